"""zstd:chunked: the test writer against the reader, hostile layers, and a layer served, verified and restored.

The writer (`tests/harness/zstd_chunked.py`) lays blobs out as containers/storage does;
the reader is `formats/zstd_chunked.py` with eStargz's TOC schema and tree, served by
`EStargzLayer` and resolved by the manager with the checksum from the image manifest.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
from pathlib import Path
from typing import Any

import pytest
import trio

from snapshotter.cache import ChunkCache
from snapshotter.formats import zstd_chunked as zc
from snapshotter.formats.errors import FormatError
from snapshotter.formats.toc import Toc
from snapshotter.labels import LayerRequest
from snapshotter.layer_modes import FallbackCause
from snapshotter.layers import saved
from snapshotter.layers.estargz import FETCH_WINDOW, EStargzLayer, fetch_zstd_index, read_tail
from snapshotter.layers.images import layer_annotations
from snapshotter.layers.layer import ReadError
from snapshotter.layers.tree import build_tree
from tests.harness.images import Dir, File, Hardlink, Symlink, layer_tar, sample_layers
from tests.harness.zstd_chunked import (
    CHECKSUM_ANNOTATION,
    LEGACY_PREFIX,
    assemble,
    build_zstd_chunked,
    decompress_all,
    frame,
    skippable,
)
from tests.unit.blobs import MemoryBlob
from tests.unit.fakes import FakeRegistry
from tests.unit.test_manager import REF, opened

CHUNK = 16 << 10


def files() -> dict[str, bytes]:
    rng = random.Random(13)
    return {"etc/conf": b"key = value\n", "big.bin": rng.randbytes(5 * CHUNK + 77), "empty": b"",
            **{f"lib/mod{i}.py": f"# module {i}\n".encode() * (30 + i) for i in range(10)}}


def entries() -> list[Any]:
    return [Dir("etc"), Dir("lib"), *(File(n, d) for n, d in files().items()), Symlink("link", "etc/conf"),
            Hardlink("again", "big.bin")]


def parsed(layer: Any) -> tuple[Toc, list[Any]]:
    annotated = zc.parse_annotations(layer.annotations)
    assert annotated is not None and annotated.position is not None
    position = annotated.position
    toc = zc.parse_toc(layer.blob[position.offset:position.end], uncompressed_size=position.uncompressed_size)
    zc.verify_toc(toc, annotated.checksum, allow_unverified=False)
    return toc, zc.layer_entries(toc, position.offset)


def read_file(blob: bytes, content: tuple[Any, ...]) -> bytes:
    return b"".join(zc.decompress_chunk(blob[c.compressed_offset:c.compressed_end], c) for c in content)


# --------------------------------------------------------------------------- the writer and the reader agree

@pytest.mark.parametrize("index", range(3))
def test_the_blob_decompresses_to_the_tar_and_every_file_reads_back(index: int) -> None:
    layer_entries = sample_layers()[index]
    layer = build_zstd_chunked(layer_entries, chunk_size=64 << 10)
    assert decompress_all(layer.blob) == layer.tar == layer_tar(layer_entries), "plain zstd gives the tar back"
    footer = zc.parse_footer(layer.blob[-zc.FOOTER_READ_SIZE:], blob_size=len(layer.blob))
    assert (footer.toc.offset, footer.toc.size, footer.legacy) == (layer.toc_offset, len(layer.toc_compressed), False)
    toc, entries_ = parsed(layer)
    assert toc.digest == layer.checksum and toc.raw == layer.toc_compressed
    tree = build_tree(entries_)
    expected = {e.name: e.data for e in layer_entries if e.kind == b"0"}
    for name, data in expected.items():
        node = tree.resolve(name)
        if node is not None and isinstance(node.content, tuple):
            assert read_file(layer.blob, node.content) == data, name


def test_a_file_over_the_chunk_size_is_chunks_of_their_own_frames() -> None:
    layer = build_zstd_chunked(entries(), chunk_size=CHUNK)
    _, entries_ = parsed(layer)
    big = next(e for e in entries_ if e.path == "big.bin")
    assert len(big.content) == 6 and all(c.digest for c in big.content)
    assert [c.file_offset for c in big.content] == [i * CHUNK for i in range(6)]
    for before, after in zip(big.content, big.content[1:]):
        assert before.compressed_end == after.compressed_offset, "a chunk ends where the next begins"
    assert read_file(layer.blob, big.content) == files()["big.bin"]
    one = next(e for e in entries_ if e.path == "etc/conf")
    (chunk,) = one.content
    assert chunk.digest == "sha256:" + hashlib.sha256(b"key = value\n").hexdigest(), "one chunk: the file digest"
    assert next(e for e in entries_ if e.path == "empty").content == ()


def test_legacy_footer_and_annotation_prefix() -> None:
    layer = build_zstd_chunked(entries(), chunk_size=CHUNK, legacy=True)
    footer = zc.parse_footer(layer.blob[-zc.FOOTER_READ_SIZE:], blob_size=len(layer.blob))
    assert footer.legacy and footer.size == zc.LEGACY_FOOTER_SIZE and footer.tar_split is None
    assert footer.toc.offset == layer.toc_offset
    assert all(k.startswith(LEGACY_PREFIX) for k in layer.annotations)
    _, entries_ = parsed(layer)
    big = next(e for e in entries_ if e.path == "big.bin")
    assert read_file(layer.blob, big.content) == files()["big.bin"]


def test_layer_annotations_are_read_from_the_manifest() -> None:
    layer = build_zstd_chunked(entries(), chunk_size=CHUNK)
    manifest = {"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd", "digest": layer.digest, "size": len(layer.blob),
         "annotations": layer.annotations}]}
    found = layer_annotations(json.dumps(manifest).encode())
    assert found == {layer.digest: layer.annotations}
    assert layer_annotations(b'{"schemaVersion": 2, "manifests": []}') == {}, "an index has no layers"


# --------------------------------------------------------------------------- trust

def test_a_toc_that_is_not_the_annotated_one_is_refused() -> None:
    layer = build_zstd_chunked(entries(), chunk_size=CHUNK)
    toc = zc.parse_toc(layer.toc_compressed)
    with pytest.raises(FormatError, match="checksum mismatch"):
        zc.verify_toc(toc, "sha256:" + hashlib.sha256(layer.toc_json).hexdigest(), allow_unverified=False)
    with pytest.raises(FormatError, match="manifest-checksum"):
        zc.verify_toc(toc, None, allow_unverified=False)
    zc.verify_toc(toc, None, allow_unverified=True)


@pytest.mark.parametrize("annotations,match", [
    ({CHECKSUM_ANNOTATION: "sha256:xyz"}, "manifest-checksum"),
    ({zc.POSITION_ANNOTATION: "1:2:3"}, "offset:length"),
    ({zc.POSITION_ANNOTATION: "8:2:3:2"}, "TOC type 2"),
    ({zc.POSITION_ANNOTATION: "8:-2:3:1"}, "offset:length"),
])
def test_malformed_annotations_are_errors(annotations: dict[str, str], match: str) -> None:
    with pytest.raises(FormatError, match=match):
        zc.parse_annotations(annotations)


def test_no_annotations_is_not_zstd_chunked() -> None:
    assert zc.parse_annotations({"org.opencontainers.image.title": "x"}) is None


# --------------------------------------------------------------------------- hostile layers

def _hostile(mutate: Any) -> tuple[bytes, Toc, int]:
    layer = build_zstd_chunked(entries(), chunk_size=CHUNK, mutate=mutate)
    return layer.blob, zc.parse_toc(layer.toc_compressed), layer.toc_offset


def _entry(toc: dict[str, Any], name: str, kind: str = "reg") -> dict[str, Any]:
    return next(e for e in toc["entries"] if e["name"] == name and e["type"] == kind)


def _chunks(toc: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [e for e in toc["entries"] if e["name"] == name and e["type"] in ("reg", "chunk")]


@pytest.mark.parametrize("mutate,match", [
    (lambda t: _entry(t, "etc/conf").update(offset=10 << 30, endOffset=(10 << 30) + 5), "not before"),
    (lambda t: _entry(t, "etc/conf").update(endOffset=10 << 30), "past the payload end"),
    (lambda t: _entry(t, "etc/conf").pop("endOffset"), "not after its offset"),
    (lambda t: _chunks(t, "big.bin")[2].update(offset=_chunks(t, "big.bin")[1]["offset"]), "not after its offset"),
    (lambda t: _entry(t, "lib/mod1.py").update(offset=_entry(t, "lib/mod0.py")["offset"],
                                               endOffset=_entry(t, "lib/mod0.py")["endOffset"]), "overlap"),
    (lambda t: _entry(t, "etc/conf").update(innerOffset=3), "innerOffset"),
    (lambda t: _entry(t, "etc/conf").pop("digest"), "without a digest"),
    (lambda t: _chunks(t, "big.bin")[3].pop("chunkDigest"), "without a digest"),
])
def test_impossible_chunk_layouts_are_refused(mutate: Any, match: str) -> None:
    _, toc, offset = _hostile(mutate)
    with pytest.raises(FormatError, match=match):
        zc.layer_entries(toc, offset)


def test_a_chunk_that_decompresses_to_more_than_its_size_is_refused() -> None:
    def shrink(toc: dict[str, Any]) -> None:
        _chunks(toc, "big.bin")[1]["chunkSize"] = CHUNK - 100
        _chunks(toc, "big.bin")[2]["chunkOffset"] = 2 * CHUNK - 100
        _chunks(toc, "big.bin")[2]["chunkSize"] = CHUNK + 100

    blob, toc, offset = _hostile(shrink)
    big = next(e for e in zc.layer_entries(toc, offset) if e.path == "big.bin")
    chunk = big.content[1]
    with pytest.raises(FormatError, match="more than"):
        zc.decompress_chunk(blob[chunk.compressed_offset:chunk.compressed_end], chunk)


def test_a_corrupt_or_short_chunk_is_refused() -> None:
    layer = build_zstd_chunked(entries(), chunk_size=CHUNK)
    _, entries_ = parsed(layer)
    chunk = next(e for e in entries_ if e.path == "big.bin").content[2]
    good = layer.blob[chunk.compressed_offset:chunk.compressed_end]
    assert zc.decompress_chunk(good, chunk) == files()["big.bin"][2 * CHUNK:3 * CHUNK]
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF
    with pytest.raises(FormatError, match="corrupt|digest mismatch|decompressed to"):
        zc.decompress_chunk(bytes(flipped), chunk)
    with pytest.raises(FormatError):
        zc.decompress_chunk(good[:len(good) // 2], chunk)
    other = frame(b"\0" * chunk.size)
    with pytest.raises(FormatError, match="digest mismatch"):
        zc.decompress_chunk(other, chunk)


def test_a_toc_larger_than_allowed_or_than_its_position_says_is_refused() -> None:
    layer = build_zstd_chunked(entries(), chunk_size=CHUNK)
    with pytest.raises(FormatError, match="more than 100"):
        zc.parse_toc(layer.toc_compressed, max_size=100)
    with pytest.raises(FormatError, match="more than 10 bytes"):
        zc.parse_toc(layer.toc_compressed, uncompressed_size=10)
    with pytest.raises(FormatError, match="corrupt zstd"):
        zc.parse_toc(b"not zstd at all")


def test_bad_footers() -> None:
    layer = build_zstd_chunked(entries(), chunk_size=CHUNK)
    payload = layer.blob[:-zc.FOOTER_SIZE]
    with pytest.raises(zc.NotZstdChunked):
        zc.parse_footer(payload[-zc.FOOTER_READ_SIZE:], blob_size=len(payload))
    size = len(layer.blob)
    wrong_type = skippable(struct.pack("<7Q", layer.toc_offset, len(layer.toc_compressed), 1, 2, 0, 0, 0) + b"GNUlInUx")
    with pytest.raises(FormatError, match="TOC type 2"):
        zc.parse_footer(payload + wrong_type, blob_size=size)
    outside = skippable(struct.pack("<7Q", size, 100, 1, 1, 0, 0, 0) + b"GNUlInUx")
    with pytest.raises(FormatError, match="not inside"):
        zc.parse_footer(payload + outside, blob_size=size)
    bad_frame = b"\0\0\0\0" + outside[4:]
    with pytest.raises(FormatError, match="skippable frame"):
        zc.parse_footer(payload + bad_frame, blob_size=size)
    with pytest.raises(FormatError, match="not inside"):
        zc.check_position(zc.Position(size - 10, 100, 1), size)


def test_a_toc_with_garbage_json_is_refused() -> None:
    layer = build_zstd_chunked(entries(), chunk_size=CHUNK)
    blob, compressed, offset, _ = assemble(layer.payload, b'{"version": 1, "entries": [{"name": 5}]}')
    with pytest.raises(FormatError, match="name is not a string"):
        zc.parse_toc(compressed)


# --------------------------------------------------------------------------- served by EStargzLayer

async def _layer(tmp_path: Path, blob_bytes: bytes, position: zc.Position) -> tuple[EStargzLayer, MemoryBlob]:
    blob = MemoryBlob(blob_bytes)
    index = await fetch_zstd_index(blob, await read_tail(blob), position)
    blob.reads = blob.fetched_bytes = 0
    return EStargzLayer(index, blob, ChunkCache(tmp_path / "cache", 1 << 30)), blob


async def test_an_estargz_layer_serves_a_zstd_chunked_blob_and_fetches_only_what_is_read(tmp_path: Path) -> None:
    rng = random.Random(5)
    big = rng.randbytes(128 * CHUNK)
    layer = build_zstd_chunked([File("small.txt", b"small\n"), File("big.bin", big)], chunk_size=CHUNK)
    annotated = zc.parse_annotations(layer.annotations)
    assert annotated is not None and annotated.position is not None
    lay, blob = await _layer(tmp_path, layer.blob, annotated.position)
    node = lay.tree.resolve("small.txt")
    assert node is not None and await lay.read(node, 0, 100) == b"small\n"
    # The miss brings the chunks after it within one fetch window, and no more.
    assert blob.fetched_bytes <= FETCH_WINDOW < len(layer.blob) // 4, (blob.fetched_bytes, len(layer.blob))
    node = lay.tree.resolve("big.bin")
    assert node is not None
    before = blob.fetched_bytes
    assert await lay.read(node, 80 * CHUNK + 5, 1000) == big[80 * CHUNK + 5:80 * CHUNK + 1005]
    assert 0 < blob.fetched_bytes - before <= FETCH_WINDOW
    assert await lay.read(node, 0, len(big)) == big


async def test_a_corrupt_chunk_is_a_read_error_and_is_not_cached(tmp_path: Path) -> None:
    secret = random.Random(9).randbytes(3 * CHUNK)
    layer = build_zstd_chunked([File("secret.bin", secret)], chunk_size=CHUNK)
    annotated = zc.parse_annotations(layer.annotations)
    assert annotated is not None and annotated.position is not None
    lay, blob = await _layer(tmp_path, layer.blob, annotated.position)
    node = lay.tree.resolve("secret.bin")
    assert node is not None and isinstance(node.content, tuple)
    chunk = node.content[1]
    good = bytes(blob.data[chunk.compressed_offset:chunk.compressed_end])
    blob.data[chunk.compressed_offset + len(good) // 2] ^= 0xFF
    with pytest.raises(ReadError):
        await lay.read(node, CHUNK, 10)
    assert not lay.is_cached(next(u for u in lay.units if u.start == chunk.compressed_offset))
    blob.data[chunk.compressed_offset:chunk.compressed_end] = good
    assert await lay.read(node, CHUNK, CHUNK) == secret[CHUNK:2 * CHUNK], "good bytes once the blob is good"


# --------------------------------------------------------------------------- resolved, verified, saved, restored

def _registry(layer: Any, annotations: dict[str, str] | None) -> FakeRegistry:
    registry = FakeRegistry({layer.digest: layer.blob})
    descriptor: dict[str, Any] = {"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
                                  "digest": layer.digest, "size": len(layer.blob)}
    if annotations:
        descriptor["annotations"] = annotations
    registry.manifest = json.dumps({"schemaVersion": 2, "layers": [descriptor]}).encode()
    return registry


def _request(digest: str, registry: FakeRegistry) -> LayerRequest:
    return LayerRequest(target=f"chain-{digest[7:19]}", image_ref=REF, layer_digest=digest, image_layers=(digest,),
                        manifest_digest=registry.manifest_digest)


async def test_an_annotated_layer_is_served_lazily_saved_and_restored(tmp_path: Path) -> None:
    layer = build_zstd_chunked(entries(), chunk_size=CHUNK)
    registry = _registry(layer, layer.annotations)
    async with opened(tmp_path, registry) as env:
        with trio.fail_after(5):
            layer_id = await env.manager._mount(_request(layer.digest, registry))
        assert isinstance(layer_id, int), env.manager.served.status[layer.digest].reason
        (record,) = env.layers()
        assert (record.format, record.index_digest, record.index_offset) == ("zstd:chunked", layer.checksum,
                                                                             layer.toc_offset)
        assert env.manager.explain(layer.digest) == ("zstd:chunked", "")
        files_ = saved.files_of(env.root, record)
        assert files_.index.name == "toc.zst" and files_.index.read_bytes() == layer.toc_compressed
        served = env.manager.served.status[layer.digest].layer
        assert isinstance(served, EStargzLayer)
        node = served.tree.resolve("big.bin")
        assert node is not None and isinstance(node.content, tuple)
        chunk = node.content[3]
        with trio.fail_after(5):
            data = await env.manager.serve_unit(layer.digest, chunk.digest)
        assert data == files()["big.bin"][3 * CHUNK:4 * CHUNK]

        restored = saved.load_layer(env.root, record, MemoryBlob(layer.blob, layer.digest),
                                    ChunkCache(tmp_path / "other-cache", 1 << 30))
        assert isinstance(restored, EStargzLayer) and restored.index.format.name == "zstd:chunked"
        node = restored.tree.resolve("big.bin")
        assert node is not None and await restored.read(node, 0, node.size) == files()["big.bin"]


@pytest.mark.parametrize("case", ["no annotations", "wrong checksum", "position only"])
async def test_an_unverifiable_layer_falls_back_with_the_reason(tmp_path: Path, case: str) -> None:
    layer = build_zstd_chunked(entries(), chunk_size=CHUNK)
    annotations = {"no annotations": None,
                   "wrong checksum": {**layer.annotations, CHECKSUM_ANNOTATION: "sha256:" + "0" * 64},
                   "position only": {k: v for k, v in layer.annotations.items() if k != CHECKSUM_ANNOTATION}}[case]
    registry = _registry(layer, annotations)
    async with opened(tmp_path, registry) as env:
        with trio.fail_after(5):
            assert await env.manager._mount(_request(layer.digest, registry)) is None
        status = env.manager.served.status[layer.digest]
        assert status.mode == "fallback" and status.cause == FallbackCause.VERIFICATION, status.reason
        assert ("mismatch" if case == "wrong checksum" else "manifest-checksum") in status.reason
        assert env.layers() == []
    async with opened(tmp_path / "b", _registry(layer, annotations), allow_unverified=True) as env:
        with trio.fail_after(5):
            result = await env.manager._mount(_request(layer.digest, env.registry))
        if case == "wrong checksum":
            assert result is None, "a checksum that does not match is never served"
        else:
            assert result is not None and env.manager.explain(layer.digest)[0] == "zstd:chunked"


async def test_a_plain_zstd_layer_has_no_index(tmp_path: Path) -> None:
    tar = layer_tar(entries())
    blob = frame(tar)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    registry = FakeRegistry({digest: blob})
    async with opened(tmp_path, registry) as env:
        with trio.fail_after(5):
            assert await env.manager._mount(_request(digest, registry)) is None
        status = env.manager.served.status[digest]
        assert status.cause == FallbackCause.NO_INDEX, status.reason
        assert "zstd:chunked" in status.reason


async def test_a_toc_that_starts_before_the_tail_read_is_fetched_whole(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from snapshotter.layers import estargz as layers_estargz
    monkeypatch.setattr(layers_estargz, "TAIL_READ", 100)
    layer = build_zstd_chunked(entries(), chunk_size=CHUNK)
    annotated = zc.parse_annotations(layer.annotations)
    assert annotated is not None and annotated.position is not None
    assert len(layer.blob) - annotated.position.offset > 100, "the TOC must start before the tail"
    lay, _ = await _layer(tmp_path, layer.blob, annotated.position)
    assert lay.index.member == layer.toc_compressed
    node = lay.tree.resolve("big.bin")
    assert node is not None and await lay.read(node, 0, node.size) == files()["big.bin"]
