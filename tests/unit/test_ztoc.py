"""SOCI zTOC: flatbuffers round trip, validation of hostile input, the tar scanner, and files
reproduced through the zTOC byte for byte as `tar -x` extracts them.

No independent zTOC producer is installable here (soci is neither in Debian nor on PyPI),
so compatibility rests on the schema (proto/ztoc.fbs, copied field for field from soci's),
the checkpoint cross-check against zran.c in test_gzip_index.py, and the layout tests below.
"""

from __future__ import annotations

import filecmp
import io
import random
import shutil
import subprocess
import sys
import tarfile
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import flatbuffers  # type: ignore[import-untyped]
import pytest

from snapshotter.formats import gzip_index as gi
from snapshotter.formats import ztoc as Z
from snapshotter.formats.tar import format_time, parse_time
from snapshotter.formats.errors import FormatError
from snapshotter.formats.ztoc_fbs.ztoc import CompressionInfo as fb_compression_info
from snapshotter.formats.ztoc_fbs.ztoc import Ztoc as fb_ztoc
from snapshotter.layers.tree import EntryType, build_tree
from tests.unit.test_gzip_index import (
    SPAN,
    Layer,
    _synthetic_blocks,
    build_corpus,
    chunks,
)

REPO = Path(__file__).resolve().parents[2]
GZIP = Z.CompressionAlgorithm.GZIP
UNCOMPRESSED = Z.CompressionAlgorithm.UNCOMPRESSED


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Layer]:
    return build_corpus(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def extracted(corpus: list[Layer], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus tar as GNU tar extracts it."""
    out = tmp_path_factory.mktemp("tar-x")
    subprocess.run(["tar", "-x", "-C", str(out)], input=corpus[0].tar, check=True)
    return out


@pytest.fixture(scope="session")
def ztocs(corpus: list[Layer]) -> dict[str, bytes]:
    built = {layer.name: Z.build_ztoc(chunks(layer.blob, 1 << 20), SPAN, len(layer.blob)) for layer in corpus}
    built["tar"] = Z.build_ztoc(chunks(corpus[0].tar, 1 << 20), SPAN, compression=UNCOMPRESSED)
    return built


def _blob(corpus: list[Layer], name: str) -> bytes:
    return corpus[0].tar if name == "tar" else next(x.blob for x in corpus if x.name == name)


# --------------------------------------------------------------------------- generated code

def test_generated_flatbuffers_code_is_current(tmp_path: Path) -> None:
    if shutil.which("flatc") is None:
        pytest.fail("flatc is needed to check snapshotter/formats/ztoc_fbs: apt-get install flatbuffers-compiler",
                    pytrace=False)
    out = tmp_path / "ztoc_fbs"
    subprocess.run([sys.executable, str(REPO / "proto" / "generate_ztoc.py"), "--out", str(out)], check=True)
    committed = REPO / "snapshotter" / "formats" / "ztoc_fbs"
    generated = sorted(p.relative_to(out) for p in out.rglob("*.py"))
    existing = sorted(p.relative_to(committed) for p in committed.rglob("*.py"))
    assert generated == existing, "run `python proto/generate_ztoc.py`: the set of generated files changed"
    stale = [str(p) for p in generated if not filecmp.cmp(out / p, committed / p, shallow=False)]
    assert not stale, f"run `python proto/generate_ztoc.py`: stale generated files {stale}"


# --------------------------------------------------------------------------- round trip and layout

def _sample_ztoc() -> Z.Ztoc:
    cps = [gi.Checkpoint(23, 0, 0, bytes(32768)), gi.Checkpoint(9000, 70000, 6, bytes(range(256)) * 128)]
    return Z.Ztoc(
        version="0.9", build_tool_identifier="test", compressed_archive_size=20000, uncompressed_archive_size=90624,
        entries=[
            Z.FileMetadata("./", "dir", 512, 0, mode=0o755, mod_time="2024-01-02T03:04:05Z"),
            Z.FileMetadata("./caf\u00e9 \udcff.bin", "reg", 1536, 70000, mode=0o4755, uid=1 << 31, gid=7,
                           uname="u", gname="g", mod_time="2024-01-02T03:04:05.123456789Z",
                           xattrs={"SCHILY.xattr.security.capability": b"\x01\x00\x00\x02\xff\x00",
                                   "SCHILY.xattr.user.a": b"", "path": b"./caf\xc3\xa9"}),
            Z.FileMetadata("./link", "hardlink", 72192, 0, linkname="./caf\u00e9 \udcff.bin"),
            Z.FileMetadata("./dev", "char", 72704, 0, devmajor=1, devminor=3, mode=0o666),
        ],
        compression=Z.CompressionInfo(GZIP, 1, ["sha256:" + "a" * 64, "sha256:" + "b" * 64],
                                      gi.encode_checkpoints(65536, cps)),
    )


def test_round_trip_of_every_field() -> None:
    z = _sample_ztoc()
    data = Z.serialize_ztoc(z)
    parsed = Z.parse_ztoc(data)
    assert parsed == z
    assert Z.serialize_ztoc(parsed) == data
    assert Z.ztoc_digest(data).startswith("sha256:") and len(Z.ztoc_digest(data)) == 71


def test_round_trip_of_built_ztocs(ztocs: dict[str, bytes]) -> None:
    for name, data in ztocs.items():
        z = Z.parse_ztoc(data)
        assert Z.serialize_ztoc(z) == data, name
        assert z.version == "0.9" and z.build_tool_identifier == Z.DEFAULT_BUILD_TOOL


def test_gzip_is_the_default_when_the_field_is_absent() -> None:
    """The Go writer leaves the enum out for gzip (its default), so a reader must default to it."""
    data = Z.serialize_ztoc(_sample_ztoc())
    ci = fb_ztoc.Ztoc.GetRootAs(data, 0).CompressionInfo()
    assert ci._tab.Offset(4) == 0
    assert Z.parse_ztoc(data).compression.algorithm == GZIP


def test_checkpoint_blob_in_a_built_ztoc_has_the_documented_layout(corpus: list[Layer],
                                                                  ztocs: dict[str, bytes]) -> None:
    for layer in corpus:
        z = Z.parse_ztoc(ztocs[layer.name])
        n = z.compression.max_span_id + 1
        assert len(z.compression.checkpoints) == 12 + n * 32785
        assert len(z.compression.span_digests) == n
        assert z.compressed_archive_size == len(layer.blob)
        assert z.uncompressed_archive_size <= len(layer.tar)


def test_uncompressed_layers_carry_a_tar_zinfo(corpus: list[Layer], ztocs: dict[str, bytes]) -> None:
    z = Z.parse_ztoc(ztocs["tar"])
    tar = corpus[0].tar
    assert z.compression.algorithm == UNCOMPRESSED
    assert Z.parse_tar_zinfo(z.compression.checkpoints) == Z.TarZinfo(2, SPAN, len(tar))
    assert z.compression.max_span_id == (len(tar) + SPAN - 1) // SPAN - 1
    spans = Z.span_index(z)
    for i in range(spans.max_span_id + 1):
        span = spans.span(i)
        assert span.compressed_start == span.uncompressed_start == i * SPAN
        assert span.compressed_end == span.uncompressed_end == min((i + 1) * SPAN, len(tar))
        gi.verify_span(tar[span.compressed_start:span.compressed_end], z.compression.span_digests[i])


def test_tar_spans_when_the_size_is_a_multiple_of_the_span() -> None:
    tar = _tar([_reg("a", b"x" * 1000)], tarfile.GNU_FORMAT)
    tar += bytes(4096 - len(tar) % 4096)
    z = Z.parse_ztoc(Z.build_ztoc([tar], 4096, compression=UNCOMPRESSED))
    assert z.compression.max_span_id == len(tar) // 4096 - 1
    assert Z.spans_for(z, 0, len(tar))[-1].compressed_end == len(tar)


# --------------------------------------------------------------------------- hostile input

def test_truncated_ztocs_are_format_errors() -> None:
    data = Z.serialize_ztoc(_sample_ztoc())
    lengths = [*range(4096), *range(4096, len(data), 257), *range(len(data) - 64, len(data))]
    for n in lengths:
        with pytest.raises(FormatError):
            Z.parse_ztoc(data[:n])


def test_garbage_is_a_format_error() -> None:
    rng = random.Random(11)
    for n in [0, 1, 4, 7, 8, 16, 64, 1000, 70000]:
        for _ in range(20):
            with pytest.raises(FormatError):
                Z.parse_ztoc(rng.randbytes(n))
    with pytest.raises(FormatError):
        Z.parse_ztoc(b"\xff" * 4096)  # every offset and length at its maximum


def test_flipped_bytes_give_a_format_error_or_a_valid_ztoc() -> None:
    data = Z.serialize_ztoc(_sample_ztoc())
    rng = random.Random(12)
    outcomes = set()
    for _ in range(400):
        mutated = bytearray(data)
        mutated[rng.randrange(len(data) - 32768 - 12) if rng.random() < 0.8 else rng.randrange(len(data))] ^= \
            1 << rng.randrange(8)
        try:
            Z.parse_ztoc(bytes(mutated))
            outcomes.add("parsed")
        except FormatError:
            outcomes.add("error")
    assert "error" in outcomes


def test_a_huge_vector_length_fails_fast() -> None:
    """flatbuffers' own reader would loop over 4 billion entries; the verifier refuses first."""
    z = _sample_ztoc()
    data = bytearray(Z.serialize_ztoc(z))
    toc = fb_ztoc.Ztoc.GetRootAs(bytes(data), 0).Toc()
    o = toc._tab.Offset(4)
    vector = toc._tab.Vector(o) - 4
    data[vector:vector + 4] = b"\xff\xff\xff\x7f"
    with pytest.raises(FormatError, match="run past"):
        Z.parse_ztoc(bytes(data))


def _one_more_digest(c: Z.CompressionInfo) -> None:
    c.span_digests.append("sha256:" + "c" * 64)
    c.max_span_id = 2


def _with(mutate: Callable[[Z.Ztoc], None]) -> bytes:
    z = _sample_ztoc()
    mutate(z)
    return Z.serialize_ztoc(z)


@pytest.mark.parametrize("mutate, message", [
    (lambda z: setattr(z, "version", "1.0"), "version"),
    (lambda z: setattr(z.compression, "max_span_id", 2), "span digests"),
    (lambda z: z.compression.span_digests.pop(), "span digests"),
    (lambda z: setattr(z.compression, "max_span_id", -1), "span digests"),
    (lambda z: _one_more_digest(z.compression), "describe 2 spans"),
    (lambda z: setattr(z.compression, "span_digests", ["sha256:00", "sha256:" + "b" * 64]), "not a sha256"),
    (lambda z: setattr(z.compression, "checkpoints", z.compression.checkpoints[:-1]), "fits neither"),
    (lambda z: setattr(z.compression, "checkpoints", b""), "shorter than"),
    (lambda z: setattr(z, "compressed_archive_size", 100), "past the end"),
    (lambda z: setattr(z, "compressed_archive_size", -1), "negative"),
    (lambda z: setattr(z.entries[1], "type", "sparse"), "unknown type"),
    (lambda z: setattr(z.entries[1], "uncompressed_size", 1 << 40), "runs past"),
    (lambda z: setattr(z.entries[2], "uncompressed_offset", 1536 + 512), "overlaps"),
    (lambda z: setattr(z.compression, "algorithm", UNCOMPRESSED), "TarZinfo"),
])
def test_inconsistent_ztocs_are_format_errors(mutate: Callable[[Z.Ztoc], None], message: str) -> None:
    with pytest.raises(FormatError, match=message):
        Z.parse_ztoc(_with(mutate))


def test_unknown_compression_algorithm() -> None:
    z = _sample_ztoc()
    z.compression.algorithm = 3  # type: ignore[assignment]
    with pytest.raises(FormatError, match="compression algorithm 3"):
        Z.parse_ztoc(Z.serialize_ztoc(z))


def test_missing_compression_info() -> None:
    b = flatbuffers.Builder(64)
    version = b.CreateString("0.9")
    fb_ztoc.Start(b)
    fb_ztoc.AddVersion(b, version)
    b.Finish(fb_ztoc.End(b))
    with pytest.raises(FormatError, match="no compression_info"):
        Z.parse_ztoc(bytes(b.Output()))


def test_a_zero_checkpoint_blob_with_max_span_id_0() -> None:
    b = flatbuffers.Builder(64)
    version = b.CreateString("0.9")
    digest = b.CreateString("sha256:" + "a" * 64)
    fb_compression_info.StartSpanDigestsVector(b, 1)
    b.PrependUOffsetTRelative(digest)
    digests = b.EndVector()
    fb_compression_info.Start(b)
    fb_compression_info.AddSpanDigests(b, digests)
    info = fb_compression_info.End(b)
    fb_ztoc.Start(b)
    fb_ztoc.AddVersion(b, version)
    fb_ztoc.AddCompressionInfo(b, info)
    b.Finish(fb_ztoc.End(b))
    with pytest.raises(FormatError, match="checkpoint blob"):
        Z.parse_ztoc(bytes(b.Output()))


def test_soci_prefetch_trailer_is_ignored() -> None:
    data = Z.serialize_ztoc(_sample_ztoc())
    assert Z.parse_ztoc(data + b'---SOCI-PREFETCH---[{"path":"/bin/sh"}]') == _sample_ztoc()


# --------------------------------------------------------------------------- tar scanning

def _reg(name: str, data: bytes, **attrs: object) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def _special(name: str, kind: bytes, **attrs: object) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, None


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def _tricky_members(fmt: int) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    long_dir = "d/" + "long-directory-name-" * 4
    members = [
        _special("d/", tarfile.DIRTYPE, mode=0o755, mtime=1_700_000_000),
        _reg("d/empty", b""),
        _reg("d/exact-512", b"y" * 512, mode=0o600, uid=1000, gid=1001, uname="alice", gname="staff"),
        _reg(long_dir + "/" + "f" * 90, b"long name data " * 100, mtime=1_600_000_000),
        _special("d/sym", tarfile.SYMTYPE, linkname="../" + "t" * 150 if fmt != tarfile.USTAR_FORMAT else "exact-512"),
        _special("d/hard", tarfile.LNKTYPE, linkname="d/exact-512"),
        _special("d/fifo", tarfile.FIFOTYPE, mode=0o644),
        _special("d/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
        _special("d/sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660),
        _reg("d/big-uid", b"z" * 3000, uid=3_000_000, gid=4_000_000),
    ]
    if fmt == tarfile.PAX_FORMAT:
        xattr = _reg("d/xattr", b"x" * 700)
        xattr[0].pax_headers = {"SCHILY.xattr.user.note": "hello", "SCHILY.xattr.security.selinux": "s0\x00",
                                "comment": "not an xattr", "mtime": "1700000000.25"}
        members.append(xattr)
        members.append(_reg("d/caf\u00e9-\u00fc", b"unicode"))
    return members


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_scanner_agrees_with_tarfile(fmt: int) -> None:
    members = _tricky_members(fmt)
    if fmt == tarfile.USTAR_FORMAT:
        members = [m for m in members if "uid" not in m[0].name]
    tar = _tar(members, fmt)
    scanner = Z.TarScanner()
    for i in range(len(tar)):  # byte at a time: chunking must not matter
        scanner.feed(tar[i:i + 1])
    entries, size = scanner.finish()
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        infos = archive.getmembers()
    assert len(entries) == len(infos)
    end_of_archive = infos[-1].offset_data + (infos[-1].size + 511) // 512 * 512 if infos[-1].isreg() else \
        infos[-1].offset_data
    assert size == end_of_archive + 1024
    for e, m in zip(entries, infos, strict=True):
        assert e.name.rstrip("/") == m.name
        assert e.uncompressed_offset == m.offset_data
        assert e.uncompressed_size == m.size
        assert (e.mode, e.uid, e.gid, e.uname, e.gname) == (m.mode, m.uid, m.gid, m.uname, m.gname)
        assert (e.linkname, e.devmajor, e.devminor) == (m.linkname, m.devmajor, m.devminor)
        assert abs(parse_time(e.mod_time, "t") - m.mtime * 1_000_000_000) < 1000
        assert {k: v.decode("utf-8", "surrogateescape") for k, v in e.xattrs.items()} == m.pax_headers
        assert e.type == {tarfile.REGTYPE: "reg", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
                          tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block",
                          tarfile.FIFOTYPE: "fifo"}[m.type]


def test_tar_scanner_on_the_real_corpus(corpus: list[Layer], ztocs: dict[str, bytes]) -> None:
    """GNU tar's output: entries match tarfile's view, and the size stops after the end-of-archive blocks."""
    tar = corpus[0].tar
    z = Z.parse_ztoc(ztocs["gzip6"])
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        infos = archive.getmembers()
    assert [(e.name.rstrip("/"), e.uncompressed_offset, e.uncompressed_size) for e in z.entries] == \
        [(m.name, m.offset_data, m.size) for m in infos]
    last = z.entries[-1]
    end_of_archive = last.uncompressed_offset + (last.uncompressed_size + 511) // 512 * 512
    # Go's reader stops after the two zero blocks, before GNU tar's padding to 10 KiB records.
    assert z.uncompressed_archive_size == end_of_archive + 1024 <= len(tar)
    assert tar[end_of_archive:].count(0) == len(tar) - end_of_archive


@pytest.mark.parametrize("tar, message", [
    (b"x" * 512, "checksum"),
    (_tar([_reg("a", b"1234")], tarfile.GNU_FORMAT)[:700], "truncated"),
    (_tar([_reg("a", b"1234")], tarfile.GNU_FORMAT)[:300], "truncated"),
    (bytes(512) + _tar([_reg("a", b"1")], tarfile.GNU_FORMAT), "zero block followed by data"),
    (_tar([_special("c", b"7")], tarfile.GNU_FORMAT), "unsupported tar entry type"),
    (_tar([_special("s", tarfile.GNUTYPE_SPARSE)], tarfile.GNU_FORMAT), "unsupported tar entry type"),
])
def test_tar_scanner_rejects(tar: bytes, message: str) -> None:
    scanner = Z.TarScanner()
    with pytest.raises(FormatError, match=message):
        scanner.feed(tar)
        scanner.finish()


def test_tar_scanner_rejects_malformed_pax() -> None:
    good = _tar([_reg("a", b"1")], tarfile.PAX_FORMAT)
    info = tarfile.TarInfo("x")
    info.type = tarfile.XHDTYPE
    info.size = 12
    bad = info.tobuf(tarfile.USTAR_FORMAT) + b"99 path=abc\n".ljust(512, b"\0") + good
    with pytest.raises(FormatError, match="PAX"):
        Z.TarScanner().feed(bad)


def test_global_pax_headers_are_skipped() -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "git"}) as tar:
        info = tarfile.TarInfo("a")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    scanner = Z.TarScanner()
    scanner.feed(out.getvalue())
    entries, _ = scanner.finish()
    assert [e.name for e in entries] == ["a"]


# --------------------------------------------------------------------------- entries and files

def test_layer_entries_build_the_tree_tar_would() -> None:
    tar = _tar(_tricky_members(tarfile.PAX_FORMAT), tarfile.PAX_FORMAT)
    z = Z.parse_ztoc(Z.build_ztoc([zlib.compress(tar, wbits=31)], 4096))
    entries = {e.path: e for e in Z.layer_entries(z)}
    assert entries["d"].type == EntryType.DIR and entries["d"].mtime_ns == 1_700_000_000 * 10**9
    xattr = entries["d/xattr"]
    assert xattr.xattrs == {"user.note": b"hello", "security.selinux": b"s0\x00"}
    assert xattr.mtime_ns == 1_700_000_000_250_000_000
    assert entries["d/hard"].type == EntryType.HARDLINK and entries["d/hard"].link_name == "d/exact-512"
    assert entries["d/null"].type == EntryType.CHAR and (entries["d/null"].dev_major, entries["d/null"].dev_minor) == (1, 3)
    assert entries["d/sym"].link_name == "../" + "t" * 150
    exact = entries["d/exact-512"]
    assert (exact.mode, exact.uid, exact.gid, exact.size) == (0o600, 1000, 1001, 512)
    assert isinstance(exact.content, Z.FileExtent) and tar[exact.content.uncompressed_offset:exact.content.end] == b"y" * 512
    tree = build_tree(Z.layer_entries(z))
    node = tree.resolve("d/hard")
    assert node is not None and node.nlink == 2
    blob = zlib.compress(tar, wbits=31)
    z = Z.parse_ztoc(Z.build_ztoc([blob], 4096))
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        for e in Z.layer_entries(z):
            if e.type == EntryType.REG:
                member = archive.extractfile(archive.getmember(e.path))
                assert member is not None and Z.extract_file(z, e.content, blob) == member.read()


def test_every_file_equals_tar_x(corpus: list[Layer], ztocs: dict[str, bytes], extracted: Path) -> None:
    for name, data in ztocs.items():
        z = Z.parse_ztoc(data)
        blob = _blob(corpus, name)
        spans = Z.span_index(z)
        files = 0
        for entry in Z.layer_entries(z):
            if entry.type != EntryType.REG:
                continue
            assert Z.extract_file(z, entry.content, blob, spans) == (extracted / entry.path).read_bytes(), \
                (name, entry.path)
            files += 1
        assert files > 400, name


def test_extract_file_refuses_a_tampered_blob(corpus: list[Layer], ztocs: dict[str, bytes]) -> None:
    layer = next(x for x in corpus if x.name == "gzip6")
    z = Z.parse_ztoc(ztocs["gzip6"])
    entry = max((e for e in Z.layer_entries(z) if e.type == EntryType.REG), key=lambda e: e.size)
    span = Z.spans_for(z, entry.content.uncompressed_offset, entry.content.end)[0]
    tampered = bytearray(layer.blob)
    tampered[span.compressed_end - 1] ^= 0x40
    with pytest.raises(FormatError, match="span digest mismatch"):
        Z.extract_file(z, entry.content, bytes(tampered))
    with pytest.raises(FormatError, match="blob is"):
        Z.extract_file(z, entry.content, layer.blob[:-1])


def test_build_ztoc_checks_the_blob_size(corpus: list[Layer]) -> None:
    layer = corpus[0]
    with pytest.raises(FormatError, match="expected"):
        Z.build_ztoc([layer.blob], SPAN, len(layer.blob) + 1)
    with pytest.raises(FormatError, match="empty"):
        Z.build_ztoc([], SPAN)
    with pytest.raises(FormatError, match="checksum"):
        Z.build_ztoc([zlib.compress(b"not a tar " * 100, wbits=31)], SPAN)


# --------------------------------------------------------------------------- times

@pytest.mark.parametrize("ns, text", [
    (0, "1970-01-01T00:00:00Z"),
    (1_700_000_000_250_000_000, "2023-11-14T22:13:20.25Z"),
    (1_700_000_000_000_000_001, "2023-11-14T22:13:20.000000001Z"),
    (-1_000_000_000, "1969-12-31T23:59:59Z"),
])
def test_mod_time_text(ns: int, text: str) -> None:
    assert format_time(ns) == text
    assert parse_time(text, "t") == ns


def test_mod_time_parsing() -> None:
    assert parse_time("2023-11-14T23:13:20+01:00", "t") == 1_700_000_000 * 10**9
    assert parse_time("", "t") == 0
    assert format_time(10**30) == ""
    for bad in ("yesterday", "2023-13-01T00:00:00Z", "2023-11-14 22:13:20Z"):
        with pytest.raises(FormatError):
            parse_time(bad, "mod_time")


def test_ztoc_builder_memory_is_bounded() -> None:
    """A 64 MiB tar streamed as gzip: the builder keeps headers and a 32 KiB window, never file data."""
    blocks = _synthetic_blocks(4)
    headers = []
    for i in range(64):
        info = tarfile.TarInfo(f"data/file-{i:02d}.bin")
        info.size = len(blocks[i % 4])
        headers.append(info.tobuf(tarfile.GNU_FORMAT))
    builder = Z.ZtocBuilder(1 << 22)
    tracemalloc.start()
    try:
        compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
        for i in range(64):
            builder.feed(compressor.compress(headers[i]))
            builder.feed(compressor.compress(blocks[i % 4]))
        builder.feed(compressor.compress(bytes(1024)) + compressor.flush())
        z = builder.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(z.entries) == 64 and z.uncompressed_archive_size == 64 * (512 + (1 << 20)) + 1024
    checkpoints = len(z.compression.checkpoints)
    assert peak < 2 * checkpoints + (6 << 20), (peak, checkpoints)
