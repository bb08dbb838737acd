"""Which layers are served lazily, and how: resolve, verify, attach to FUSE, restore at start.

The manager lives on the trio side. containerd's Prepare arrives on a gRPC worker
thread and reaches `mount` through `trio.from_thread`, so resolution (network I/O)
never blocks the event loop that serves FUSE reads.

What makes it different from its peers:
- the first Prepare of an image starts resolving *all* the image's layers at once,
  so later Prepares find their index already fetched;
- every fallback has a reason, which is logged, kept, and shown by `lazysnap status`
  and `lazysnap rpull`;
- a layer's index is saved on disk once verified, so after a restart every layer is
  mounted again without the registry (only reads of uncached bytes need it).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..cache import ChunkCache
from ..formats import estargz
from ..formats.errors import FormatError
from ..fuse.filesystem import LayerFilesystem
from ..labels import LayerRequest
from ..registry.client import RegistryClient
from ..registry.errors import RegistryError
from ..store import LayerRecord, Store
from .estargz import EStargzIndex, EStargzLayer, fetch_index, parse_index

log = logging.getLogger(__name__)

ESTARGZ = "estargz"
FALLBACK = "fallback"
RESOLUTION_TTL = 300.0
"""Seconds a fetched index waits for its layer's Prepare before it is dropped from memory."""
MAX_FALLBACK_STATUS = 1000
"""Fallback reasons kept for `lazysnap status`, newest first (served layers are always kept)."""


@dataclass
class LayerStatus:
    """How one layer is served, for `lazysnap status` and `rpull`."""

    digest: str
    image_ref: str
    mode: str = ""
    reason: str = ""
    size: int = 0
    resolve_seconds: float = 0.0
    path: str = ""
    layer: EStargzLayer | None = field(default=None, repr=False)
    """Bytes this layer fetched, the index included, count from its blob."""

    @property
    def fetched_bytes(self) -> int:
        return self.layer.blob.fetched_bytes if self.layer is not None else 0


class RegistryBlob:
    """A `Blob` read through the registry client (which owns redirects, auth and retries)."""

    def __init__(self, client: RegistryClient, ref: str, digest: str, size: int, location: object) -> None:
        self.client, self.ref, self._digest, self._size, self.location = client, ref, digest, size, location
        self.fetched_bytes = 0

    @property
    def digest(self) -> str:
        return self._digest

    @property
    def size(self) -> int:
        return self._size

    async def read(self, start: int, end: int) -> bytes:
        data = await self.client.read_range(self.location, start, end)
        self.fetched_bytes += len(data)
        return data


@dataclass
class ManagerOptions:
    resolve_timeout: float = 30.0
    allow_unverified: bool = False


