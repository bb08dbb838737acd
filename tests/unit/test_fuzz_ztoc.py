"""Property-based fuzzing of SOCI's formats (issue 14): the zTOC flatbuffer, its gzip checkpoint
blob and span geometry, span inflation, the zTOC builder, and the streaming tar scanner.

Properties: every parser returns a result or raises `FormatError` within the time bound;
a tree built from an accepted zTOC has no path outside the layer; a file extracted through
an accepted zTOC equals what Python's tarfile reads; the tar scanner finds the members and
data offsets tarfile finds.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import zlib
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from snapshotter.formats import gzip_index as gi
from snapshotter.formats import ztoc as Z
from snapshotter.formats.tar import TarScanner, clean_path
from snapshotter.layers.tree import build_tree
from tests.harness.images import Dir, File, Hardlink, Symlink, layer_tar
from tests.unit.fuzzing import (check_tree, examples, hostile_ints, hostile_names, mutated, parse_or_refuse,
                                tar_streams, writable)

SHA = "sha256:" + "0" * 64
WINDOW = bytes(gi.WINDOW_SIZE)


def _gzip(data: bytes, level: int = 6) -> bytes:
    return gzip.compress(data, compresslevel=level, mtime=0)


SAMPLE_ENTRIES = [Dir("a"), File("a/f", b"hello world\n" * 50), File("a/g", bytes(range(256)) * 20),
                  Symlink("a/s", "../etc/passwd"), Hardlink("a/h", "a/f"), File("b", b"")]
SAMPLE_TAR = layer_tar(SAMPLE_ENTRIES)
SAMPLE_GZ = _gzip(SAMPLE_TAR)
SAMPLE_ZTOCS = {
    "gzip": (SAMPLE_GZ, Z.build_ztoc([SAMPLE_GZ], span_size=1024)),
    "tar": (SAMPLE_TAR, Z.build_ztoc([SAMPLE_TAR], span_size=700, compression=Z.CompressionAlgorithm.UNCOMPRESSED)),
}


def _reference(tar: bytes) -> dict[int, bytes]:
    """Regular files' bytes by their data offset in the tar, as tarfile reads them."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        for member in archive:
            if member.isreg():
                extracted = archive.extractfile(member)
                assert extracted is not None
                out[member.offset_data] = extracted.read()
    return out


def _check_accepted(z: Any) -> None:
    entries = parse_or_refuse(Z.layer_entries, z)
    if entries is not None:
        tree = parse_or_refuse(build_tree, entries)
        if tree is not None:
            check_tree(tree)
    index = parse_or_refuse(Z.span_index, z)
    if index is not None:
        for start, end in ((0, z.uncompressed_archive_size), (0, 1), (z.uncompressed_archive_size // 2,
                                                                      z.uncompressed_archive_size)):
            spans = parse_or_refuse(index.spans_for, start, end)
            for span in spans or []:
                assert 0 <= span.id <= z.compression.max_span_id
                assert span.compressed_start <= span.compressed_end <= z.compressed_archive_size or \
                    span.checkpoint is not None


# --------------------------------------------------------------------------- flatbuffer bytes

@examples(1.0)
@given(data=st.one_of(st.binary(max_size=400), mutated(SAMPLE_ZTOCS["tar"][1]),
                      mutated(SAMPLE_ZTOCS["gzip"][1]).map(lambda b: b[:4000] if len(b) > 40000 else b),
                      mutated(SAMPLE_ZTOCS["gzip"][1])))
def test_ztoc_bytes(data: bytes) -> None:
    z = parse_or_refuse(Z.parse_ztoc, data)
    if z is not None:
        _check_accepted(z)


@examples(1.0)
@given(data=st.one_of(st.binary(max_size=100), mutated(Z.serialize_tar_zinfo(Z.TarZinfo(2, 4096, 10000)))))
def test_tar_zinfo_bytes(data: bytes) -> None:
    parse_or_refuse(Z.parse_tar_zinfo, data)


# --------------------------------------------------------------------------- records with hostile fields

