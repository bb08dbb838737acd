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
import shutil
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..atomic import write_atomically
from ..cache import ChunkCache
from ..formats import estargz, soci_index, ztoc
from ..formats.errors import FormatError
from ..formats.profile import Profile
from ..fuse.filesystem import LayerFilesystem
from ..labels import LayerRequest
from ..profiles import ProfileStore, find_remote
from ..registry.client import RegistryClient
from ..registry.errors import RegistryError
from ..soci.discovery import Discovery, fetch_ztoc, find_index
from ..soci.local import LocalIndexes
from ..store import LayerRecord, Store
from . import erofs
from .background import BackgroundFetcher, BackgroundOptions, Target
from .estargz import EStargzIndex, EStargzLayer, fetch_index, parse_index
from .fetch import FetchableLayer, FetchActivity, Progress, Recording, Unit, batches, first_reached
from .layer import Blob
from .prefetch import FetchQueue, prefetch
from .readahead import Readahead
from .soci import SociLayer

log = logging.getLogger(__name__)

ESTARGZ = "estargz"
SOCI = "soci"
FALLBACK = "fallback"
EROFS_DIR = "erofs"
"""Under the root: `<id>`, the EROFS mount of each layer whose metadata the kernel serves."""
RESOLUTION_TTL = 300.0
"""Seconds a fetched index waits for its layer's Prepare before it is dropped from memory."""
RETRY_FAILED_AFTER = 30.0
"""A failed resolution is tried again by its own layer's Prepare at once, but by the
Prepares of the image's other layers (which look ahead) only after this long: without
it, each Prepare of a pull would fetch again an index that one layer does not have."""
READAHEAD_GETS = 2
"""Readahead GETs in flight at once, across all layers."""
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
    progress: Progress = field(default_factory=Progress)

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
    prefetch: bool = True
    """Prefetch at mount what the image says it reads first (profile, landmark, SOCI prefetch artifact)."""
    record_profiles: bool = True
    """Record a start profile for an image that has none."""
    profile_seconds: float = 30.0
    fetch_concurrency: int = 4
    """Parallel range GETs of one image's prefetch."""
    background: BackgroundOptions | None = field(default_factory=BackgroundOptions)
    """None: no background fetch."""
    readahead_max: int = 8 << 20
    """Largest blob readahead of a streak of forward misses; 0 turns readahead off."""
    kernel_metadata: bool = True
    """Mount each layer's metadata as an EROFS image (`erofs.py`) when the kernel can."""


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
        self.finished = 0.0
        """`time.monotonic()` when it ended."""


class _Image:
    """What is found once per image and shared by its layers: its SOCI index, its start profile."""

    def __init__(self, request: LayerRequest, concurrency: int) -> None:
        self.ref = request.image_ref
        self.manifest_digest = request.manifest_digest
        self.layers = request.image_layers
        self.done = trio.Event()
        """The SOCI search is over (`result`)."""
        self.result = Discovery()
        self.ready = trio.Event()
        """The profile search is over too (`profile`, `recording`, `soci_prefetch`)."""
        self.profile: Profile | None = None
        self.recording: Recording | None = None
        self.soci_prefetch: dict[str, list[tuple[int, int]]] = {}
        """Layer digest -> span id ranges (inclusive) from the SOCI index's prefetch artifacts."""
        self.queue = FetchQueue(trio.CapacityLimiter(concurrency))
        """The prefetch GETs of all the image's layers, most urgent first."""


