"""A layer lazysnap pulls whole itself: streamed from the registry, decompressed and applied as it arrives.

When a layer has no usable index, containerd's own unpacker would download it, and on
the CRI and ctr-remote paths every layer above it too (containerd-api.md §2.2). So the
snapshotter fetches it itself and commits it under the target name, like a lazy layer,
and the layers above stay lazy.

Nothing is buffered whole: the registry client streams the blob (resuming a dropped
connection, verifying its digest at the end), a worker thread decompresses it (gzip with
isal, zstd, or a plain tar, told apart by their magic bytes) and applies it as it comes
(`apply.py`). A digest mismatch, a truncated or hostile stream raises, and the caller
throws the half-applied directory away.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import isal.igzip
import isal.isal_zlib
import outcome
import trio
import zstandard

from ..formats.errors import FormatError
from ..registry.client import RegistryClient
from .apply import Applied, apply_layer

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK_SIZE = 1 << 20
DECOMPRESSION_ERRORS = (EOFError, zstandard.ZstdError, isal.igzip.BadGzipFile, isal.isal_zlib.error)
BUFFERED_CHUNKS = 8
"""Chunks between the network and the applier: enough to keep both busy, bounded memory."""


@dataclass(frozen=True)
class PulledLayer:
    digest: str
    compressed_bytes: int
    compression: str
    applied: Applied
    seconds: float


async def pull_layer(registry: RegistryClient, image_ref: str, digest: str, dest: Path,
                     parents: Sequence[Path] = ()) -> PulledLayer:
    """Stream blob `digest` of `image_ref` into the empty directory `dest` (an overlay upper dir)."""
    start = time.monotonic()
    location = await registry.open_blob(image_ref, digest)
    send, receive = trio.open_memory_channel[bytes](BUFFERED_CHUNKS)
    reader = _ChannelReader(receive, trio.lowlevel.current_trio_token())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_produce, registry, location, send, reader)
        result = await outcome.acapture(trio.to_thread.run_sync, _apply, reader, dest, parents)
        nursery.cancel_scope.cancel()  # the applier gave up early: stop the download too
    compression, applied = result.unwrap()  # outside the nursery: the error itself, not a group of one
    return PulledLayer(digest, reader.total, compression, applied, time.monotonic() - start)


async def _produce(registry: RegistryClient, location: object, send: trio.MemorySendChannel[bytes],
                   reader: _ChannelReader) -> None:
    try:
        async for chunk in registry.stream_blob(location, CHUNK_SIZE):  # type: ignore[arg-type]
            await send.send(chunk)
    except Exception as e:
        reader.error = e  # raised by the applier's thread, once it has read what came before: one error, not two
    finally:
        send.close()


def _apply(reader: _ChannelReader, dest: Path, parents: Sequence[Path]) -> tuple[str, Applied]:
    buffered = io.BufferedReader(reader, CHUNK_SIZE)
    magic = buffered.peek(4)[:4]
    stream: BinaryIO
    if magic.startswith(GZIP_MAGIC):
        compression, stream = "gzip", isal.igzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[assignment]
    elif magic == ZSTD_MAGIC:
        compression = "zstd"
        stream = zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)  # type: ignore[assignment]
    else:
        compression, stream = "none", buffered  # type: ignore[assignment]
    try:
        applied = apply_layer(stream, dest, parents=parents)
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
