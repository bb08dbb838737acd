"""The checkpoint blob SOCI stores in a zTOC, and the spans it cuts a layer into.

`encode_checkpoints`/`CheckpointTable` are the codec; `GzipSpanIndex` maps an
uncompressed range to the spans (and their checkpoints) that hold it; a span's
compressed bytes are checked against their digest before anything inflates them.
"""

from __future__ import annotations

import bisect
import hashlib
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..digest import content_digest
from ..errors import FormatError

WINDOW_SIZE = 32768
BLOB_HEADER_SIZE = 12
CHECKPOINT_SIZE = 8 + 8 + 1 + WINDOW_SIZE
GZIP_TRAILER_SIZE = 8
DEFAULT_SPAN_SIZE = 4 << 20

_HEADER = struct.Struct("<iq")
_POINT = struct.Struct("<qqB")
_ZERO_WINDOW = bytes(WINDOW_SIZE)
_SHA256 = re.compile(r"sha256:([0-9a-f]{64})")



# --------------------------------------------------------------------------- records

@dataclass(frozen=True)
class Checkpoint:
    """Where inflation can restart: compressed `in_` (+ `bits` of byte in_-1), uncompressed `out`."""

    in_: int
    out: int
    bits: int
    window: bytes

    @property
    def compressed_start(self) -> int:
        """The first blob byte a span starting here needs: in_-1 when it carries leftover bits."""
        return self.in_ - 1 if self.bits else self.in_


@dataclass(frozen=True)
class Span:
    """One unit of fetch, verification and inflation.

    Blob bytes [compressed_start, compressed_end) inflate to uncompressed bytes
    [uncompressed_start, uncompressed_end) of the layer's tar. `checkpoint` is None for
    an uncompressed layer, whose compressed and uncompressed ranges are the same bytes.
    """

    id: int
    compressed_start: int
    compressed_end: int
    uncompressed_start: int
    uncompressed_end: int
    checkpoint: Checkpoint | None

    @property
    def compressed_size(self) -> int:
        return self.compressed_end - self.compressed_start

    @property
    def uncompressed_size(self) -> int:
        return self.uncompressed_end - self.uncompressed_start


# --------------------------------------------------------------------------- blob codec

def encode_checkpoints(span_size: int, checkpoints: Sequence[Checkpoint]) -> bytes:
    """The v2 blob: int32 count, int64 span size, then per checkpoint int64 in, int64 out, uint8 bits, window."""
    if not checkpoints:
        raise FormatError("a gzip index needs at least one checkpoint")
    parts = [_HEADER.pack(len(checkpoints), span_size)]
    for cp in checkpoints:
        if len(cp.window) != WINDOW_SIZE:
            raise FormatError(f"checkpoint window is {len(cp.window)} bytes, want {WINDOW_SIZE}")
        parts.append(_POINT.pack(cp.in_, cp.out, cp.bits))
        parts.append(cp.window)
    return b"".join(parts)


class CheckpointTable:
    """A parsed checkpoint blob. Offsets are decoded up front; windows are sliced on demand.

    Legacy (v1) blobs count checkpoint 0 in the header but omit it; it is synthesised as
    SOCI does (in=10, out=0, bits=0, zero window), which assumes a 10-byte gzip header.
    """

    def __init__(self, blob: bytes) -> None:
        if len(blob) < BLOB_HEADER_SIZE:
            raise FormatError(f"checkpoint blob is {len(blob)} bytes, shorter than its {BLOB_HEADER_SIZE}-byte header")
        have, span_size = _HEADER.unpack_from(blob, 0)
        if have < 1:
            raise FormatError(f"checkpoint blob claims {have} checkpoints, want at least 1")
        if span_size < 0:
            raise FormatError(f"checkpoint blob has a negative span size {span_size}")
        if len(blob) == BLOB_HEADER_SIZE + have * CHECKPOINT_SIZE:
            self.legacy = False
        elif len(blob) == BLOB_HEADER_SIZE + (have - 1) * CHECKPOINT_SIZE:
            self.legacy = True
        else:
            raise FormatError(f"checkpoint blob is {len(blob)} bytes, which fits neither {have} checkpoints "
                              f"({BLOB_HEADER_SIZE} + {have}*{CHECKPOINT_SIZE}) nor the legacy layout without "
                              "checkpoint 0")
        self.blob = blob
        self.span_size: int = span_size
        self.ins: list[int] = []
        self.outs: list[int] = []
        self.bits: list[int] = []
        self._window_at: list[int] = []
        if self.legacy:
            self._add(10, 0, 0, -1)
        pos = BLOB_HEADER_SIZE
        while pos < len(blob):
            in_, out, bits = _POINT.unpack_from(blob, pos)
            self._add(in_, out, bits, pos + _POINT.size)
            pos += CHECKPOINT_SIZE

    def _add(self, in_: int, out: int, bits: int, window_at: int) -> None:
        i = len(self.ins)
        if in_ < 0 or out < 0:
            raise FormatError(f"checkpoint {i} has a negative offset (in={in_}, out={out})")
        if bits > 7 or (bits and in_ == 0):
            raise FormatError(f"checkpoint {i} has bits={bits} at in={in_}")
        if self.ins and (in_ < self.ins[-1] or out < self.outs[-1]):
            raise FormatError(f"checkpoint {i} (in={in_}, out={out}) goes backwards from checkpoint {i - 1} "
                              f"(in={self.ins[-1]}, out={self.outs[-1]})")
        self.ins.append(in_)
        self.outs.append(out)
        self.bits.append(bits)
        self._window_at.append(window_at)

    def __len__(self) -> int:
        return len(self.ins)

    def window(self, i: int) -> bytes:
        at = self._window_at[i]
        return _ZERO_WINDOW if at < 0 else self.blob[at:at + WINDOW_SIZE]

    def checkpoint(self, i: int) -> Checkpoint:
        return Checkpoint(self.ins[i], self.outs[i], self.bits[i], self.window(i))

    def checkpoints(self) -> list[Checkpoint]:
        return [self.checkpoint(i) for i in range(len(self))]