class LayerManager:
    def __init__(self, root: Path, mountpoint: Path, store: Store, registry: RegistryClient, cache: ChunkCache,
                 fs: LayerFilesystem, nursery: trio.Nursery, options: ManagerOptions) -> None:
        self.mountpoint = mountpoint
        self.erofs_dir = root / EROFS_DIR
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
        self.profiles = ProfileStore(root / "profiles")
        self.activity = FetchActivity()
        if options.readahead_max > 0:
            self.activity.on_miss = Readahead(self._spawn_readahead, maximum=options.readahead_max).miss
        self._readahead = FetchQueue(trio.CapacityLimiter(READAHEAD_GETS))
        self._progress: weakref.WeakKeyDictionary[FetchableLayer, Progress] = weakref.WeakKeyDictionary()
        self._resolutions: dict[str, _Resolution] = {}
        self._images: dict[str, _Image] = {}
        self._paths: dict[int, Path] = {}
        """Layer record id -> its EROFS mount, for layers whose metadata the kernel serves."""
        self.kernel_metadata = False
        """Whether layers are mounted through EROFS: asked for, and the kernel can (`start`)."""

    def layer_path(self, layer_id: int) -> Path:
        """Where a served layer's tree is: its EROFS mount, or its directory in the FUSE mount."""
        return self._paths.get(layer_id) or self.mountpoint / str(layer_id)

    # -- the blocking face, for the snapshotter on gRPC threads --------------------

    def mount(self, request: LayerRequest) -> int | None:
        return trio.from_thread.run(self._mount, request, trio_token=self.token)

    def release(self, layers: list[LayerRecord]) -> None:
        trio.from_thread.run(self._release, layers, trio_token=self.token)

    def report(self, digests: list[str]) -> tuple[list[dict[str, object]], dict[str, int], dict[str, object]]:
        """Layer, cache and FUSE request state for the Status API (read on the trio thread, so consistent)."""
        return trio.from_thread.run_sync(self._report, digests, trio_token=self.token)

    def _report(self, digests: list[str]) -> tuple[list[dict[str, object]], dict[str, int], dict[str, object]]:
        wanted = set(digests)
        layers = [
            {"digest": s.digest, "image_ref": s.image_ref, "mode": s.mode, "reason": s.reason, "size": s.size,
             "resolve_seconds": s.resolve_seconds, "path": s.path, "fetched_bytes": s.fetched_bytes,
             "fetch_state": s.progress.state if s.layer is not None else "", "prefetched_bytes": s.progress.prefetched_bytes,
             "background_bytes": s.progress.background_bytes}
            for s in reversed(self.status.values()) if not wanted or s.digest in wanted
        ]
        stats = self.cache.stats
        cache = {"bytes": self.cache.size, "max_bytes": self.cache.max_bytes, "hits": stats.hits,
                 "misses": stats.misses, "evictions": stats.evictions}
        return layers, cache, self.fs.stats.report()

    def explain(self, digest: str) -> tuple[str, str]:
        """(mode, reason) for a layer: how it is served, and why not lazily. On the trio thread."""
        status = self.status.get(digest)
        return (status.mode, status.reason) if status is not None else ("", "")

    # -- the trio side ---------------------------------------------------------------

    async def _mount(self, request: LayerRequest) -> int | None:
        status = self.status.setdefault(request.layer_digest, LayerStatus(request.layer_digest, request.image_ref))
        for other in request.image_layers:
            if other != request.layer_digest:
                self._start_resolving(request, other, retry_after=RETRY_FAILED_AFTER)
        resolution = self._start_resolving(request, request.layer_digest, retry_after=0.0)
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
                # In a worker thread: building a 30,000-entry tree takes a while, and reads of
                # mounted layers must not wait for it. An eStargz TOC is already parsed.
                if resolution.estargz is not None:
                    layer = await trio.to_thread.run_sync(EStargzLayer, resolution.estargz, resolution.blob,
                                                          self.cache, self.activity)
                    index_digest = resolution.estargz.toc.digest
                else:
                    layer, index_digest = await trio.to_thread.run_sync(
                        _layer, resolution.kind, resolution.saved, resolution.offset, resolution.blob, self.cache,
                        self.activity)
            except FormatError as e:
                raise _Fallback(f"unusable {resolution.kind} index: {e}") from None
            image = await self._image(request.layer_digest, layer)
            if image is None and not self.fs.accepts(layer):
                raise _Fallback("the layer has extended attributes or opaque directories, and fuse_xattrs is off")
        except _Fallback as e:
            status.mode, status.reason, status.resolve_seconds = FALLBACK, str(e), resolution.seconds
            log.warning("layer %s of %s is pulled whole: %s", request.layer_digest, request.image_ref, e)
            self._forget_old_fallbacks()
            return None
        record = self._record(request, resolution, index_digest)
        await self._attach(record, layer, image, status)
        status.resolve_seconds = resolution.seconds
        self.nursery.start_soon(self._prefetch, self._start_image(request), request.layer_digest, layer, status)
        self._resolutions.pop(request.layer_digest, None)  # the layer holds what it needs now
        return record.id

    def _start_resolving(self, request: LayerRequest, digest: str, *, retry_after: float) -> _Resolution:
        """The layer's resolution, started if there is none, or if it failed over `retry_after` s ago."""
        resolution = self._resolutions.get(digest)
        if resolution is None or (resolution.done.is_set() and resolution.error
                                  and time.monotonic() - resolution.finished >= retry_after):
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
                image = self._start_image(request)  # its SOCI search runs in parallel with the footer read
                try:
                    resolution.estargz = await fetch_index(blob)
                    resolution.kind, resolution.saved = ESTARGZ, resolution.estargz.member
                    resolution.offset = resolution.estargz.footer.toc_offset
                except estargz.NotEStargz as e:
                    log.debug("layer %s of %s: %s", digest, image_ref, e)
                    await image.done.wait()
                    resolution.saved = await self._ztoc(request, digest, image.result)
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
            resolution.finished = time.monotonic()
            resolution.seconds = resolution.finished - start
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

    def _start_image(self, request: LayerRequest) -> _Image:
        key = request.manifest_digest or request.image_ref
        image = self._images.get(key)
        if image is None:
            image = self._images[key] = _Image(request, self.options.fetch_concurrency)
            self.nursery.start_soon(self._discover, request, key, image)
        return image

    async def _discover(self, request: LayerRequest, key: str, image: _Image) -> None:
        try:
            try:
                image.manifest_digest = image.manifest_digest or (await self.registry.resolve(request.image_ref)).digest
                image.result = await find_index(self.registry, self.local, request.image_ref, image.manifest_digest,
                                                request.soci_index_digest)
            except RegistryError as e:
                image.result = Discovery(misses=[f"cannot resolve the image: {e}"])
            finally:
                image.done.set()
            if image.result.index is not None:
                log.info("SOCI index %s (%s) found for %s", image.result.index.digest, image.result.source,
                         request.image_ref)
            if image.manifest_digest:
                await self._find_profile(image)
        finally:
            image.ready.set()
        if image.recording is not None:
            await self._record_profile(image.recording)
        await trio.sleep(RESOLUTION_TTL)
        if self._images.get(key) is image:
            del self._images[key]

    async def _find_profile(self, image: _Image) -> None:
        """What the image reads first: a profile (this node's, else its registry's), SOCI prefetch artifacts."""
        if self.options.prefetch:
            image.profile = self.profiles.get(image.manifest_digest)
            source = "this node"
            if image.profile is None:
                image.profile = await find_remote(self.registry, image.ref, image.manifest_digest)
                source = "the registry"
            if image.profile is not None:
                log.info("start profile of %s from %s: %d bytes in %d layers", image.ref, source,
                         image.profile.bytes, len(image.profile.layers))
            if image.result.index is not None:
                image.soci_prefetch = await self._soci_prefetch(image, image.result.index)
        if image.profile is None and self.options.record_profiles:
            image.recording = Recording(image.manifest_digest, image.layers, self.options.profile_seconds)

    async def _soci_prefetch(self, image: _Image, index: soci_index.SociIndex) -> dict[str, list[tuple[int, int]]]:
        out: dict[str, list[tuple[int, int]]] = {}
        for layer, ref in index.prefetches.items():
            try:
                raw = await self.registry.fetch_blob(image.ref, ref.digest, max_size=ref.size or soci_index.MAX_PREFETCH)
                out[layer] = soci_index.parse_prefetch(raw)
            except (RegistryError, FormatError) as e:
                log.warning("ignoring SOCI prefetch artifact %s of %s: %s", ref.digest, image.ref, e)
        return out

    async def _record_profile(self, recording: Recording) -> None:
        """Let the recording run for its window after the image's first read, then save it."""
        try:
            with trio.move_on_after(RESOLUTION_TTL):
                while recording.started is None:
                    await trio.sleep(0.2)
            if recording.started is not None:
                await trio.sleep(max(0.0, recording.seconds - (time.monotonic() - recording.started)))
        finally:
            for status in self.status.values():
                if status.layer is not None and recording in status.layer.recordings:
                    status.layer.recordings.remove(recording)
            if recording.touched:
                path = self.profiles.put(recording.profile())
                log.info("saved the start profile of %s (%d units) to %s", recording.image, len(recording.touched),
                         path)

    async def _prefetch(self, image: _Image, digest: str, layer: EStargzLayer | SociLayer,
                        status: LayerStatus) -> None:
        """Start recording this layer's reads, or fetch ahead what the image will read of it."""
        await image.ready.wait()
        if image.recording is not None and digest in image.layers:
            layer.recordings.append(image.recording)
        if not self.options.prefetch:
            return
        units, sources = _prefetch_units(image, digest, layer)
        if units:
            log.info("prefetching %d units of %s (%s)", len(units), digest, ", ".join(sources))
            await prefetch(digest, layer, units, status.progress, image.queue)

    def _spawn_readahead(self, layer: FetchableLayer, units: list[Unit]) -> None:
        self.nursery.start_soon(self._read_ahead, layer, units)

    async def _read_ahead(self, layer: FetchableLayer, units: list[Unit]) -> None:
        todo = batches([u for u in units if not layer.is_cached(u)])
        failure = await self._readahead.fetch(layer, [(0.0, run) for run in todo],  # ties: first come, first fetched
                                             self._progress.get(layer, Progress()))
        if failure:
            log.debug("readahead stopped: %s", failure)

    def background_targets(self) -> list[Target]:
        return [(s.digest, s.layer, s.progress) for s in self.status.values() if s.layer is not None]

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
            write_atomically(path, resolution.saved)
        return record

    async def _image(self, digest: str, layer: EStargzLayer | SociLayer) -> erofs.Image | None:
        """The layer's EROFS image, or None if the kernel will not serve its metadata."""
        if not self.kernel_metadata:
            return None
        try:
            return await trio.to_thread.run_sync(erofs.image_of, layer)
        except FormatError as e:
            log.warning("layer %s: metadata served by FUSE, not EROFS: %s", digest, e)
            return None

    async def _attach(self, record: LayerRecord, layer: EStargzLayer | SociLayer, image: erofs.Image | None,
                      status: LayerStatus) -> None:
        name = str(record.id)
        if name not in self.fs.layers():
            if image is None or not await self._mount_erofs(record, layer, image):
                self.fs.attach(name, layer)
        status.mode, status.reason, status.size, status.layer = record.format, "", record.blob_size, layer
        self._progress[layer] = status.progress
        self.activity.mounted()
        status.path = str(self.layer_path(record.id))

    async def _mount_erofs(self, record: LayerRecord, layer: EStargzLayer | SociLayer, image: erofs.Image) -> bool:
        """Serve the layer's file bytes at `<fuse>/<id>/data`, and its image over them at `<erofs>/<id>`."""
        name = str(record.id)
        path = self._index_path(record).with_name("meta.erofs")
        target = self.erofs_dir / name
        self.fs.attach(name, erofs.DataDevice(layer, image))
        try:
            await trio.to_thread.run_sync(write_atomically, path, image.meta)
            await trio.to_thread.run_sync(erofs.mount, path, self.mountpoint / name / erofs.DEVICE_NAME.decode(),
                                          target)
        except OSError as e:
            log.warning("layer %s: metadata served by FUSE, not EROFS: %s", record.digest, e)
            await self.fs.detach(name)
            return False
        self._paths[record.id] = target
        return True

    async def start_kernel_metadata(self) -> None:
        """Drop EROFS mounts a previous daemon left (their data devices died with it); probe the kernel."""
        self.erofs_dir.mkdir(exist_ok=True)
        await trio.to_thread.run_sync(erofs.release_all, self.erofs_dir)
        if not self.options.kernel_metadata:
            return
        why = await trio.to_thread.run_sync(erofs.kernel_supports_erofs, self.erofs_dir / ".probe")
        if why is None:
            self.kernel_metadata = True
            log.info("layer metadata is served by the kernel (EROFS), file bytes through FUSE")
        else:
            log.warning("this kernel cannot mount EROFS images (%s); layer metadata is served through FUSE", why)

    async def restore(self) -> None:
        """Attach every stored layer from its saved index; a broken one is logged and skipped."""
        with self.store.transaction() as tx:
            records = tx.layers()
        for record in records:
            status = self.status.setdefault(record.digest, LayerStatus(record.digest, record.image_ref))
            try:
                saved = self._index_path(record).read_bytes()
                layer, digest = _layer(record.format, saved, record.index_offset, _LazyBlob(self.registry, record),
                                       self.cache, self.activity)
                if digest != record.index_digest:
                    raise FormatError(f"saved index digest {digest} is not {record.index_digest}")
            except (OSError, FormatError) as e:
                log.error("cannot restore layer %s (snapshot reads will fail): %s", record.digest, e)
                status.mode, status.reason = FALLBACK, f"restore failed: {e}"
                continue
            await self._attach(record, layer, await self._image(record.digest, layer), status)
        log.info("restored %d lazily served layers", len(records))

    async def _release(self, layers: list[LayerRecord]) -> None:
        for record in layers:
            target = self._paths.pop(record.id, None)
            if target is not None:
                await trio.to_thread.run_sync(erofs.release, target)
            if str(record.id) in self.fs.layers():
                await self.fs.detach(str(record.id))
            shutil.rmtree(self._index_path(record).parent, ignore_errors=True)
            self.status.pop(record.digest, None)
            self._resolutions.pop(record.digest, None)
            log.info("stopped serving layer %s", record.digest)

    def _index_path(self, record: LayerRecord) -> Path:
        return self.index_dir / str(record.id) / ("toc.gz" if record.format == ESTARGZ else "ztoc")


