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

It predicts, it does not sweep: the window holds more of the file the miss read and small
files after it, and ends at the first large file no read has reached (`fetch.fetch_ahead`);
the next miss, if a read does go on into that file, continues the streak there. Issue 15's
layer (tests/unit/test_readahead.py: a ~1 MiB busybox, /etc, a 6 MiB file nobody reads;
reading busybox, /etc/passwd, /etc/motd = 1.03 MB) fetched 4.90 MB before (4.8x what was
read; 1.76 MB with 256 KiB chunks), 0.70 MB after (0.69x; 0.71 MB); SOCI with 512 KiB spans
1.22 MB before, 0.70 MB after. End to end (test_lazy.py, `cat /etc/passwd`): 5.29 MB of the
7.33 MB layer before, 1.10 MB after. A sequential read of a 64 MiB file is unchanged: `cat` in
a container over loopback 0.65 s before and after (median of 5; 0.62-0.81 s, 0.63-0.75 s),
and the same GETs and misses with a simulated 100 Mbit/s + 20 ms link (eStargz, SOCI).
"""

from __future__ import annotations

import bisect
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from .fetch import FetchableLayer, Unit, fetch_ahead, units_in

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
        i = bisect.bisect_right(layer.units, start, key=lambda u: u.start) - 1  # the unit holding `start`
        read_file = layer.units[i].file if i >= 0 else -1
        stop = next((k for k, u in enumerate(units) if not fetch_ahead(u, read_file)), None)
        if stop is None:
            stream.end = max(end, lo + stream.ahead)
        else:  # a read that goes on into the large file is the streak's next miss
            units = units[:stop]
            stream.end = max(end, units[-1].end if units else lo)
        if units:
            self.spawn(layer, units)
