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

import bisect
import ctypes
import ctypes.util
import hashlib
import re
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from . import inflate
from .digest import content_digest
from .errors import FormatError

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
        return [self.span(i) for i in _span_ids(self, start, end)]


def _span_ids(index: Any, start: int, end: int) -> range:
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


# --------------------------------------------------------------------------- span inflation

def _bits_le(fields: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """Pack (value, width) fields LSB-first, as deflate stores header fields and extra bits."""
    value = nbits = 0
    for field, width in fields:
        value |= field << nbits
        nbits += width
    return value, nbits


def _code(code: int, length: int) -> tuple[int, int]:
    """A Huffman code as an LSB-first field: deflate sends codes starting with their top bit."""
    return int(format(code, f"0{length}b")[::-1], 2), length


# An empty fixed-Huffman block: BFINAL=0, BTYPE=01, end-of-block (code 0000000): 10 bits.
_EMPTY_FIXED = _bits_le([(0, 1), (1, 2), (0, 7)])

# An empty dynamic-Huffman block, 93 bits (odd, unlike the fixed block). Code-length code:
# symbol 0 -> "0", symbol 1 -> "10", symbol 18 -> "11" (complete). Literal/length code:
# only end-of-block (256) with length 1; no distance codes. zlib accepts both, as a
# single one-bit literal code and an empty distance code are explicitly allowed.
_CL_ORDER = (16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15)
_CL_LENGTHS = {0: 1, 1: 2, 18: 2}
_EMPTY_DYNAMIC = _bits_le(
    [(0, 1), (2, 2), (0, 5), (0, 5), (18 - 4, 4)]
    + [(_CL_LENGTHS.get(sym, 0), 3) for sym in _CL_ORDER[:18]]
    + [_code(0b11, 2), (138 - 11, 7), _code(0b11, 2), (118 - 11, 7)]  # 256 zero lengths (literals 0-255)
    + [_code(0b10, 2)]  # length 1 for end-of-block
    + [_code(0b0, 1)]  # length 0 for the one distance code
    + [_code(0b0, 1)]  # the block's only symbol: end-of-block
)


def _preface_fields(bits: int) -> tuple[int, int]:
    """Empty non-final blocks whose length is congruent to -bits mod 8 (fixed 10 ≡ 2, dynamic 93 ≡ 5)."""
    need = (8 - bits) % 8
    dynamic = need % 2
    fixed = ((need - 5 * dynamic) % 8) // 2
    return _bits_le([_EMPTY_DYNAMIC] * dynamic + [_EMPTY_FIXED] * fixed)


_PREFACES = {bits: _preface_fields(bits) for bits in range(1, 8)}


def preface(bits: int, partial: int) -> bytes:
    """Bytes that put a raw inflater where a checkpoint with `bits` leftover bits left off.

    `partial` is blob byte in_-1; its top `bits` bits begin the next real block. The empty
    blocks before them end exactly `bits` bits before a byte boundary, so the rest of the
    span follows byte-aligned, as stored blocks require: shifting the data would not work.
    """
    value, nbits = _PREFACES[bits]
    value |= (partial >> (8 - bits)) << nbits
    return value.to_bytes((nbits + bits) // 8, "little")


def inflate_span(compressed: Bytes, span: Span) -> bytes:
    """The uncompressed bytes of `span`, exactly, from its compressed bytes (verify them first).

    Crosses gzip member boundaries inside the span (pigz, eStargz-style blobs): the raw
    member is followed by its 8-byte trailer, and later members are read as gzip.
    """
    data = memoryview(compressed)
    if len(data) != span.compressed_size:
        raise FormatError(f"span {span.id}: got {len(data)} compressed bytes, want {span.compressed_size}")
    want = span.uncompressed_size
    cp = span.checkpoint
    if cp is None:
        if want > len(data):
            raise FormatError(f"span {span.id}: {len(data)} bytes cannot hold {want} uncompressed bytes")
        return bytes(data[:want])
    if want == 0:
        return b""
    mod = inflate.module
    inflater = mod.decompressobj(-15, zdict=cp.window)
    pieces: list[bytes] = []
    have = 0
    raw = True
    try:
        if cp.bits:
            if not data:
                raise FormatError(f"span {span.id}: no compressed bytes")
            inflater.decompress(preface(cp.bits, data[0]))
            data = data[1:]
        pending: bytes | memoryview = data
        while have < want:
            piece = inflater.decompress(pending, want - have)
            pieces.append(piece)
            have += len(piece)
            if inflater.eof:
                rest = inflater.unused_data
                if raw:
                    if len(rest) < GZIP_TRAILER_SIZE:
                        break
                    rest = rest[GZIP_TRAILER_SIZE:]
                    raw = False
                if have >= want or not rest:
                    break
                inflater = mod.decompressobj(31)
                pending = rest
                continue
            pending = inflater.unconsumed_tail
            if not piece and not pending:
                break
    except inflate.ERRORS as e:
        raise FormatError(f"span {span.id}: corrupt deflate data: {e}") from None
    if have != want:
        raise FormatError(f"span {span.id}: inflated to {have} of {want} bytes")
    return b"".join(pieces)


# --------------------------------------------------------------------------- index builder

_Z_OK, _Z_STREAM_END, _Z_NEED_DICT, _Z_BUF_ERROR = 0, 1, 2, -5
_Z_BLOCK = 5
_AUTO_HEADER = 15 + 32  # zlib or gzip header, 32 KiB window: what zran and SOCI use
_END_OF_BLOCK = 128
_LAST_BLOCK = 64
_OUT_SIZE = 1 << 16


class _ZStream(ctypes.Structure):
    _fields_ = [
        ("next_in", ctypes.c_void_p), ("avail_in", ctypes.c_uint), ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p), ("avail_out", ctypes.c_uint), ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p), ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p), ("zfree", ctypes.c_void_p), ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int), ("adler", ctypes.c_ulong), ("reserved", ctypes.c_ulong),
    ]


