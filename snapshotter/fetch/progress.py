"""How far ahead of its reads a layer has been fetched: what `lazysnap status` shows as its
fetch state, and how much of it is in the cache."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import trio

from ..phases import PhaseState
from .units import FetchableLayer, Unit


class Phase(enum.Enum):
    """What fetching ahead is doing with a layer (its value is how `lazysnap status` says it)."""

    ON_DEMAND = "on demand"
    PREFETCHING = "prefetching"
    BACKGROUND = "background"
    COMPLETE = "complete"
    BACKGROUND_SKIPPED = "background skipped"
    """Background fetch leaves it alone (the detail says why)."""
    BACKGROUND_STOPPED = "background stopped"
    """Background fetch gave up on it (the detail says why)."""


FetchState = PhaseState[Phase]


ON_DEMAND = FetchState(Phase.ON_DEMAND)
PREFETCHING = FetchState(Phase.PREFETCHING)
BACKGROUND = FetchState(Phase.BACKGROUND)
COMPLETE = FetchState(Phase.COMPLETE)


@dataclass
class Progress:
    """How far ahead of its reads a layer has been fetched (for `lazysnap status`)."""

    state: FetchState = ON_DEMAND
    prefetched_bytes: int = 0
    background_bytes: int = 0
    cursor: int = 0
    """Background fetch has checked every unit before this index."""
    warming: bool = False
    """`lazysnap prefetch` is fetching the layer now (background fetch leaves it alone)."""
    content_bytes: int = 0
    complete_bytes: int = 0
    """The last `completeness` count: compressed bytes of every unit, and of those in the cache."""
    counted_at: tuple[int, ...] = ()
    """The cache's state (size, evictions, corrupt entries) when they were counted."""

    @property
    def complete(self) -> bool:
        return self.state.phase is Phase.COMPLETE

    def shown(self) -> str:
        """The fetch state as `lazysnap status` shows it (`fetch_state` of `status --json`)."""
        return "warming" if self.warming else str(self.state)


SCAN_STEP = 4096
"""Units checked between two yields to other tasks (~3 ms), so a count never holds up a read."""


async def scan(layer: FetchableLayer) -> AsyncIterator[tuple[Unit, bool]]:
    """Each unit of the layer, and whether it is in the cache, yielding to other tasks as it goes
    (a layer has up to ~10^5 units)."""
    for i, unit in enumerate(layer.units):
        yield unit, layer.is_cached(unit)
        if i % SCAN_STEP == SCAN_STEP - 1:
            await trio.lowlevel.checkpoint()


async def cached_units(layer: FetchableLayer) -> set[int]:
    """Indexes of the layer's units in the cache."""
    return {unit.index async for unit, cached in scan(layer) if cached}


async def completeness(layer: FetchableLayer, progress: Progress, cache_state: Callable[[], tuple[int, ...]]
                       ) -> tuple[int, int]:
    """(compressed bytes of the layer's units in the cache, of all its units), for `lazysnap status`.

    Counted again only when the cache changed since (`cache_state`: size, evictions, corrupt
    entries); a complete layer only when something left the cache.
    """
    state = cache_state()
    if progress.counted_at == state or (progress.counted_at[1:] == state[1:] and progress.content_bytes
                                        and progress.complete_bytes == progress.content_bytes):
        return progress.complete_bytes, progress.content_bytes
    done = total = 0
    async for unit, cached in scan(layer):
        size = unit.end - unit.start
        total += size
        if cached:
            done += size
    progress.complete_bytes, progress.content_bytes, progress.counted_at = done, total, state
    return done, total
