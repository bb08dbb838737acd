"""eStargz parsing: footers, TOCs, chunk ranges and verified inflation, over layers the tests build."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
import zlib
from itertools import pairwise
from typing import Any

import msgspec
import pytest

from snapshotter.formats.errors import FormatError
from snapshotter.formats.estargz import (
    DEFAULT_MAX_TOC_SIZE,
    FOOTER_READ_SIZE,
    FOOTER_SIZE,
    LEGACY_FOOTER_SIZE,
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_DIGEST_ANNOTATION,
    UNCOMPRESSED_SIZE_ANNOTATION,
    Footer,
    decompress_chunk,
    has_no_prefetch_landmark,
    parse_footer,
    parse_toc,
    prefetch_end,
    verify_toc,
)
from snapshotter.formats.toc import Chunk, Toc
from snapshotter.formats.toc_entries import layer_entries
from snapshotter.layers.tree import OPAQUE_XATTR, EntryType, LayerEntry, build_tree
from tests.harness.estargz import (
    EStargzLayer,
    assemble,
    build_estargz,
    encode_toc,
    extract_members,
    footer,
    gzip_member,
    toc_member,
    toc_tar,
)
from tests.harness.images import DEFAULT_MTIME, CharDev, Dir, Entry, File, Hardlink, Opaque, Symlink, Whiteout

UNICODE = "données/ünïcødé-文件.txt"
DEEP = "/".join(f"d{i}" for i in range(40))


def sample_entries() -> list[Entry]:
    """Every kind of member a layer holds, with payloads that split, pack and compress badly."""
    rnd = os.urandom
    return [
        Dir("etc"), File("etc/passwd", "root:x:0:0::/root:/bin/sh\n"),
        Dir("bin"), File("bin/tool", rnd(250_000), mode=0o4755),
        File("bin/exactly-two-chunks", rnd(200_000), mode=0o755),
        Hardlink("bin/tool-again", "bin/tool"),
        Symlink("bin/sh", "tool"), Symlink("usr-abs", "/usr/bin/env"),
        File("empty", b""),
        Dir("home"), Dir("home/u", mode=0o750, uid=1000, gid=2000),
        File("home/u/owned", "mine\n", mode=0o600, uid=1000, gid=2000),
        File("xattr.txt", "x",
             xattrs={"user.text": "v", "user.binary": b"\x00\xff\x10", "security.capability": b"\x01"}),
        File(UNICODE, "unicode\n"),
        File(f"{DEEP}/leaf", "deep\n"),
        CharDev("dev-null", 1, 3),
        *[File(f"small/{i}", f"small file {i}\n" * (i + 1)) for i in range(20)],
        Whiteout("etc/shadow"), Opaque("home"),
        File("last", rnd(1000)),
    ]


def files_of(entries: list[Entry]) -> dict[str, bytes]:
    return {e.name: e.data for e in entries if e.kind == b"0"}


def open_layer(blob: bytes, expected_digest: str | None = None) -> tuple[Footer, Toc, list[LayerEntry]]:
    """What the daemon will do with a blob: footer, TOC member, verify, entries."""
    foot = parse_footer(blob[-FOOTER_READ_SIZE:], blob_size=len(blob))
    start, end = foot.toc_range(len(blob))
    toc = parse_toc(blob[start:end])
    verify_toc(toc, expected_digest, allow_unverified=expected_digest is None)
    return foot, toc, layer_entries(toc, foot.toc_offset)


def read_file(blob: bytes, entry: LayerEntry) -> bytes:
    """A file's bytes, inflating each chunk from exactly its compressed range (the TOC file is inline)."""
    if isinstance(entry.content, bytes):
        return entry.content
    return b"".join(decompress_chunk(blob[c.compressed_offset:c.compressed_end], c) for c in entry.content)


LAYOUTS: dict[str, dict[str, Any]] = {
    "one-member-per-file": {},
    "split-100k": {"chunk_size": 100_000},
    "packed-min-chunk": {"chunk_size": 100_000, "min_chunk_size": 64 << 10},
    "legacy-no-chunk-digests": {"chunk_size": 100_000, "legacy_footer": True, "chunk_digests": False},
    "prefetch-landmark": {"prefetch": ["bin/tool", "etc/passwd"]},
    "no-prefetch-landmark": {"no_prefetch_landmark": True},
}


