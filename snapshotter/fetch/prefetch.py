"""Prefetch: fetch what a layer will be read for first, in parallel, as soon as it is mounted.

What to fetch comes from the image (a start profile, eStargz landmarks, a SOCI prefetch
artifact); this module only turns units into parallel range GETs. It never blocks a
read: a read of a unit being prefetched waits for that GET like for its own fetch, and
a prefetch that fails only logs (the reads then fetch for themselves).

The GETs of all of an image's layers share one `FetchQueue`, most urgent first: a
container reads its layers interleaved (the interpreter from the base layer, then a
library from the next, then more of the base), and a profile says when each range was
first read, so replay follows that order across layers instead of splitting the link
evenly between them.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from .batching import Job, batch_jobs
from .progress import ON_DEMAND, PREFETCHING, Progress
from .units import FetchableLayer, Unit

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Owner:
    """One layer's share of a queue: its jobs still to finish, and its first failure."""

    layer: FetchableLayer
    progress: Progress
    pending: int
    done: trio.Event = field(default_factory=trio.Event)
    failure: str = ""

    def finished_one(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self.done.set()


@dataclass(order=True)
class _Job:
    priority: float
    seq: int
    batch: list[Unit] = field(compare=False)
    owner: _Owner = field(compare=False)


class FetchQueue:
    """Batches of any number of layers, fetched most urgent first, at most `limiter` GETs at a time.

    There is no long-lived worker: every caller of `fetch` works the queue (taking
    whichever job is most urgent, its own or another layer's) until it is empty, then
    waits for its own jobs that others are still fetching.
    """

    def __init__(self, limiter: trio.CapacityLimiter) -> None:
        self.limiter = limiter
        self._heap: list[_Job] = []
        self._seq = itertools.count()

    async def fetch(self, layer: FetchableLayer, todo: Sequence[Job], progress: Progress) -> str:
        """Fetch `todo` ((priority, batch); lower is sooner), counting the bytes cached into
        `progress`; stops this layer's jobs at its first failure and says what it was ("" if none)."""
        if not todo:
            return ""
        owner = _Owner(layer, progress, len(todo))
        for priority, batch in todo:
            heapq.heappush(self._heap, _Job(priority, next(self._seq), batch, owner))
        try:
            async with trio.open_nursery() as nursery:
                # int(): total_tokens is a float only when it is math.inf, and then min() is len(todo)
                for _ in range(int(min(len(todo), self.limiter.total_tokens))):
                    nursery.start_soon(self._work)
            await owner.done.wait()
        finally:
            if not owner.done.is_set():  # cancelled (its layer released): others skip its jobs left
                owner.failure = owner.failure or "cancelled"
        return owner.failure

    async def _work(self) -> None:
        while self._heap:
            async with self.limiter:
                if not self._heap:
                    return
                job = heapq.heappop(self._heap)
                owner = job.owner
                try:
                    if not owner.failure:
                        owner.progress.prefetched_bytes += await owner.layer.fetch_batch(job.batch)
                except Exception as e:  # the reads will fetch for themselves and report
                    owner.failure = f"{type(e).__name__}: {e}"
                finally:
                    owner.finished_one()


async def prefetch(name: str, layer: FetchableLayer, units: Sequence[tuple[float, Unit]], progress: Progress,
                   queue: FetchQueue) -> None:
    """Fetch the uncached ones of `units` ((priority, unit); lower is sooner) through `queue`."""
    todo = batch_jobs((p, unit) for p, unit in units if not layer.is_cached(unit))
    if not todo:
        return
    progress.state = PREFETCHING
    started = trio.current_time()
    failure = await queue.fetch(layer, todo, progress)
    if progress.state == PREFETCHING:
        progress.state = ON_DEMAND
    if failure:
        log.warning("prefetch of %s stopped: %s", name, failure)
    log.info("prefetched %d bytes of %s in %.2f s", progress.prefetched_bytes, name, trio.current_time() - started)
