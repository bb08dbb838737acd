"""Blob readahead: when a layer's misses walk forward through the blob, fetch ahead of them.

A container's first start reads a package's files one after another, and they sit
one after another in the layer's tar. The kernel's readahead stops at each file's end,
and a miss fetches only its own neighbourhood, so without help every few files cost a
round trip. Like the kernel's readahead, but across files: a miss close after the
previous one (a *streak*) starts an asynchronous fetch of the next `ahead` bytes,
and `ahead` doubles on each miss of the streak, up to `max_ahead`. Random reads (a
model file read at a few offsets) never form a streak, so they fetch no more than
before. The fetch goes through the cache's batch single-flight, so a read of a unit
on its way waits for it rather than fetching it again.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

from .fetch import FetchableLayer, Unit, units_in

FIRST_AHEAD = 1 << 20
MAX_AHEAD = 8 << 20
STREAK_GAP = 1 << 20
"""A miss starting at most this far after the end of the last fetch (or readahead) continues a streak."""


@dataclass
class _Stream:
    end: int
    """Where the last fetch or readahead of this layer ended."""
    ahead: int = 0


class Readahead:
    def __init__(self, spawn: Callable[[FetchableLayer, list[Unit]], None], first: int = FIRST_AHEAD,
                 maximum: int = MAX_AHEAD) -> None:
        self.spawn = spawn
        """Starts fetching the units in the background (the manager owns the tasks)."""
        self.first, self.maximum = first, maximum
        self._streams: weakref.WeakKeyDictionary[FetchableLayer, _Stream] = weakref.WeakKeyDictionary()

    def miss(self, layer: FetchableLayer, start: int, end: int) -> None:
        stream = self._streams.get(layer)
        if stream is None or not stream.end - STREAK_GAP <= start <= stream.end + STREAK_GAP:
            self._streams[layer] = _Stream(end)
            return
        stream.ahead = min(self.maximum, stream.ahead * 2 if stream.ahead else self.first)
        lo = max(end, stream.end)
        units = [u for u in units_in(layer.units, [(lo, lo + stream.ahead)]) if u.start >= lo]
        stream.end = max(end, lo + stream.ahead)
        if units:
            self.spawn(layer, units)
