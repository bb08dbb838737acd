"""eStargz and zstd:chunked layers: the TOC gives the tree, chunks are fetched, verified and cached on first read.

The two formats share the TOC schema, the tree and the chunk records; what differs (how
the TOC is found and verified, where a chunk ends, how it decompresses) is in
`formats/estargz.py` and `formats/zstd_chunked.py`, and reaches the layer through a
`ChunkFormat`.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter

import trio

from ..cache import ChunkCache, Verify, sha256_verifier
from ..fetch.activity import FetchActivity
from ..fetch.batching import decode_each, extent, fill_batch
from ..fetch.readahead import SMALL_FILE
from ..fetch.units import Unit
from ..formats import estargz, zstd_chunked
from ..formats.entries import LayerEntry
from ..formats.errors import FormatError
from ..layer_modes import LayerMode
from ..recording import ReadHook
from .directories import Directories
from .layer import Blob, ReadError, UnitSource
from .tree import LayerTree, Node, build_tree

log = logging.getLogger(__name__)

TAIL_READ = 64 << 10
"""Bytes read from the end of a blob to find the footer; small TOCs come with them in one request."""

FETCH_WINDOW = 512 << 10
"""A miss fetches its chunk and the chunks right after it in the blob, up to this many
compressed bytes, in one range GET: more of the file it reads, and the small files of that
file's directory. A package's modules sit together in the tar, so one round trip serves
many first reads; on a 20 ms link that is the difference between hundreds of serial round
trips and a few dozen."""
BEHIND_WINDOW = 128 << 10
"""The same miss also fetches the small files of that directory right before its file, up
to this many compressed bytes: a package's `__init__` is read first, then the modules it
imports, in the order its code names them, not in tar order, so half of them lie behind it.

Measured on python-app's first start without a profile (100 Mbit/s + 20 ms, interleaved
rounds of one cold run each; benchmarks/RESULTS.md): the window forward across directories
(as before) 10.13 s median of 7, 48.4 MiB, 154 GETs; forward within the directory and 128 KiB
behind 9.53 s (7 runs), 44.9-46.3 MiB, 161-170 GETs. Either half alone changed nothing
(10.34 s and 10.21 s, 4 runs each): forward within the directory alone turns the next
directory's files into more misses (204-208 GETs), 128 KiB behind alone fetches more per miss
(122 GETs, 48.0 MiB); 256 KiB behind or a 1 MiB window forward were no better (9.67 s, 9.82 s).
A trace of the old window's start had 93 misses, 19 of them a file of the same directory within
128 KiB before an earlier miss's file."""


@dataclass(frozen=True)
class ChunkFormat:
    """What differs between the formats whose files are TOC-listed chunks of the blob."""

    name: LayerMode
    layer_entries: Callable[[estargz.Toc, int], list[LayerEntry]]
    decompress_chunk: Callable[[bytes, estargz.Chunk], bytes]
    parse_toc: Callable[[bytes], estargz.Toc]
    """The TOC from the bytes saved on disk (`EStargzIndex.member`)."""


ESTARGZ_CHUNKS = ChunkFormat(LayerMode.ESTARGZ, estargz.layer_entries, estargz.decompress_chunk, estargz.parse_toc)
ZSTD_CHUNKS = ChunkFormat(LayerMode.ZSTD_CHUNKED, zstd_chunked.layer_entries, zstd_chunked.decompress_chunk,
                          zstd_chunked.parse_toc)
CHUNK_FORMATS: dict[str, ChunkFormat] = {f.name: f for f in (ESTARGZ_CHUNKS, ZSTD_CHUNKS)}


@dataclass(frozen=True)
class EStargzIndex:
    """What resolving an eStargz or zstd:chunked layer yields: enough to serve it, and to keep it on disk."""

    footer: estargz.Footer
    """`toc_offset` is where the TOC starts: the payload lies before it (for zstd:chunked, the
    TOC frame's payload; the footer's other fields are eStargz's only)."""
    toc: estargz.Toc
    member: bytes
    """The TOC as fetched (eStargz: its gzip member; zstd:chunked: its compressed bytes, which
    its checksum covers): saved so a restart needs no registry."""
    format: ChunkFormat = ESTARGZ_CHUNKS


async def read_tail(blob: Blob) -> tuple[int, bytes]:
    """(where it starts, bytes): the end of the blob, where both formats keep their footer."""
    tail_start = max(0, blob.size - TAIL_READ)
    return tail_start, await blob.read(tail_start, blob.size)


async def _range(blob: Blob, tail: tuple[int, bytes], start: int, end: int) -> bytes:
    """Blob bytes [start, end), from the tail already read as far as it reaches."""
    tail_start, data = tail
    if start >= tail_start:
        return data[start - tail_start:end - tail_start]
    return await blob.read(start, min(end, tail_start)) + data[:max(0, end - tail_start)]


