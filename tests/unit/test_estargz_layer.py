"""An eStargz layer read from an in-memory blob: bytes right, chunks verified, neighbours fetched together."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from snapshotter.cache import ChunkCache
from snapshotter.layers.estargz import FETCH_WINDOW, EStargzLayer, fetch_index
from snapshotter.layers.layer import ReadError
from tests.harness.estargz import build_estargz
from tests.harness.images import File
from tests.unit.blobs import MemoryBlob


def files() -> dict[str, bytes]:
    rng = random.Random(3)
    out = {f"pkg/mod{i}.py": f"# module {i}\n".encode() * (20 + i) for i in range(40)}
    out["big/blob.bin"] = rng.randbytes(3 * FETCH_WINDOW)
    out["after/one.txt"] = b"after\n"
    return out


@pytest.fixture
async def layer(tmp_path: Path) -> tuple[EStargzLayer, MemoryBlob]:
    built = build_estargz([File(name, data) for name, data in files().items()], chunk_size=256 << 10)
    blob = MemoryBlob(built.blob)
    index = await fetch_index(blob)
    blob.reads = blob.fetched_bytes = 0
    return EStargzLayer(index, blob, ChunkCache(tmp_path / "cache", 1 << 30)), blob


async def test_every_file_reads_back(layer) -> None:  # type: ignore[no-untyped-def]
    lay, _ = layer
    for name, data in files().items():
        node = lay.tree.resolve(name)
        assert node is not None
        assert await lay.read(node, 0, len(data) + 1) == data
        assert await lay.read(node, len(data) // 3, 1000) == data[len(data) // 3:len(data) // 3 + 1000]


async def test_first_reads_of_neighbouring_files_share_one_fetch(layer) -> None:  # type: ignore[no-untyped-def]
    lay, blob = layer
    for i in range(40):
        node = lay.tree.resolve(f"pkg/mod{i}.py")
        assert node is not None
        await lay.read(node, 0, node.size)
    assert blob.reads == 1, "40 small neighbouring files should arrive in one range GET"
    assert blob.fetched_bytes <= FETCH_WINDOW


async def test_big_chunks_are_not_dragged_in(layer) -> None:  # type: ignore[no-untyped-def]
    lay, blob = layer
    node = lay.tree.resolve("big/blob.bin")
    assert node is not None
    await lay.read(node, 0, 4096)
    assert blob.fetched_bytes < 2 * (256 << 10) + 4096, "a window must not pull in more than it covers"


async def test_a_corrupt_neighbour_is_skipped_and_the_wanted_chunk_still_verifies(layer) -> None:  # type: ignore[no-untyped-def]
    lay, blob = layer
    target, neighbour = lay.tree.resolve("pkg/mod0.py"), lay.tree.resolve("pkg/mod5.py")
    assert target is not None and neighbour is not None
    c = neighbour.content[0]
    blob.data[(c.compressed_offset + c.compressed_end) // 2] ^= 0xFF
    assert await lay.read(target, 0, target.size) == files()["pkg/mod0.py"]
    with pytest.raises(ReadError):
        await lay.read(neighbour, 0, neighbour.size)
