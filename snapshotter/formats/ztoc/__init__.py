"""SOCI zTOC: read, validate, write and build the per-layer index of an unmodified tar.gz.

A zTOC (flatbuffers, schema in proto/ztoc.fbs, version "0.9") lists every tar member
with the offset of its data in the *uncompressed* tar, plus the gzip checkpoints that
cut the blob into independently inflatable spans and the sha256 of each span's
compressed bytes. The facts come from shared/research/soci.md §1.

The reader's order of work: fetch the zTOC blob (its digest is in the SOCI index
manifest) -> `parse_ztoc` -> `layer_entries` -> `layers.tree.build_tree`; on a read,
`span_index(z).spans_for(start, end)` -> fetch each span's compressed range ->
`gzip_index.verify_span` against `z.compression.span_digests[span.id]` ->
`gzip_index.inflate_span`. The builder side (`ZtocBuilder`, `build_ztoc`) streams a
layer once. Nothing here does I/O.

The modules, in that order:
- `records`: the zTOC's records and constants (`Ztoc`, `FileMetadata`, `FileExtent`, ...).
- `reader`: bytes to records with a small bounds-checked flatbuffer reader, because
  flatbuffers' Python runtime has no verifier and is slow per field.
- `validate`: `parse_ztoc` (read, then `validate_ztoc`), `layer_entries`, `ztoc_digest`.
- `spans`: the span geometry (`span_index`, `spans_for`) and `extract_file`.
- `writer`: records to bytes, with the flatc-generated code (`formats/ztoc_fbs`).
- `builder`: `ZtocBuilder` and `build_ztoc`, over `gzip_index` and `tar.TarScanner`.
"""

from ..errors import FormatError
from ..gzip_index import DEFAULT_SPAN_SIZE
from ..tar import TarScanner
from .builder import ZtocBuilder, build_ztoc
from .reader import parse_tar_zinfo
from .records import (
    DEFAULT_BUILD_TOOL,
    TAR_ZINFO_VERSION,
    XATTR_PAX_PREFIX,
    ZTOC_VERSION,
    CompressionAlgorithm,
    CompressionInfo,
    FileExtent,
    FileMetadata,
    TarZinfo,
    Ztoc,
)
from .spans import SpanIndex, TarSpanIndex, extract_file, span_index, spans_for
from .validate import layer_entries, parse_ztoc, validate_ztoc, ztoc_digest
from .writer import serialize_tar_zinfo, serialize_ztoc

__all__ = [
    "DEFAULT_BUILD_TOOL", "DEFAULT_SPAN_SIZE", "TAR_ZINFO_VERSION", "XATTR_PAX_PREFIX", "ZTOC_VERSION",
    "CompressionAlgorithm", "CompressionInfo", "FileExtent", "FileMetadata", "FormatError", "SpanIndex",
    "TarScanner", "TarSpanIndex", "TarZinfo", "Ztoc", "ZtocBuilder", "build_ztoc", "extract_file",
    "layer_entries", "parse_tar_zinfo", "parse_ztoc", "serialize_tar_zinfo",
    "serialize_ztoc", "span_index", "spans_for", "validate_ztoc", "ztoc_digest",
]