def _layer(kind: str, saved: bytes, offset: int, blob: Blob, cache: ChunkCache,
           activity: FetchActivity) -> tuple[EStargzLayer | SociLayer, str]:
    """The layer served from a saved index, and the index's digest (to check against the record)."""
    if kind == ESTARGZ:
        index = parse_index(saved, offset)
        return EStargzLayer(index, blob, cache, activity), index.toc.digest
    if kind == SOCI:
        return SociLayer(ztoc.parse_ztoc(saved), blob, cache, activity), ztoc.ztoc_digest(saved)
    raise FormatError(f"unknown layer format {kind!r}")


def _prefetch_units(image: _Image, digest: str,
                    layer: EStargzLayer | SociLayer) -> tuple[list[tuple[float, Unit]], list[str]]:
    """The units to prefetch with their priorities (lower is sooner), and where the list came from.

    A profile's units come when the image first read them (milliseconds into its start;
    their rank when the profile has no times). What the image declares itself (landmark,
    SOCI prefetch artifact) comes first.
    """
    units: list[tuple[float, Unit]] = []
    sources: list[str] = []
    recorded = image.profile.for_layer(digest) if image.profile is not None else None
    if recorded is not None:
        units += [(float(recorded.at[k] if recorded.at else k), u) for u, k in first_reached(layer.units, recorded.ranges)]
        sources.append("start profile")
    if isinstance(layer, EStargzLayer):
        end = estargz.prefetch_end(layer.index.toc)
        if end:
            units += [(0.0, u) for u, _ in first_reached(layer.units, [(0, end)])]
            sources.append("prefetch landmark")
    spans = image.soci_prefetch.get(digest, [])
    if spans and isinstance(layer, SociLayer):
        units += [(0.0, u) for first, last in spans for u in layer.units[first:last + 1]]
        sources.append("SOCI prefetch artifact")
    return units, sources


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
        await manager.start_kernel_metadata()
        try:
            await manager.restore()
            if options.background is not None:
                fetcher = BackgroundFetcher(manager.background_targets, manager.activity, cache.max_bytes,
                                            options.background)
                nursery.start_soon(fetcher.run)
            yield manager
            nursery.cancel_scope.cancel()
        finally:
            # Before the FUSE mount goes, as each EROFS mount holds its data device open.
            # Plain syscalls the kernel answers itself, so fine on this thread, even cancelled.
            erofs.release_all(manager.erofs_dir)
