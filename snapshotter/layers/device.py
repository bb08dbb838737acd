"""A layer's data device as a flat map: which chunk holds each byte of it.

An EROFS-served layer's file bytes are read through one FUSE file, the data device,
whose layout the EROFS image fixes (`Image.extents`). To serve it, the data plane needs
only, for each device offset, the chunk that holds it: not the TOC, not the tree.
Rebuilding those from a 30,000-entry TOC took the data plane ~1.4 CPU-seconds per layer
(benchmarks/read_latency.py), holding the GIL while containers' reads waited. So the
control plane, which has the layer at hand, writes this map once (`encode`) beside the
image, and the data plane loads it with a few array copies (`decode`).

eStargz and zstd:chunked layers only (`EStargzLayer`): a chunk's cached form is exactly
its file bytes, so a device range maps to a range of one cached chunk. (SOCI spans need
the zTOC's checkpoints to inflate, so a SOCI layer is still rebuilt from its zTOC.)
"""

from __future__ import annotations

import bisect
import logging
import stat
import struct
import sys
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import trio

from ..cache import ChunkCache, Verify, sha256_verifier
from ..formats.erofs import Image
from ..formats.errors import FormatError
from ..recording import ReadHook
from .estargz import EStargzLayer
from .layer import ReadError, UnitSource
from .tree import ROOT_INO, LayerTree, Node

log = logging.getLogger(__name__)

MAGIC = b"LZSDMAP1"
LITERAL = 0xFFFFFFFF
"""A piece whose bytes are kept in the map itself (the TOC file, `stargz.index.json`)."""
_HEADER = struct.Struct(">8sQQQQQ")  # magic, data size, pieces, units, literal bytes, name bytes


class HeldUnits:
    """The units loaded last, kept whole by cache key (one of these for all of a data plane's
    devices): a read within one is answered with a view of it, where the cache would copy the
    bytes out. The cache's memory holds the same objects, so this costs little memory more."""

    def __init__(self, units: int = 4) -> None:
        self.units = units
        self._held: OrderedDict[str, bytes] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        whole = self._held.get(key)
        if whole is not None:
            self._held.move_to_end(key)
        return whole

    def hold(self, key: str, whole: bytes) -> None:
        self._held[key] = whole
        self._held.move_to_end(key)
        while len(self._held) > self.units:
            self._held.popitem(last=False)


@dataclass(frozen=True)
class DeviceMap:
    """Pieces in device order: [offsets[i], offsets[i] + sizes[i]) is bytes
    [unit_offsets[i], ...) of unit `units[i]` (or of `literal` when it is LITERAL).
    Bytes of the device no piece covers are zeros (padding between files)."""

    data_size: int
    offsets: array
    sizes: array
    units: array
    unit_offsets: array
    keys: list[str]
    """Per unit: its chunk cache key."""
    digests: list[str]
    """Per unit: the sha256 its bytes must have ("" when the TOC gives none)."""
    blob_ranges: array
    """Per unit: compressed start and end in the blob, flattened (for start profiles)."""
    literal: bytes = b""


def estargz_map(layer: EStargzLayer, image: Image) -> DeviceMap:
    """The device map of an eStargz layer laid out as `image` says."""
    offsets, sizes, units, unit_offsets = array("Q"), array("Q"), array("I"), array("Q")
    keys: list[str] = []
    digests: list[str] = []
    blob_ranges = array("Q")
    index: dict[str, int] = {}
    literal = bytearray()
    for extent in image.extents:
        content = layer.tree.nodes[extent.ino].content
        if isinstance(content, bytes):
            offsets.append(extent.offset)
            sizes.append(len(content))
            units.append(LITERAL)
            unit_offsets.append(len(literal))
            literal += content
            continue
        for chunk in content or ():
            key = layer.key_of(chunk)
            unit = index.get(key)
            if unit is None:
                unit = index[key] = len(keys)
                keys.append(key)
                digests.append(chunk.digest or "")
                blob_ranges.extend((chunk.compressed_offset, chunk.compressed_end))
            offsets.append(extent.offset + chunk.file_offset)
            sizes.append(chunk.size)
            units.append(unit)
            unit_offsets.append(0)
    return DeviceMap(image.data_size, offsets, sizes, units, unit_offsets, keys, digests, blob_ranges, bytes(literal))