@pytest.fixture(scope="module")
def entries() -> list[Entry]:
    return sample_entries()


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def built(request: pytest.FixtureRequest, entries: list[Entry]) -> EStargzLayer:
    return build_estargz(entries, **LAYOUTS[request.param])


# --------------------------------------------------------------------------- footer

def test_footer_is_51_bytes_of_spec_layout() -> None:
    data = footer(0x1234)
    assert len(data) == FOOTER_SIZE == 51
    assert data[:10] == bytes.fromhex("1f8b0804000000000 0ff".replace(" ", ""))
    assert data[10:12] == (26).to_bytes(2, "little") and data[12:14] == b"SG"
    assert data[14:16] == (22).to_bytes(2, "little") and data[16:38] == b"0000000000001234STARGZ"
    assert data[38:] == bytes.fromhex("010000ffff") + bytes(8)
    assert gzip.decompress(data) == b""


def test_parse_footer_estargz(built: EStargzLayer) -> None:
    foot = parse_footer(built.blob[-FOOTER_READ_SIZE:], blob_size=len(built.blob))
    legacy = built.footer_size == LEGACY_FOOTER_SIZE
    assert foot == Footer(built.toc_offset, built.footer_size, legacy)
    assert foot.toc_range(len(built.blob)) == (built.toc_offset, len(built.blob) - built.footer_size)


def test_parse_footer_legacy_from_a_51_byte_tail() -> None:
    blob = b"x" * 100 + footer(7, legacy=True)
    assert len(footer(7, legacy=True)) == LEGACY_FOOTER_SIZE == 47
    assert parse_footer(blob[-51:]) == Footer(7, 47, True)
    assert parse_footer(blob[-51:], blob_size=len(blob)) == Footer(7, 47, True)


def test_parse_footer_of_a_blob_shorter_than_the_read_size() -> None:
    """The tail is then the whole blob, so a TOC offset must leave room before the footer."""
    assert parse_footer(b"abc" + footer(0, legacy=True)) == Footer(0, 47, True)
    with pytest.raises(FormatError, match="footer itself starts at 0"):
        parse_footer(footer(0, legacy=True))


@pytest.mark.parametrize("tail", [
    b"", b"\x1f\x8b", bytes(51), os.urandom(51), b"PK\x03\x04" + bytes(47),
    gzip.compress(b"a plain gzip layer ends with its own trailer" * 3)[-51:],
    footer(5)[:-1], footer(5)[1:], footer(5, legacy=True)[:-1],
], ids=["empty", "two-bytes", "zeros", "random", "zip", "plain-gzip", "estargz-short", "estargz-cut-head",
        "legacy-short"])
def test_parse_footer_rejects_non_estargz(tail: bytes) -> None:
    with pytest.raises(FormatError, match="not an eStargz layer"):
        parse_footer(tail)


def _mutated(offset: int, value: bytes) -> bytes:
    data = bytearray(footer(0x10))
    data[offset:offset + len(value)] = value
    return b"y" * 100 + bytes(data)


@pytest.mark.parametrize("blob", [
    _mutated(0, b"\x1f\x8c"), _mutated(2, b"\x07"), _mutated(3, b"\x0c"), _mutated(10, b"\x1b"),
    _mutated(12, b"GS"), _mutated(14, b"\x17"), _mutated(16, b"000000000000001g"), _mutated(32, b"STARGY"),
    _mutated(16, b"-000000000000010"), _mutated(38, b"\x00"), _mutated(43, b"\x01"), _mutated(47, b"\x01"),
    _mutated(16, b"ffffffffffffffff"),
], ids=["magic", "method", "flags", "xlen", "subfield-id", "subfield-len", "hex", "stargz-magic", "sign",
        "deflate", "crc", "isize", "int64-overflow"])
