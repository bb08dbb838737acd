"""The table of served layers: attach, persist, restore, release, and answer the data planes.

A layer the control plane has resolved is *attached*: its verified index is saved under
`<root>/layers/<id>/` (with its EROFS image and the image's extents when the kernel
serves its metadata), recorded in the store, and handed to a data plane, which mounts
it at `<root>/mnt/<id>`. The control plane keeps its own copy of the layer: with it it
answers the data planes' misses, prefetches and fetches in the background.

At start, `restore` rebuilds every stored layer from its files, and attaches those that
no live data plane serves (after the node rebooted, or a data plane died); a layer a
data plane serves but the store no longer has is detached.
"""

from __future__ import annotations

import logging
import shutil
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import trio

from .. import metrics
from ..atomic import write_atomically
from ..cache import ChunkCache
from ..fetch.activity import FetchActivity
from ..fetch.blob import RestoredBlob
from ..fetch.progress import Progress, completeness
from ..fetch.units import FetchableLayer
from ..formats.erofs import Image
from ..formats.errors import FormatError
from ..labels import LayerRequest
from ..layer_modes import FallbackCause, LayerMode
from ..registry.client import RegistryClient
from ..store import LayerRecord, Store
from . import device, erofs, saved
from .estargz import EStargzLayer
from .layer import ReadError
from .soci import SociLayer

log = logging.getLogger(__name__)

MAX_FALLBACK_STATUS = 1000
"""Fallback reasons kept for `lazysnap status`, newest first (served layers are always kept)."""


@dataclass(frozen=True)
class LayerReport:
    """How one layer is served, for `lazysnap status` (the Status API's `Layer`, which says what each field means)."""

    digest: str
    image_ref: str
    mode: LayerMode | None
    """None while lazysnap resolves it."""
    reason: str
    size: int
    resolve_seconds: float
    path: str
    fetched_bytes: int
    fetch_state: str
    prefetched_bytes: int
    background_bytes: int
    pull_seconds: float
    complete_bytes: int
    content_bytes: int


@dataclass(frozen=True)
class CacheReport:
    """The chunk cache: its size, and how the data planes' reads fared in it."""

    bytes: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int


@dataclass(frozen=True)
class FuseOpReport:
    """FUSE requests of one operation since the data planes started, and the time they took."""

    name: str
    count: int
    seconds: float


@dataclass(frozen=True)
class FuseReport:
    """What the data planes' FUSE mounts served, busiest operation first."""

    ops: tuple[FuseOpReport, ...]
    read_bytes: int
    read_errors: int

    @classmethod
    def of(cls, counters: Mapping[str, Any]) -> FuseReport:
        """From the data planes' counters (`PlaneStats.fuse`, as the data plane sends them)."""
        return cls(tuple(FuseOpReport(str(op["name"]), int(op["count"]), float(op["seconds"]))
                         for op in counters.get("ops", [])),
                   int(counters.get("read_bytes", 0)), int(counters.get("read_errors", 0)))


@dataclass(frozen=True)
class PlaneReport:
    """One live data plane process (`DataPlane.generations`)."""

    generation: int
    pid: int
    retiring: bool
    layers: int
    build: str

    @classmethod
    def of(cls, generation: Mapping[str, Any]) -> PlaneReport:
        return cls(int(generation["generation"]), int(generation["pid"]), bool(generation["retiring"]),
                   int(generation["layers"]), str(generation["build"]))


@dataclass(frozen=True)
class StatusReport:
    """Layers (newest first), cache, FUSE requests and data planes: what `lazysnap status` shows.
    `service.py` turns it into the Status API's answer."""

    layers: tuple[LayerReport, ...]
    cache: CacheReport
    fuse: FuseReport
    planes: tuple[PlaneReport, ...]


class Explanation(NamedTuple):
    """How a layer is obtained, for `rpull`'s report: its mode (None while lazysnap has not seen it) and,
    when it is not lazy, why. A named tuple: it still reads as the `(mode, reason)` pair it replaces."""

    mode: LayerMode | None = None
    reason: str = ""