def encode(device: DeviceMap) -> bytes:
    names = "\n".join(f"{k}\t{d}" for k, d in zip(device.keys, device.digests, strict=True)).encode()
    parts = [_HEADER.pack(MAGIC, device.data_size, len(device.offsets), len(device.keys), len(device.literal),
                          len(names))]
    parts += [_little(column) for column in (device.offsets, device.sizes, device.unit_offsets, device.blob_ranges,
                                             device.units)]
    parts += [device.literal, names]
    return b"".join(parts)


def decode(raw: bytes) -> DeviceMap:
    """The map `encode` wrote; FormatError if it is torn or not one."""
    try:
        magic, data_size, n, units_n, literal_n, names_n = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise FormatError("not a lazysnap device map")
        pos = _HEADER.size
        columns = []
        for code, count in (("Q", n), ("Q", n), ("Q", n), ("Q", 2 * units_n), ("I", n)):
            column = array(code)
            size = column.itemsize * count
            if pos + size > len(raw):
                raise FormatError("torn device map: a column is short")
            column.frombytes(raw[pos:pos + size])
            if sys.byteorder == "big":
                column.byteswap()
            columns.append(column)
            pos += size
        literal = raw[pos:pos + literal_n]
        if len(raw) != pos + literal_n + names_n:
            raise FormatError(f"torn device map: {len(raw)} bytes, not {pos + literal_n + names_n}")
        names = raw[pos + literal_n:].decode().split("\n") if units_n else []
        pairs = [name.split("\t") for name in names]
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"torn device map: {e}") from None
    offsets, sizes, unit_offsets, blob_ranges, units = columns
    if len(pairs) != units_n or any(len(pair) != 2 for pair in pairs) or len(literal) != literal_n \
            or any(u != LITERAL and u >= units_n for u in units):
        raise FormatError("torn device map: its sections do not agree")
    return DeviceMap(data_size, offsets, sizes, units, unit_offsets, [k for k, _ in pairs], [d for _, d in pairs],
                     blob_ranges, literal)


def _little(column: array) -> bytes:
    if sys.byteorder == "big":
        column = array(column.typecode, column)
        column.byteswap()
    return column.tobytes()


LOAD_AHEAD = 2
"""Chunks loaded ahead of a sequential reader (`MappedDevice._load_ahead`; 8 MiB of memory).

First read of a cached 1 GiB file (`python -m benchmarks.cached_read --runs 3`, median
[min-max]): none ahead 300 MB/s [270-527]; one 695 [489-696]; two 693 [623-804]. Two it is,
for the better worst case; the reads are then bound by the FUSE replies on the trio thread
(0.8 ms per 1 MiB) and the GIL, not by the loads."""