async def fetch_index(blob: Blob, tail: tuple[int, bytes] | None = None) -> EStargzIndex:
    """Footer and TOC of an eStargz blob, in one range request when the TOC is small."""
    tail = tail or await read_tail(blob)
    footer = estargz.parse_footer(tail[1][-estargz.FOOTER_READ_SIZE:], blob_size=blob.size)
    start, end = footer.toc_range(blob.size)
    member = await _range(blob, tail, start, end)
    return EStargzIndex(footer, await trio.to_thread.run_sync(estargz.parse_toc, member), member)


async def fetch_zstd_index(blob: Blob, tail: tuple[int, bytes], position: zstd_chunked.Position) -> EStargzIndex:
    """The TOC of a zstd:chunked blob at `position` (from the annotation, else the footer); not yet verified."""
    zstd_chunked.check_position(position, blob.size)
    compressed = await _range(blob, tail, position.offset, position.end)
    toc = await trio.to_thread.run_sync(
        lambda: zstd_chunked.parse_toc(compressed, uncompressed_size=position.uncompressed_size or None))
    return EStargzIndex(estargz.Footer(position.offset, 0, False), toc, compressed, ZSTD_CHUNKS)


def parse_index(member: bytes, toc_offset: int, format: str = LayerMode.ESTARGZ) -> EStargzIndex:
    """An index saved by `fetch_index` or `fetch_zstd_index`, read back from disk."""
    chunks = CHUNK_FORMATS[format]
    return EStargzIndex(estargz.Footer(toc_offset, 0, False), chunks.parse_toc(member), member, chunks)


