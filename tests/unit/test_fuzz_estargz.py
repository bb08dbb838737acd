"""Property-based fuzzing of the eStargz reader (issue 14): footer, TOC member, TOC entries,
chunk geometry, the layer tree built from them, and chunk inflation.

Properties: every parser returns a result or raises `FormatError` within the time bound;
a tree built from an accepted TOC has no path outside the layer; bytes served through an
accepted TOC equal what Python's tarfile reads from the whole blob. Budgets and profiles:
`tests/unit/fuzzing.py`.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from snapshotter.formats import estargz as E
from snapshotter.layers.tree import build_tree
from tests.harness.estargz import assemble, build_estargz, encode_toc, extract_members, footer, toc_member
from tests.harness.images import Dir, File, Symlink
from tests.unit.fuzzing import (PAX_KEYS, PAX_VALUES, check_tree, examples, hostile_ints, hostile_names, json_values,
                                mostly, mutated, parse_or_refuse, tar_streams, weighted, writable)

TYPES = ["dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk"]
SHA = "sha256:" + "0" * 64


# --------------------------------------------------------------------------- strategies

def _value(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field of the right JSON type, one time in 30 any JSON value: an entry has a dozen fields."""
    return mostly(good, 29)


def toc_entries(tame: bool = False) -> st.SearchStrategy[dict[str, Any]]:
    """TOC entries with hostile names, offsets, sizes and chunk geometry; unless `tame`, also values
    of the wrong type or outside their range, bad digests, times and base64."""
    small = st.integers(0, 4096)
    ints = small if tame else weighted((3, small), (1, hostile_ints(64, signed=False)), (1, hostile_ints()))
    geometry = weighted((3, small), (1, hostile_ints(64, signed=False)))
    names = weighted((2, st.lists(st.sampled_from(["a", "b", "c", "a/", "./b"]), min_size=1, max_size=3).map("/".join)),
                     (3, hostile_names()))
    value = (lambda good: good) if tame else _value
    digest = [SHA, "sha512:" + "0" * 128] if tame else [SHA, "sha512:" + "0" * 128, "sha256:", "md5:00", ""]
    return st.fixed_dictionaries(
        {"name": value(names), "type": value(st.sampled_from(TYPES if tame else [*TYPES, *TYPES, "bogus", ""]))},
        optional={
            "size": value(geometry), "offset": value(geometry), "chunkOffset": value(geometry),
            "chunkSize": value(geometry), "innerOffset": value(geometry), "linkName": value(names),
            "mode": value(ints), "uid": value(ints), "gid": value(ints),
            "devMajor": value(ints), "devMinor": value(ints),
            "modtime": value(st.sampled_from(["2023-11-14T22:13:20Z", "0001-01-01T00:00:00Z",
                                              "9999-12-31T23:59:60.999999999+23:59", "1970-01-01T00:00:00-00:00", ""]
                                             + ([] if tame else ["2023-02-30T00:00:00Z", "not a time"]))),
            "digest": value(st.sampled_from(digest)),
            "chunkDigest": value(st.sampled_from(digest)),
            "xattrs": value(st.dictionaries(st.text(max_size=6),
                                            st.sampled_from(["", "eQ=="]) if tame else
                                            st.one_of(st.sampled_from(["", "eQ==", "é", "!!", "eQ"]),
                                                      st.text(max_size=6)), max_size=3)),
        })


def toc_documents() -> st.SearchStrategy[Any]:
    def doc(tame: bool) -> st.SearchStrategy[Any]:
        entries = st.lists(toc_entries(tame), max_size=12)
        return st.fixed_dictionaries({"version": st.just(1) if tame else _value(st.just(1)),
                                      "entries": entries if tame else _value(entries)})
    return weighted((4, doc(True)), (3, doc(False)), (1, json_values()))


def _check_entries(entries: list[Any], toc_offset: int) -> None:
    """What `layer_entries` promises of the records it accepts."""
    for entry in entries:
        assert not entry.path.startswith("/") and ".." not in entry.path.split("/")
        if isinstance(entry.content, tuple):
            covered = 0
            for chunk in entry.content:
                assert chunk.file_offset == covered and chunk.size > 0
                assert 0 <= chunk.compressed_offset < chunk.compressed_end <= toc_offset
                covered += chunk.size
            assert covered == entry.size