def _metadata() -> st.SearchStrategy[Z.FileMetadata]:
    i64 = st.one_of(st.integers(0, 20000), hostile_ints())
    return st.builds(
        Z.FileMetadata,
        name=hostile_names().filter(writable),
        type=st.sampled_from(["reg", "dir", "symlink", "hardlink", "char", "block", "fifo", "chunk", "", "x\udcff"]),
        uncompressed_offset=i64, uncompressed_size=i64,
        linkname=hostile_names(3).filter(writable), mode=hostile_ints(), uid=hostile_ints(32, signed=False),
        gid=hostile_ints(32, signed=False), mod_time=st.sampled_from(["", "2023-11-14T22:13:20Z", "bad",
                                                                       "0000-01-01T00:00:00Z"]),
        devmajor=hostile_ints(), devminor=hostile_ints(),
        xattrs=st.dictionaries(st.sampled_from(["SCHILY.xattr.user.a", "SCHILY.xattr.", "SCHILY.xattr.a\x00b",
                                                "SCHILY.xattr.trusted.overlay.opaque", "path", "\udcff"]),
                               st.binary(max_size=8), max_size=3),
    )


@st.composite
def _checkpoint_blobs(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 5)) == 0:
        return draw(st.binary(max_size=64))
    points = draw(st.lists(st.tuples(st.one_of(st.integers(0, 5000), hostile_ints()),
                                     st.one_of(st.integers(0, 50000), hostile_ints()), st.integers(0, 255)),
                           min_size=1, max_size=3))
    blob = gi.checkpoints._HEADER.pack(len(points), draw(st.one_of(st.integers(0, 1 << 20), hostile_ints())))
    blob += b"".join(gi.checkpoints._POINT.pack(i, o, b) + WINDOW for i, o, b in points)
    if draw(st.booleans()):  # the legacy layout: checkpoint 0 left out
        blob = blob[:gi.BLOB_HEADER_SIZE] + blob[gi.BLOB_HEADER_SIZE + gi.CHECKPOINT_SIZE:]
    return blob


@st.composite
def ztoc_records(draw: st.DrawFn) -> Z.Ztoc:
    algorithm = draw(st.sampled_from(list(Z.CompressionAlgorithm)))
    if algorithm is Z.CompressionAlgorithm.UNCOMPRESSED:
        zinfo = Z.TarZinfo(draw(st.integers(-1, 3)), draw(st.one_of(st.integers(-1, 5000), hostile_ints())),
                           draw(st.one_of(st.integers(0, 50000), hostile_ints())))
        checkpoints = Z.serialize_tar_zinfo(zinfo) if draw(st.integers(0, 4)) else draw(st.binary(max_size=40))
    else:
        checkpoints = draw(_checkpoint_blobs())
    max_span_id = draw(st.one_of(st.integers(-1, 4), hostile_ints(32)))
    count = max_span_id + 1 if 0 <= max_span_id < 5 and draw(st.integers(0, 5)) else draw(st.integers(0, 3))
    digests = [draw(st.sampled_from([SHA, SHA, "sha256:", "md5:1", ""])) for _ in range(count)]
    size = st.one_of(st.integers(0, 50000), hostile_ints())
    return Z.Ztoc(version=draw(st.sampled_from(["0.9", "0.9", "0.8", ""])), build_tool_identifier="fuzz",
                  compressed_archive_size=draw(size), uncompressed_archive_size=draw(size),
                  entries=draw(st.lists(_metadata(), max_size=8)),
                  compression=Z.CompressionInfo(algorithm, max_span_id, digests, checkpoints))


@examples(1.0)
@given(z=ztoc_records())
@example(z=Z.Ztoc("0.9", "t", 100, 2048, [Z.FileMetadata("c", "char", 512, 0, devmajor=1 << 40)],
                  Z.CompressionInfo(Z.CompressionAlgorithm.UNCOMPRESSED, 0, [SHA],
                                    Z.serialize_tar_zinfo(Z.TarZinfo(2, 4096, 100)))))
@example(z=Z.Ztoc("0.9", "t", 100, 2048, [Z.FileMetadata("a\udcffb", "reg", 512, 4)],
                  Z.CompressionInfo(Z.CompressionAlgorithm.UNCOMPRESSED, 0, [SHA],
                                    Z.serialize_tar_zinfo(Z.TarZinfo(2, 4096, 100)))))
def test_ztoc_records(z: Z.Ztoc) -> None:
    try:
        data = Z.serialize_ztoc(z)
    except (ValueError, OverflowError, UnicodeError):
        return  # the writer cannot hold it (a number past its field's width): no zTOC to parse
    parsed = parse_or_refuse(Z.parse_ztoc, data)
    if parsed is not None:
        assert parsed.entries == z.entries
        _check_accepted(parsed)


# --------------------------------------------------------------------------- files through spans

