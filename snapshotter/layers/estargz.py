"""eStargz layers: the TOC gives the tree, chunks are fetched, verified and cached on first read."""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

import trio

from ..cache import ChunkCache, sha256_verifier
from ..formats import estargz
from ..formats.errors import FormatError
from .layer import Blob, ReadError
from .tree import LayerTree, Node, build_tree

log = logging.getLogger(__name__)

TAIL_READ = 64 << 10
"""Bytes read from the end of a blob to find the footer; small TOCs come with them in one request."""


@dataclass(frozen=True)
class EStargzIndex:
    """What resolving an eStargz layer yields: enough to serve it, and to keep it on disk."""

    footer: estargz.Footer
    toc: estargz.Toc
    member: bytes
    """The TOC's gzip member as fetched: saved so a restart needs no registry."""


async def fetch_index(blob: Blob) -> EStargzIndex:
    """Footer and TOC of an eStargz blob, in one range request when the TOC is small."""
    tail_start = max(0, blob.size - TAIL_READ)
    tail = await blob.read(tail_start, blob.size)
    footer = estargz.parse_footer(tail[-estargz.FOOTER_READ_SIZE:], blob_size=blob.size)
    start, end = footer.toc_range(blob.size)
    if start >= tail_start:
        member = tail[start - tail_start:end - tail_start]
    else:
        member = await blob.read(start, tail_start) + tail[:end - tail_start]
    return EStargzIndex(footer, estargz.parse_toc(member), member)


def parse_index(member: bytes, toc_offset: int) -> EStargzIndex:
    """An index saved by `fetch_index`, read back from disk."""
    toc = estargz.parse_toc(member)
    return EStargzIndex(estargz.Footer(toc_offset, 0, False), toc, member)


class EStargzLayer:
    """A `Layer` whose files are chunks of an eStargz blob."""

    def __init__(self, index: EStargzIndex, blob: Blob, cache: ChunkCache) -> None:
        self.index = index
        self.blob = blob
        self.cache = cache
        entries = estargz.layer_entries(index.toc, index.footer.toc_offset)
        toc_file = estargz.toc_file_entry(index.toc)
        self._tree = build_tree(entries + ([toc_file] if toc_file is not None else []))

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
            data = await self._chunk(chunk)
            parts.append(data[max(0, offset - chunk.file_offset):end - chunk.file_offset])
        return b"".join(parts)

    async def _chunk(self, chunk: estargz.Chunk) -> bytes:
        key = chunk.digest or f"{self.blob.digest}@{chunk.compressed_offset}+{chunk.inner_offset}:{chunk.size}"
        verify = sha256_verifier(chunk.digest) if chunk.digest else None
        try:
            return await self.cache.get_or_fetch(key, lambda: self._fetch(chunk), verify)
        except FormatError as e:
            raise ReadError(f"layer {self.blob.digest}: {e}") from e

    async def _fetch(self, chunk: estargz.Chunk) -> bytes:
        try:
            compressed = await self.blob.read(chunk.compressed_offset, chunk.compressed_end)
        except Exception as e:
            raise ReadError(f"fetching {self.blob.digest} [{chunk.compressed_offset}, {chunk.compressed_end}): {e}") from e
        return await trio.to_thread.run_sync(estargz.decompress_chunk, compressed, chunk)