@dataclass(frozen=True)
class PlaneStats:
    """What the data planes counted since they started, summed over the live ones."""

    fuse: dict[str, object]
    """FUSE requests per operation, in the shape of the Status API's `Fuse` message."""
    hits: int = 0
    misses: int = 0
    """Reads served from the chunk cache, and reads that had to ask the control plane."""
    read_failures: dict[str, int] = field(default_factory=dict)
    """EIOs by cause (`fuse.counters.ReadFailure` values)."""


class AttachError(Exception):
    """A layer could not be saved or served (disk full, data plane refused): it is pulled whole."""


class DataPlane(Protocol):
    """Where layers are served from (`dataplane/client.py`): each at a stable path, whichever process serves it."""

    mnt_dir: Path
    """Where every layer is mounted, `<mnt_dir>/<layer id>`."""

    def layer_path(self, layer_id: int) -> Path: ...

    def served(self) -> set[int]:
        """Layers a live data plane serves now."""
        ...

    async def attach(self, record: LayerRecord, kernel_metadata: bool) -> str:
        """Serve the layer from its saved files: "erofs" or "fuse" (how its tree is served). AttachError if not."""
        ...

    async def detach(self, layer_id: int) -> None: ...

    async def stats(self) -> PlaneStats:
        """What the live data planes counted, summed."""
        ...

    def generations(self) -> list[dict[str, object]]:
        """The live data planes: generation, pid, retiring, layers, build."""
        ...


