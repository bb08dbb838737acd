"""Which layers are served lazily: resolve, verify, attach, prefetch. The pieces live beside it:

- `resolver.py`: for a layer, its verified index, or the reason it is pulled whole;
- `images.py`: what an image's layers share (SOCI index, start profile, prefetch plan);
- `served.py`: the table of served layers (attach, persist, restore, release, status),
  which data planes serve the files of.

The manager lives on the control plane's trio loop. containerd's Prepare arrives on a
gRPC worker thread and reaches `mount` through `trio.from_thread`; the data planes'
misses arrive on the same loop (`serve_unit`), so nothing here needs a lock.

What makes it different from its peers:
- the first Prepare of an image starts resolving *all* the image's layers at once,
  so later Prepares find their index already fetched (`lazysnap rpull` starts it sooner
  still, once the manifest is resolved: `expect`);
- every fallback has a reason, which is logged, kept, and shown by `lazysnap status`
  and `lazysnap rpull`;
- a layer's index is saved on disk once verified, so after a restart every layer is
  served again without the registry (only reads of uncached bytes need it).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .. import metrics
from ..config import FETCH_CONCURRENCY
from ..cache import ChunkCache
from ..fetch.activity import FetchActivity
from ..fetch.background import BackgroundFetcher, BackgroundOptions, Target
from ..fetch.prefetch import prefetch
from ..fetch.readahead import Readahead
from ..fetch.units import FetchableLayer, Unit
from ..formats import estargz, zstd_chunked
from ..formats.errors import FormatError
from ..labels import LayerRequest
from ..layer_modes import FallbackCause, LayerMode
from ..profiles import ProfileStore
from ..pull_records import PullReport
from ..recording import Recording
from ..registry.client import RegistryClient
from ..registry.errors import RegistryError
from ..soci.local import LocalIndexes
from ..store import LayerRecord, Store
from ..whole.apply import copy_up_parents
from .estargz import EStargzLayer
from .images import Image, ImageOptions, Images, borrowed_note, prefetch_units
from .resolver import SETTLED, Fallback, Resolution, Resolver
from .saved import build_layer
from .served import AttachError, DataPlane, Explanation, LayerStatus, ServedLayers, StatusReport
from .soci import SociLayer
from .warming import Warmer, Warming
from .whole_pulls import WholePulls

log = logging.getLogger(__name__)

RETRY_FAILED_AFTER = 30.0
"""A failed resolution is tried again by its own layer's Prepare at once, but by the
Prepares of the image's other layers (which look ahead) only after this long: without
it, each Prepare of a pull would fetch again an index that one layer does not have."""


@dataclass
class ManagerOptions:
    resolve_timeout: float = 30.0
    allow_unverified: bool = False
    prefetch: bool = True
    """Prefetch at mount what the image says it reads first (profile, landmark, SOCI prefetch artifact)."""
    record_profiles: bool = True
    """Record a start profile for an image that has none."""
    profile_seconds: float = 30.0
    fetch_concurrency: int = FETCH_CONCURRENCY
    """Parallel range GETs of one image's prefetch."""
    background: BackgroundOptions | None = field(default_factory=BackgroundOptions)
    """None: no background fetch."""
    readahead_max: int = 8 << 20
    """Largest blob readahead of a streak of forward misses; 0 turns readahead off."""
    kernel_metadata: bool = True
    """Mount each layer's metadata as an EROFS image (`erofs.py`) when the kernel can."""
    fuse_xattrs: bool = True
    """Whether a data plane serves xattrs of layers whose tree it serves itself."""