def test_parse_footer_validates_every_field(blob: bytes) -> None:
    with pytest.raises(FormatError, match="not an eStargz layer"):
        parse_footer(blob[-FOOTER_READ_SIZE:], blob_size=len(blob))


def test_parse_footer_rejects_toc_offset_inside_the_footer() -> None:
    blob = b"z" * 100 + footer(100)
    with pytest.raises(FormatError, match="TOC at 100"):
        parse_footer(blob[-51:], blob_size=len(blob))
    assert parse_footer(blob[-51:]).toc_offset == 100  # without the size it cannot tell


# --------------------------------------------------------------------------- TOC

def test_toc_keeps_raw_bytes_and_their_digest(built: EStargzLayer) -> None:
    _, toc, _ = open_layer(built.blob, built.toc_digest)
    assert toc.raw == built.toc_json
    assert toc.digest == "sha256:" + hashlib.sha256(built.toc_json).hexdigest() == built.toc_digest
    assert toc.version == 1
    assert len(toc.entries) == len(built.toc["entries"])


def test_toc_entry_has_every_field() -> None:
    data = os.urandom(64)
    payload = gzip_member(data)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    doc = {"version": 1, "entries": [{
        "name": "f", "type": "reg", "size": 64, "modtime": "2023-11-14T22:13:20Z", "linkName": "",
        "mode": 0o100640, "uid": 7, "gid": 8, "userName": "alice", "groupName": "staff", "offset": 0,
        "innerOffset": 0, "devMajor": 0, "devMinor": 0, "xattrs": {"user.a": "AAEC"}, "digest": digest,
        "chunkOffset": 0, "chunkSize": 0, "chunkDigest": digest, "NumLink": 0,
    }, {"name": "dev", "type": "block", "devMajor": 8, "devMinor": 1, "linkName": "ignored"}]}
    blob = assemble(payload, encode_toc(doc))
    _, toc, entries = open_layer(blob)
    f, dev = toc.entries
    assert (f.name, f.type, f.size, f.modtime, f.mode, f.uid, f.gid, f.user_name, f.group_name) == (
        "f", "reg", 64, "2023-11-14T22:13:20Z", 0o100640, 7, 8, "alice", "staff")
    assert (f.offset, f.inner_offset, f.xattrs, f.digest, f.chunk_offset, f.chunk_size, f.chunk_digest) == (
        0, 0, {"user.a": b"\x00\x01\x02"}, digest, 0, 0, digest)
    assert (dev.type, dev.dev_major, dev.dev_minor, dev.link_name) == ("block", 8, 1, "ignored")
    assert entries[0].mode == 0o640 and entries[0].mtime_ns == DEFAULT_MTIME * 10**9
    assert entries[0].content == (Chunk(0, 64, 0, len(payload), 0, digest),)
    assert read_file(blob, entries[0]) == data
    assert (entries[1].type, entries[1].dev_major, entries[1].dev_minor) == (EntryType.BLOCK, 8, 1)


def test_every_file_reads_back_through_its_chunks(built: EStargzLayer, entries: list[Entry]) -> None:
    _, _, records = open_layer(built.blob, built.toc_digest)
    want = files_of(entries)
    got = {e.path: read_file(built.blob, e) for e in records if e.type == EntryType.REG}
    for landmark in (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK):
        if landmark in got:
            assert got.pop(landmark) == b"\x0f"
    assert got == want
    tar_view = {name: data for name, (member, data) in extract_members(built.blob).items() if member.isreg()}
    assert tar_view.pop("stargz.index.json") == built.toc_json
    assert {k: v for k, v in tar_view.items() if not k.endswith("landmark")} == want