@dataclass
class LayerStatus:
    """How one layer is served, for `lazysnap status` and `rpull`."""

    digest: str
    image_ref: str
    mode: LayerMode | None = None
    """None while lazysnap resolves it."""
    reason: str = ""
    cause: FallbackCause | None = None
    """Why it is pulled whole, as a class (None while it is served lazily)."""
    size: int = 0
    resolve_seconds: float = 0.0
    pull_seconds: float = 0.0
    """How long lazysnap took to pull it whole (mode WHOLE)."""
    path: str = ""
    layer: EStargzLayer | SociLayer | None = field(default=None, repr=False)
    progress: Progress = field(default_factory=Progress)
    tasks: set[trio.CancelScope] = field(default_factory=set, repr=False)
    """The layer's prefetch and readahead, cancelled when it is released."""

    @property
    def fetched_bytes(self) -> int:
        """Bytes this layer fetched, the index included, counted from its blob."""
        return self.layer.blob.fetched_bytes if self.layer is not None else 0

    def fall_back(self, reason: str, cause: FallbackCause) -> None:
        self.mode, self.reason, self.cause, self.layer = LayerMode.FALLBACK, reason, cause, None

    async def run_task(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run one of the layer's background tasks (start it in a nursery); it ends with the layer."""
        with trio.CancelScope() as scope:
            self.tasks.add(scope)
            try:
                await fn(*args)
            finally:
                self.tasks.discard(scope)

    def cancel_tasks(self) -> None:
        for scope in self.tasks:
            scope.cancel()


class ServedLayers:
    def __init__(self, root: Path, store: Store, registry: RegistryClient, cache: ChunkCache,
                 activity: FetchActivity, planes: DataPlane, *, fuse_xattrs: bool = True) -> None:
        self.root = root
        self.store = store
        self.registry = registry
        self.cache = cache
        self.activity = activity
        self.planes = planes
        self.fuse_xattrs = fuse_xattrs
        self.status: dict[str, LayerStatus] = {}
        self._records: dict[int, LayerRecord] = {}
        self._by_layer: weakref.WeakKeyDictionary[FetchableLayer, LayerStatus] = weakref.WeakKeyDictionary()
        self.kernel_metadata = False
        """Whether layers' metadata goes to the kernel as EROFS images: asked for, and the kernel can."""
        self.restored = trio.Event()

    def status_of(self, request: LayerRequest) -> LayerStatus:
        return self.status.setdefault(request.layer_digest, LayerStatus(request.layer_digest, request.image_ref))

    def serving(self, digest: str) -> LayerRecord | None:
        """The record of the layer if it is served already (for another image, say)."""
        status = self.status.get(digest)
        if status is None or status.layer is None:
            return None
        return next((record for record in self._records.values() if record.digest == digest), None)

    def status_of_layer(self, layer: FetchableLayer) -> LayerStatus | None:
        return self._by_layer.get(layer)

    async def probe_kernel_metadata(self, wanted: bool) -> None:
        if not wanted:
            return
        scratch = self.root / "probe"
        why = await trio.to_thread.run_sync(erofs.kernel_supports_erofs, scratch)
        if why is None:
            self.kernel_metadata = True
            log.info("layer metadata is served by the kernel (EROFS), file bytes through FUSE")
        else:
            log.warning("this kernel cannot mount EROFS images (%s); layer metadata is served through FUSE", why)

    async def image_of(self, digest: str, layer: EStargzLayer | SociLayer) -> Image | None:
        """The layer's EROFS image, or None if the kernel will not serve its metadata."""
        if not self.kernel_metadata:
            return None
        try:
            return await trio.to_thread.run_sync(erofs.image_of, layer)
        except FormatError as e:
            log.warning("layer %s: metadata served by FUSE, not EROFS: %s", digest, e)
            return None

    def accepts(self, layer: EStargzLayer | SociLayer, image: Image | None) -> bool:
        """Whether a data plane can serve it: only a FUSE-served tree with xattrs, when they are off, cannot."""
        return image is not None or self.fuse_xattrs or not layer.tree.has_xattrs

    # -- attach, restore, release ---------------------------------------------------

    async def attach_new(self, request: LayerRequest, kind: LayerMode, index: bytes, index_digest: str, index_offset: int,
                         layer: EStargzLayer | SociLayer, image: Image | None, status: LayerStatus) -> LayerRecord:
        """Save the layer's verified index (and image), record it, and serve it; AttachError if any step fails."""
        with self.store.transaction() as tx:
            record = tx.put_layer(request.layer_digest, request.image_ref, kind, layer.blob.size, index_digest,
                                  index_offset)
        files = saved.files_of(self.root, record)
        try:
            try:
                await trio.to_thread.run_sync(_save, files, index, image, layer)
            except OSError as e:
                raise AttachError(f"cannot save the layer's index under {files.dir}: {e}") from None
            await self._attach(record, layer, image is not None, status)
        except AttachError:
            with self.store.transaction() as tx:
                forgotten = tx.remove_layer_if_unused(record.id)
            if forgotten:  # nothing of it is left to restore at the next start
                await trio.to_thread.run_sync(shutil.rmtree, files.dir, True)
            raise
        return record

    async def _attach(self, record: LayerRecord, layer: EStargzLayer | SociLayer, kernel_metadata: bool,
                      status: LayerStatus) -> None:
        how = await self.planes.attach(record, kernel_metadata)
        if kernel_metadata and how != "erofs":
            log.warning("layer %s: the data plane serves its tree through FUSE", record.digest)
        self._serving(record, layer, status)

    def _serving(self, record: LayerRecord, layer: EStargzLayer | SociLayer, status: LayerStatus) -> None:
        status.mode, status.reason, status.cause, status.size, status.layer = LayerMode(record.format), "", None, record.blob_size, \
            layer
        status.path = str(self.planes.layer_path(record.id))
        self._records[record.id] = record
        self._by_layer[layer] = status
        self.activity.mounted()

    async def restore(self) -> None:
        """Rebuild every stored layer; attach those no live data plane serves; detach what is no longer stored."""
        with self.store.transaction() as tx:
            records = tx.layers()
        served = self.planes.served()
        attached = 0
        for record in records:
            status = self.status.setdefault(record.digest, LayerStatus(record.digest, record.image_ref))
            try:
                layer = await trio.to_thread.run_sync(saved.load_layer, self.root, record,
                                                      RestoredBlob(self.registry, record), self.cache, self.activity)
                if record.id in served:
                    self._serving(record, layer, status)
                    continue
                image_saved = await self._ensure_image(record, layer)
                await self._attach(record, layer, image_saved, status)
                attached += 1
            except (OSError, FormatError, AttachError) as e:
                log.error("cannot restore layer %s (snapshot reads will fail): %s", record.digest, e)
                status.fall_back(f"restore failed: {e}", FallbackCause.RESTORE)
        stored = {record.id for record in records}
        for layer_id in sorted(served - stored):
            log.info("layer %d is served but no longer stored: detaching it", layer_id)
            await self.planes.detach(layer_id)
        await trio.to_thread.run_sync(self._clear_orphans, stored, self.planes.served(),
                                     self.planes.mnt_dir)
        self.restored.set()
        log.info("restored %d lazily served layers (%d already served by a running data plane)", len(records),
                 len(records) - attached)

    def _clear_orphans(self, stored: set[int], served: set[int], mnt_dir: Path) -> None:
        """What a SIGKILL at the wrong moment leaves: saved files of layers the store no longer
        has, layer mounts no data plane serves, and the mounts of lazysnap before data planes."""
        index_dir = self.root / saved.INDEX_DIR
        for path in sorted(index_dir.iterdir()) if index_dir.is_dir() else []:
            if path.name.isdigit() and int(path.name) not in stored:
                log.info("removing %s: no stored layer has it", path)
                shutil.rmtree(path, ignore_errors=True)
        for path in sorted(set(mnt_dir.iterdir()) | erofs.mounted(mnt_dir)) if mnt_dir.is_dir() else []:
            if not path.name.isdigit() or int(path.name) not in served:
                log.info("releasing %s: no data plane serves it", path)
                erofs.release(path)
        for legacy in (self.root / "erofs", self.root / "fuse"):  # one FUSE mount in serve, EROFS beside it
            if legacy.exists() or legacy in erofs.mounted(self.root):
                log.info("releasing %s, left by a lazysnap without data planes", legacy)
                erofs.release_all(legacy)
                erofs.release(legacy)

    async def _ensure_image(self, record: LayerRecord, layer: EStargzLayer | SociLayer) -> bool:
        """Whether the layer's EROFS image is on disk, built now if the kernel serves metadata and it is not."""
        if not self.kernel_metadata:
            return False
        files = saved.files_of(self.root, record)
        if files.has_image():
            return True
        image = await self.image_of(record.digest, layer)
        if image is None:
            return False
        await trio.to_thread.run_sync(_save, files, None, image, layer)
        return True

    async def reattach(self, layer_ids: list[int]) -> None:
        """Serve again, from a new data plane, the layers of one that died."""
        for layer_id in layer_ids:
            record = self._records.get(layer_id)
            status = self.status.get(record.digest) if record is not None else None
            if record is None or status is None or status.layer is None:
                continue
            try:
                await self._attach(record, status.layer, saved.files_of(self.root, record).has_image()
                                   and self.kernel_metadata, status)
            except AttachError as e:
                log.error("cannot serve layer %s again: %s", record.digest, e)

    async def release(self, records: list[LayerRecord]) -> None:
        for record in records:
            status = self.status.pop(record.digest, None)
            if status is not None:
                status.cancel_tasks()
            await self.planes.detach(record.id)
            await trio.to_thread.run_sync(shutil.rmtree, saved.files_of(self.root, record).dir, True)
            self._records.pop(record.id, None)
            log.info("stopped serving layer %s", record.digest)

    def forget_old_fallbacks(self) -> None:
        fallbacks = [d for d, s in self.status.items() if s.mode is LayerMode.FALLBACK]
        for digest in fallbacks[:-MAX_FALLBACK_STATUS]:
            del self.status[digest]

    # -- the data planes' calls -------------------------------------------------------

    async def serve_unit(self, digest: str, key: str) -> bytes:
        """A unit a data plane missed: from the cache, or fetched now (and readahead learns of it)."""
        status = self.status.get(digest)
        if status is None or status.layer is None:
            await self.restored.wait()
            status = self.status.get(digest)
        if status is None or status.layer is None:
            raise ReadError(f"layer {digest} is not served by this control plane")
        return await status.layer.cached_unit(key)

    def first_reads(self, layers: dict[str, list[list[int]]]) -> None:
        """Units read for the first time: what a recording start profile is made of."""
        for digest, ranges in layers.items():
            status = self.status.get(digest)
            if status is None or status.layer is None:
                continue
            for recording in status.layer.recordings:
                for start, end in ranges:
                    recording.touch(digest, int(start), int(end))

    async def report(self, digests: list[str]) -> StatusReport:
        want = set(digests)
        wanted = [s for s in reversed(self.status.values()) if not want or s.digest in want]
        cached = {s.digest: await completeness(s.layer, s.progress, self._cache_state) for s in wanted if s.layer}
        layers = tuple(
            LayerReport(
                digest=s.digest, image_ref=s.image_ref, mode=s.mode, reason=s.reason, size=s.size,
                resolve_seconds=s.resolve_seconds, path=s.path, fetched_bytes=s.fetched_bytes,
                fetch_state=s.progress.shown() if s.layer is not None else "",
                prefetched_bytes=s.progress.prefetched_bytes, background_bytes=s.progress.background_bytes,
                pull_seconds=s.pull_seconds, complete_bytes=cached.get(s.digest, (0, 0))[0],
                content_bytes=cached.get(s.digest, (0, 0))[1])
            for s in wanted
        )
        planes = await self.planes.stats()
        cache = CacheReport(bytes=self.cache.size, max_bytes=self.cache.max_bytes, hits=planes.hits,
                            misses=planes.misses, evictions=self.cache.stats.evictions)
        return StatusReport(layers, cache, FuseReport.of(planes.fuse),
                            tuple(PlaneReport.of(g) for g in self.planes.generations()))

    async def metrics(self) -> metrics.Snapshot:
        """One consistent view of the layers, the cache and the data planes, for a scrape."""
        layers: dict[str, int] = {}
        fallbacks: dict[str, int] = {}
        for s in self.status.values():
            if s.mode is not None:
                layers[s.mode] = layers.get(s.mode, 0) + 1
            if s.cause is not None:
                fallbacks[s.cause.value] = fallbacks.get(s.cause.value, 0) + 1
        served = [s for s in self.status.values() if s.layer is not None]
        planes = await self.planes.stats()
        ops = {op.name: (op.count, op.seconds) for op in FuseReport.of(planes.fuse).ops}
        generations = [PlaneReport.of(g) for g in self.planes.generations()]
        return metrics.Snapshot(
            layers=layers, fallbacks=fallbacks,
            complete_layers=sum(1 for s in served if s.progress.complete),
            fetched_bytes=sum(s.fetched_bytes for s in served),
            prefetched_bytes=sum(s.progress.prefetched_bytes for s in served),
            background_bytes=sum(s.progress.background_bytes for s in served),
            cache_bytes=self.cache.size, cache_max_bytes=self.cache.max_bytes,
            cache_evictions=self.cache.stats.evictions, read_hits=planes.hits, read_misses=planes.misses,
            fuse_ops=ops, read_failures=dict(planes.read_failures),
            data_planes={"current": sum(1 for g in generations if not g.retiring),
                         "retiring": sum(1 for g in generations if g.retiring)})

    def _cache_state(self) -> tuple[int, int, int]:
        return self.cache.size, self.cache.stats.evictions, self.cache.stats.corrupt

    def explain(self, digest: str) -> Explanation:
        """How a layer is served, and why not lazily."""
        status = self.status.get(digest)
        return Explanation(status.mode, status.reason) if status is not None else Explanation()


def _save(files: saved.LayerFiles, index: bytes | None, image: Image | None, layer: EStargzLayer | SociLayer) -> None:
    """Write what a data plane loads the layer from; each file whole or not at all, the image last."""
    files.dir.mkdir(parents=True, exist_ok=True)
    if index is not None and not files.index.exists():
        write_atomically(files.index, index)
    if image is not None:
        if isinstance(layer, EStargzLayer):
            write_atomically(files.device, device.encode(device.estargz_map(layer, image)))
        else:
            write_atomically(files.extents, saved.encode_extents(image.data_size, image.extents))
        write_atomically(files.meta, image.meta)