_libz: ctypes.CDLL | None = None
_libz_lock = threading.Lock()


def _zlib_library() -> ctypes.CDLL:
    """The system libz, bound on first use (the builder is the only user)."""
    global _libz
    with _libz_lock:
        if _libz is None:
            try:
                lib = ctypes.CDLL("libz.so.1")
            except OSError:  # not the usual Linux soname: ask the loader's cache
                lib = ctypes.CDLL(ctypes.util.find_library("z") or "libz.so")
            stream = ctypes.POINTER(_ZStream)
            lib.zlibVersion.restype = ctypes.c_char_p
            lib.inflateInit2_.argtypes = [stream, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            lib.inflate.argtypes = [stream, ctypes.c_int]
            lib.inflateReset2.argtypes = [stream, ctypes.c_int]
            lib.inflateEnd.argtypes = [stream]
            for fn in (lib.inflateInit2_, lib.inflate, lib.inflateReset2, lib.inflateEnd):
                fn.restype = ctypes.c_int
            _libz = lib
        return _libz


@dataclass(frozen=True)
class GzipIndex:
    """What one pass over a gzip stream yields: checkpoints, span digests and sizes."""

    span_size: int
    checkpoints: list[Checkpoint]
    span_digests: list[str]
    compressed_size: int
    uncompressed_size: int
    members: int

    def blob(self) -> bytes:
        return encode_checkpoints(self.span_size, self.checkpoints)

    def span_index(self, uncompressed_size: int | None = None) -> GzipSpanIndex:
        size = self.uncompressed_size if uncompressed_size is None else uncompressed_size
        return GzipSpanIndex(CheckpointTable(self.blob()), self.compressed_size, size)


class GzipIndexBuilder:
    """Streams a gzip blob once and makes the checkpoints SOCI's zran-based builder makes.

    A checkpoint is taken at a deflate block boundary (not after the last block of a
    member) when nothing has been output yet or more than `span_size` bytes were output
    since the previous one. Concatenated members are followed. Memory is bounded: the
    last 32 KiB of output, one chunk of input, and the checkpoints themselves.
    Inflated bytes go to `sink` as they come (the tar scanner, when building a zTOC).
    """

    def __init__(self, span_size: int = DEFAULT_SPAN_SIZE, sink: Callable[[bytes], None] | None = None) -> None:
        if span_size <= 0:
            raise ValueError(f"span size must be positive, not {span_size}")
        self.span_size = span_size
        self._sink = sink
        self._lib = _zlib_library()
        self._strm = _ZStream()
        version = self._lib.zlibVersion()
        ret = self._lib.inflateInit2_(ctypes.byref(self._strm), _AUTO_HEADER, version, ctypes.sizeof(_ZStream))
        if ret != _Z_OK:
            raise RuntimeError(f"inflateInit2 failed: {ret}")
        self._open = True
        self._out = ctypes.create_string_buffer(_OUT_SIZE)
        self._out_addr = ctypes.addressof(self._out)
        self._tail = bytearray()
        self._totin = 0
        self._totout = 0
        self._last = 0
        self._members = 1
        self._member_done = False
        self._checkpoints: list[Checkpoint] = []
        self._digests: list[str] = []
        self._hash: Any = None
        self._hashed_to = 0
        self._prev_byte = 0
        self._finished = False

    def __del__(self) -> None:
        self._close()

    def _close(self) -> None:
        if getattr(self, "_open", False):
            self._lib.inflateEnd(ctypes.byref(self._strm))
            self._open = False

    @property
    def uncompressed_size(self) -> int:
        return self._totout

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        data = bytes(chunk)
        if not data:
            return
        start = self._totin
        try:
            self._inflate(data, start)
        except FormatError:
            self._close()
            self._finished = True
            raise
        if self._hash is not None:
            self._hash.update(memoryview(data)[self._hashed_to - start:])
            self._hashed_to = start + len(data)
        self._prev_byte = data[-1]

    def _inflate(self, data: bytes, start: int) -> None:
        lib, strm = self._lib, self._strm
        ref = ctypes.byref(strm)
        stalls = 0
        keep = ctypes.c_char_p(data)  # points into `data`, which outlives every call below
        strm.next_in = ctypes.cast(keep, ctypes.c_void_p)
        strm.avail_in = len(data)
        while strm.avail_in:
            if self._member_done:
                if lib.inflateReset2(ref, _AUTO_HEADER) != _Z_OK:
                    raise RuntimeError("inflateReset2 failed")
                self._member_done = False
                self._members += 1
            avail_in = strm.avail_in
            strm.next_out = self._out_addr
            strm.avail_out = _OUT_SIZE
            ret = lib.inflate(ref, _Z_BLOCK)
            consumed = avail_in - strm.avail_in
            self._totin += consumed
            produced = _OUT_SIZE - strm.avail_out
            stalls = 0 if consumed or produced else stalls + 1
            if stalls > 2:
                raise FormatError(f"inflate makes no progress at compressed offset {self._totin}")
            if produced:
                self._output(ctypes.string_at(self._out_addr, produced))
            if ret == _Z_STREAM_END:
                self._member_done = True
                continue
            if ret not in (_Z_OK, _Z_BUF_ERROR):
                msg = strm.msg.decode(errors="replace") if strm.msg else f"zlib error {ret}"
                if ret == _Z_NEED_DICT:
                    msg = "stream needs a preset dictionary"
                raise FormatError(f"not a valid gzip stream at compressed offset {self._totin}: {msg}")
            dt = strm.data_type
            if dt & _END_OF_BLOCK and not dt & _LAST_BLOCK and (
                    self._totout == 0 or self._totout - self._last > self.span_size):
                self._checkpoint(data, start, dt & 7)

    def _output(self, piece: bytes) -> None:
        self._totout += len(piece)
        tail = self._tail
        if len(piece) >= WINDOW_SIZE:
            self._tail = bytearray(piece[-WINDOW_SIZE:])
        else:
            tail += piece
            if len(tail) > WINDOW_SIZE:
                del tail[:len(tail) - WINDOW_SIZE]
        if self._sink is not None:
            self._sink(piece)

    def _checkpoint(self, data: bytes, start: int, bits: int) -> None:
        in_ = self._totin
        window = bytes(self._tail).rjust(WINDOW_SIZE, b"\0")
        self._checkpoints.append(Checkpoint(in_, self._totout, bits, window))
        self._last = self._totout
        view = memoryview(data)
        if self._hash is not None:
            self._hash.update(view[self._hashed_to - start:in_ - start])
            self._digests.append("sha256:" + self._hash.hexdigest())
        self._hash = hashlib.sha256()
        if bits:
            self._hash.update(bytes([data[in_ - 1 - start] if in_ - 1 >= start else self._prev_byte]))
        self._hashed_to = in_

    def finish(self) -> GzipIndex:
        """End of the blob: the last member must be complete; the last span runs to here."""
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        self._close()
        if self._totin == 0:
            raise FormatError("empty blob: not a gzip stream")
        if not self._member_done:
            raise FormatError(f"gzip stream is truncated at compressed offset {self._totin}")
        if not self._checkpoints or self._hash is None:
            raise FormatError("gzip stream has no deflate data")
        digests = [*self._digests, "sha256:" + self._hash.hexdigest()]
        return GzipIndex(self.span_size, self._checkpoints, digests, self._totin, self._totout, self._members)


def build_gzip_index(chunks: Iterable[Bytes], span_size: int = DEFAULT_SPAN_SIZE,
                     sink: Callable[[bytes], None] | None = None) -> GzipIndex:
    """Convenience: feed an iterable of compressed chunks to a `GzipIndexBuilder`."""
    builder = GzipIndexBuilder(span_size, sink)
    for chunk in chunks:
        builder.feed(chunk)
    return builder.finish()


__all__ = [
    "BLOB_HEADER_SIZE", "CHECKPOINT_SIZE", "DEFAULT_SPAN_SIZE", "WINDOW_SIZE",
    "Checkpoint", "CheckpointTable", "GzipIndex", "GzipIndexBuilder", "GzipSpanIndex", "Span",
    "build_gzip_index", "decode_checkpoints", "encode_checkpoints", "inflate_span", "preface",
    "span_digest", "verify_span",
]