@examples(0.5)
@given(kind=st.sampled_from(sorted(SAMPLE_ZTOCS)), blob=st.data())
def test_extract_file_from_hostile_blob(kind: str, blob: st.DataObject) -> None:
    original, ztoc_bytes = SAMPLE_ZTOCS[kind]
    data = blob.draw(st.one_of(st.just(original), mutated(original)))
    z = Z.parse_ztoc(ztoc_bytes)
    reference = _reference(SAMPLE_TAR)
    for entry in Z.layer_entries(z):
        if entry.content is not None:
            got = parse_or_refuse(Z.extract_file, z, entry.content, data)
            if got is not None:
                assert got == reference[entry.content.uncompressed_offset]
            elif data == original:
                raise AssertionError(f"{entry.path} not extracted from the untouched blob")


@examples(1.0)
@given(compressed=st.one_of(st.binary(max_size=300), mutated(SAMPLE_GZ[:2000])),
       cp=st.tuples(st.integers(0, 20), st.integers(0, 100), st.integers(0, 7)),
       sizes=st.tuples(st.integers(0, 5000), st.integers(0, 5000)))
def test_inflate_span(compressed: bytes, cp: tuple[int, int, int], sizes: tuple[int, int]) -> None:
    in_, out, bits = cp
    checkpoint = gi.Checkpoint(max(in_, 1 if bits else 0), out, bits, WINDOW)
    span = gi.Span(0, checkpoint.compressed_start, checkpoint.compressed_start + len(compressed), out,
                   out + sizes[0], checkpoint)
    data = parse_or_refuse(gi.inflate_span, compressed, span)
    if data is not None:
        assert len(data) == sizes[0]


@examples(1.0)
@given(blob=_checkpoint_blobs(), sizes=st.tuples(st.integers(0, 50000), st.integers(0, 50000)),
       ranges=st.lists(st.tuples(st.integers(-5, 60000), st.integers(-5, 60000)), max_size=4))
def test_checkpoint_table(blob: bytes, sizes: tuple[int, int], ranges: list[tuple[int, int]]) -> None:
    table = parse_or_refuse(gi.CheckpointTable, blob)
    if table is None:
        return
    index = parse_or_refuse(gi.GzipSpanIndex, table, *sizes)
    if index is None:
        return
    for start, end in ranges:
        for span in parse_or_refuse(index.spans_for, start, end) or []:
            assert span.uncompressed_start <= span.uncompressed_end
            assert 0 <= span.compressed_start


# --------------------------------------------------------------------------- building from hostile layers

@examples(0.5)
@given(tar=tar_streams(), gz=st.booleans(), split=st.integers(1, 4096), span=st.sampled_from([64, 1024, 1 << 20]),
       mutate=st.data())
def test_build_ztoc_from_hostile_layer(tar: bytes, gz: bool, split: int, span: int, mutate: st.DataObject) -> None:
    blob = _gzip(tar, 1) if gz else tar
    if mutate.draw(st.integers(0, 3)) == 0:
        blob = mutate.draw(mutated(blob))
    chunks = [blob[i:i + split] for i in range(0, len(blob), split)]
    algorithm = Z.CompressionAlgorithm.GZIP if gz else Z.CompressionAlgorithm.UNCOMPRESSED
    data = parse_or_refuse(Z.build_ztoc, chunks, span, compression=algorithm)
    if data is not None:
        z = Z.parse_ztoc(data)  # what we build, we read back
        _check_accepted(z)


@examples(1.0)
@given(blob=st.one_of(st.binary(max_size=200), mutated(_gzip(b"abc" * 1000)), mutated(_gzip(b"x") + _gzip(b"y"))),
       split=st.integers(1, 512))
def test_gzip_index_builder(blob: bytes, split: int) -> None:
    index = parse_or_refuse(gi.build_gzip_index, [blob[i:i + split] for i in range(0, len(blob), split)], 128)
    if index is not None:
        assert len(index.span_digests) == len(index.checkpoints)
        assert index.compressed_size <= len(blob)


# --------------------------------------------------------------------------- tar scanner

def _scan(tar: bytes, split: int) -> tuple[list[Any], int] | None:
    def run() -> tuple[list[Any], int]:
        scanner = TarScanner()
        for i in range(0, len(tar), split):
            scanner.feed(tar[i:i + split])
        return scanner.finish()
    return parse_or_refuse(run)


@examples(1.0)
@given(tar=st.one_of(tar_streams(), tar_streams().flatmap(mutated), st.binary(max_size=1500)),
       split=st.integers(1, 2000))
@example(tar=b"5001 " + b"1" * 4996 + b"x", split=512)
def test_tar_scanner_hostile(tar: bytes, split: int) -> None:
    found = _scan(tar, split)
    if found is not None:
        entries, size = found
        assert size <= len(tar)
        for e in entries:
            assert 0 <= e.uncompressed_offset <= size and e.uncompressed_size >= 0


