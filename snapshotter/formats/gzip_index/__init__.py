"""Random access into an ordinary gzip stream through zran-style checkpoints (SOCI's "zinfo").

A checkpoint is a deflate block boundary: the compressed offset `in_` of its first full
byte, the `bits` (0-7) of byte `in_ - 1` that already belong to the next block, the
uncompressed offset `out`, and the 32 KiB of output before `out`, which later blocks may
copy from. With those, inflation restarts mid-stream, so one span of a layer can be
inflated from a ranged fetch of its compressed bytes (shared/research/soci.md §1.2-1.3).

Three parts, no I/O:
- the checkpoint blob codec SOCI stores in a zTOC (`encode_checkpoints`, `CheckpointTable`);
- `GzipIndexBuilder`, which streams a layer once and reproduces the checkpoints zran and
  SOCI make. Python's zlib cannot report block boundaries, so it drives the system libz
  through ctypes with `inflate(Z_BLOCK)` (pure computation: no files, no sockets);
- `inflate_span`, which restarts inflation at a checkpoint with the stdlib or isal API:
  neither has `inflatePrime`, so when `bits` is not 0 a preface of empty deflate blocks
  realigns the leftover bits (research python-limits.md §3(b)).
"""

from __future__ import annotations

from .builder import GzipIndex, GzipIndexBuilder, build_gzip_index
from .checkpoints import (BLOB_HEADER_SIZE, CHECKPOINT_SIZE, DEFAULT_SPAN_SIZE, GZIP_TRAILER_SIZE, WINDOW_SIZE, Bytes,
                          Checkpoint, CheckpointTable, GzipSpanIndex, Span, decode_checkpoints, encode_checkpoints,
                          span_digest, span_ids, verify_span)
from .restart import inflate_span, preface


__all__ = [
    "BLOB_HEADER_SIZE", "Bytes", "GZIP_TRAILER_SIZE", "CHECKPOINT_SIZE", "DEFAULT_SPAN_SIZE", "WINDOW_SIZE",
    "Checkpoint", "CheckpointTable", "GzipIndex", "GzipIndexBuilder", "GzipSpanIndex", "Span",
    "build_gzip_index", "decode_checkpoints", "encode_checkpoints", "inflate_span", "preface",
    "span_digest", "span_ids", "verify_span",
]
