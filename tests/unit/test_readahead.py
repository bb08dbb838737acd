"""Readahead predicts, it does not sweep: reading a few small files of a layer fetches none
of a large file that sits after them in the blob and that nobody reads (issue 15)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
import trio.testing

from snapshotter.cache import ChunkCache
from snapshotter.fetch.activity import FetchActivity
from snapshotter.fetch.blob import RegistryBlob
from snapshotter.fetch.readahead import Readahead
from snapshotter.fetch.units import FetchableLayer, Unit
from snapshotter.layers.estargz import BEHIND_WINDOW, EStargzLayer, fetch_index
from snapshotter.layers.soci import SociLayer
from snapshotter.formats import ztoc
from tests.harness.estargz import build_estargz
from tests.harness.images import File
from tests.unit.blobs import MemoryBlob
from tests.unit.test_soci_layer import gzip_layer


class RangeBlob(MemoryBlob):
    """A `MemoryBlob` that also keeps every range read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.ranges: list[tuple[int, int]] = []

    async def read(self, start: int, end: int) -> bytes:
        self.ranges.append((start, end))
        return await super().read(start, end)


def busybox_like(big: int = 6 << 20) -> dict[str, bytes]:
    """A busybox-like root (a ~1 MiB binary, /etc, a few small files), then one large file."""
    rng = random.Random(15)
    words = [rng.randbytes(6).hex().encode() for _ in range(512)]

    def text(n: int) -> bytes:
        return b" ".join(rng.choice(words) for _ in range(n // 13 + 1))[:n]

    out = {"bin/busybox": rng.randbytes(600 << 10) + text(400 << 10),
           "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n", "etc/group": b"root:x:0:\n",
           "etc/hostname": b"lazysnap\n", "etc/motd": text(2000)}
    out.update({f"usr/share/doc/note{i}.txt": text(3000 + 100 * i) for i in range(8)})
    out["opt/model.bin"] = rng.randbytes(big)   # large, incompressible, read by nobody
    out["zz/after.txt"] = b"after\n"
    return out


async def read_with_readahead(tmp_path: Path, files: dict[str, bytes], reads: list[str], chunk_size: int,
                              maximum: int = 8 << 20) -> tuple[EStargzLayer, RangeBlob]:
    """Read `reads` whole from an eStargz layer of `files`, with readahead fetching as the manager does."""
    built = build_estargz([File(n, d) for n, d in files.items()], chunk_size=chunk_size)
    blob = RangeBlob(built.blob)
    index = await fetch_index(blob)
    blob.ranges.clear()
    blob.reads = blob.fetched_bytes = 0
    activity = FetchActivity()
    layer = EStargzLayer(index, blob, ChunkCache(tmp_path / "cache", 1 << 30), activity)
    async with trio.open_nursery() as nursery:
        def spawn(target: FetchableLayer, units: list[Unit]) -> None:
            nursery.start_soon(target.fetch_batch, units)

        activity.on_miss = Readahead(spawn, maximum=maximum).miss
        for path in reads:
            node = layer.tree.resolve(path)
            assert node is not None
            for offset in range(0, node.size, 128 << 10):   # as FUSE asks
                assert await layer.read(node, offset, 128 << 10) == files[path][offset:offset + (128 << 10)]
    return layer, blob


def file_range(layer: EStargzLayer, path: str) -> tuple[int, int]:
    node = layer.tree.resolve(path)
    assert node is not None and node.content
    return node.content[0].compressed_offset, node.content[-1].compressed_end


@pytest.mark.parametrize("chunk_size, reads", [
    (4 << 20, ["bin/busybox", "etc/passwd", "etc/motd"]),    # issue 15: a streak's readahead
    (256 << 10, ["bin/busybox", "etc/passwd", "etc/motd"]),
    (256 << 10, ["etc/passwd"]),                             # one miss: its fetch window
])
async def test_reading_small_files_fetches_nothing_of_a_large_unread_file(tmp_path: Path, chunk_size: int,
                                                                          reads: list[str]) -> None:
    files = busybox_like()
    layer, blob = await read_with_readahead(tmp_path, files, reads, chunk_size)
    lo, hi = file_range(layer, "opt/model.bin")
    into_big = sum(max(0, min(end, hi) - max(start, lo)) for start, end in blob.ranges)
    read = sum(len(files[p]) for p in reads)
    assert into_big == 0, (f"{into_big} bytes of the unread {hi - lo}-byte large file fetched "
                           f"({blob.fetched_bytes} in all, {len(blob.ranges)} GETs, for {read} bytes read)")


async def test_a_sequential_read_of_a_large_file_is_still_read_ahead(tmp_path: Path) -> None:
    files = busybox_like(big=12 << 20)
    layer, blob = await read_with_readahead(tmp_path, files, ["opt/model.bin"], 1 << 20)
    lo, hi = file_range(layer, "opt/model.bin")
    assert blob.fetched_bytes >= hi - lo
    misses = layer.activity.foreground_fetches
    assert misses <= 5, f"{misses} reads of the 12 MiB file waited for the registry: readahead did not follow"


# ---------------------------------------------------------------- the tail read at resolve time

class _Client:
    """A registry client's `read_range` over bytes in memory, keeping the ranges asked for."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.ranges: list[tuple[int, int]] = []

    async def read_range(self, location: object, start: int, end: int) -> bytes:
        self.ranges.append((start, end))
        return self.data[start:end]


async def test_a_blob_serves_reads_from_the_tail_it_kept() -> None:
    data = random.Random(1).randbytes(100_000)
    client = _Client(data)
    blob = RegistryBlob(client, "ref", "sha256:" + "ab" * 32, len(data), None)  # type: ignore[arg-type]
    blob.keep(60_000, data[60_000:90_000])   # the payload part of a tail, without the index after it
    assert await blob.read(61_000, 70_000) == data[61_000:70_000] and client.ranges == []
    assert await blob.read(50_000, 65_000) == data[50_000:65_000] and client.ranges == [(50_000, 60_000)]
    assert await blob.read(85_000, 95_000) == data[85_000:95_000] and client.ranges[-1] == (85_000, 95_000)
    assert await blob.read(0, 1000) == data[:1000]
    assert blob.fetched_bytes == 10_000 + 10_000 + 1000


@pytest.mark.parametrize("span", [1 << 20, 512 << 10])
async def test_soci_readahead_stops_at_a_large_unread_file(tmp_path: Path, span: int) -> None:
    """SOCI: a span is the unit, so the span holding /etc may hold the large file's first bytes
    too; but no span that starts inside the large file is fetched."""
    files = busybox_like()
    data = gzip_layer(files)
    blob = RangeBlob(data)
    activity = FetchActivity()
    layer = SociLayer(ztoc.parse_ztoc(ztoc.build_ztoc([data], span, len(data))), blob,
                      ChunkCache(tmp_path / "cache", 1 << 30), activity)
    async with trio.open_nursery() as nursery:
        def spawn(target: FetchableLayer, units: list[Unit]) -> None:
            nursery.start_soon(target.fetch_batch, units)

        activity.on_miss = Readahead(spawn).miss
        for path in ["bin/busybox", "etc/passwd", "etc/motd"]:
            node = layer.tree.resolve(path)
            assert node is not None
            for offset in range(0, node.size, 128 << 10):
                assert await layer.read(node, offset, 128 << 10) == files[path][offset:offset + (128 << 10)]
    model = layer.tree.resolve("opt/model.bin")
    assert model is not None
    inside = [s for s in (layer.index.span(i) for i in range(layer.index.max_span_id + 1))
              if model.content.uncompressed_offset < s.uncompressed_start
              < model.content.uncompressed_offset + model.content.size]
    fetched = [s.id for s in inside if layer.is_cached(layer.units[s.id])]
    assert fetched == [], (f"spans {fetched} of the unread large file fetched ({blob.fetched_bytes} of "
                           f"{len(data)} bytes in all)")


# ---------------------------------------------------------------- a package's directory

def package_like() -> dict[str, bytes]:
    """A package of 40 modules (30 KB each, 1.2 MB: more than one miss's fetch window), a large
    library in it that nobody reads, and another directory nobody reads."""
    rng = random.Random(16)
    out = {f"pkg/mod{i:02d}.py": rng.randbytes(30_000) for i in range(40)}
    out["pkg/big.so"] = rng.randbytes(2 << 20)
    out.update({f"other/x{i}.txt": rng.randbytes(3000) for i in range(10)})
    return out


async def test_reads_of_two_modules_of_a_package_fetch_its_other_small_files(tmp_path: Path) -> None:
    """Imports read a package's modules out of blob order; once two of them missed, the rest of
    the directory's small files come in the background, and nothing of other directories or of
    the package's large unread file."""
    files = package_like()
    built = build_estargz([File(n, d) for n, d in files.items()], chunk_size=256 << 10)
    blob = RangeBlob(built.blob)
    index = await fetch_index(blob)
    blob.ranges.clear()
    activity = FetchActivity()
    layer = EStargzLayer(index, blob, ChunkCache(tmp_path / "cache", 1 << 30), activity)

    async def read(path: str) -> None:
        node = layer.tree.resolve(path)
        assert node is not None
        assert await layer.read(node, 0, node.size) == files[path]

    async with trio.open_nursery() as nursery:
        def spawn(target: FetchableLayer, units: list[Unit]) -> None:
            nursery.start_soon(target.fetch_batch, units)

        activity.on_miss = Readahead(spawn).miss
        await read("pkg/mod39.py")
        await read("pkg/mod02.py")  # backward: no streak; the second file of pkg/
        assert activity.foreground_fetches == 2
        await trio.testing.wait_all_tasks_blocked()
        for name in ("pkg/mod30.py", "pkg/mod25.py", "pkg/mod00.py", "pkg/mod35.py"):
            await read(name)
    assert activity.foreground_fetches == 2, "modules of the package read after two misses waited for the registry"
    for path in ("pkg/big.so", *(p for p in files if p.startswith("other/"))):
        lo, hi = file_range(layer, path)
        into = sum(max(0, min(end, hi) - max(start, lo)) for start, end in blob.ranges)
        assert into == 0, f"{into} bytes of unread {path} fetched"


async def test_one_read_in_a_directory_fetches_only_the_files_just_before_it(tmp_path: Path) -> None:
    """A miss brings the small files of its directory within `BEHIND_WINDOW` before its file
    (a package's `__init__` is read first, the modules it imports next, in no tar order);
    one read fetches no file of its directory further away."""
    files = package_like()
    layer, blob = await read_with_readahead(tmp_path, files, ["pkg/mod39.py"], 256 << 10)
    await trio.testing.wait_all_tasks_blocked()
    lo, _ = file_range(layer, "pkg/mod00.py")
    _, hi = file_range(layer, "pkg/mod38.py")
    near = sum(max(0, min(end, hi) - max(start, lo)) for start, end in blob.ranges)
    assert 0 < near <= BEHIND_WINDOW, f"{near} bytes of the modules before the one read fetched"
    _, far = file_range(layer, "pkg/mod33.py")
    into = sum(max(0, min(end, far) - max(start, lo)) for start, end in blob.ranges)
    assert into == 0, f"{into} bytes of modules more than {BEHIND_WINDOW} bytes away fetched after one read"