class _Resolution:
    """One layer's index being fetched; Prepares for it wait on `done`."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.index: EStargzIndex | None = None
        self.blob: RegistryBlob | None = None
        self.error: str = ""
        self.seconds = 0.0


class LayerManager:
    def __init__(self, root: Path, store: Store, registry: RegistryClient, cache: ChunkCache, fs: LayerFilesystem,
                 nursery: trio.Nursery, options: ManagerOptions) -> None:
        self.mountpoint = root / "fuse"
        self.index_dir = root / "layers"
        self.index_dir.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.registry = registry
        self.cache = cache
        self.fs = fs
        self.nursery = nursery
        self.options = options
        self.token = trio.lowlevel.current_trio_token()
        self.status: dict[str, LayerStatus] = {}
        self._resolutions: dict[str, _Resolution] = {}

    # -- the blocking face, for the snapshotter on gRPC threads --------------------

    def mount(self, request: LayerRequest, layer_dir: Callable[[int], Path]) -> int | None:
        return trio.from_thread.run(self._mount, request, trio_token=self.token)

    def release(self, layers: list[LayerRecord]) -> None:
        trio.from_thread.run(self._release, layers, trio_token=self.token)

    def report(self, digests: list[str]) -> tuple[list[dict[str, object]], dict[str, int]]:
        """Layer and cache state for the Status API (read on the trio thread, so consistent)."""
        return trio.from_thread.run_sync(self._report, digests, trio_token=self.token)

    def _report(self, digests: list[str]) -> tuple[list[dict[str, object]], dict[str, int]]:
        wanted = set(digests)
        layers = [
            {"digest": s.digest, "image_ref": s.image_ref, "mode": s.mode, "reason": s.reason, "size": s.size,
             "resolve_seconds": s.resolve_seconds, "path": s.path, "fetched_bytes": s.fetched_bytes}
            for s in reversed(self.status.values()) if not wanted or s.digest in wanted
        ]
        stats = self.cache.stats
        cache = {"bytes": self.cache.size, "max_bytes": self.cache.max_bytes, "hits": stats.hits,
                 "misses": stats.misses, "evictions": stats.evictions}
        return layers, cache

    # -- the trio side ---------------------------------------------------------------

    async def _mount(self, request: LayerRequest) -> int | None:
        status = self.status.setdefault(request.layer_digest, LayerStatus(request.layer_digest, request.image_ref))
        for other in request.image_layers:
            self._start_resolving(request.image_ref, other)
        resolution = self._start_resolving(request.image_ref, request.layer_digest)
        with trio.move_on_after(self.options.resolve_timeout):
            await resolution.done.wait()
        try:
            if not resolution.done.is_set():
                raise _Fallback(f"finding the layer's index took over {self.options.resolve_timeout:g} s")
            if resolution.error:
                raise _Fallback(resolution.error)
            assert resolution.index is not None and resolution.blob is not None
            try:
                estargz.verify_toc(resolution.index.toc, request.toc_digest or None,
                                   allow_unverified=self.options.allow_unverified or request.skip_verify)
            except FormatError as e:
                raise _Fallback(str(e)) from None
            layer = EStargzLayer(resolution.index, resolution.blob, self.cache)
        except _Fallback as e:
            status.mode, status.reason, status.resolve_seconds = FALLBACK, str(e), resolution.seconds
            log.warning("layer %s of %s is pulled whole: %s", request.layer_digest, request.image_ref, e)
            self._forget_old_fallbacks()
            return None
        record = self._record(request, resolution)
        self._attach(record, layer, status)
        status.resolve_seconds = resolution.seconds
        self._resolutions.pop(request.layer_digest, None)  # the layer holds what it needs now
        return record.id

    def _start_resolving(self, image_ref: str, digest: str) -> _Resolution:
        resolution = self._resolutions.get(digest)
        if resolution is None or (resolution.done.is_set() and resolution.error):
            resolution = self._resolutions[digest] = _Resolution()
            self.nursery.start_soon(self._resolve, image_ref, digest, resolution)
        return resolution

    async def _resolve(self, image_ref: str, digest: str, resolution: _Resolution) -> None:
        start = time.monotonic()
        try:
            with trio.fail_after(self.options.resolve_timeout):
                location = await self.registry.open_blob(image_ref, digest)
                blob = RegistryBlob(self.registry, image_ref, digest, location.size, location)
                resolution.index = await fetch_index(blob)
                resolution.blob = blob
        except trio.TooSlowError:
            resolution.error = f"finding the layer's index took over {self.options.resolve_timeout:g} s"
        except estargz.NotEStargz as e:
            log.debug("layer %s of %s: %s", digest, image_ref, e)
            resolution.error = "not an eStargz layer (no eStargz footer); convert the image or index it"
        except FormatError as e:
            resolution.error = f"broken eStargz index: {e}"
        except RegistryError as e:
            resolution.error = f"registry: {e}"
        except Exception as e:
            log.exception("resolving layer %s of %s failed", digest, image_ref)
            resolution.error = f"internal error: {e!r}"
        finally:
            resolution.seconds = time.monotonic() - start
            resolution.done.set()
        await trio.sleep(RESOLUTION_TTL)
        if self._resolutions.get(digest) is resolution:
            del self._resolutions[digest]

    def _forget_old_fallbacks(self) -> None:
        fallbacks = [d for d, s in self.status.items() if s.mode == FALLBACK]
        for digest in fallbacks[:-MAX_FALLBACK_STATUS]:
            del self.status[digest]

    def _record(self, request: LayerRequest, resolution: _Resolution) -> LayerRecord:
        """Persist the layer and its verified index (atomically), so restarts need no registry."""
        assert resolution.index is not None and resolution.blob is not None
        index = resolution.index
        with self.store.transaction() as tx:
            record = tx.put_layer(request.layer_digest, request.image_ref, ESTARGZ, resolution.blob.size,
                                  index.toc.digest, index.footer.toc_offset)
        path = self._index_path(record)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(index.member)
            os.replace(tmp, path)
        return record

    def _attach(self, record: LayerRecord, layer: EStargzLayer, status: LayerStatus) -> None:
        name = str(record.id)
        if name not in self.fs.layers():
            self.fs.attach(name, layer)
        status.mode, status.reason, status.size, status.layer = record.format, "", record.blob_size, layer
        status.path = str(self.mountpoint / name)

    async def restore(self) -> None:
        """Attach every stored layer from its saved index; a broken one is logged and skipped."""
        with self.store.transaction() as tx:
            records = tx.layers()
        for record in records:
            status = self.status.setdefault(record.digest, LayerStatus(record.digest, record.image_ref))
            try:
                index = parse_index(self._index_path(record).read_bytes(), record.index_offset)
                if index.toc.digest != record.index_digest:
                    raise FormatError(f"saved index digest {index.toc.digest} is not {record.index_digest}")
            except (OSError, FormatError) as e:
                log.error("cannot restore layer %s (snapshot reads will fail): %s", record.digest, e)
                status.mode, status.reason = FALLBACK, f"restore failed: {e}"
                continue
            blob = _LazyBlob(self.registry, record)
            self._attach(record, EStargzLayer(index, blob, self.cache), status)
        log.info("restored %d lazily served layers", len(records))

    async def _release(self, layers: list[LayerRecord]) -> None:
        for record in layers:
            if str(record.id) in self.fs.layers():
                await self.fs.detach(str(record.id))
            shutil.rmtree(self._index_path(record).parent, ignore_errors=True)
            self.status.pop(record.digest, None)
            self._resolutions.pop(record.digest, None)
            log.info("stopped serving layer %s", record.digest)

    def _index_path(self, record: LayerRecord) -> Path:
        return self.index_dir / str(record.id) / "toc.gz"


class _LazyBlob:
    """A restored layer's blob: located in the registry on the first read, not at start."""

    def __init__(self, client: RegistryClient, record: LayerRecord) -> None:
        self.client, self.record = client, record
        self._blob: RegistryBlob | None = None
        self._lock = trio.Lock()

    @property
    def fetched_bytes(self) -> int:
        return self._blob.fetched_bytes if self._blob is not None else 0

    @property
    def digest(self) -> str:
        return self.record.digest

    @property
    def size(self) -> int:
        return self.record.blob_size

    async def read(self, start: int, end: int) -> bytes:
        if self._blob is None:
            async with self._lock:
                if self._blob is None:
                    location = await self.client.open_blob(self.record.image_ref, self.record.digest)
                    self._blob = RegistryBlob(self.client, self.record.image_ref, self.digest, location.size, location)
        return await self._blob.read(start, end)


class _Fallback(Exception):
    """This layer will be pulled whole; the message says why."""


@asynccontextmanager
async def open_manager(root: Path, store: Store, registry: RegistryClient, cache: ChunkCache, fs: LayerFilesystem,
                       options: ManagerOptions) -> AsyncIterator[LayerManager]:
    """A manager whose background resolutions live (and die) with this block."""
    async with trio.open_nursery() as nursery:
        manager = LayerManager(root, store, registry, cache, fs, nursery, options)
        await manager.restore()
        yield manager
        nursery.cancel_scope.cancel()

