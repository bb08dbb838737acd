"""The zTOC builder: stream a layer blob once, make its zTOC.

A gzip layer is inflated by `gzip_index.GzipIndexBuilder`, which records the checkpoints
and span digests and hands the tar to `tar.TarScanner`; an uncompressed layer goes to the
scanner as it is, cut into fixed spans by `_FixedSpanHasher`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from ..errors import FormatError
from ..gzip_index import DEFAULT_SPAN_SIZE, GzipIndexBuilder
from ..tar import TarScanner
from .records import (
    DEFAULT_BUILD_TOOL,
    TAR_ZINFO_VERSION,
    ZTOC_VERSION,
    CompressionAlgorithm,
    CompressionInfo,
    TarZinfo,
    Ztoc,
)
from .writer import serialize_tar_zinfo, serialize_ztoc


class _FixedSpanHasher:
    """sha256 of each `span_size` slice of a stream (the spans of an uncompressed layer)."""

    def __init__(self, span_size: int) -> None:
        self.span_size = span_size
        self.digests: list[str] = []
        self._hash = hashlib.sha256()
        self._filled = 0
        self.size = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            step = min(self.span_size - self._filled, len(view))
            self._hash.update(view[:step])
            self._filled += step
            self.size += step
            view = view[step:]
            if self._filled == self.span_size:
                self.digests.append("sha256:" + self._hash.hexdigest())
                self._hash = hashlib.sha256()
                self._filled = 0

    def finish(self) -> list[str]:
        if self._filled:
            self.digests.append("sha256:" + self._hash.hexdigest())
        return self.digests


class ZtocBuilder:
    """Streams a layer blob once (push chunks with `feed`) and makes its zTOC.

    Memory stays bounded: the tar scanner keeps only headers, the gzip builder a 32 KiB
    window; the zTOC itself (entries and ~32 KiB per span) is the only growth.
    """

    def __init__(self, span_size: int = DEFAULT_SPAN_SIZE, *,
                 compression: CompressionAlgorithm = CompressionAlgorithm.GZIP,
                 build_tool_identifier: str = DEFAULT_BUILD_TOOL) -> None:
        if span_size <= 0:
            raise ValueError(f"span size must be positive, not {span_size}")
        self.span_size = span_size
        self.compression = compression
        self.build_tool_identifier = build_tool_identifier
        self.tar = TarScanner()
        self.compressed_size = 0
        self._gzip: GzipIndexBuilder | None = None
        self._fixed: _FixedSpanHasher | None = None
        if compression == CompressionAlgorithm.GZIP:
            self._gzip = GzipIndexBuilder(span_size, self.tar.feed)
        else:
            self._fixed = _FixedSpanHasher(span_size)

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        self.compressed_size += len(chunk)
        if self._gzip is not None:
            self._gzip.feed(chunk)
        else:
            assert self._fixed is not None
            self.tar.feed(chunk)
            self._fixed.feed(chunk)

    def finish(self) -> Ztoc:
        if self.compressed_size == 0:
            raise FormatError("empty layer blob")
        if self._gzip is not None:
            index = self._gzip.finish()
            entries, tar_size = self.tar.finish()
            compression = CompressionInfo(CompressionAlgorithm.GZIP, len(index.checkpoints) - 1,
                                          index.span_digests, index.blob())
        else:
            assert self._fixed is not None
            entries, tar_size = self.tar.finish()
            digests = self._fixed.finish()
            zinfo = TarZinfo(TAR_ZINFO_VERSION, self.span_size, self.compressed_size)
            compression = CompressionInfo(CompressionAlgorithm.UNCOMPRESSED, zinfo.max_span_id, digests,
                                          serialize_tar_zinfo(zinfo))
        return Ztoc(ZTOC_VERSION, self.build_tool_identifier, self.compressed_size, tar_size, entries, compression)


def build_ztoc(chunks: Iterable[bytes | bytearray | memoryview], span_size: int = DEFAULT_SPAN_SIZE,
               compressed_size: int | None = None, *,
               compression: CompressionAlgorithm = CompressionAlgorithm.GZIP,
               build_tool_identifier: str = DEFAULT_BUILD_TOOL) -> bytes:
    """The serialized zTOC of a layer given as a stream of blob chunks (gzip, or a plain tar)."""
    builder = ZtocBuilder(span_size, compression=compression, build_tool_identifier=build_tool_identifier)
    for chunk in chunks:
        builder.feed(chunk)
    z = builder.finish()
    if compressed_size is not None and compressed_size != z.compressed_archive_size:
        raise FormatError(f"layer blob is {z.compressed_archive_size} bytes, expected {compressed_size}")
    return serialize_ztoc(z)