# --------------------------------------------------------------------------- footer

VALID_FOOTERS = [footer(0), footer(1234), footer(1234, legacy=True), footer((1 << 63) - 1)]


@examples(1.0)
@given(tail=st.binary(max_size=80), blob_size=st.one_of(st.none(), st.integers(0, 1 << 20)))
def test_footer_of_random_bytes(tail: bytes, blob_size: int | None) -> None:
    found = parse_or_refuse(E.parse_footer, tail, blob_size=blob_size)
    if found is not None:
        size = blob_size if blob_size is not None else (len(tail) if len(tail) < E.FOOTER_READ_SIZE else None)
        if size is not None:
            assert 0 <= found.toc_offset < size - found.footer_size


@examples(1.0)
@given(tail=st.sampled_from(VALID_FOOTERS).flatmap(mutated),
       blob_size=st.one_of(st.none(), st.integers(0, 1 << 64)))
def test_footer_mutated(tail: bytes, blob_size: int | None) -> None:
    found = parse_or_refuse(E.parse_footer, tail, blob_size=blob_size)
    if found is not None and blob_size is not None:
        assert 0 <= found.toc_offset < blob_size - found.footer_size


# --------------------------------------------------------------------------- TOC

@examples(1.0)
@given(doc=toc_documents(), toc_offset=st.one_of(st.integers(0, 8192), hostile_ints()))
@example(doc={"version": 1, "entries": [{"name": "a", "type": "reg", "xattrs": {"k": "é"}}]}, toc_offset=10)
@example(doc={"version": 1, "entries": [{"name": "c", "type": "char", "devMajor": 1 << 40}]}, toc_offset=10)
@example(doc={"version": 1, "entries": [{"name": "\ud800", "type": "dir"}]}, toc_offset=10)
@example(doc={"version": 1, "entries": [{"name": "a\x00b", "type": "reg"}]}, toc_offset=10)
@example(doc={"version": 1, "entries": [{"name": "d", "type": []}]}, toc_offset=0)
@example(doc={"version": 1, "entries": [{"name": ".wh.", "type": "dir"}]}, toc_offset=0)
@example(doc={"version": 1, "entries": [{"name": "a", "type": "reg"},  # was a KeyError (a dangling inode)
                                        {"name": "a", "type": "hardlink", "linkName": "a"}]}, toc_offset=0)
@example(doc={"version": 1, "entries": [{"name": "d/f", "type": "reg"},
                                        {"name": "d", "type": "hardlink", "linkName": "d/f"}]}, toc_offset=0)
@example(doc={"version": 1, "entries": [{"name": "f", "type": "reg"},
                                        {"name": "f/x", "type": "hardlink", "linkName": "f"}]}, toc_offset=0)
@example(doc={"version": 1, "entries": [{"name": "a", "type": "hardlink", "linkName": "b"},
                                        {"name": "b", "type": "hardlink", "linkName": "a"}]}, toc_offset=0)
@example(doc={"version": 1, "entries": [{"name": "a", "type": "reg"}, {"name": "a/", "type": "dir"},
                                        {"name": "a/b", "type": "symlink", "linkName": "/"},
                                        {"name": "./a", "type": "hardlink", "linkName": "a/b"},
                                        {"name": "a/b/c", "type": "reg"}]}, toc_offset=0)
@example(doc={"version": 1, "entries": [{"name": "/".join(["d"] * 5000), "type": "reg"},
                                        {"name": "d", "type": "reg"}]}, toc_offset=0)  # was a RecursionError
@example(doc={"version": 1, "entries": [{"name": "a/.wh..", "type": "reg"}]}, toc_offset=0)
@example(doc={"version": 1, "entries": [{"name": "../../etc/passwd", "type": "reg"},
                                        {"name": "/abs/../../x", "type": "symlink", "linkName": "/etc"},
                                        {"name": "l", "type": "hardlink", "linkName": "../../etc/passwd"}]},
         toc_offset=10)