def test_metadata_of_every_kind_of_member(entries: list[Entry]) -> None:
    layer = build_estargz(entries, chunk_size=100_000)
    _, _, records = open_layer(layer.blob, layer.toc_digest)
    by_path = {e.path: e for e in records}
    tool = by_path["bin/tool"]
    assert (tool.type, tool.mode, tool.size, tool.mtime_ns) == (EntryType.REG, 0o4755, 250_000, DEFAULT_MTIME * 10**9)
    assert [(c.file_offset, c.size) for c in tool.content] == [(0, 100_000), (100_000, 100_000), (200_000, 50_000)]
    two = by_path["bin/exactly-two-chunks"]
    assert [(c.file_offset, c.size) for c in two.content] == [(0, 100_000), (100_000, 100_000)]
    again = by_path["bin/tool-again"]
    assert (again.type, again.link_name, again.mode) == (EntryType.HARDLINK, "bin/tool", 0o4755)
    assert (by_path["bin/sh"].type, by_path["bin/sh"].link_name) == (EntryType.SYMLINK, "tool")
    assert by_path["usr-abs"].link_name == "/usr/bin/env"
    assert (by_path["empty"].size, by_path["empty"].content) == (0, ())
    owned = by_path["home/u/owned"]
    assert (owned.uid, owned.gid, owned.mode) == (1000, 2000, 0o600)
    assert (by_path["home/u"].type, by_path["home/u"].mode, by_path["home/u"].uid) == (EntryType.DIR, 0o750, 1000)
    assert by_path["xattr.txt"].xattrs == {"user.text": b"v", "user.binary": b"\x00\xff\x10",
                                           "security.capability": b"\x01"}
    assert UNICODE in by_path and f"{DEEP}/leaf" in by_path
    dev = by_path["dev-null"]
    assert (dev.type, dev.dev_major, dev.dev_minor, dev.mode) == (EntryType.CHAR, 1, 3, 0o666)
    assert by_path["etc/.wh.shadow"].type == EntryType.REG and by_path["home/.wh..wh..opq"].size == 0


def test_packed_members_use_inner_offsets() -> None:
    layer = build_estargz([File(f"f{i}", f"file {i}\n" * 50) for i in range(10)], min_chunk_size=1 << 20)
    _, _, records = open_layer(layer.blob, layer.toc_digest)
    chunks = [e.content[0] for e in records]
    assert len({c.compressed_offset for c in chunks}) == 1
    assert chunks[0].inner_offset == 0 and all(b.inner_offset > a.inner_offset for a, b in pairwise(chunks))
    assert all(c.compressed_end == layer.toc_offset for c in chunks)
    assert [read_file(layer.blob, e) for e in records] == [f"file {i}\n".encode() * 50 for i in range(10)]


def test_compressed_ranges_end_at_the_next_member(built: EStargzLayer) -> None:
    _, toc, records = open_layer(built.blob, built.toc_digest)
    members = _member_starts(built.blob)
    chunks = sorted((c for e in records if e.type == EntryType.REG for c in e.content),
                    key=lambda c: c.compressed_offset)
    for chunk in chunks:
        assert chunk.compressed_offset in members
        later = [m for m in members if m > chunk.compressed_offset]
        assert chunk.compressed_end == later[0]
    assert chunks[-1].compressed_end == built.toc_offset


def _member_starts(blob: bytes) -> list[int]:
    starts, pos = [], 0
    while pos < len(blob):
        starts.append(pos)
        inflater = zlib.decompressobj(31)
        inflater.decompress(blob[pos:])
        pos = len(blob) - len(inflater.unused_data)
    return starts


def test_modtime_rfc3339_variants() -> None:
    doc = {"version": 1, "entries": [
        {"name": "a", "type": "dir", "modtime": "2023-11-14T23:13:20.5+01:00"},
        {"name": "b", "type": "dir", "modtime": "1969-12-31T23:59:59Z"},
        {"name": "c", "type": "dir", "modtime": "2023-11-14t22:13:20.000000001z"},
        {"name": "d", "type": "dir"},
    ]}
    _, _, records = open_layer(assemble(b"", encode_toc(doc)))
    assert [e.mtime_ns for e in records] == [
        DEFAULT_MTIME * 10**9 + 500_000_000, -10**9, DEFAULT_MTIME * 10**9 + 1, 0]


