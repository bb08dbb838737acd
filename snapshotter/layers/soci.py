"""SOCI layers: an ordinary gzip (or tar) layer made seekable by a zTOC.

The zTOC gives the tree and the span geometry; a file read becomes the spans that hold
its bytes. Each span's compressed bytes are fetched with one range GET, checked against
the zTOC's span digest, kept in the chunk cache under that digest (so a copy on disk is
re-verified whenever it is loaded), and inflated from the span's checkpoint. A few
inflated spans stay in memory, because a run of 128 KiB FUSE reads walks one span.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Sequence

import trio

from ..cache import ChunkCache, sha256_verifier
from ..fetch.activity import FetchActivity
from ..fetch.batching import fill_batch
from ..fetch.units import Unit
from ..formats import gzip_index, ztoc
from ..formats.errors import FormatError
from ..recording import ReadHook
from .layer import Blob, ReadError, UnitSource
from .tree import LayerTree, Node, build_tree

INFLATED_SPANS = 8
"""Inflated spans kept per layer (4 MiB each at the default span size)."""


class SociLayer:
    """A `Layer` whose files are read through a zTOC's spans."""

    def __init__(self, z: ztoc.Ztoc, blob: Blob, cache: ChunkCache, activity: FetchActivity | None = None,
                 source: UnitSource | None = None) -> None:
        """`source`: where misses go (the data plane's control plane); None fetches from `blob` here."""
        if z.compressed_archive_size != blob.size:
            raise FormatError(f"the zTOC is for a {z.compressed_archive_size}-byte layer, the blob has {blob.size}")
        self.ztoc = z
        self.index = ztoc.span_index(z)
        self.blob = blob
        self.cache = cache
        self.source = source
        entries = ztoc.layer_entries(z)
        self._tree = build_tree(entries)
        self._inflated: OrderedDict[int, bytes] = OrderedDict()
        self._inflating: dict[int, trio.Event] = {}
        self.activity = activity or FetchActivity()
        self.recordings: list[ReadHook] = []
        spans = [self.index.span(i) for i in range(self.index.max_span_id + 1)]
        self._by_digest: dict[str, int] | None = None
        extents = sorted({e.content for e in entries if isinstance(e.content, ztoc.FileExtent) and e.content.size})
        self._units = [Unit(s.compressed_start, s.compressed_end, s.id, s.compressed_end - s.compressed_start,
                            *_file_at(extents, s)) for s in spans]

    @property
    def units(self) -> Sequence[Unit]:
        return self._units

    def is_cached(self, unit: Unit) -> bool:
        return self._key(unit) in self.cache

    def directory(self, unit: Unit) -> int:
        """Not told: a span (4 MiB by default) already holds a run of neighbouring files."""
        return -1

    def directory_units(self, directory: int) -> list[Unit]:
        return []

    async def fetch_batch(self, units: Sequence[Unit]) -> int:
        return await fill_batch(self.cache, self.blob.read, units, self._key, self._verified)

    def _key(self, unit: Unit) -> str:
        return self.ztoc.compression.span_digests[unit.index]

    def _verified(self, unit: Unit, compressed: bytes) -> bytes:
        """A span is cached compressed, once it matches its digest."""
        gzip_index.verify_span(compressed, self._key(unit))
        return compressed

    @property
    def tree(self) -> LayerTree:
        return self._tree

    async def read(self, node: Node, offset: int, size: int) -> bytes:
        extent: ztoc.FileExtent = node.content
        end = min(offset + size, node.size)
        if offset >= end:
            return b""
        start, stop = extent.uncompressed_offset + offset, extent.uncompressed_offset + end
        parts = []
        for span in self.index.spans_for(start, stop):
            for recording in self.recordings:
                recording.touch(self.blob.digest, span.compressed_start, span.compressed_end)
            data = await self._span(span)
            parts.append(data[max(start, span.uncompressed_start) - span.uncompressed_start:
                              min(stop, span.uncompressed_end) - span.uncompressed_start])
        return b"".join(parts)

    async def _span(self, span: gzip_index.Span) -> bytes:
        """The inflated span: from memory, or fetched/loaded and inflated once however many ask."""
        while True:
            data = self._inflated.get(span.id)
            if data is not None:
                self._inflated.move_to_end(span.id)
                return data
            busy = self._inflating.get(span.id)
            if busy is None:
                break
            await busy.wait()
        done = self._inflating[span.id] = trio.Event()
        try:
            digest = self.ztoc.compression.span_digests[span.id]
            try:
                compressed = await self._compressed(span, digest)
                data = await trio.to_thread.run_sync(gzip_index.inflate_span, compressed, span)
            except FormatError as e:
                raise ReadError(f"layer {self.blob.digest} span {span.id}: {e}") from e
            self._inflated[span.id] = data
            while len(self._inflated) > INFLATED_SPANS:
                self._inflated.popitem(last=False)
            return data
        finally:
            del self._inflating[span.id]
            done.set()

    async def _compressed(self, span: gzip_index.Span, digest: str) -> bytes:
        fetch = (lambda: self._fetch(span, digest)) if self.source is None else (lambda: self._from_source(digest))
        return await self.cache.get_or_fetch(digest, fetch, sha256_verifier(digest))

    async def _from_source(self, digest: str) -> bytes:
        assert self.source is not None
        compressed = await self.source.fetch(self.blob.digest, digest)
        gzip_index.verify_span(compressed, digest)
        return compressed

    async def cached_unit(self, key: str) -> bytes:
        """The compressed span whose digest is `key` (verified), fetched if missing: a data plane's miss."""
        if self._by_digest is None:
            self._by_digest = {d: i for i, d in enumerate(self.ztoc.compression.span_digests)}
        span_id = self._by_digest.get(key)
        if span_id is None:
            raise ReadError(f"layer {self.blob.digest} has no span {key}")
        try:
            return await self._compressed(self.index.span(span_id), key)
        except FormatError as e:
            raise ReadError(f"layer {self.blob.digest} span {span_id}: {e}") from e

    async def _fetch(self, span: gzip_index.Span, digest: str) -> bytes:
        self.activity.foreground(self, span.compressed_start, span.compressed_end)
        try:
            compressed = await self.blob.read(span.compressed_start, span.compressed_end)
        except Exception as e:
            raise ReadError(f"fetching {self.blob.digest} span {span.id} "
                            f"[{span.compressed_start}, {span.compressed_end}): {e}") from e
        gzip_index.verify_span(compressed, digest)
        return compressed


def _file_at(extents: list[ztoc.FileExtent], span: gzip_index.Span) -> tuple[int, int]:
    """(where it starts, its size), both uncompressed, of the file a span's bytes begin with (or,
    if none runs into it, of the first file that starts in it): what readahead tells files by
    (`readahead.fetch_ahead`; an uncompressed size keeps to the small side of the bound). (-1, 0):
    no file."""
    i = bisect.bisect_right(extents, (span.uncompressed_start, 1 << 62)) - 1
    if i >= 0 and extents[i].uncompressed_offset + extents[i].size > span.uncompressed_start:
        return extents[i].uncompressed_offset, extents[i].size
    if i + 1 < len(extents) and extents[i + 1].uncompressed_offset < span.uncompressed_end:
        return extents[i + 1].uncompressed_offset, extents[i + 1].size
    return -1, 0