def decode_checkpoints(blob: bytes) -> CheckpointTable:
    """Parse a zTOC's gzip checkpoint blob (v2, or legacy v1 without checkpoint 0)."""
    return CheckpointTable(blob)


# --------------------------------------------------------------------------- span geometry

class GzipSpanIndex:
    """Span geometry of a gzip layer: span i starts at checkpoint i and ends where i+1 starts.

    Compressed, span i is [in_i - (1 if bits_i else 0), in_{i+1}) (the byte holding
    leftover bits is shared with the previous span); the last span runs to the end of the
    blob, trailer included. Uncompressed it is [out_i, out_{i+1}), the last ending at the
    tar size; a span past that end (a checkpoint in the tar's trailing padding) is empty.
    """

    def __init__(self, table: CheckpointTable, compressed_size: int, uncompressed_size: int) -> None:
        if table.ins[-1] > compressed_size:
            raise FormatError(f"checkpoint at compressed offset {table.ins[-1]} is past the end of the "
                              f"{compressed_size}-byte blob")
        self.table = table
        self.compressed_size = compressed_size
        self.uncompressed_size = uncompressed_size

    @property
    def max_span_id(self) -> int:
        return len(self.table) - 1

    def span_id_at(self, offset: int) -> int:
        """The span holding uncompressed `offset`: the last checkpoint with out <= offset."""
        return max(bisect.bisect_right(self.table.outs, offset) - 1, 0)

    def span(self, i: int) -> Span:
        t = self.table
        last = i == len(t) - 1
        c_end = self.compressed_size if last else t.ins[i + 1]
        u_end = self.uncompressed_size if last else t.outs[i + 1]
        cp = t.checkpoint(i)
        return Span(i, cp.compressed_start, c_end, cp.out, max(cp.out, u_end), cp)

    def spans_for(self, start: int, end: int) -> list[Span]:
        return [self.span(i) for i in span_ids(self, start, end)]


def span_ids(index: Any, start: int, end: int) -> range:
    """The ids of the spans of `index` that hold uncompressed [start, end); refuses a range outside the layer."""
    if not 0 <= start <= end <= index.uncompressed_size:
        raise FormatError(f"range [{start}, {end}) is outside the layer's {index.uncompressed_size} uncompressed bytes")
    if start == end:
        return range(0)
    return range(index.span_id_at(start), index.span_id_at(end - 1) + 1)


# --------------------------------------------------------------------------- span digests

Bytes = bytes | bytearray | memoryview


def span_digest(compressed: Bytes) -> str:
    return content_digest(compressed)


def verify_span(compressed: Bytes, digest: str) -> None:
    """Check a span's compressed bytes against its zTOC digest before anything inflates them."""
    m = _SHA256.fullmatch(digest)
    if m is None:
        raise FormatError(f"span digest {digest!r} is not a sha256 digest")
    actual = hashlib.sha256(compressed).hexdigest()
    if actual != m[1]:
        raise FormatError(f"span digest mismatch: want {digest}, the {len(compressed)} bytes are sha256:{actual}")