class LayerManager:
    def __init__(self, root: Path, store: Store, registry: RegistryClient, cache: ChunkCache, planes: DataPlane,
                 nursery: trio.Nursery, options: ManagerOptions) -> None:
        local = LocalIndexes(root / "soci")
        self.registry = registry
        self.cache = cache
        self.planes = planes
        self.nursery = nursery
        self.options = options
        self.token = trio.lowlevel.current_trio_token()
        self.activity = FetchActivity()
        self.served = ServedLayers(root, store, registry, cache, self.activity, planes, fuse_xattrs=options.fuse_xattrs)
        self.images = Images(registry, local, ProfileStore(root / "profiles"), nursery,
                             ImageOptions(options.prefetch, options.record_profiles, options.profile_seconds,
                                          options.fetch_concurrency), Recording.detach)
        self.resolver = Resolver(registry, local, self.images, nursery, options.resolve_timeout)
        self.wholes = WholePulls(registry, root, nursery)
        self.warmer = Warmer(self.served, self.images, cache, nursery)
        self.readahead = Readahead(self._spawn_readahead, maximum=options.readahead_max)
        if options.readahead_max > 0:
            self.activity.on_miss = self.readahead.miss

    def layer_path(self, layer_id: int) -> Path:
        """Where a served layer's tree is mounted: `<root>/mnt/<id>`, whichever data plane serves it."""
        return self.planes.layer_path(layer_id)

    # -- the blocking face, for the snapshotter on gRPC threads --------------------

    def mount(self, request: LayerRequest) -> int | None:
        return trio.from_thread.run(self._mount, request, trio_token=self.token)

    def pull_whole(self, request: LayerRequest, dest: Path, parents: list[Path]) -> bool:
        """Blocking: pull a layer that cannot be lazy into `dest` here; False to leave it to containerd."""
        return trio.from_thread.run(self._pull_whole, request, dest, parents, trio_token=self.token)

    def release(self, layers: list[LayerRecord]) -> None:
        trio.from_thread.run(self.served.release, layers, trio_token=self.token)

    def report(self, digests: list[str]) -> StatusReport:
        """Layer, cache, FUSE request and data plane state for the Status API."""
        return trio.from_thread.run(self.served.report, digests, trio_token=self.token)

    def metrics(self) -> metrics.Snapshot:
        """The state a Prometheus scrape reports (from the metrics server's thread)."""
        return trio.from_thread.run(self.served.metrics, trio_token=self.token)

    def explain(self, digest: str) -> Explanation:
        """How a layer is served, and why not lazily. On the trio thread."""
        return self.served.explain(digest)

    def warm(self, pulled: PullReport) -> Warming:
        """Fill the cache with a pulled image's lazy layers now (`lazysnap prefetch`). On the trio thread."""
        return self.warmer.start(pulled)

    # -- the data planes' calls (`dataplane.client.UnitServer`) ------------------------

    async def serve_unit(self, layer: str, key: str) -> bytes:
        return await self.served.serve_unit(layer, key)

    def first_reads(self, layers: dict[str, list[list[int]]]) -> None:
        self.served.first_reads(layers)

    # -- the trio side ---------------------------------------------------------------

    async def _mount(self, request: LayerRequest) -> int | None:
        served = self.served.serving(request.layer_digest)
        if served is not None:  # another image's layer too: nothing to resolve, and nothing to break
            return served.id
        status = self.served.status_of(request)
        self._resolve_ahead(request, request.layer_digest)
        resolution = self.resolver.start(request, request.layer_digest, retry_after=0.0)
        with trio.move_on_after(self.options.resolve_timeout):
            await resolution.done.wait()
        try:
            if not resolution.done.is_set():
                raise Fallback(f"finding the layer's index took over {self.options.resolve_timeout:g} s",
                               FallbackCause.TIMEOUT)
            if resolution.error:
                raise Fallback(resolution.error, resolution.cause)
            assert resolution.blob is not None and resolution.kind is not None
            if resolution.estargz is not None:
                allow = self.options.allow_unverified or request.skip_verify
                try:
                    if resolution.kind is LayerMode.ZSTD_CHUNKED:  # its checksum comes from the manifest, not the labels
                        zstd_chunked.verify_toc(resolution.estargz.toc, resolution.expected_digest or None,
                                                allow_unverified=allow)
                    else:
                        estargz.verify_toc(resolution.estargz.toc, request.toc_digest or None, allow_unverified=allow)
                except FormatError as e:
                    note = f" ({resolution.note})" if resolution.note else ""
                    raise Fallback(f"{e}{note}", FallbackCause.VERIFICATION) from None
            layer: EStargzLayer | SociLayer
            try:
                # In a worker thread: building a 30,000-entry tree takes a while, and the
                # data planes' misses must not wait for it. An eStargz or zstd:chunked TOC is already parsed.
                if resolution.estargz is not None:
                    layer = await trio.to_thread.run_sync(EStargzLayer, resolution.estargz, resolution.blob,
                                                          self.cache, self.activity)
                    index_digest = resolution.estargz.toc.digest
                else:
                    layer, index_digest = await trio.to_thread.run_sync(
                        build_layer, resolution.kind, resolution.saved, resolution.offset, resolution.blob, self.cache,
                        self.activity)
            except FormatError as e:  # TreeError too: a hardlink to nothing is a broken index
                raise Fallback(f"unusable {resolution.kind} index: {e}", FallbackCause.BROKEN_INDEX) from None
            image = await self.served.image_of(request.layer_digest, layer)
            if not self.served.accepts(layer, image):
                raise Fallback("the layer has extended attributes or opaque directories, and fuse_xattrs is off",
                               FallbackCause.XATTRS)
            try:
                record = await self.served.attach_new(request, resolution.kind, resolution.saved, index_digest,
                                                      resolution.offset, layer, image, status)
            except AttachError as e:
                raise Fallback(str(e), FallbackCause.ATTACH) from None
        except Fallback as e:
            status.fall_back(str(e), e.cause)
            status.resolve_seconds = resolution.seconds
            log.warning("layer %s of %s is pulled whole: %s", request.layer_digest, request.image_ref, e)
            self.served.forget_old_fallbacks()
            return None
        status.resolve_seconds = resolution.seconds
        self.nursery.start_soon(status.run_task, self._prefetch, self.images.start(request), request.layer_digest,
                                layer, status)
        self.resolver.forget(request.layer_digest)
        return record.id

    def expect(self, request: LayerRequest) -> None:
        """On the trio thread: an image is being pulled (`lazysnap rpull`), `request` is what its
        first Prepare will say; start resolving its layers now."""
        self._resolve_ahead(request)

    def _resolve_ahead(self, request: LayerRequest, but: str = "") -> None:
        """Start resolving the image's layers other than `but` that are not served yet."""
        for other in request.image_layers:
            if other != but and self.served.serving(other) is None:
                ahead = self.resolver.start(request, other, retry_after=RETRY_FAILED_AFTER)
                self.nursery.start_soon(self._pull_ahead_if_settled, request.image_ref, other, ahead)

    async def _pull_ahead_if_settled(self, image_ref: str, digest: str, resolution: Resolution) -> None:
        """Start pulling a layer whole as soon as it is known to have no usable index."""
        await resolution.done.wait()
        if resolution.error and resolution.cause in SETTLED:
            self.wholes.start(image_ref, digest)

    async def _pull_whole(self, request: LayerRequest, dest: Path, parents: list[Path]) -> bool:
        status = self.served.status_of(request)
        ahead = self.wholes.started(request.layer_digest)
        try:
            pulled = await self.wholes.claim(request.image_ref, request.layer_digest, dest)
            await trio.to_thread.run_sync(copy_up_parents, dest, pulled.applied, parents)
        except (RegistryError, FormatError, OSError) as e:
            log.warning("layer %s of %s: pulling it whole failed (%s); containerd pulls it", request.layer_digest,
                        request.image_ref, e)
            status.reason = f"{status.reason}; lazysnap could not pull it whole either: {e}"
            return False
        status.mode, status.size, status.pull_seconds = LayerMode.WHOLE, pulled.compressed_bytes, pulled.seconds
        log.info("layer %s of %s pulled whole by lazysnap in %.2f s%s (%s, %d bytes, %d entries): %s",
                 request.layer_digest, request.image_ref, pulled.seconds, " (started ahead)" if ahead else "",
                 pulled.compression, pulled.compressed_bytes, pulled.applied.entries, status.reason)
        return True

    async def _prefetch(self, image: Image, digest: str, layer: EStargzLayer | SociLayer,
                        status: LayerStatus) -> None:
        """Start recording this layer's reads, or fetch ahead what the image will read of it."""
        await image.ready.wait()
        if image.recording is not None and digest in image.layers:
            image.recording.attach(layer)
        if not self.options.prefetch:
            return
        units, sources = prefetch_units(image, digest, layer)
        if borrowed_note(image, digest) and not status.reason:  # `lazysnap status` says whose profile
            status.reason = f"prefetched the {borrowed_note(image, digest)}"
        if units:
            log.info("prefetching %d units of %s (%s)", len(units), digest, ", ".join(sources))
            await prefetch(digest, layer, units, status.progress, image.queue)

    def _spawn_readahead(self, layer: FetchableLayer, units: list[Unit]) -> None:
        """Readahead's fetch runs as one of its layer's tasks (releasing the layer cancels it)."""
        status = self.served.status_of_layer(layer)
        if status is not None:
            self.nursery.start_soon(status.run_task, self.readahead.fetch, layer, units, status.progress)

    def background_targets(self) -> list[Target]:
        return [(s.digest, s.layer, s.progress) for s in self.served.status.values() if s.layer is not None]


@asynccontextmanager
async def open_manager(root: Path, store: Store, registry: RegistryClient, cache: ChunkCache, planes: DataPlane,
                       options: ManagerOptions) -> AsyncIterator[LayerManager]:
    """A manager whose background work lives (and dies) with this block. Layers stay mounted
    when it ends: their data planes serve them on, and the next control plane adopts them."""
    async with trio.open_nursery() as nursery:
        manager = LayerManager(root, store, registry, cache, planes, nursery, options)
        await trio.to_thread.run_sync(manager.wholes.clear)
        await manager.served.probe_kernel_metadata(options.kernel_metadata)
        yield manager
        nursery.cancel_scope.cancel()


async def start_background(manager: LayerManager) -> None:
    """Fetch the rest of every layer once reads go quiet (until cancelled)."""
    if manager.options.background is not None:
        fetcher = BackgroundFetcher(manager.background_targets, manager.activity, manager.cache.max_bytes,
                                    manager.options.background)
        await fetcher.run()
