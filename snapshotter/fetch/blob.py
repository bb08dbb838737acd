"""Layer blobs read through the registry client (which owns mirrors, redirects, auth and retries).

A `Blob` (the protocol is in `layers/layer.py`) is what every fetch of a lazy layer reads:
the resolver's tail read, a miss, a batch. The data plane's layers never read theirs (their
misses go to the control plane), so it gets a `StoredBlob`, which cannot.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import trio

from .. import metrics
from ..store import LayerRecord

if TYPE_CHECKING:  # the data plane uses StoredBlob, and must not load the HTTP stack
    from ..registry.client import BlobLocation, RegistryClient


class StoredBlob:
    """A layer blob known by name and size only: the data plane's, which never reads the registry."""

    def __init__(self, digest: str, size: int) -> None:
        self._digest, self._size = digest, size

    @property
    def fetched_bytes(self) -> int:
        """Bytes read from the registry so far (for `lazysnap status`): none."""
        return 0

    @property
    def digest(self) -> str:
        return self._digest

    @property
    def size(self) -> int:
        return self._size

    async def read(self, start: int, end: int) -> bytes:
        """Never called: a data plane's layer sends its misses to the control plane (a layer's
        reads turn any failure of its blob into its own `ReadError`)."""
        raise RuntimeError(f"layer {self._digest}: the data plane does not read the registry")


class RegistryBlob(StoredBlob):
    """A `Blob` whose location in the registry is known (it was just resolved)."""

    fetched_bytes = 0
    """Counted by each fetch: a plain attribute here, in place of StoredBlob's read-only property."""

    def __init__(self, client: RegistryClient, ref: str, digest: str, size: int, location: BlobLocation) -> None:
        super().__init__(digest, size)
        self.client, self.ref, self.location = client, ref, location
        self.fetched_bytes = 0
        self._kept: tuple[int, bytes] = (size, b"")

    def keep(self, start: int, data: bytes) -> None:
        """Hold blob bytes [start, start + len(data)), already fetched, and serve reads from them.

        The resolver keeps the payload part of the 64 KiB tail it read to find the index
        (at most 64 KiB for as long as the layer is served): a layer that small was read
        whole at resolve time, and its first read fetched it all again. The sample image's
        three layers, resolved and one file read in each: eStargz 72,548 -> 69,651 bytes and
        6 -> 3 GETs; SOCI (1 MiB spans) 568,710 -> 501,907 bytes and 6 -> 4 GETs.
        """
        self._kept = (start, data)

    async def read(self, start: int, end: int) -> bytes:
        kept_start, kept = self._kept
        if kept_start < end <= kept_start + len(kept):
            head = await self._fetch(start, kept_start) if start < kept_start else b""
            return head + kept[max(start, kept_start) - kept_start:end - kept_start]
        return await self._fetch(start, end)

    async def _fetch(self, start: int, end: int) -> bytes:
        began = time.monotonic()
        try:
            data = await self.client.read_range(self.location, start, end)
        except BaseException:
            metrics.FETCH_ERRORS.inc()
            raise
        metrics.FETCH_SECONDS.observe(time.monotonic() - began)
        metrics.FETCH_BYTES.inc(len(data))
        self.fetched_bytes += len(data)
        return data


class RestoredBlob(StoredBlob):
    """A restored layer's blob: located in the registry on its first read, not at start
    (a restart must not need the registry, and most restored layers are never read again)."""

    def __init__(self, client: RegistryClient, record: LayerRecord) -> None:
        super().__init__(record.digest, record.blob_size)
        self.client, self.record = client, record
        self._blob: RegistryBlob | None = None
        self._lock = trio.Lock()

    @property
    def fetched_bytes(self) -> int:
        return self._blob.fetched_bytes if self._blob is not None else 0

    async def read(self, start: int, end: int) -> bytes:
        if self._blob is None:
            async with self._lock:
                if self._blob is None:
                    location = await self.client.open_blob(self.record.image_ref, self.record.digest)
                    self._blob = RegistryBlob(self.client, self.record.image_ref, self.digest, location.size, location)
        return await self._blob.read(start, end)
