"""Background fetch: once reads go quiet, fetch the rest of every lazy layer into the cache.

A node whose layers are complete no longer needs the registry: a registry outage, a
deleted tag or expired credentials cannot break its running containers. The fetcher
yields to the foreground: it only works after `quiet` seconds without a read that
went to the registry, and checks again before every GET. It is rate-limited, fetches
one GET at a time, and leaves alone a layer too large for the chunk cache (it would
only evict itself).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import trio

from .activity import FetchActivity
from .batching import BATCH_BYTES, batches
from .progress import BACKGROUND, COMPLETE, FetchState, Phase, Progress
from .units import FetchableLayer, Unit

log = logging.getLogger(__name__)

POLL = 1.0
"""Seconds between looks for work while idle or yielding."""
LEFT_ALONE = frozenset({Phase.COMPLETE, Phase.PREFETCHING, Phase.BACKGROUND_SKIPPED, Phase.BACKGROUND_STOPPED})
"""Layers in these phases are not background fetched (nor are layers being warmed)."""


@dataclass(frozen=True)
class BackgroundOptions:
    quiet: float = 10.0
    """Seconds without a foreground fetch before background fetching starts (or resumes)."""
    rate: float = 32 << 20
    """Bytes per second at most; 0 means no limit."""
    max_share: float = 0.5
    """A layer whose cached size exceeds this share of the cache is not fetched."""


Target = tuple[str, FetchableLayer, Progress]
"""A layer to complete: its name (for logs), the layer, and its progress record."""


class BackgroundFetcher:
    def __init__(self, targets: Callable[[], list[Target]], activity: FetchActivity, cache_max_bytes: int,
                 options: BackgroundOptions) -> None:
        self.targets = targets
        self.activity = activity
        self.cache_max_bytes = cache_max_bytes
        self.options = options
        self._sizes: weakref.WeakKeyDictionary[FetchableLayer, int] = weakref.WeakKeyDictionary()
        """Each layer's size in the cache, once complete (summed once: a layer has up to ~10^5 units)."""

    async def run(self) -> None:
        """Forever: complete one layer after another while the foreground is quiet."""
        while True:
            target = self._next()
            wait = self.options.quiet - self.activity.quiet_for()
            if target is None or wait > 0:
                await trio.sleep(POLL if target is None else min(POLL, wait))
                continue
            name, layer, progress = target
            try:
                await self._step(layer, progress)
            except Exception as e:
                log.warning("background fetch of %s failed, retrying later: %s", name, e)
                await trio.sleep(self.options.quiet)
                continue
            if progress.complete:
                log.info("layer %s is complete in the cache (%d bytes fetched in the background)",
                         name, progress.background_bytes)

    def _next(self) -> Target | None:
        for name, layer, progress in self.targets():
            if progress.warming or progress.state.phase in LEFT_ALONE:
                continue
            size = self._sizes.get(layer)
            if size is None:
                size = self._sizes[layer] = sum(u.cached_size for u in layer.units)
            if size > self.cache_max_bytes * self.options.max_share:
                progress.state = FetchState(Phase.BACKGROUND_SKIPPED, f"{size >> 20} MiB would take over "
                                            f"{self.options.max_share:.0%} of the {self.cache_max_bytes >> 20} MiB cache")
                continue
            return name, layer, progress
        return None

    async def _step(self, layer: FetchableLayer, progress: Progress) -> None:
        """Fetch the next run of uncached units (one GET, about `BATCH_BYTES`), then pace."""
        units = layer.units
        run: list[Unit] = []
        while progress.cursor < len(units):
            unit = units[progress.cursor]
            if run and unit.end - run[0].start > BATCH_BYTES:
                break
            if not layer.is_cached(unit):
                run.append(unit)
            progress.cursor += 1
        if not run:
            progress.state = COMPLETE
            return
        progress.state = BACKGROUND
        started = time.monotonic()
        fetched = 0
        for batch in batches(run, max_gap=BATCH_BYTES):
            fetched += await layer.fetch_batch(batch)
        progress.background_bytes += fetched
        if not fetched:
            progress.state = FetchState(Phase.BACKGROUND_STOPPED,
                                        f"{len(run)} unit(s) from blob offset {run[0].start} fail verification")
            log.error("background fetch: %s", progress.state)
            return
        compressed = run[-1].end - run[0].start
        if self.options.rate > 0:
            await trio.sleep(max(0.0, compressed / self.options.rate - (time.monotonic() - started)))
        if progress.cursor >= len(units):
            progress.cursor = 0  # one more pass confirms every unit is cached (a failed unit is retried)
