"""A zTOC's spans: which pieces of the blob hold uncompressed [start, end), and a file read through them.

On a read the runtime takes `span_index(z).spans_for(start, end)`, fetches each span's
compressed range, checks it with `gzip_index.verify_span` against
`z.compression.span_digests[span.id]` and inflates it with `gzip_index.inflate_span`;
`extract_file` does the same from the whole blob. A gzip layer's spans come from its
checkpoints (`gzip_index.GzipSpanIndex`); an uncompressed layer's are fixed slices
(`TarSpanIndex`).
"""

from __future__ import annotations

from .. import gzip_index
from ..errors import FormatError
from ..gzip_index import CheckpointTable, GzipSpanIndex, Span
from .reader import parse_tar_zinfo
from .records import CompressionAlgorithm, FileExtent, TarZinfo, Ztoc


class TarSpanIndex:
    """Span geometry of an uncompressed layer: fixed spans, compressed bytes = uncompressed bytes."""

    def __init__(self, zinfo: TarZinfo, compressed_size: int) -> None:
        if zinfo.span_size <= 0:
            raise FormatError(f"TarZinfo span size {zinfo.span_size} is not positive")
        if zinfo.size != compressed_size:
            raise FormatError(f"TarZinfo size {zinfo.size} differs from the {compressed_size}-byte blob")
        self.zinfo = zinfo
        self.uncompressed_size = zinfo.size

    @property
    def max_span_id(self) -> int:
        return self.zinfo.max_span_id

    def span_id_at(self, offset: int) -> int:
        return min(offset // self.zinfo.span_size, max(self.max_span_id, 0))

    def span(self, i: int) -> Span:
        start = i * self.zinfo.span_size
        end = self.zinfo.size if i == self.max_span_id else start + self.zinfo.span_size
        return Span(i, start, end, start, end, None)

    def spans_for(self, start: int, end: int) -> list[Span]:
        return [self.span(i) for i in gzip_index.span_ids(self, start, end)]


SpanIndex = GzipSpanIndex | TarSpanIndex


def span_index(z: Ztoc) -> SpanIndex:
    """The span geometry of a zTOC; build it once per layer, it parses the checkpoint blob."""
    c = z.compression
    if c.algorithm == CompressionAlgorithm.UNCOMPRESSED:
        return TarSpanIndex(parse_tar_zinfo(c.checkpoints), z.compressed_archive_size)
    return GzipSpanIndex(CheckpointTable(c.checkpoints), z.compressed_archive_size, z.uncompressed_archive_size)


def spans_for(z_or_index: Ztoc | SpanIndex, uncompressed_start: int, uncompressed_end: int) -> list[Span]:
    """The spans whose bytes cover uncompressed [start, end), in order."""
    index = span_index(z_or_index) if isinstance(z_or_index, Ztoc) else z_or_index
    return index.spans_for(uncompressed_start, uncompressed_end)


def extract_file(z: Ztoc, extent: FileExtent, blob: bytes | memoryview, index: SpanIndex | None = None) -> bytes:
    """A regular file's bytes from the whole layer blob, each span verified before it is inflated.

    The core of `ztoc get-file`; the runtime does the same span by span from ranged fetches.
    """
    if len(blob) != z.compressed_archive_size:
        raise FormatError(f"blob is {len(blob)} bytes, the zTOC says {z.compressed_archive_size}")
    index = index or span_index(z)
    view = memoryview(blob)
    pieces = []
    for span in index.spans_for(extent.uncompressed_offset, extent.end):
        compressed = view[span.compressed_start:span.compressed_end]
        gzip_index.verify_span(compressed, z.compression.span_digests[span.id])
        data = gzip_index.inflate_span(compressed, span)
        lo = max(extent.uncompressed_offset, span.uncompressed_start) - span.uncompressed_start
        hi = min(extent.end, span.uncompressed_end) - span.uncompressed_start
        pieces.append(data[lo:hi])
    out = b"".join(pieces)
    if len(out) != extent.size:
        raise FormatError(f"file at {extent.uncompressed_offset}: got {len(out)} of {extent.size} bytes")
    return out