def test_toc_entries_and_tree(doc: Any, toc_offset: int) -> None:
    raw = json.dumps(doc).encode()
    toc = parse_or_refuse(E.parse_toc, toc_member(raw, level=1))
    if toc is None:
        return
    assert toc.raw == raw and toc.digest == "sha256:" + hashlib.sha256(raw).hexdigest()
    E.prefetch_end(toc)
    E.has_no_prefetch_landmark(toc)
    entries = parse_or_refuse(E.layer_entries, toc, toc_offset)
    if entries is None:
        return
    _check_entries(entries, toc_offset)
    tree = parse_or_refuse(build_tree, entries)
    if tree is not None:
        check_tree(tree)


def _toc_tar(raw: bytes, name: str = "stargz.index.json", fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(raw)
    return info.tobuf(fmt) + raw + b"\0" * (-len(raw) % 512) + b"\0" * 1024


VALID_TOC_MEMBER = toc_member(encode_toc({"version": 1, "entries": [
    {"name": "a/", "type": "dir"}, {"name": "a/f", "type": "reg", "size": 3, "offset": 0, "chunkDigest": SHA}]}))


@examples(1.0)
@given(member=st.one_of(st.binary(max_size=600), mutated(VALID_TOC_MEMBER)))
def test_toc_member_bytes(member: bytes) -> None:
    toc = parse_or_refuse(E.parse_toc, member)
    if toc is not None:
        entries = parse_or_refuse(E.layer_entries, toc, 1 << 20)
        if entries is not None:
            tree = parse_or_refuse(build_tree, entries)
            if tree is not None:
                check_tree(tree)


def _sparse_toc_tar(pax: dict[str, str]) -> bytes:
    raw = b'{"version": 1}'
    info = tarfile.TarInfo("stargz.index.json")
    info.size, info.pax_headers = len(raw), pax
    return info.tobuf(tarfile.PAX_FORMAT) + raw + b"\0" * (-len(raw) % 512) + b"\0" * 1024


@examples(0.5)
@given(tar=st.one_of(
    st.binary(max_size=2048).flatmap(lambda raw: st.one_of(
        st.just(_toc_tar(raw)), mutated(_toc_tar(raw)), mutated(_toc_tar(raw, fmt=tarfile.GNU_FORMAT)),
        mutated(_toc_tar(raw, fmt=tarfile.PAX_FORMAT)))),
    st.dictionaries(st.sampled_from(PAX_KEYS), PAX_VALUES.filter(writable), max_size=4).map(_sparse_toc_tar),
    tar_streams(st.sampled_from(["stargz.index.json", "./stargz.index.json", "a", "stargz.index.json/"]))))
@example(tar=_sparse_toc_tar({"GNU.sparse.map": "abc", "GNU.sparse.major": "0", "GNU.sparse.minor": "1"}))
@example(tar=_sparse_toc_tar({"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}))
@example(tar=_sparse_toc_tar({"GNU.sparse.size": "zz"}))
def test_toc_tar_layer(tar: bytes) -> None:
    """The tar inside the TOC's gzip member, hostile at the tar level (headers, sizes, PAX records)."""
    import zlib
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    parse_or_refuse(E.parse_toc, compressor.compress(tar) + compressor.flush())


# --------------------------------------------------------------------------- served bytes

def _plain_names() -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=3).map("/".join)


def _utf8(text: str) -> bool:
    """Whether the harness can write `text` into a TOC (JSON as UTF-8: no surrogates at all)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


@st.composite
def layers(draw: st.DrawFn) -> list[Any]:
    """Files (some empty, some many chunks), directories and symlinks, each name once, parents first."""
    entries: list[Any] = []
    taken: set[str] = set()
    for path in draw(st.lists(_plain_names(), max_size=8, unique=True)):
        parts = path.split("/")
        if any("/".join(parts[:i]) in taken for i in range(1, len(parts))):
            continue  # a parent is already a file or symlink
        if any(t.startswith(path + "/") for t in taken) or path in taken:
            continue
        kind = draw(st.sampled_from(["file", "file", "file", "dir", "symlink"]))
        if kind == "file":
            entries.append(File(path, draw(st.binary(max_size=300)), mode=draw(st.integers(0, 0o7777))))
            taken.add(path)
        elif kind == "symlink":
            target = draw(hostile_names(3).filter(_utf8)).replace("\x00", "")
            entries.append(Symlink(path, target))
            taken.add(path)
        else:
            entries.append(Dir(path))
    return entries


def _files_through_toc(blob: bytes, toc_offset: int) -> dict[str, bytes]:
    found = E.parse_footer(blob[-E.FOOTER_READ_SIZE:], blob_size=len(blob))
    assert found.toc_offset == toc_offset
    start, end = found.toc_range(len(blob))
    toc = E.parse_toc(blob[start:end])
    out = {}
    for entry in E.layer_entries(toc, found.toc_offset):
        if entry.type.value == "reg":
            out[entry.path] = b"".join(E.decompress_chunk(blob[c.compressed_offset:c.compressed_end], c)
                                       for c in entry.content)
    return out


@examples(0.6)
@given(entries=layers(), chunk_size=st.integers(1, 128), min_chunk_size=st.sampled_from([0, 0, 16, 200]),
       legacy=st.booleans())
def test_served_bytes_equal_tarfile(entries: list[Any], chunk_size: int, min_chunk_size: int, legacy: bool) -> None:
    layer = build_estargz(entries, chunk_size=chunk_size, min_chunk_size=min_chunk_size, legacy_footer=legacy)
    served = _files_through_toc(layer.blob, layer.toc_offset)
    reference = {name: data for name, (member, data) in extract_members(layer.blob).items()
                 if member.isreg() and name != E.TOC_TAR_NAME}
    assert served == reference


_NUMERIC = ["offset", "innerOffset", "chunkOffset", "chunkSize", "size"]


@examples(0.6)
@given(entries=layers(), chunk_size=st.integers(1, 64), min_chunk_size=st.sampled_from([0, 32]),
       edits=st.lists(st.tuples(st.integers(0, 1000), st.sampled_from(_NUMERIC),
                                st.one_of(st.integers(0, 2048), hostile_ints())), min_size=1, max_size=4))
def test_hostile_geometry_never_serves_wrong_bytes(entries: list[Any], chunk_size: int, min_chunk_size: int,
                                                  edits: list[tuple[int, str, int]]) -> None:
    """Offsets, sizes and inner offsets rewritten (digests kept): a chunk is refused or right."""
    layer = build_estargz(entries, chunk_size=chunk_size, min_chunk_size=min_chunk_size)
    reference = {name: data for name, (member, data) in extract_members(layer.blob).items() if member.isreg()}
    toc = json.loads(layer.toc_json)
    if not toc["entries"]:
        return
    for index, key, value in edits:
        toc["entries"][index % len(toc["entries"])][key] = value
    blob = assemble(layer.payload, encode_toc(toc))
    found = E.parse_footer(blob[-E.FOOTER_READ_SIZE:], blob_size=len(blob))
    parsed = parse_or_refuse(E.parse_toc, blob[found.toc_offset:len(blob) - found.footer_size])
    accepted = parse_or_refuse(E.layer_entries, parsed, found.toc_offset) if parsed else None
    for entry in accepted or []:
        if entry.type.value != "reg":
            continue
        for chunk in entry.content:
            data = parse_or_refuse(E.decompress_chunk, blob[chunk.compressed_offset:chunk.compressed_end], chunk)
            if data is not None:
                assert data == reference[entry.path][chunk.file_offset:chunk.file_offset + chunk.size]


@examples(1.0)
@given(compressed=st.one_of(st.binary(max_size=200), mutated(toc_member(b"x" * 300))),
       skip=st.one_of(st.integers(0, 2000), hostile_ints(64, signed=False)),
       size=st.one_of(st.integers(0, 2000), hostile_ints(64, signed=False)),
       digest=st.sampled_from([None, SHA, "sha512:" + "0" * 128, "sha256:bad"]))
def test_decompress_chunk(compressed: bytes, skip: int, size: int, digest: str | None) -> None:
    chunk = E.Chunk(0, size, 0, len(compressed), skip, digest)
    data = parse_or_refuse(E.decompress_chunk, compressed, chunk)
    if data is not None:
        assert len(data) == size
        if digest is not None:
            algorithm, _, hexdigest = digest.partition(":")
            assert hashlib.new(algorithm, data).hexdigest() == hexdigest
