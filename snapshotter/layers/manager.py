"""Which layers are served lazily, and how: resolve, verify, prefetch; `served.py` keeps the table.

The manager lives on the control plane's trio loop. containerd's Prepare arrives on a
gRPC worker thread and reaches `mount` through `trio.from_thread`; the data planes'
misses arrive on the same loop (`serve_unit`), so no lock is needed anywhere.

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
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..cache import ChunkCache
from ..formats import estargz, soci_index
from ..formats.errors import FormatError
from ..formats.profile import Profile
from ..labels import LayerRequest
from ..profiles import ProfileStore, find_remote
from ..registry.client import RegistryClient
from ..registry.errors import RegistryError
from ..soci.discovery import Discovery, fetch_ztoc, find_index
from ..soci.local import LocalIndexes
from ..store import LayerRecord, Store
from .background import BackgroundFetcher, BackgroundOptions, Target
from .blob import RegistryBlob
from .estargz import EStargzIndex, EStargzLayer, fetch_index
from .fetch import FetchableLayer, FetchActivity, Recording, Unit, batches, first_reached
from .prefetch import FetchQueue, prefetch
from .readahead import Readahead
from .saved import ESTARGZ, SOCI, build_layer
from .served import AttachError, DataPlane, LayerStatus, ServedLayers
from .soci import SociLayer

log = logging.getLogger(__name__)

RESOLUTION_TTL = 300.0
"""Seconds a fetched index waits for its layer's Prepare before it is dropped from memory."""
RETRY_FAILED_AFTER = 30.0
"""A failed resolution is tried again by its own layer's Prepare at once, but by the
Prepares of the image's other layers (which look ahead) only after this long: without
it, each Prepare of a pull would fetch again an index that one layer does not have."""
READAHEAD_GETS = 2
"""Readahead GETs in flight at once, across all layers."""


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
    fuse_xattrs: bool = True
    """Whether a data plane serves xattrs of layers whose tree it serves itself."""


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
    """Which layers are served lazily: resolution, the image's profile and prefetch, and
    the table of served layers (`ServedLayers`), which a data plane serves the files of."""

    def __init__(self, root: Path, store: Store, registry: RegistryClient, cache: ChunkCache, planes: DataPlane,
                 nursery: trio.Nursery, options: ManagerOptions) -> None:
        self.local = LocalIndexes(root / "soci")
        self.registry = registry
        self.cache = cache
        self.planes = planes
        self.nursery = nursery
        self.options = options
        self.token = trio.lowlevel.current_trio_token()
        self.profiles = ProfileStore(root / "profiles")
        self.activity = FetchActivity()
        self.served = ServedLayers(root, store, registry, cache, self.activity, planes, fuse_xattrs=options.fuse_xattrs)
        if options.readahead_max > 0:
            self.activity.on_miss = Readahead(self._spawn_readahead, maximum=options.readahead_max).miss
        self._readahead = FetchQueue(trio.CapacityLimiter(READAHEAD_GETS))
        self._resolutions: dict[str, _Resolution] = {}
        self._images: dict[str, _Image] = {}

    def layer_path(self, layer_id: int) -> Path:
        """Where a served layer's tree is mounted: `<root>/mnt/<id>`, whichever data plane serves it."""
        return self.planes.layer_path(layer_id)

    # -- the blocking face, for the snapshotter on gRPC threads --------------------

    def mount(self, request: LayerRequest) -> int | None:
        return trio.from_thread.run(self._mount, request, trio_token=self.token)

    def release(self, layers: list[LayerRecord]) -> None:
        trio.from_thread.run(self.served.release, layers, trio_token=self.token)

    def report(self, digests: list[str]) -> tuple[list[dict[str, object]], dict[str, int], dict[str, object]]:
        """Layer, cache and FUSE request state for the Status API."""
        return trio.from_thread.run(self.served.report, digests, trio_token=self.token)

    def explain(self, digest: str) -> tuple[str, str]:
        """(mode, reason) for a layer: how it is served, and why not lazily. On the trio thread."""
        return self.served.explain(digest)

    # -- the data planes' calls (`dataplane.client.UnitServer`) ------------------------

    async def serve_unit(self, layer: str, key: str) -> bytes:
        return await self.served.serve_unit(layer, key)

    def first_reads(self, layers: dict[str, list[list[int]]]) -> None:
        self.served.first_reads(layers)

    # -- the trio side ---------------------------------------------------------------

    async def _mount(self, request: LayerRequest) -> int | None:
        status = self.served.status_of(request)
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
                # In a worker thread: building a 30,000-entry tree takes a while, and the
                # data planes' misses must not wait for it. An eStargz TOC is already parsed.
                if resolution.estargz is not None:
                    layer = await trio.to_thread.run_sync(EStargzLayer, resolution.estargz, resolution.blob,
                                                          self.cache, self.activity)
                    index_digest = resolution.estargz.toc.digest
                else:
                    layer, index_digest = await trio.to_thread.run_sync(
                        build_layer, resolution.kind, resolution.saved, resolution.offset, resolution.blob, self.cache,
                        self.activity)
            except FormatError as e:  # TreeError too: a hardlink to nothing is a broken index
                raise _Fallback(f"unusable {resolution.kind} index: {e}") from None
            image = await self.served.image_of(request.layer_digest, layer)
            if not self.served.accepts(layer, image):
                raise _Fallback("the layer has extended attributes or opaque directories, and fuse_xattrs is off")
            try:
                record = await self.served.attach_new(request, resolution.kind, resolution.saved, index_digest,
                                                      resolution.offset, layer, image, status)
            except AttachError as e:
                raise _Fallback(str(e)) from None
        except _Fallback as e:
            status.fall_back(str(e))
            status.resolve_seconds = resolution.seconds
            log.warning("layer %s of %s is pulled whole: %s", request.layer_digest, request.image_ref, e)
            self.served.forget_old_fallbacks()
            return None
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
            for status in self.served.status.values():
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
                                             self.served.progress_of(layer))
        if failure:
            log.debug("readahead stopped: %s", failure)

    def background_targets(self) -> list[Target]:
        return [(s.digest, s.layer, s.progress) for s in self.served.status.values() if s.layer is not None]


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


class _Fallback(Exception):
    """This layer will be pulled whole; the message says why."""


@asynccontextmanager
async def open_manager(root: Path, store: Store, registry: RegistryClient, cache: ChunkCache, planes: DataPlane,
                       options: ManagerOptions) -> AsyncIterator[LayerManager]:
    """A manager whose background work lives (and dies) with this block. Layers stay mounted
    when it ends: their data planes serve them on, and the next control plane adopts them."""
    async with trio.open_nursery() as nursery:
        manager = LayerManager(root, store, registry, cache, planes, nursery, options)
        await manager.served.probe_kernel_metadata(options.kernel_metadata)
        yield manager
        nursery.cancel_scope.cancel()


async def start_background(manager: LayerManager) -> None:
    """Fetch the rest of every layer once reads go quiet (until cancelled)."""
    if manager.options.background is not None:
        fetcher = BackgroundFetcher(manager.background_targets, manager.activity, manager.cache.max_bytes,
                                    manager.options.background)
        await fetcher.run()