class EStargzLayer:
    """A `Layer` whose files are chunks of an eStargz or zstd:chunked blob."""

    def __init__(self, index: EStargzIndex, blob: Blob, cache: ChunkCache,
                 activity: FetchActivity | None = None, source: UnitSource | None = None) -> None:
        """`source`: where misses go (the data plane's control plane); None fetches from `blob` here."""
        self.index = index
        self.blob = blob
        self.source = source
        self.cache = cache
        self.activity = activity or FetchActivity()
        self.recordings: list[ReadHook] = []
        self._decompress = index.format.decompress_chunk
        entries = index.format.layer_entries(index.toc, index.footer.toc_offset)
        toc_file = estargz.toc_file_entry(index.toc)
        self._tree = build_tree(entries + ([toc_file] if toc_file is not None else []))
        files: dict[estargz.Chunk, tuple[int, int]] = {}  # chunk -> (where its file starts, the file's compressed bytes)
        for e in entries:
            content = e.content
            if isinstance(content, tuple) and content:
                where = (content[0].compressed_offset, content[-1].compressed_end - content[0].compressed_offset)
                for c in content:
                    files.setdefault(c, where)
        self._in_blob_order = sorted(files, key=attrgetter("compressed_offset", "inner_offset"))
        self._offsets = [c.compressed_offset for c in self._in_blob_order]
        self._units = [Unit(c.compressed_offset, c.compressed_end, i, c.size, *files[c])
                       for i, c in enumerate(self._in_blob_order)]
        self._by_key: dict[str, estargz.Chunk] | None = None
        self._directories: Directories | None = None

    @property
    def units(self) -> Sequence[Unit]:
        return self._units

    def directory(self, unit: Unit) -> int:
        # Built on the first miss, not at mount: 0.014 s (0.007-0.016) for benchmarks.pull_cpu's 32,402 entries.
        if self._directories is None:
            self._directories = Directories(self._tree, _first_chunk_offset)
        return self._directories.of(unit.file)

    def directory_units(self, directory: int) -> list[Unit]:
        assert self._directories is not None, "directory() names the directories"
        out: list[Unit] = []
        for file in self._directories.files(directory):
            i = bisect.bisect_left(self._offsets, file)
            while i < len(self._units) and self._units[i].start == file and self._units[i].file != file:
                i += 1  # chunks of one gzip member share an offset
            while i < len(self._units) and self._units[i].file == file:
                out.append(self._units[i])
                i += 1
        return sorted(out)

    def is_cached(self, unit: Unit) -> bool:
        return self._key(unit) in self.cache

    async def fetch_batch(self, units: Sequence[Unit]) -> int:
        return await fill_batch(self.cache, self.blob.read, units, self._key, self._decode)

    def _key(self, unit: Unit) -> str:
        return self.key_of(self._in_blob_order[unit.index])

    def _decode(self, unit: Unit, compressed: bytes) -> bytes:
        return self._decompress(compressed, self._in_blob_order[unit.index])

    @property
    def tree(self) -> LayerTree:
        return self._tree

    async def read(self, node: Node, offset: int, size: int) -> bytes:
        end = min(offset + size, node.size)
        if offset >= end:
            return b""
        if isinstance(node.content, bytes):  # the TOC file: verified bytes we already hold
            return node.content[offset:end]
        chunks: tuple[estargz.Chunk, ...] = node.content or ()
        starts = [c.file_offset for c in chunks]
        first = bisect.bisect_right(starts, offset) - 1
        parts: list[bytes] = []
        for chunk in chunks[first:]:
            if chunk.file_offset >= end:
                break
            for recording in self.recordings:
                recording.touch(self.blob.digest, chunk.compressed_offset, chunk.compressed_end)
            lo, hi = max(0, offset - chunk.file_offset), min(chunk.size, end - chunk.file_offset)
            verify = sha256_verifier(chunk.digest) if chunk.digest else None
            part = await self.cache.get_range(self.key_of(chunk), lo, hi, verify)
            parts.append(part if part is not None else (await self._chunk(chunk, verify))[lo:hi])
        return b"".join(parts)

    async def _chunk(self, chunk: estargz.Chunk, verify: Verify | None) -> bytes:
        key = self.key_of(chunk)
        fetch = (lambda: self._fetch(chunk)) if self.source is None else (lambda: self._from_source(key, verify))
        try:
            return await self.cache.get_or_fetch(key, fetch, verify)
        except FormatError as e:
            raise ReadError(f"layer {self.blob.digest}: {e}") from e

    async def _from_source(self, key: str, verify: Verify | None) -> bytes:
        assert self.source is not None
        data = await self.source.fetch(self.blob.digest, key)
        if verify is not None and not verify(data):
            raise ReadError(f"layer {self.blob.digest}: chunk {key} as served fails its digest check")
        return data

    async def cached_unit(self, key: str) -> bytes:
        """The whole chunk named `key` (uncompressed, verified), fetched if missing: a data plane's miss."""
        if self._by_key is None:
            self._by_key = {self.key_of(c): c for c in self._in_blob_order}
        chunk = self._by_key.get(key)
        if chunk is None:
            raise ReadError(f"layer {self.blob.digest} has no chunk {key}")
        return await self._chunk(chunk, sha256_verifier(chunk.digest) if chunk.digest else None)

    def key_of(self, chunk: estargz.Chunk) -> str:
        """The chunk's name in the chunk cache: its digest, or where it sits in the blob when it has none."""
        return chunk.digest or f"{self.blob.digest}@{chunk.compressed_offset}+{chunk.inner_offset}:{chunk.size}"

    def _unit_of(self, chunk: estargz.Chunk) -> Unit:
        i = bisect.bisect_left(self._offsets, chunk.compressed_offset)
        while self._in_blob_order[i] != chunk:  # chunks of one gzip member share an offset
            i += 1
        return self._units[i]

    def _window(self, chunk: estargz.Chunk) -> list[Unit]:
        """Verifiable, uncached chunks (their units) that a miss of `chunk` fetches with it:
        after it, more of its file and the small files of its directory, up to `FETCH_WINDOW`
        and the first chunk that is neither; before it, small files of its directory, up to
        `BEHIND_WINDOW`. Never a large file no read has reached (`readahead.SMALL_FILE`): in
        issue 15's layer with 256 KiB chunks, reading /etc/passwd alone fetched 277,573 bytes,
        262,242 of them the first chunk of the large unread file after /etc; 15,331 now."""
        first = bisect.bisect_left(self._offsets, chunk.compressed_offset)
        read_file = self._units[first].file
        directory = self.directory(self._units[first])

        def sibling(unit: Unit) -> bool:
            return (unit.file != read_file and unit.file_bytes <= SMALL_FILE and directory >= 0
                    and self.directory(unit) == directory)

        def fetchable(other: estargz.Chunk) -> bool:
            # a chunk cached or on its way ends the window, rather than fetch its bytes again
            return bool(other.digest) and self.cache.wanted(self.key_of(other))

        out = []
        limit = chunk.compressed_offset + FETCH_WINDOW
        for unit, other in zip(self._units[first:], self._in_blob_order[first:]):
            if other == chunk:
                continue
            if (other.compressed_end > limit or not (unit.file == read_file or sibling(unit))
                    or not fetchable(other)):
                break
            out.append(unit)
        floor = chunk.compressed_offset - BEHIND_WINDOW
        for k in range(first - 1, -1, -1):
            unit, other = self._units[k], self._in_blob_order[k]
            if other.compressed_offset < floor or not sibling(unit) or not fetchable(other):
                break
            out.append(unit)
        return out

    async def _fetch(self, chunk: estargz.Chunk) -> bytes:
        neighbours = self._window(chunk)
        # Claimed, so that a read of a neighbour meanwhile waits for this GET instead of its own.
        async with self.cache.claimed([self._key(u) for u in neighbours]) as claim:
            units = [self._unit_of(chunk), *neighbours]  # all claimed: none was cached or on its way
            start, end = extent(units)
            self.activity.foreground(self, units[0].start, end)  # where the read was, how far the GET reached
            try:
                compressed = await self.blob.read(start, end)
            except Exception as e:
                raise ReadError(f"fetching {self.blob.digest} [{start}, {end}): {e}") from e
            done = await decode_each(compressed, start, units, self._decode)
            wanted = done[0][1]
            if isinstance(wanted, FormatError):
                raise wanted
            # A neighbour that fails to verify is fetched again when read.
            claim.got.update((self._key(unit), data) for unit, data in done[1:] if isinstance(data, bytes))
        return wanted


def _first_chunk_offset(node: Node) -> int | None:
    """What a file is known by among the units (`Unit.file`): where its first chunk starts."""
    chunks = node.content
    return chunks[0].compressed_offset if isinstance(chunks, tuple) and chunks else None
