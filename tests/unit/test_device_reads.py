"""How a `MappedDevice` answers the reads EROFS sends it (issue 15, cached reads).

EROFS reads a layer's data device with up to 1 MiB at a time, several in flight, so most
reads lie inside one chunk and several ask for the same chunk at once. Each chunk is then
loaded and checked against its digest once, by the first of them; the others wait for it,
and every read is answered with exactly the device's bytes, or a ReadError, never others.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
import trio.testing

from snapshotter.cache import ChunkCache
from snapshotter.layers import device
from snapshotter.layers.layer import ReadError
from tests.unit.test_device_map import CHUNK, ControlPlane, layer_and_image


async def served_layer(tmp_path: Path, corrupt: bool = False, held: device.HeldUnits | None = None):
    layer, image = await layer_and_image(tmp_path)
    source = ControlPlane(layer, corrupt=corrupt)
    served = device.MappedDevice(device.estargz_map(layer, image), layer.blob.digest,
                                 ChunkCache(tmp_path / "reader", 1 << 30, writer=False), source, held)
    node = served.tree.resolve("data")
    assert node is not None
    big = next(e for e in image.extents if e.size > 3 * CHUNK)
    return layer, image, source, served, node, big


async def reference_bytes(layer, image) -> bytes:
    from snapshotter.layers import erofs
    reference = erofs.DataDevice(layer, image.data_size, image.extents)
    node = reference.tree.resolve("data")
    assert node is not None
    return bytes(await reference.read(node, 0, image.data_size))


async def test_concurrent_first_reads_of_a_chunk_fetch_and_check_it_once(tmp_path: Path) -> None:
    layer, image, source, served, node, big = await served_layer(tmp_path)
    expect = await reference_bytes(layer, image)
    got: dict[int, bytes] = {}

    async def read(offset: int, size: int) -> None:
        got[offset] = bytes(await served.read(node, offset, size))

    async with trio.open_nursery() as nursery:
        for k in range(8):  # eight reads in one chunk, all at once
            nursery.start_soon(read, big.offset + k * (CHUNK // 8), CHUNK // 8)
    for offset, data in got.items():
        assert data == expect[offset:offset + CHUNK // 8]
    assert len(source.asked) == 1, "the chunk is asked for once, not once per read"


async def test_concurrent_first_reads_of_a_cached_chunk_verify_it_once(tmp_path: Path) -> None:
    layer, image, source, served, node, big = await served_layer(tmp_path)
    expect = await reference_bytes(layer, image)
    key = served.device.keys[served.device.units[next(i for i, off in enumerate(served.device.offsets)
                                                      if off == big.offset)]]
    writer = ChunkCache(tmp_path / "reader", 1 << 30)  # the control plane filled the cache before
    await writer.put(key, await layer.cached_unit(key))
    loads = 0
    real_get = served.cache.get

    async def counting_get(k, verify=None):
        nonlocal loads
        loads += 1
        return await real_get(k, verify)

    served.cache.get = counting_get  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        for k in range(8):
            nursery.start_soon(served.read, node, big.offset + k * (CHUNK // 8), CHUNK // 8)
    assert loads == 1 and source.asked == []
    assert bytes(await served.read(node, big.offset, CHUNK)) == expect[big.offset:big.offset + CHUNK]


async def test_every_read_is_the_device_s_bytes(tmp_path: Path) -> None:
    """Reads inside one chunk (answered with views), across chunks, files and padding, after
    the held chunks were pushed out (answered by part reads of the cache)."""
    layer, image, source, served, node, big = await served_layer(tmp_path, held=device.HeldUnits(units=1))
    expect = await reference_bytes(layer, image)
    size = image.data_size
    rng = random.Random(3)
    reads = [(0, size), (big.offset + 5, 100), (big.offset + CHUNK - 10, 20), (size - 7, 100), (size, 10)]
    reads += [(o, rng.randrange(1, 3 * CHUNK)) for o in (rng.randrange(size) for _ in range(60))]
    for offset, length in reads:
        data = await served.read(node, offset, length)
        assert bytes(data) == expect[offset:offset + length], (offset, length)


async def test_a_corrupt_chunk_fails_every_waiting_read_with_one_fetch(tmp_path: Path) -> None:
    _, _, source, served, node, big = await served_layer(tmp_path, corrupt=True)
    errors = []

    async def read(offset: int) -> None:
        try:
            await served.read(node, offset, 100)
        except ReadError as e:
            errors.append(e)

    async with trio.open_nursery() as nursery:
        for k in range(4):
            nursery.start_soon(read, big.offset + k * 1000)
    assert len(errors) == 4, "no read gets bytes that failed their digest"
    assert len(source.asked) == 1, "reads waiting on a failed first load share its failure, not retry it"
    with pytest.raises(ReadError, match="digest"):
        await served.read(node, big.offset, 10)
    assert len(source.asked) == 2, "a later read tries the chunk again: nothing bad was kept"


def test_a_failed_read_fails_fast_only_over_its_own_bytes() -> None:
    """One data device serves every container of a layer: a bad chunk under one container's
    read must not fail another's reads elsewhere in it, while the kernel's page-by-page retry
    of the failed read fails at once (test_lazy.py's hanging-registry case needs that)."""
    from snapshotter.fuse.filesystem import _OpenFile

    f = _OpenFile(att=None, node=None)  # type: ignore[arg-type]
    f.failed_at(1 << 20, 1 << 20, until=10.0)
    assert f.fails_fast((1 << 20) + 4096, 4096, now=9.0), "a retry within the failed read fails at once"
    assert not f.fails_fast(0, 4096, now=9.0), "a read elsewhere in the device is served"
    assert not f.fails_fast(2 << 20, 4096, now=9.0), "the failed read's end is exclusive"
    assert not f.fails_fast((1 << 20) + 4096, 4096, now=10.5), "after the window, the bytes are tried again"


async def test_a_sequential_reader_finds_the_next_cached_chunk_loaded_ahead(tmp_path: Path) -> None:
    """While the layer is served (`run`), the first read of a chunk after the one before it was
    read loads the next chunk from the disk cache beside it; a read elsewhere loads nothing
    ahead, and a chunk not in the cache is never fetched ahead."""
    layer, image, source, served, node, big = await served_layer(tmp_path)
    expect = await reference_bytes(layer, image)
    dev = served.device
    first = next(i for i, off in enumerate(dev.offsets) if off == big.offset)
    keys = [dev.keys[dev.units[first + k]] for k in range(4)]
    writer = ChunkCache(tmp_path / "reader", 1 << 30)  # the control plane filled the cache before
    for key in keys[:3]:  # not the fourth: it must not be fetched ahead
        await writer.put(key, await layer.cached_unit(key))
    loaded: list[str] = []
    real_get = served.cache.get

    async def counting_get(k, verify=None):
        loaded.append(k)
        return await real_get(k, verify)

    served.cache.get = counting_get  # type: ignore[method-assign]

    async def read_chunk(k: int) -> None:
        offset = big.offset + k * CHUNK
        assert bytes(await served.read(node, offset, 4096)) == expect[offset:offset + 4096]

    async with trio.open_nursery() as nursery:
        await nursery.start(served.run)
        await read_chunk(0)
        assert loaded == [keys[0]], "a first read with nothing read before it loads nothing ahead"
        await read_chunk(1)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(loaded) == sorted(keys[:3]), "the chunk after a sequential reader's is loaded ahead"
        await read_chunk(2)
        assert loaded.count(keys[2]) == 1, "the reader finds it loaded, not loading it again"
        await trio.testing.wait_all_tasks_blocked()
        assert source.asked == [] and keys[3] not in loaded, "the fourth chunk, not in the cache, is not fetched ahead"
        served.stop()
    assert served._ahead is None


@pytest.mark.parametrize("error", [OSError(5, "Input/output error"), RuntimeError("a bug in the load")])
async def test_a_failing_load_ahead_leaves_the_layer_served(tmp_path: Path, error: Exception) -> None:
    """A load ahead that fails (a disk error reading the cache file, or a bug) is dropped quietly:
    the layer's task group lives on, and the reader that needs the chunk tries it itself."""
    layer, image, source, served, node, big = await served_layer(tmp_path)
    dev = served.device
    first = next(i for i, off in enumerate(dev.offsets) if off == big.offset)
    keys = [dev.keys[dev.units[first + k]] for k in range(3)]
    writer = ChunkCache(tmp_path / "reader", 1 << 30)
    for key in keys:
        await writer.put(key, await layer.cached_unit(key))
    real_get = served.cache.get
    failed: list[str] = []

    async def failing_get(k, verify=None):
        if k == keys[2] and not failed:
            failed.append(k)
            raise error
        return await real_get(k, verify)

    served.cache.get = failing_get  # type: ignore[method-assign]
    expect = await reference_bytes(layer, image)
    async with trio.open_nursery() as nursery:
        await nursery.start(served.run)
        for k in range(3):
            offset = big.offset + k * CHUNK
            assert bytes(await served.read(node, offset, 4096)) == expect[offset:offset + 4096]
            await trio.testing.wait_all_tasks_blocked()
        assert failed == [keys[2]], "the load ahead of the third chunk failed"
        assert served._ahead is not None, "and the layer's loads ahead live on"
        served.stop()
