"""The device map (`layers/device.py`): what the data plane serves an eStargz layer's data device from.

Read for read, a `MappedDevice` must give the same bytes as the control plane's
`DataDevice` over the whole layer, without a TOC or a tree; and a map that is torn, or a
chunk that does not match its digest, must never become wrong bytes.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from snapshotter.cache import ChunkCache
from snapshotter.formats.errors import FormatError
from snapshotter.layers import device, erofs
from snapshotter.layers.estargz import EStargzLayer, fetch_index
from snapshotter.layers.layer import ReadError
from tests.harness.estargz import build_estargz
from tests.harness.images import File
from tests.unit.blobs import MemoryBlob

CHUNK = 64 << 10


async def layer_and_image(tmp_path: Path) -> tuple[EStargzLayer, erofs.Image]:
    rng = random.Random(7)
    files = [File("big.bin", rng.randbytes(3 * CHUNK + 123)), File("etc/conf", b"conf\n"),
             File("empty", b""), File("lib/a.py", b"a = 1\n" * 3000), File("lib/b.py", rng.randbytes(5000))]
    built = build_estargz(files, chunk_size=CHUNK)
    blob = MemoryBlob(built.blob, built.digest)
    layer = EStargzLayer(await fetch_index(blob), blob, ChunkCache(tmp_path / "control", 1 << 30))
    return layer, erofs.image_of(layer)


class ControlPlane:
    """A `UnitSource` answering from the control plane's own layer, as `ServedLayers.serve_unit` does."""

    def __init__(self, layer: EStargzLayer, corrupt: bool = False) -> None:
        self.layer, self.corrupt, self.asked = layer, corrupt, []

    async def fetch(self, layer: str, key: str) -> bytes:
        self.asked.append(key)
        data = await self.layer.cached_unit(key)
        return data[:-1] + bytes([data[-1] ^ 1]) if self.corrupt else data


async def test_map_round_trips_and_serves_what_the_layer_serves(tmp_path: Path) -> None:
    layer, image = await layer_and_image(tmp_path)
    mapped = device.estargz_map(layer, image)
    again = device.decode(device.encode(mapped))
    assert again == mapped
    source = ControlPlane(layer)
    served = device.MappedDevice(again, layer.blob.digest, ChunkCache(tmp_path / "reader", 1 << 30, writer=False),
                                 source)
    reference = erofs.DataDevice(layer, image.data_size, image.extents)
    node, ref_node = served.tree.resolve("data"), reference.tree.resolve("data")
    assert node is not None and ref_node is not None and node.size == image.data_size
    size = image.data_size
    for offset, length in [(0, size), (1, 100), (CHUNK - 10, 20), (size - 7, 100), (size, 10), (4096, 3 * CHUNK)]:
        assert await served.read(node, offset, length) == await reference.read(ref_node, offset, length), (offset,
                                                                                                            length)
    assert source.asked, "misses go to the control plane"
    asked = len(source.asked)
    await served.read(node, 0, size)
    assert len(source.asked) == asked, "a chunk the reader holds is not asked for again"


async def test_the_toc_file_is_served_from_the_map_itself(tmp_path: Path) -> None:
    layer, image = await layer_and_image(tmp_path)
    toc = layer.tree.resolve("stargz.index.json")
    assert toc is not None and isinstance(toc.content, bytes)
    extent = next(e for e in image.extents if e.ino == toc.ino)
    source = ControlPlane(layer)
    served = device.MappedDevice(device.estargz_map(layer, image), layer.blob.digest,
                                 ChunkCache(tmp_path / "reader", 1 << 30, writer=False), source)
    node = served.tree.resolve("data")
    assert node is not None
    assert await served.read(node, extent.offset, extent.size) == toc.content
    assert source.asked == []


async def test_a_chunk_that_fails_its_digest_is_a_read_error_never_bytes(tmp_path: Path) -> None:
    layer, image = await layer_and_image(tmp_path)
    served = device.MappedDevice(device.estargz_map(layer, image), layer.blob.digest,
                                 ChunkCache(tmp_path / "reader", 1 << 30, writer=False), ControlPlane(layer, corrupt=True))
    node = served.tree.resolve("data")
    big = next(e for e in image.extents if e.size > CHUNK)
    assert node is not None
    with pytest.raises(ReadError, match="digest"):
        await served.read(node, big.offset, 10)


@pytest.mark.parametrize("cut", [0, 5, 40, -1, -20])
async def test_a_torn_map_is_a_format_error(tmp_path: Path, cut: int) -> None:
    layer, image = await layer_and_image(tmp_path)
    raw = device.encode(device.estargz_map(layer, image))
    with pytest.raises(FormatError):
        device.decode(raw[:cut])


async def test_a_map_naming_a_unit_it_does_not_have_is_a_format_error(tmp_path: Path) -> None:
    layer, image = await layer_and_image(tmp_path)
    mapped = device.estargz_map(layer, image)
    mapped.units[0] = len(mapped.keys) + 3
    with pytest.raises(FormatError, match="agree"):
        device.decode(device.encode(mapped))
