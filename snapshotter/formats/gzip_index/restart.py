"""Restarting inflation at a checkpoint, with the stdlib or isal API.

Neither API has zlib's `inflatePrime`, so when a checkpoint's `bits` is not 0, a
preface of empty deflate blocks realigns the leftover bits (research python-limits.md §3(b)).
"""

from __future__ import annotations

from collections.abc import Sequence

from .. import inflate
from ..errors import FormatError
from .checkpoints import GZIP_TRAILER_SIZE, Bytes, Span

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
