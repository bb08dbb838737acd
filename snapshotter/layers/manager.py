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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..cache import ChunkCache
from ..formats import estargz, ztoc
from ..formats.errors import FormatError
from ..fuse.filesystem import LayerFilesystem
from ..labels import LayerRequest
from ..registry.client import RegistryClient
from ..registry.errors import RegistryError
from ..soci.discovery import Discovery, fetch_ztoc, find_index
from ..soci.local import LocalIndexes
from ..store import LayerRecord, Store
from .estargz import EStargzIndex, EStargzLayer, fetch_index, parse_index
from .layer import Blob
from .soci import SociLayer

log = logging.getLogger(__name__)

ESTARGZ = "estargz"
SOCI = "soci"
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
    layer: EStargzLayer | SociLayer | None = field(default=None, repr=False)
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
    """One layer's index being fetched; Prepares for it wait on `done`.

    `saved` is the index as it is kept on disk (an eStargz TOC member or a zTOC), so
    that the layer can be rebuilt from it at restart without the registry.
    """

    def __init__(self) -> None:
        self.done = trio.Event()
        self.kind = ""
        self.estargz: EStargzIndex | None = None
        self.saved = b""
        self.offset = 0
        self.blob: RegistryBlob | None = None
        self.error: str = ""
        self.seconds = 0.0