class MappedDevice:
    """A data device served from a `DeviceMap`: the data plane's view of an eStargz layer.

    Reads come from the chunk cache (verified once per process), or from `source` (the
    control plane) on a miss, verified here again. Like `EStargzLayer.read`, minus the tree.
    """

    direct_io = True

    def __init__(self, device: DeviceMap, digest: str, cache: ChunkCache, source: UnitSource,
                 held: HeldUnits | None = None) -> None:
        self.device = device
        self.digest = digest
        self.cache = cache
        self.source = source
        self.recordings: list[ReadHook] = []
        self.held = held if held is not None else HeldUnits()
        self._loaded: set[int] = set()
        """Units loaded (so verified) once: the cache then reads just the bytes asked for."""
        self._ahead: trio.Nursery | None = None
        """Where chunks are loaded ahead of a sequential reader, while `run` runs."""
        self.size = device.data_size
        self.tree = LayerTree()
        node = Node(ROOT_INO + 1, stat.S_IFREG | 0o400, size=device.data_size, parent=ROOT_INO)
        self.tree.nodes[node.ino] = node
        assert self.tree.root.children is not None
        self.tree.root.children[b"data"] = node.ino

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """While the layer is served (its owner cancels this on detach): owns the loads ahead."""
        try:
            async with trio.open_nursery() as nursery:
                self._ahead = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._ahead = None

    def stop(self) -> None:
        """End `run`, and the loads ahead with it."""
        if self._ahead is not None:
            self._ahead.cancel_scope.cancel()

    async def read(self, node: Node, offset: int, size: int) -> bytes | memoryview:
        device = self.device
        end = min(offset + size, device.data_size)
        i = bisect.bisect_right(device.offsets, offset) - 1
        if i >= 0 and offset < end <= device.offsets[i] + device.sizes[i]:
            # Most reads lie within one chunk (EROFS asks for up to 1 MiB, chunks are 4 MiB):
            # answer with its bytes as they come, without copying them twice more.
            return await self._piece(i, offset - device.offsets[i], end - offset)
        out = bytearray()
        while offset < end:
            i = bisect.bisect_right(device.offsets, offset) - 1
            if i >= 0 and offset < device.offsets[i] + device.sizes[i]:
                n = min(end, device.offsets[i] + device.sizes[i]) - offset
                out += await self._piece(i, offset - device.offsets[i], n)
            else:  # padding between files
                following = device.offsets[i + 1] if i + 1 < len(device.offsets) else device.data_size
                n = min(end, following) - offset
                out += bytes(n)
            offset += n
        return bytes(out)

    async def _piece(self, i: int, within: int, n: int) -> bytes | memoryview:
        device = self.device
        unit = device.units[i]
        start = device.unit_offsets[i] + within
        if unit == LITERAL:
            return device.literal[start:start + n]
        for recording in self.recordings:
            recording.touch(self.digest, device.blob_ranges[2 * unit], device.blob_ranges[2 * unit + 1])
        key, verify = self._key_and_check(unit)
        whole = self.held.get(key)
        part: bytes | memoryview | None = None
        if whole is None and unit in self._loaded:
            part = await self.cache.get_range(key, start, start + n, verify)  # just these bytes
        elif whole is None:
            # A chunk's first read loads all of it and checks its digest, once however many
            # reads of it are in flight (they wait for it in the cache, and share its failure).
            self._load_ahead(i)
            whole = await self._whole(key, verify)
            self._loaded.add(unit)
        if part is None:
            if whole is None:  # loaded before, but the cache no longer has it
                whole = await self._whole(key, verify)
            self.held.hold(key, whole)
            part = memoryview(whole)[start:start + n]  # a view: no copy
        if len(part) != n:
            raise ReadError(f"layer {self.digest}: chunk {key} holds {len(part)} of the {n} bytes asked for")
        return part

    def _load_ahead(self, i: int) -> None:
        """At the first read of piece `i`'s chunk, when the piece before it was read (a sequential
        reader), load the chunks of the next `LOAD_AHEAD` pieces from the disk cache, in the background.

        A chunk's load (the file read and its sha256) is what a cached sequential read waited
        for, one load at a time (py-spy of `benchmarks.cached_read`). Never fetches.
        """
        units = self.device.units
        if self._ahead is None or i == 0 or units[i - 1] not in self._loaded:
            return
        for after in units[i + 1:i + 1 + LOAD_AHEAD]:
            if after != LITERAL and after not in self._loaded and after != units[i]:
                self._ahead.start_soon(self._preload, after)

    async def _preload(self, unit: int) -> None:
        key, verify = self._key_and_check(unit)
        try:
            await self.cache.preload(key, verify)
        except OSError as e:  # the reader that needs the chunk loads it itself, and says what failed
            log.debug("layer %s: loading chunk %s ahead: %s", self.digest, key, e)
        except Exception:  # a bug: said, but a load ahead must never take the data plane down
            log.exception("layer %s: loading chunk %s ahead failed", self.digest, key)

    def _key_and_check(self, unit: int) -> tuple[str, Verify | None]:
        """The unit's cache key, and the check of its bytes (none when the TOC gives no digest)."""
        digest = self.device.digests[unit]
        return self.device.keys[unit], sha256_verifier(digest) if digest else None

    async def _whole(self, key: str, verify: Verify | None) -> bytes:
        """The unit's verified bytes: from the cache (checked there), else from the source (checked here)."""
        return await self.cache.get_or_fetch(key, lambda: self._from_source(key, verify), verify)

    async def _from_source(self, key: str, verify: Verify | None) -> bytes:
        data = await self.source.fetch(self.digest, key)
        if verify is not None and not verify(data):
            raise ReadError(f"layer {self.digest}: chunk {key} as served fails its digest check")
        return data