def _pax_record(body: bytes, zeros: int = 0) -> bytes:
    """`<len> key=value\\n` with `body` = b" key=value\\n": the length counts its own digits (and `zeros`)."""
    length = len(body) + zeros + 1
    while length != len(body) + zeros + len(str(length)):
        length = len(body) + zeros + len(str(length))
    return b"0" * zeros + str(length).encode() + body


def _pax_record_header(records: bytes) -> bytes:
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = len(records)
    return info.tobuf(tarfile.USTAR_FORMAT) + records + b"\0" * (-len(records) % 512)


@examples(0.5)
@given(records=st.lists(st.one_of(
    st.sampled_from([b"size", b"uid", b"gid", b"mtime", b"path", b"linkpath", b"GNU.sparse.size"]).flatmap(
        lambda k: st.one_of(st.just(b"9" * 5000), st.just(b"-" + b"1" * 5000), st.just(b"1." + b"0" * 5000),
                            st.binary(max_size=20)).map(lambda v: b" " + k + b"=" + v + b"\n")),
    st.binary(max_size=30)), max_size=3), length_digits=st.sampled_from([0, 0, 5000]))
@example(records=[b" size=" + b"9" * 5000 + b"\n"], length_digits=0)
@example(records=[b" mtime=" + b"9" * 5000 + b"\n"], length_digits=0)
@example(records=[b" uid=" + b"9" * 5000 + b"\n"], length_digits=0)
@example(records=[b" x=y\n"], length_digits=5000)
def test_tar_scanner_pax_numbers(records: list[bytes], length_digits: int) -> None:
    """PAX records whose length or value has thousands of digits (Python refuses to parse those)."""
    data = b"".join(_pax_record(body, length_digits) for body in records)
    member = tarfile.TarInfo("f")
    tar = _pax_record_header(data) + member.tobuf(tarfile.USTAR_FORMAT) + b"\0" * 1024
    _scan(tar, 512)


AGREED_NAMES = st.lists(st.sampled_from(["a", "b", "ü", "\udcff", "x" * 120, "y" * 60]), min_size=1,
                        max_size=4).map("/".join)
"""Names tarfile and Go's reader agree on: tarfile takes a slash at the end of a GNU header's own
(truncated) name for a directory before the long name replaces it; Go looks at the long name."""


@examples(0.5)
@given(tar=tar_streams(AGREED_NAMES, hostile=False), split=st.integers(1, 3000))
def test_tar_scanner_agrees_with_tarfile(tar: bytes, split: int) -> None:
    found = _scan(tar, split)
    try:
        with tarfile.open(fileobj=io.BytesIO(tar), mode="r:", encoding="utf-8", errors="surrogateescape") as archive:
            members = archive.getmembers()
    except tarfile.TarError:
        return
    if found is None:
        return  # refused what tarfile reads: stricter than tarfile (e.g. an empty name), never looser
    entries, _ = found
    assert [(clean_path(e.name), e.uncompressed_offset) for e in entries] == \
        [(clean_path(m.name), m.offset_data) for m in members]


def test_deflate_error_is_format_error() -> None:
    """Sanity: a corrupt deflate stream in a span is a FormatError, never zlib.error."""
    cp = gi.Checkpoint(10, 0, 0, WINDOW)
    bad = zlib.compress(b"x" * 100)[2:-4][::-1]
    span = gi.Span(0, 10, 10 + len(bad), 0, 100, cp)
    assert parse_or_refuse(gi.inflate_span, bad, span) is None


def test_tar_scanner_reads_type_0_with_a_slash_as_go_does() -> None:
    """Found by the fuzzer: the scanner took a '0' member named `a/` for a directory and read its
    data as the next header; Go's reader (so soci and containerd) turns only type '\\0' with a
    slash into a directory, and skips a '0' member's data whatever its name."""
    def header(name: str, kind: bytes, size: int) -> bytes:
        info = tarfile.TarInfo(name)
        info.type, info.size = kind, size
        return info.tobuf(tarfile.USTAR_FORMAT)
    hidden = header("hidden", tarfile.REGTYPE, 0)  # a header inside a's data: not a member
    tar = (header("a/", tarfile.REGTYPE, 512) + hidden + header("b/", tarfile.AREGTYPE, 0)
           + header("c", tarfile.REGTYPE, 0) + b"\0" * 1024)
    found = _scan(tar, 512)
    assert found is not None
    assert [(e.name, e.type, e.uncompressed_offset) for e in found[0]] == [
        ("a/", "reg", 512), ("b/", "dir", 1536), ("c", "reg", 2048)]