class _ImageDiscovery:
    """The SOCI index search for one image, shared by all its layers."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result = Discovery()


class LayerManager:
    def __init__(self, root: Path, mountpoint: Path, store: Store, registry: RegistryClient, cache: ChunkCache,
                 fs: LayerFilesystem, nursery: trio.Nursery, options: ManagerOptions) -> None:
        self.mountpoint = mountpoint
        self.local = LocalIndexes(root / "soci")
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
        self._discoveries: dict[str, _ImageDiscovery] = {}

    # -- the blocking face, for the snapshotter on gRPC threads --------------------

    def mount(self, request: LayerRequest) -> int | None:
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
            self._start_resolving(request, other)
        resolution = self._start_resolving(request, request.layer_digest)
        with trio.move_on_after(self.options.resolve_timeout):
            await resolution.done.wait()
        try:
            if not resolution.done.is_set():
                raise _Fallback(f"finding the layer's index took over {self.options.resolve_timeout:g} s")
            if resolution.error:
                raise _Fallback(resolution.error)
            assert resolution.blob is not None
            if resolution.estargz is not None:
                try:
                    estargz.verify_toc(resolution.estargz.toc, request.toc_digest or None,
                                       allow_unverified=self.options.allow_unverified or request.skip_verify)
                except FormatError as e:
                    raise _Fallback(str(e)) from None
            try:
                layer, index_digest = _layer(resolution.kind, resolution.saved, resolution.offset, resolution.blob,
                                             self.cache)
            except FormatError as e:
                raise _Fallback(f"unusable {resolution.kind} index: {e}") from None
        except _Fallback as e:
            status.mode, status.reason, status.resolve_seconds = FALLBACK, str(e), resolution.seconds
            log.warning("layer %s of %s is pulled whole: %s", request.layer_digest, request.image_ref, e)
            self._forget_old_fallbacks()
            return None
        record = self._record(request, resolution, index_digest)
        self._attach(record, layer, status)
        status.resolve_seconds = resolution.seconds
        self._resolutions.pop(request.layer_digest, None)  # the layer holds what it needs now
        return record.id

    def _start_resolving(self, request: LayerRequest, digest: str) -> _Resolution:
        resolution = self._resolutions.get(digest)
        if resolution is None or (resolution.done.is_set() and resolution.error):
            resolution = self._resolutions[digest] = _Resolution()
            self.nursery.start_soon(self._resolve, request, digest, resolution)
        return resolution

    async def _resolve(self, request: LayerRequest, digest: str, resolution: _Resolution) -> None:
        """Find the layer's index: an eStargz TOC in the blob itself, else a SOCI zTOC beside the image."""
        image_ref = request.image_ref
        start = time.monotonic()
        try:
            with trio.fail_after(self.options.resolve_timeout):
                location = await self.registry.open_blob(image_ref, digest)
                blob = RegistryBlob(self.registry, image_ref, digest, location.size, location)
                discovery = self._start_discovery(request)  # in parallel with the footer read
                try:
                    resolution.estargz = await fetch_index(blob)
                    resolution.kind, resolution.saved = ESTARGZ, resolution.estargz.member
                    resolution.offset = resolution.estargz.footer.toc_offset
                except estargz.NotEStargz as e:
                    log.debug("layer %s of %s: %s", digest, image_ref, e)
                    await discovery.done.wait()
                    resolution.saved = await self._ztoc(request, digest, discovery.result)
                    resolution.kind = SOCI
                resolution.blob = blob
        except trio.TooSlowError:
            resolution.error = f"finding the layer's index took over {self.options.resolve_timeout:g} s"
        except _Fallback as e:
            resolution.error = str(e)
        except FormatError as e:
            resolution.error = f"broken index: {e}"
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

    async def _ztoc(self, request: LayerRequest, digest: str, discovery: Discovery) -> bytes:
        index = discovery.index
        if index is None:
            raise _Fallback(f"not an eStargz layer, and {discovery.reason}")
        ref = index.ztocs.get(digest)
        if ref is None:
            raise _Fallback(f"the image's SOCI index ({discovery.source}) has no zTOC for this layer "
                            "(smaller than the index's minimum layer size?)")
        return await fetch_ztoc(self.registry, self.local, request.image_ref, ref)

    def _start_discovery(self, request: LayerRequest) -> _ImageDiscovery:
        key = request.manifest_digest or request.image_ref
        discovery = self._discoveries.get(key)
        if discovery is None:
            discovery = self._discoveries[key] = _ImageDiscovery()
            self.nursery.start_soon(self._discover, request, key, discovery)
        return discovery

    async def _discover(self, request: LayerRequest, key: str, discovery: _ImageDiscovery) -> None:
        try:
            manifest_digest = request.manifest_digest or (await self.registry.resolve(request.image_ref)).digest
            discovery.result = await find_index(self.registry, self.local, request.image_ref, manifest_digest,
                                                request.soci_index_digest)
        except RegistryError as e:
            discovery.result = Discovery(misses=[f"cannot resolve the image: {e}"])
        finally:
            discovery.done.set()
        if discovery.result.index is not None:
            log.info("SOCI index %s (%s) found for %s", discovery.result.index.digest, discovery.result.source,
                     request.image_ref)
        await trio.sleep(RESOLUTION_TTL)
        if self._discoveries.get(key) is discovery:
            del self._discoveries[key]

    def _forget_old_fallbacks(self) -> None:
        fallbacks = [d for d, s in self.status.items() if s.mode == FALLBACK]
        for digest in fallbacks[:-MAX_FALLBACK_STATUS]:
            del self.status[digest]

    def _record(self, request: LayerRequest, resolution: _Resolution, index_digest: str) -> LayerRecord:
        """Persist the layer and its verified index (atomically), so restarts need no registry."""
        assert resolution.blob is not None
        with self.store.transaction() as tx:
            record = tx.put_layer(request.layer_digest, request.image_ref, resolution.kind, resolution.blob.size,
                                  index_digest, resolution.offset)
        path = self._index_path(record)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(resolution.saved)
            os.replace(tmp, path)
        return record

    def _attach(self, record: LayerRecord, layer: EStargzLayer | SociLayer, status: LayerStatus) -> None:
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
                saved = self._index_path(record).read_bytes()
                layer, digest = _layer(record.format, saved, record.index_offset, _LazyBlob(self.registry, record),
                                       self.cache)
                if digest != record.index_digest:
                    raise FormatError(f"saved index digest {digest} is not {record.index_digest}")
            except (OSError, FormatError) as e:
                log.error("cannot restore layer %s (snapshot reads will fail): %s", record.digest, e)
                status.mode, status.reason = FALLBACK, f"restore failed: {e}"
                continue
            self._attach(record, layer, status)
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
        return self.index_dir / str(record.id) / ("toc.gz" if record.format == ESTARGZ else "ztoc")


def _layer(kind: str, saved: bytes, offset: int, blob: Blob, cache: ChunkCache) -> tuple[EStargzLayer | SociLayer, str]:
    """The layer served from a saved index, and the index's digest (to check against the record)."""
    if kind == ESTARGZ:
        index = parse_index(saved, offset)
        return EStargzLayer(index, blob, cache), index.toc.digest
    if kind == SOCI:
        return SociLayer(ztoc.parse_ztoc(saved), blob, cache), ztoc.ztoc_digest(saved)
    raise FormatError(f"unknown layer format {kind!r}")


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
async def open_manager(root: Path, mountpoint: Path, store: Store, registry: RegistryClient, cache: ChunkCache,
                       fs: LayerFilesystem, options: ManagerOptions) -> AsyncIterator[LayerManager]:
    """A manager whose background resolutions live (and die) with this block."""
    async with trio.open_nursery() as nursery:
        manager = LayerManager(root, mountpoint, store, registry, cache, fs, nursery, options)
        await manager.restore()
        yield manager
        nursery.cancel_scope.cancel()