def test_root_entry_and_dir_names_with_slashes() -> None:
    doc = {"version": 1, "entries": [{"name": "./", "type": "dir", "mode": 0o40700},
                                     {"name": "./a/b/", "type": "dir", "mode": 0o40750}]}
    _, _, records = open_layer(assemble(b"", encode_toc(doc)))
    assert [(e.path, e.mode) for e in records] == [("", 0o700), ("a/b", 0o750)]
    tree = build_tree(records)
    assert stat.S_IMODE(tree.root.mode) == 0o700


# --------------------------------------------------------------------------- verification

def test_verify_toc_digest() -> None:
    layer = build_estargz([File("a", "a")])
    _, toc, _ = open_layer(layer.blob)
    verify_toc(toc, layer.toc_digest, allow_unverified=False)
    verify_toc(toc, "sha512:" + hashlib.sha512(layer.toc_json).hexdigest(), allow_unverified=False)
    with pytest.raises(FormatError, match="TOC digest mismatch"):
        verify_toc(toc, "sha256:" + "0" * 64, allow_unverified=True)
    with pytest.raises(FormatError, match="not a sha256"):
        verify_toc(toc, "md5:abc", allow_unverified=True)
    with pytest.raises(FormatError, match=TOC_DIGEST_ANNOTATION):
        verify_toc(toc, None, allow_unverified=False)
    verify_toc(toc, None, allow_unverified=True)
    verify_toc(toc, "", allow_unverified=True)


def test_annotation_names() -> None:
    assert TOC_DIGEST_ANNOTATION == "containerd.io/snapshot/stargz/toc.digest"
    assert UNCOMPRESSED_SIZE_ANNOTATION == "io.containers.estargz.uncompressed-size"


def test_reserialised_toc_does_not_verify() -> None:
    """The digest is over the raw JSON: equal content in other bytes is a different TOC."""
    layer = build_estargz([File("a", "a")])
    compact = json.dumps(json.loads(layer.toc_json), separators=(",", ":")).encode()
    _, toc, _ = open_layer(assemble(layer.payload, compact))
    with pytest.raises(FormatError, match="mismatch"):
        verify_toc(toc, layer.toc_digest, allow_unverified=False)


