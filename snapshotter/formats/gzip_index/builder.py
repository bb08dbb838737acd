"""One streaming pass over a gzip layer that makes the checkpoints zran and SOCI make.

Python's zlib cannot report deflate block boundaries, so this drives the system libz
through ctypes with `inflate(Z_BLOCK)` (pure computation: no files, no sockets).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import FormatError
from .checkpoints import (DEFAULT_SPAN_SIZE, WINDOW_SIZE, Bytes, Checkpoint, CheckpointTable, GzipSpanIndex,
                          encode_checkpoints)

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
