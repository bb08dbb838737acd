"""Prefetch: fetch what a layer will be read for first, in parallel, as soon as it is mounted.

What to fetch comes from the image (a start profile, eStargz landmarks, a SOCI prefetch
artifact); this module only turns units into parallel range GETs. It never blocks a
read: a read of a unit being prefetched waits for that GET like for its own fetch, and
a prefetch that fails only logs (the reads then fetch for themselves).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from .fetch import FetchableLayer, Progress, Unit, batches

log = logging.getLogger(__name__)


async def prefetch(name: str, layer: FetchableLayer, units: Sequence[Unit], progress: Progress,
                   limiter: trio.CapacityLimiter) -> None:
    """Fetch the uncached ones of `units` (most urgent first), at most `limiter` GETs at a time."""
    todo = batches([u for u in units if not layer.is_cached(u)])
    if not todo:
        return
    progress.state = "prefetching"
    started = trio.current_time()
    failure = await fetch_batches(layer, todo, progress, limiter)
    if progress.state == "prefetching":
        progress.state = "on demand"
    if failure:
        log.warning("prefetch of %s stopped: %s", name, failure)
    log.info("prefetched %d bytes of %s in %.2f s", progress.prefetched_bytes, name, trio.current_time() - started)


async def fetch_batches(layer: FetchableLayer, todo: list[list[Unit]], progress: Progress,
                        limiter: trio.CapacityLimiter) -> str:
    """Fetch `todo` in order, at most `limiter` batches at a time, counting the bytes cached
    into `progress`; stops at the first failure and says what it was ("" if none)."""
    failures: list[str] = []

    async def worker() -> None:
        while todo and not failures:
            batch = todo.pop(0)
            async with limiter:
                try:
                    progress.prefetched_bytes += await layer.fetch_batch(batch)
                except Exception as e:  # the reads will fetch for themselves and report
                    failures.append(f"{type(e).__name__}: {e}")

    async with trio.open_nursery() as nursery:
        for _ in range(min(len(todo), limiter.total_tokens)):
            nursery.start_soon(worker)
    return failures[0] if failures else ""