@pytest.mark.parametrize("layout", ["one-member-per-file", "split-100k", "packed-min-chunk", "legacy-no-chunk-digests"])
def test_flipped_payload_byte_is_an_error(layout: str) -> None:
    data = os.urandom(150_000)
    layer = build_estargz([File("victim", data)], **LAYOUTS[layout])
    _, _, records = open_layer(layer.blob, layer.toc_digest)
    for chunk in records[0].content:
        blob = bytearray(layer.blob)
        blob[(chunk.compressed_offset + chunk.compressed_end) // 2] ^= 0x01
        with pytest.raises(FormatError):
            decompress_chunk(bytes(blob[chunk.compressed_offset:chunk.compressed_end]), chunk)


def test_wrong_chunk_digest_is_an_error() -> None:
    layer = build_estargz([File("a", "payload")])
    _, _, records = open_layer(layer.blob)
    chunk = msgspec.structs.replace(records[0].content[0], digest="sha256:" + hashlib.sha256(b"other").hexdigest())
    with pytest.raises(FormatError, match="digest mismatch"):
        decompress_chunk(layer.blob[chunk.compressed_offset:chunk.compressed_end], chunk)


def test_single_chunk_without_chunk_digest_is_checked_against_the_file_digest() -> None:
    layer = build_estargz([File("a", "payload")], chunk_digests=False)
    _, _, records = open_layer(layer.blob)
    assert records[0].content[0].digest == "sha256:" + hashlib.sha256(b"payload").hexdigest()


def test_short_and_truncated_chunks_are_errors() -> None:
    member = gzip_member(b"0123456789")
    good = Chunk(0, 10, 0, len(member), 0, None)
    assert decompress_chunk(member, good) == b"0123456789"
    with pytest.raises(FormatError, match="inflated to 10 of 11"):
        decompress_chunk(member, msgspec.structs.replace(good, size=11))
    with pytest.raises(FormatError, match="inflated to 6 of 8 bytes"):
        decompress_chunk(member, msgspec.structs.replace(good, inner_offset=4, size=8))
    with pytest.raises(FormatError):
        decompress_chunk(member[:-4], good)  # no digest: the CRC/size trailer must be there
    with pytest.raises(FormatError, match="corrupt gzip"):
        decompress_chunk(b"not gzip at all", good)


@pytest.mark.parametrize("size", [1, 4095, 1 << 20, (1 << 20) + 1, 3 << 20])
@pytest.mark.parametrize("digest", [True, False])
def test_chunk_sizes_around_the_inflate_step(size: int, digest: bool) -> None:
    for data in (os.urandom(size), bytes(size)):
        member = gzip_member(data)
        whole = Chunk(0, size, 0, len(member), 0, "sha256:" + hashlib.sha256(data).hexdigest() if digest else None)
        assert decompress_chunk(member, whole) == data
        half = max(size // 2, 1)
        part = msgspec.structs.replace(whole, inner_offset=size - half, size=half,
                       digest="sha256:" + hashlib.sha256(data[-half:]).hexdigest() if digest else None)
        assert decompress_chunk(member, part) == data[-half:]


def test_inflation_stops_once_the_chunk_is_out() -> None:
    """A chunk near the start of a shared member does not pay for (or trip on) the rest of it."""
    head = b"the file we want\n"
    member = bytearray(gzip_member(head + os.urandom(1 << 20), level=1))
    member[-8:] = bytes(8)  # a broken CRC at the far end of the member
    chunk = Chunk(0, len(head), 0, len(member), 0, "sha256:" + hashlib.sha256(head).hexdigest())
    assert decompress_chunk(bytes(member[:len(member) // 2]), chunk) == head
    assert decompress_chunk(bytes(member), msgspec.structs.replace(chunk, inner_offset=4, size=len(head) - 4,
                                                   digest="sha256:" + hashlib.sha256(head[4:]).hexdigest())) == head[4:]


# --------------------------------------------------------------------------- hostile TOCs

def test_toc_zip_bomb_is_refused() -> None:
    bomb = gzip_member(toc_tar(b"[" + b" " * (3 << 20) + b"]"), level=9)
    assert len(bomb) < 10_000
    with pytest.raises(FormatError, match="more than 1048576 bytes"):
        parse_toc(bomb, max_size=1 << 20)
    split = gzip_member(bytes(600_000)) + gzip_member(bytes(600_000))
    with pytest.raises(FormatError, match="more than"):
        parse_toc(split, max_size=1 << 20)
    assert DEFAULT_MAX_TOC_SIZE == 256 << 20


def test_toc_exactly_at_the_limit_is_accepted() -> None:
    tar = toc_tar(encode_toc({"version": 1, "entries": []}))
    assert parse_toc(gzip_member(tar), max_size=len(tar)).entries == []
    with pytest.raises(FormatError, match="more than"):
        parse_toc(gzip_member(tar), max_size=len(tar) - 1)


@pytest.mark.parametrize("member, match", [
    (b"", "empty"),
    (b"garbage", "not valid gzip"),
    (toc_member(b"{}")[:-10], "truncated"),
    (toc_member(b"{}") + b"trailing", "not valid gzip"),
    (gzip_member(b"\x01" * 1024), "not a valid tar|holds no"),
    (gzip_member(bytes(1024)), "holds no stargz.index.json"),
], ids=["empty", "not-gzip", "truncated", "trailing-garbage", "not-tar", "empty-tar"])
def test_broken_toc_members(member: bytes, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        parse_toc(member)


def test_toc_member_with_another_file_first() -> None:
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("other.json", b"{}"), ("./stargz.index.json", encode_toc({"version": 1}))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert parse_toc(gzip_member(buf.getvalue())).entries == []


@pytest.mark.parametrize("toc_json, match", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    (b"[]", "want an object"),
    (b'{"entries": []}', "version"),
    (b'{"version": "1", "entries": []}', "version"),
    (b'{"version": 1, "entries": {}}', "entries is a JSON dict"),
    (b'{"version": 1, "entries": [7]}', "TOC entry 0 is a JSON int"),
    (b'{"version": 1, "entries": [{"type": "dir"}]}', "name is not a string"),
    (b'{"version": 1, "entries": [{"name": "", "type": "dir"}]}', "empty name"),
    (b'{"version": 1, "entries": [{"name": "s", "type": "socket"}]}', r"TOC entry 0 \('s'\): unknown type 'socket'"),
    (b'{"version": 1, "entries": [{"name": "n", "type": "reg", "size": -1}]}', r"\('n'\): size -1 is out of range"),
    (b'{"version": 1, "entries": [{"name": "n", "type": "reg", "offset": -5}]}', "offset -5 is out of range"),
    (b'{"version": 1, "entries": [{"name": "n", "type": "reg", "size": "3"}]}', "size is '3', want an integer"),
    (b'{"version": 1, "entries": [{"name": "n", "type": "reg", "size": 3.0}]}', "want an integer"),
    (b'{"version": 1, "entries": [{"name": "n", "type": "reg", "uid": true}]}', "uid is True"),
    (b'{"version": 1, "entries": [{"name": "n", "type": "reg", "size": 99999999999999999999}]}', "out of range"),
    (b'{"version": 1, "entries": [{"name": "n", "type": "dir", "linkName": 5}]}', "linkName is 5"),
    (b'{"version": 1, "entries": [{"name": "n", "type": "dir", "modtime": "yesterday"}]}', "not RFC 3339"),
    (b'{"version": 1, "entries": [{"name": "n", "type": "dir", "modtime": "2023-13-01T00:00:00Z"}]}', "not a valid"),
    (b'{"version": 1, "entries": [{"name": "n", "type": "dir", "xattrs": {"user.a": "!!"}}]}', "not valid base64"),
    (b'{"version": 1, "entries": [{"name": "n", "type": "dir", "xattrs": ["a"]}]}', "xattrs is"),
    (b'{"version": 1, "entries": [{"name": "n", "type": "reg", "digest": "sha256:xyz"}]}', "digest 'sha256:xyz'"),
    (b'{"version": 1, "entries": [{"name": "n", "type": "reg", "chunkDigest": "sha1:ab"}]}', "chunkDigest"),
], ids=lambda v: v[:40] if isinstance(v, str) else None)
def test_malformed_toc_json(toc_json: bytes, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        parse_toc(toc_member(toc_json))


def test_null_fields_mean_absent() -> None:
    toc = parse_toc(toc_member(b'{"version": 1, "entries": [{"name": "d", "type": "dir", "mode": null, '
                               b'"xattrs": null}]}'))
    assert (toc.entries[0].mode, toc.entries[0].xattrs) == (0, {})


# --------------------------------------------------------------------------- chunk tiling

def _reg(name: str, size: int, **kw: object) -> dict[str, Any]:
    return {"name": name, "type": "reg", "size": size, **kw}


def _chunk(name: str, offset: int, chunk_offset: int, chunk_size: int = 0) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "type": "chunk", "offset": offset, "chunkOffset": chunk_offset}
    if chunk_size:
        entry["chunkSize"] = chunk_size
    return entry


@pytest.mark.parametrize("toc_entries, match", [
    ([_reg("f", 10, offset=0, chunkSize=4), _chunk("f", 1, 5)], "starts at 5, want 4"),
    ([_reg("f", 10, offset=0, chunkSize=4), _chunk("f", 1, 3)], "starts at 3, want 4"),
    ([_reg("f", 10, offset=0, chunkSize=4), _chunk("f", 1, 4, 4)], "cover 8 of its 10"),
    ([_reg("f", 10, offset=0, chunkSize=4)], "cover 4 of its 10"),
    ([_reg("f", 10, offset=0, chunkSize=4), _chunk("f", 1, 4, 7)], "does not fit"),
    ([_reg("f", 10, offset=0, chunkSize=11)], "does not fit"),
    ([_reg("f", 10, offset=0, chunkOffset=2)], "starts at 2, want 0"),
    ([_chunk("f", 1, 0)], "does not follow a non-empty regular file"),
    ([_reg("f", 0), _chunk("f", 1, 0)], "does not follow"),
    ([{"name": "d", "type": "dir"}, _chunk("d", 1, 0)], "does not follow"),
    ([_reg("f", 10, offset=0, chunkSize=4), _chunk("g", 1, 4)], "different file"),
    ([_reg("f", 10, offset=200)], "not before the TOC at 100"),
    ([{"name": "h", "type": "hardlink"}], "hardlink without a target"),
], ids=["gap", "overlap", "short", "missing-rest", "past-end", "first-past-end", "first-not-at-0",
        "orphan-chunk", "chunk-after-empty", "chunk-after-dir", "chunk-of-other-file", "offset-past-toc",
        "hardlink-nowhere"])
def test_chunks_must_tile_the_file(toc_entries: list[dict[str, Any]], match: str) -> None:
    toc = parse_toc(toc_member(encode_toc({"version": 1, "entries": toc_entries})))
    with pytest.raises(FormatError, match=match):
        layer_entries(toc, 100)


def test_chunk_size_zero_means_to_end_of_file() -> None:
    entries = [_reg("f", 10, offset=0, chunkSize=4), _chunk("", 30, 4)]
    toc = parse_toc(toc_member(encode_toc({"version": 1, "entries": entries})))
    (record,) = layer_entries(toc, 100)
    assert record.content == (Chunk(0, 4, 0, 30, 0, None), Chunk(4, 6, 30, 100, 0, None))


# --------------------------------------------------------------------------- landmarks and the tree

def test_landmarks() -> None:
    files = [File("a", "a" * 100), File("b", "b" * 100), File("c", "c" * 100)]
    plain = build_estargz(files)
    _, toc, _ = open_layer(plain.blob)
    assert prefetch_end(toc) is None and not has_no_prefetch_landmark(toc)
    marked = build_estargz(files, prefetch=["c", "a"])
    _, toc, records = open_layer(marked.blob)
    assert [e.path for e in records] == ["c", "a", PREFETCH_LANDMARK, "b"]
    landmark = records[2].content[0]
    assert prefetch_end(toc) == landmark.compressed_offset
    assert all(c.compressed_end <= landmark.compressed_offset for e in records[:2] for c in e.content)
    none = build_estargz(files, no_prefetch_landmark=True)
    _, toc, records = open_layer(none.blob)
    assert has_no_prefetch_landmark(toc) and prefetch_end(toc) is None
    assert records[0].path == NO_PREFETCH_LANDMARK and read_file(none.blob, records[0]) == b"\x0f"


def test_build_tree_from_layer_entries(entries: list[Entry]) -> None:
    layer = build_estargz(entries, chunk_size=100_000)
    _, _, records = open_layer(layer.blob, layer.toc_digest)
    tree = build_tree(records)
    shadow = tree.resolve("etc/shadow")
    assert shadow is not None and stat.S_ISCHR(shadow.mode) and shadow.rdev == os.makedev(0, 0)
    assert tree.resolve("etc/.wh.shadow") is None
    home = tree.resolve("home")
    assert home is not None and home.xattrs.get(OPAQUE_XATTR) == b"y"
    assert tree.resolve("home/.wh..wh..opq") is None
    tool, again = tree.resolve("bin/tool"), tree.resolve("bin/tool-again")
    assert tool is not None and tool is again and tool.nlink == 2
    assert stat.S_IMODE(tool.mode) == 0o4755 and tool.size == 250_000 and len(tool.content) == 3
    link = tree.resolve("bin/sh")
    assert link is not None and stat.S_ISLNK(link.mode) and link.target == b"tool"
    dev = tree.resolve("dev-null")
    assert dev is not None and stat.S_ISCHR(dev.mode) and dev.rdev == os.makedev(1, 3)
    xattr = tree.resolve("xattr.txt")
    assert xattr is not None and xattr.xattrs[b"user.binary"] == b"\x00\xff\x10"
    leaf = tree.resolve(f"{DEEP}/leaf")
    assert leaf is not None and read_file(layer.blob, LayerEntry("", EntryType.REG, content=leaf.content)) == b"deep\n"
    uni = tree.resolve(UNICODE)
    assert uni is not None and uni.size == len(b"unicode\n")
