"""Property-based fuzzing of the zstd:chunked reader (issue 14): footer, annotations, the
compressed TOC, exact chunk geometry, the tree, and chunk decompression.

Properties: every parser returns a result or raises `FormatError` within the time bound;
a tree built from an accepted TOC has no path outside the layer; bytes served through an
accepted TOC equal what Python's tarfile reads from the layer's tar.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from snapshotter.formats import zstd_chunked as Z
from snapshotter.layers.tree import build_tree
from tests.harness.images import File
from tests.harness.zstd_chunked import assemble, build_zstd_chunked, footer, frame
from tests.unit.fuzzing import check_tree, examples, hostile_ints, json_values, mutated, parse_or_refuse
from tests.unit.test_fuzz_estargz import layers, toc_documents

SHA = "sha256:" + "0" * 64


def _footers() -> st.SearchStrategy[bytes]:
    u64 = st.one_of(st.integers(0, 4096), hostile_ints(64, signed=False))
    fields = st.tuples(u64, u64, u64)
    return st.one_of(
        st.builds(lambda toc, split: footer(toc, split), fields, fields),
        st.builds(lambda toc: footer(toc, (0, 0, 0), legacy=True), fields),
        st.builds(lambda f: struct.pack("<4sI7Q8s", b"\x50\x2a\x4d\x18", 64, *f, b"GNUlInUx"),
                  st.tuples(u64, u64, u64, u64, u64, u64, u64)),
    )


@examples(1.0)
@given(tail=st.one_of(st.binary(max_size=90), _footers(), _footers().flatmap(mutated)),
       blob_size=st.one_of(st.integers(0, 8192), hostile_ints(64, signed=False)))
def test_footer(tail: bytes, blob_size: int) -> None:
    found = parse_or_refuse(Z.parse_footer, tail, blob_size=blob_size)
    if found is not None:
        for position in (found.toc, found.tar_split):
            if position is not None and position.size:
                assert Z.SKIPPABLE_HEADER <= position.offset <= position.end <= blob_size - found.size


_POSITIONS = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["9" * 5000 + ":1:1:1", "0" * 5000 + "1:1:1:1", "18446744073709551616:1:1:1"]),
    st.builds(lambda a, b, c, d: f"{a}:{b}:{c}:{d}", *[st.one_of(st.integers(0, 1 << 70), st.text(max_size=3),
                                                                  st.sampled_from(["٣", "+1", "-1", " 1", "1e3"]))
                                                        for _ in range(4)]),
)


@examples(1.0)
@example(annotations={Z.POSITION_ANNOTATION: "1" * 5000 + ":1:1:1"}, blob_size=100)
@example(annotations={Z.POSITION_ANNOTATION: "0" * 5000 + "8:1:1:1"}, blob_size=100)
@given(annotations=st.dictionaries(
    st.sampled_from([Z.CHECKSUM_ANNOTATION, Z.POSITION_ANNOTATION, Z.LEGACY_ANNOTATION_PREFIX + "manifest-checksum",
                     Z.LEGACY_ANNOTATION_PREFIX + "manifest-position", "other"]),
    st.one_of(_POSITIONS, st.sampled_from([SHA, "sha256:", "sha512:" + "a" * 128, "sha256:" + "A" * 64])),
    max_size=4), blob_size=st.one_of(st.integers(0, 8192), hostile_ints(64, signed=False)))
def test_annotations(annotations: dict[str, str], blob_size: int) -> None:
    found = parse_or_refuse(Z.parse_annotations, annotations)
    if found is not None and found.position is not None:
        position = found.position
        try:
            Z.check_position(position, blob_size)
        except Z.FormatError:
            return
        assert Z.SKIPPABLE_HEADER <= position.offset < position.end <= blob_size
        assert position.uncompressed_size <= Z.MAX_TOC_SIZE


@examples(1.0)
@given(doc=toc_documents(), offset=st.one_of(st.integers(0, 8192), hostile_ints()),
       size=st.one_of(st.none(), st.integers(0, 4096), hostile_ints(64, signed=False)))
def test_toc_and_tree(doc: Any, offset: int, size: int | None) -> None:
    raw = json.dumps(doc).encode()
    toc = parse_or_refuse(Z.parse_toc, frame(raw, level=1), uncompressed_size=size)
    if toc is None:
        return
    entries = parse_or_refuse(Z.layer_entries, toc, offset)
    if entries is None:
        return
    chunks = sorted((c for e in entries if isinstance(e.content, tuple) for c in e.content),
                    key=lambda c: c.compressed_offset)
    for chunk in chunks:
        assert 0 <= chunk.compressed_offset < chunk.compressed_end <= offset - Z.SKIPPABLE_HEADER
        assert chunk.digest and not chunk.inner_offset
    for before, after in zip(chunks, chunks[1:]):
        assert before.compressed_end <= after.compressed_offset
    tree = parse_or_refuse(build_tree, entries)
    if tree is not None:
        check_tree(tree)


@examples(1.0)
@given(compressed=st.one_of(st.binary(max_size=300), mutated(frame(b'{"version":1,"entries":[]}')),
                            mutated(frame(b"x" * 5000) + frame(b"y" * 10))),
       size=st.one_of(st.none(), st.integers(0, 6000)), max_size=st.sampled_from([10, 4096, Z.MAX_TOC_SIZE]))
def test_toc_bytes(compressed: bytes, size: int | None, max_size: int) -> None:
    parse_or_refuse(Z.parse_toc, compressed, uncompressed_size=size, max_size=max_size)


@examples(1.0)
@given(compressed=st.one_of(st.binary(max_size=200), mutated(frame(b"hello" * 40))),
       size=st.one_of(st.integers(0, 300), hostile_ints(64, signed=False)),
       digest=st.sampled_from([None, SHA, "sha256:" + hashlib.sha256(b"hello" * 40).hexdigest(), "sha512:00"]))
def test_decompress_chunk(compressed: bytes, size: int, digest: str | None) -> None:
    chunk = Z.Chunk(0, size, 0, len(compressed), 0, digest)
    data = parse_or_refuse(Z.decompress_chunk, compressed, chunk)
    if data is not None:
        assert len(data) == size and "sha256:" + hashlib.sha256(data).hexdigest() == digest


def _reference(tar: bytes) -> dict[str, bytes]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        for member in archive:
            if member.isreg():
                extracted = archive.extractfile(member)
                assert extracted is not None
                out[member.name] = extracted.read()
    return out


def _served(blob: bytes, toc_compressed: bytes, toc_offset: int, toc_json_size: int) -> dict[str, bytes] | None:
    toc = parse_or_refuse(Z.parse_toc, toc_compressed, uncompressed_size=toc_json_size)
    entries = parse_or_refuse(Z.layer_entries, toc, toc_offset) if toc else None
    if entries is None:
        return None
    out = {}
    for entry in entries:
        if entry.type.value == "reg":
            pieces = [parse_or_refuse(Z.decompress_chunk, blob[c.compressed_offset:c.compressed_end], c)
                      for c in entry.content]
            out[entry.path] = None if None in pieces else b"".join(pieces)
    return out


@examples(0.6)
@given(entries=layers(), chunk_size=st.integers(1, 128), legacy=st.booleans())
def test_served_bytes_equal_tarfile(entries: list[Any], chunk_size: int, legacy: bool) -> None:
    layer = build_zstd_chunked(entries, chunk_size=chunk_size, legacy=legacy)
    found = Z.parse_footer(layer.blob[-Z.FOOTER_READ_SIZE:], blob_size=len(layer.blob))
    assert found.toc.offset == layer.toc_offset
    assert _served(layer.blob, layer.toc_compressed, layer.toc_offset, len(layer.toc_json)) == _reference(layer.tar)


@examples(0.6)
@given(entries=layers(), chunk_size=st.integers(1, 64),
       edits=st.lists(st.tuples(st.integers(0, 1000), st.sampled_from(["offset", "endOffset", "chunkOffset",
                                                                         "chunkSize", "size", "innerOffset"]),
                                st.one_of(st.integers(0, 2048), hostile_ints())), min_size=1, max_size=4))
@example(entries=[File("a", b"\0")], chunk_size=1, edits=[(0, "size", 0)])
def test_hostile_geometry_never_serves_wrong_bytes(entries: list[Any], chunk_size: int,
                                                  edits: list[tuple[int, str, int]]) -> None:
    """Offsets and sizes rewritten (digests kept): a file is refused, or served as the tar holds it.

    Except a file the TOC now says is empty: it is served empty, as the TOC says. The TOC (its
    digest in the image manifest) is the root of trust; what it says a file holds is what is
    served, and a TOC made to disagree with the tar can only be caught by reading the whole tar.
    """
    layer = build_zstd_chunked([*entries, File("z", b"zz" * 40)], chunk_size=chunk_size)
    reference = _reference(layer.tar)
    toc = json.loads(layer.toc_json)
    for index, key, value in edits:
        toc["entries"][index % len(toc["entries"])][key] = value
    toc_json = json.dumps(toc).encode()
    blob, toc_compressed, toc_offset, _ = assemble(layer.payload, toc_json)
    for name, data in (_served(blob, toc_compressed, toc_offset, len(toc_json)) or {}).items():
        if data is not None and data != b"":
            assert data == reference[name]


@examples(0.5)
@given(doc=json_values())
def test_any_json_toc(doc: Any) -> None:
    parse_or_refuse(Z.parse_toc, frame(json.dumps(doc).encode(), level=1))
