"""Warming: `lazysnap prefetch IMAGE` fills the chunk cache with an image's lazy layers now,
before any container of it runs on the node (what a pre-pull DaemonSet is for).

Why not leave it to background fetch: that completes layers only once reads have gone
quiet, one rate-limited GET at a time, so as never to compete with a running container.
An operator who warms a node wants it done now. A warming fetches at once, through the
image's prefetch queue (`fetch_concurrency` GETs, shared with the mount-time prefetch),
what the image reads first (start profile, landmark, SOCI prefetch artifact) and then the
rest of every layer, round-robin across layers by blob position.

Its tasks belong to the layers they fill (`LayerStatus.run_task`): releasing a layer
cancels its warming, a client that stops following does not. The cache bounds it: an
image larger than `WARM_SHARE` of the cache is warmed as far as that goes, most urgent
first, and the report says so (more would evict what was warmed first).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import trio

from ..cache import ChunkCache
from ..fetch.batching import BATCH_BYTES, Job, batch_jobs
from ..fetch.prefetch import FetchQueue
from ..fetch.progress import COMPLETE, cached_units
from ..fetch.units import FetchableLayer, Unit
from ..labels import LayerRequest
from ..layer_modes import LayerMode
from ..pull_records import PullReport, WarmedLayer, WarmPhase, WarmReport, WarmState, percent
from ..sizes import human_size
from .images import Image, Images, prefetch_units
from .served import LayerStatus, ServedLayers

log = logging.getLogger(__name__)

WARM_SHARE = 0.8
"""Share of the chunk cache one image may fill. Past its bound the cache evicts, least
recently used first, down to 90 %: warming more would evict what it warmed first."""
REST = 1e12
"""Priority of the units after what the image reads first (those have milliseconds)."""
PROGRESS_EVERY = 1.0
"""Seconds between progress lines of a followed warming (a layer's end is said at once)."""
PASSES = 3
"""Tries of a layer's GETs: what failed (or was in flight for another reader) is tried again
after 1 s, then 2 s, before the layer is reported as failed."""

COMPLETED = WarmState(WarmPhase.COMPLETE)
NO_ROOM = WarmState(WarmPhase.PARTIAL, "no room in the cache")
RELEASED = WarmState(WarmPhase.STOPPED, "the layer was released")

Jobs = list[Job]
"""A layer's GETs for the image's `FetchQueue`."""


@dataclass(eq=False)
class LayerWarming:
    """One layer's share of a warming, in compressed bytes of its units."""

    digest: str
    content_bytes: int = 0
    complete_bytes: int = 0
    fetched_bytes: int = 0
    state: WarmState = WarmState(WarmPhase.WAITING)
    cached: set[int] = field(default_factory=set)
    """Indexes of the units known to be in the cache."""
    done: trio.Event = field(default_factory=trio.Event)

    def count(self, layer: FetchableLayer, cached: set[int]) -> None:
        self.cached = cached
        self.content_bytes = sum(u.end - u.start for u in layer.units)
        self.complete_bytes = sum(u.end - u.start for u in layer.units if u.index in cached)

    def finish(self, state: WarmState) -> None:
        self.state = state
        self.done.set()

    def record(self) -> WarmedLayer:
        return WarmedLayer(self.digest, self.content_bytes, self.complete_bytes, self.fetched_bytes, self.state)


@dataclass(eq=False)
class Warming:
    """A warming of one image, which any number of clients may follow."""

    image: str
    manifest_digest: str
    layers: list[LayerWarming]
    started: float = field(default_factory=time.monotonic)
    sources: tuple[str, ...] = ()
    note: str = ""
    planned: trio.Event = field(default_factory=trio.Event)
    """Sizes, sources and the note are known."""
    done: trio.Event = field(default_factory=trio.Event)
    _changed: trio.Event = field(default_factory=trio.Event)

    def changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def report(self) -> WarmReport:
        return WarmReport(self.image, self.manifest_digest, tuple(lw.record() for lw in self.layers),
                          time.monotonic() - self.started, self.sources, self.note, self.done.is_set())

    async def follow(self, say: Callable[[str], None]) -> None:
        """Progress lines until the warming ends: one per layer whose share changed, at most
        every `PROGRESS_EVERY` seconds, driven by the fetches themselves (no timer)."""
        await self.planned.wait()
        lazy = [lw for lw in self.layers if lw.content_bytes]
        total = sum(lw.content_bytes for lw in lazy)
        first = f"{' and '.join(self.sources)} first" if self.sources else "no start profile: whole layers"
        say(f"warming {self.image}: {len(lazy)} lazy layer(s), {human_size(total)}, "
            f"{human_size(sum(lw.complete_bytes for lw in lazy))} in the cache already; {first}")
        said: dict[int, tuple[int, WarmState]] = {}
        last = -math.inf
        while True:
            changed = self._changed
            finished = self.done.is_set()
            due = finished or trio.current_time() - last >= PROGRESS_EVERY
            for i, lw in enumerate(self.layers):
                key = (lw.complete_bytes, lw.state)
                if lw.content_bytes and said.get(i) != key and (due or lw.done.is_set()):
                    said[i] = key
                    state = f", {lw.state}" if lw.done.is_set() else ""
                    say(f"  layer {i + 1}/{len(self.layers)} {lw.digest[:19]}: {human_size(lw.complete_bytes)} of "
                        f"{human_size(lw.content_bytes)} ({percent(lw.complete_bytes, lw.content_bytes)}){state}")
            if due:
                last = trio.current_time()
            if finished:
                return
            await changed.wait()


class Warmer:
    """Starts warmings, one at a time per image (a second `prefetch` follows the first)."""

    def __init__(self, served: ServedLayers, images: Images, cache: ChunkCache, nursery: trio.Nursery) -> None:
        self.served = served
        self.images = images
        self.cache = cache
        self.nursery = nursery
        self._running: dict[str, Warming] = {}

    def start(self, pulled: PullReport) -> Warming:
        """On the trio thread, once the image is pulled (its lazy layers served): warm them."""
        key = pulled.manifest_digest or pulled.image
        running = self._running.get(key)
        if running is not None:
            return running
        warming = self._running[key] = Warming(pulled.image, pulled.manifest_digest,
                                               [LayerWarming(layer.digest) for layer in pulled.layers])
        digests = tuple(layer.digest for layer in pulled.layers)
        image = self.images.start(LayerRequest("", pulled.image, digests[0], digests, pulled.manifest_digest)) \
            if digests else None
        self.nursery.start_soon(self._run, key, warming, image)
        return warming

    async def _run(self, key: str, warming: Warming, image: Image | None) -> None:
        try:
            if image is not None:
                try:
                    await self._plan_and_start(warming, image)
                except Exception as e:  # a bug here must not take the daemon's other layers down
                    log.exception("warming %s failed", warming.image)
                    for lw in warming.layers:
                        if not lw.done.is_set() and lw.state.phase is WarmPhase.WAITING:
                            lw.finish(WarmState(WarmPhase.FAILED, repr(e)))
            for lw in warming.layers:
                await lw.done.wait()
            done = sum(lw.complete_bytes for lw in warming.layers)
            log.info("warmed %s: %d of %d bytes in the cache, %d fetched in %.2f s%s", warming.image, done,
                     sum(lw.content_bytes for lw in warming.layers), sum(lw.fetched_bytes for lw in warming.layers),
                     time.monotonic() - warming.started, f" ({warming.note})" if warming.note else "")
        finally:
            del self._running[key]
            warming.planned.set()
            warming.done.set()
            warming.changed()

    async def _plan_and_start(self, warming: Warming, image: Image) -> None:
        await image.ready.wait()  # its start profile, if it has one
        lazy: list[tuple[LayerWarming, LayerStatus]] = []
        firsts: list[list[tuple[float, Unit]]] = []
        sources: dict[str, None] = {}
        for lw in warming.layers:
            status = self.served.status.get(lw.digest)
            if status is None or status.layer is None:
                lw.finish(WarmState(WarmPhase.PULLED_WHOLE if status is not None and status.mode is LayerMode.WHOLE
                                    else WarmPhase.NOT_LAZY))
                continue
            first, found = prefetch_units(image, lw.digest, status.layer)
            lw.count(status.layer, await cached_units(status.layer))
            lazy.append((lw, status))
            firsts.append(first)
            sources.update(dict.fromkeys(found))
        budget = int(self.cache.max_bytes * WARM_SHARE)
        jobs, left_out = await trio.to_thread.run_sync(
            plan, [(status.layer.units if status.layer else [], first, lw.cached)
                   for (lw, status), first in zip(lazy, firsts, strict=True)], budget)
        warming.sources = tuple(sources)
        if left_out:
            need = sum(u.cached_size for _, status in lazy if status.layer for u in status.layer.units)
            warming.note = (f"the image takes {human_size(need)} in the cache, more than "
                            f"{WARM_SHARE * 100:.0f} % of its {human_size(self.cache.max_bytes)} (cache_max_mib): "
                            f"warming {human_size(budget)} of it, what it reads first before the rest")
            log.warning("warming %s: %s", warming.image, warming.note)
        log.info("warming %s: %d lazy layers, %d GETs%s", warming.image, len(lazy), sum(map(len, jobs)),
                 f", {', '.join(warming.sources)} first" if warming.sources else "")
        warming.planned.set()
        warming.changed()
        for (lw, status), layer_jobs in zip(lazy, jobs, strict=True):
            if not layer_jobs:
                lw.finish(COMPLETED if lw.complete_bytes == lw.content_bytes else NO_ROOM)
                continue
            self.nursery.start_soon(status.run_task, self._warm_layer, warming, lw, status, layer_jobs, image.queue)

    async def _warm_layer(self, warming: Warming, lw: LayerWarming, status: LayerStatus, jobs: Jobs,
                          queue: FetchQueue) -> None:
        """Fetch the layer's planned GETs through the image's queue; runs as one of the layer's tasks."""
        layer = status.layer
        if layer is None or self.served.status.get(lw.digest) is not status:
            lw.finish(RELEASED)
            warming.changed()
            return
        progress = status.progress
        progress.warming = True
        lw.state = WarmState(WarmPhase.WARMING)
        counting = _Counting(layer, lw, warming)
        failure = ""
        try:
            for attempt in range(PASSES):
                failure = await queue.fetch(counting, jobs, progress)
                jobs = [(p, todo) for p, run in jobs if (todo := [u for u in run if not layer.is_cached(u)])]
                if not jobs:
                    break
                if attempt + 1 < PASSES:
                    await trio.sleep(2 ** attempt)
            lw.count(layer, await cached_units(layer))
            if lw.complete_bytes == lw.content_bytes:
                progress.state = COMPLETE
                lw.finish(COMPLETED)
            elif jobs:
                lw.finish(WarmState(WarmPhase.FAILED,
                                    failure or f"{sum(map(len, (r for _, r in jobs)))} unit(s) not cached"))
                log.warning("warming layer %s stopped: %s", lw.digest, lw.state)
            else:
                lw.finish(NO_ROOM)
        except Exception as e:  # a bug here must not take the daemon's other layers down
            log.exception("warming layer %s failed", lw.digest)
            lw.finish(WarmState(WarmPhase.FAILED, repr(e)))
        finally:
            progress.warming = False
            if not lw.done.is_set():
                lw.finish(RELEASED)
            warming.changed()


class _Counting:
    """The layer as the queue sees it, each batch's newly cached units counted into the warming."""

    def __init__(self, layer: FetchableLayer, lw: LayerWarming, warming: Warming) -> None:
        self.layer, self.lw, self.warming = layer, lw, warming
        self.activity = layer.activity
        self.recordings = layer.recordings

    @property
    def units(self) -> Sequence[Unit]:
        return self.layer.units

    def is_cached(self, unit: Unit) -> bool:
        return self.layer.is_cached(unit)

    def directory(self, unit: Unit) -> int:
        return self.layer.directory(unit)

    def directory_units(self, directory: int) -> list[Unit]:
        return self.layer.directory_units(directory)

    async def fetch_batch(self, units: Sequence[Unit]) -> int:
        stored = await self.layer.fetch_batch(units)
        for unit in units:
            if unit.index not in self.lw.cached and self.layer.is_cached(unit):
                self.lw.cached.add(unit.index)
                self.lw.complete_bytes += unit.end - unit.start
                self.lw.fetched_bytes += unit.end - unit.start
        self.warming.changed()
        return stored


def plan(layers: Sequence[tuple[Sequence[Unit], Iterable[tuple[float, Unit]], set[int]]],
         budget: int) -> tuple[list[Jobs], int]:
    """The GETs that warm each layer, given (its units, the units the image reads first with
    their priorities, the indexes already cached), and the cache bytes left out for want of room.

    Most urgent first across the image: what it reads first, then the rest of every layer,
    round-robin by blob position. Units already cached count against `budget` too (they
    take room as well); once one unit does not fit, nothing after it is warmed.
    """
    ranked: list[tuple[float, int, int, Unit]] = []
    for k, (units, first, _) in enumerate(layers):
        urgent: dict[int, float] = {}
        for p, unit in first:
            urgent[unit.index] = min(p, urgent.get(unit.index, p))
        ranked += [(urgent.get(u.index, REST + u.start // BATCH_BYTES), k, u.start, u) for u in units]
    ranked.sort(key=lambda r: r[:3])
    picked: list[dict[int, tuple[float, Unit]]] = [{} for _ in layers]
    used = left_out = 0
    for p, k, _, unit in ranked:
        if left_out or used + unit.cached_size > budget:
            left_out += unit.cached_size
            continue
        used += unit.cached_size
        if unit.index not in layers[k][2]:
            picked[k][unit.index] = (p, unit)
    return [batch_jobs(chosen.values()) for chosen in picked], left_out
