"""A SOCI layer read through its zTOC, from an in-memory blob: bytes right, spans verified."""

from __future__ import annotations

import gzip
import io
import os
import random
import tarfile
from pathlib import Path

import pytest

from snapshotter.cache import ChunkCache
from snapshotter.formats import ztoc
from snapshotter.layers.layer import ReadError
from snapshotter.layers.soci import SociLayer
from tests.unit.blobs import MemoryBlob

SPAN = 64 << 10


def layer_files() -> dict[str, bytes]:
    rng = random.Random(7)
    files = {f"d/small{i}.txt": f"file {i}\n".encode() * (i + 1) for i in range(50)}
    files["d/big.bin"] = rng.randbytes(300_000)  # crosses several spans
    files["d/text.log"] = b"".join(f"line {i} {'x' * (i % 70)}\n".encode() for i in range(20_000))
    files["empty"] = b""
    return files


def gzip_layer(files: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), compresslevel=6, mtime=0)


@pytest.fixture
def layer_and_blob(tmp_path: Path) -> tuple[SociLayer, MemoryBlob, dict[str, bytes]]:
    files = layer_files()
    blob_bytes = gzip_layer(files)
    z = ztoc.parse_ztoc(ztoc.build_ztoc([blob_bytes], SPAN, len(blob_bytes)))
    blob = MemoryBlob(blob_bytes)
    return SociLayer(z, blob, ChunkCache(tmp_path / "cache", 1 << 30)), blob, files


async def test_every_file_reads_back_at_odd_offsets(layer_and_blob) -> None:  # type: ignore[no-untyped-def]
    layer, blob, files = layer_and_blob
    assert layer.index.max_span_id > 4, "the test layer should span several spans"
    for name, data in files.items():
        node = layer.tree.resolve(name)
        assert node is not None and node.size == len(data)
        assert await layer.read(node, 0, len(data) + 10) == data
        for off in (1, 4095, len(data) // 2, max(0, len(data) - 3)):
            assert await layer.read(node, off, 70_000) == data[off:off + 70_000]


async def test_reading_one_small_file_fetches_one_span(layer_and_blob) -> None:  # type: ignore[no-untyped-def]
    layer, blob, files = layer_and_blob
    node = layer.tree.resolve("d/small3.txt")
    assert node is not None
    await layer.read(node, 0, node.size)
    assert blob.reads == 1 and blob.fetched_bytes < SPAN
    await layer.read(node, 0, node.size)
    assert blob.reads == 1


async def test_a_corrupt_span_is_a_read_error_never_wrong_bytes(layer_and_blob) -> None:  # type: ignore[no-untyped-def]
    layer, blob, files = layer_and_blob
    node = layer.tree.resolve("d/big.bin")
    assert node is not None
    span = layer.index.spans_for(node.content.uncompressed_offset, node.content.uncompressed_offset + 1)[0]
    blob.data[span.compressed_start + 100] ^= 0xFF
    with pytest.raises(ReadError, match="span"):
        await layer.read(node, 0, 4096)
    blob.data[span.compressed_start + 100] ^= 0xFF
    assert await layer.read(node, 0, 4096) == files["d/big.bin"][:4096]


def test_a_ztoc_for_another_blob_is_refused(tmp_path: Path) -> None:
    files = layer_files()
    blob_bytes = gzip_layer(files)
    z = ztoc.parse_ztoc(ztoc.build_ztoc([blob_bytes], SPAN, len(blob_bytes)))
    with pytest.raises(ValueError, match="zTOC"):
        SociLayer(z, MemoryBlob(blob_bytes + os.urandom(5)), ChunkCache(tmp_path, 1 << 20))
