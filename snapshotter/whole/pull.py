"""A layer lazysnap pulls whole itself: streamed from the registry, decompressed and applied as it arrives.

When a layer has no usable index, containerd's own unpacker would download it, and on
the CRI and ctr-remote paths every layer above it too (containerd-api.md §2.2). So the
snapshotter fetches it itself and commits it under the target name, like a lazy layer,
and the layers above stay lazy.

Nothing is buffered whole. A blob larger than one segment is fetched as SEGMENT-sized
range GETs, CONNECTIONS of them in flight (one connection's window limits a single GET on
a long link), handed on in order; a smaller one is one streamed GET. A worker thread
decompresses it as it comes (gzip with isal, zstd, or a plain tar, told apart by their
magic bytes) and applies it (`apply.py`), while the blob's digest is computed over the
same bytes. A digest mismatch, a truncated or hostile stream raises, and the caller throws
the half-applied directory away.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

import isal.igzip
import isal.isal_zlib
import outcome
import trio
import zstandard

from ..formats.errors import FormatError
from ..registry import digest as digests
from ..registry.client import BlobLocation, RegistryClient
from .apply import Applied, apply_layer

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK_SIZE = 1 << 20
SEGMENT = 4 << 20
CONNECTIONS = 4
"""Range GETs in flight for one blob; memory held is at most CONNECTIONS x SEGMENT."""
DECOMPRESSION_ERRORS = (EOFError, zstandard.ZstdError, isal.igzip.BadGzipFile,
                        cast("type[Exception]", isal.isal_zlib.error))  # a class: isal's stub says an instance
BUFFERED_CHUNKS = 8
"""Chunks between the network and the applier: enough to keep both busy, bounded memory."""


@dataclass(frozen=True)
class PulledLayer:
    digest: str
    compressed_bytes: int
    compression: str
    applied: Applied
    seconds: float


async def pull_layer(registry: RegistryClient, image_ref: str, digest: str, dest: Path) -> PulledLayer:
    """Stream blob `digest` of `image_ref` into the empty directory `dest` (an overlay upper dir).

    The layers below need not exist yet: `apply.copy_up_parents` completes the result once they do."""
    start = time.monotonic()
    location = await registry.open_blob(image_ref, digest)
    send, receive = trio.open_memory_channel[bytes](BUFFERED_CHUNKS)
    reader = _ChannelReader(receive, trio.lowlevel.current_trio_token())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_produce, registry, location, send, reader)
        result = await outcome.acapture(trio.to_thread.run_sync, _apply, reader, dest)
        nursery.cancel_scope.cancel()  # the applier gave up early: stop the download too
    compression, applied = result.unwrap()  # outside the nursery: the error itself, not a group of one
    return PulledLayer(digest, reader.total, compression, applied, time.monotonic() - start)


async def _produce(registry: RegistryClient, location: BlobLocation, send: trio.MemorySendChannel[bytes],
                   reader: _ChannelReader) -> None:
    try:
        if location.size <= SEGMENT:
            async for chunk in registry.stream_blob(location, CHUNK_SIZE):  # checks the digest at the end
                await send.send(chunk)
        else:
            await _segments(registry, location, send)
    except Exception as e:
        reader.error = e  # raised by the applier's thread, once it has read what came before: one error, not two
    finally:
        send.close()


async def _segments(registry: RegistryClient, location: BlobLocation, send: trio.MemorySendChannel[bytes]) -> None:
    """The blob as range GETs, CONNECTIONS in flight, sent on in order; its digest checked at the end."""
    bounds = [(start, min(start + SEGMENT, location.size)) for start in range(0, location.size, SEGMENT)]
    fetched: list[bytes | None] = [None] * len(bounds)
    ready = [trio.Event() for _ in bounds]
    window = trio.Semaphore(CONNECTIONS)
    hasher = digests.hasher(location.digest)
    errors: list[Exception] = []

    async def fetch(i: int) -> None:
        try:
            fetched[i] = await registry.read_range(location, *bounds[i])
        except Exception as e:  # the first failure ends the pull as itself, not as a group of one
            errors.append(e)
            nursery.cancel_scope.cancel()
            return
        ready[i].set()

    async def launch(nursery: trio.Nursery) -> None:
        for i in range(len(bounds)):
            await window.acquire()  # released once segment i has been handed on
            nursery.start_soon(fetch, i)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(launch, nursery)
        for i in range(len(bounds)):
            await ready[i].wait()
            data, fetched[i] = fetched[i], None
            assert data is not None
            hasher.update(data)
            for offset in range(0, len(data), CHUNK_SIZE):
                await send.send(data[offset:offset + CHUNK_SIZE])
            window.release()
    if errors:
        raise errors[0]
    digests.check(hasher, location.digest, f"{location.what}")


def _apply(reader: _ChannelReader, dest: Path) -> tuple[str, Applied]:
    buffered = io.BufferedReader(reader, CHUNK_SIZE)
    magic = buffered.peek(4)[:4]
    stream: BinaryIO
    if magic.startswith(GZIP_MAGIC):
        compression, stream = "gzip", isal.igzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[assignment]
    elif magic == ZSTD_MAGIC:
        compression = "zstd"
        stream = zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)
    else:
        compression, stream = "none", buffered
    try:
        applied = apply_layer(stream, dest)
        while reader.readinto(bytearray(CHUNK_SIZE)):  # what follows the tar's end: the digest covers it too
            pass
    except Exception as e:
        if reader.error is not None:  # the registry's failure (a digest mismatch, say) is the cause
            raise reader.error from None
        if isinstance(e, DECOMPRESSION_ERRORS):
            raise FormatError(f"cannot decompress the {compression} layer: {e}") from None
        raise
    return compression, applied


class _ChannelReader(io.RawIOBase):
    """The blob's chunks, received from the trio side, as a file the worker thread reads."""

    def __init__(self, receive: trio.MemoryReceiveChannel[bytes], token: trio.lowlevel.TrioToken) -> None:
        self.receive, self.token = receive, token
        self.error: BaseException | None = None
        self.total = 0
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if not self._pending:
            if self.error is not None:
                raise self.error
            try:
                chunk = trio.from_thread.run(self.receive.receive, trio_token=self.token)
            except trio.EndOfChannel:
                if self.error is not None:
                    raise self.error from None
                return 0
            self.total += len(chunk)
            self._pending = memoryview(chunk)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n
