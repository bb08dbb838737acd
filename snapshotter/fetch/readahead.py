"""Blob readahead: when a layer's misses walk forward through the blob, fetch ahead of them;
when they reach two files of one directory, fetch its other small files.

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
files after it, and ends at the first large file no read has reached (`fetch_ahead`);
the next miss, if a read does go on into that file, continues the streak there. Issue 15's
layer (tests/unit/test_readahead.py: a ~1 MiB busybox, /etc, a 6 MiB file nobody reads;
reading busybox, /etc/passwd, /etc/motd = 1.03 MB) fetched 4.90 MB before (4.8x what was
read; 1.76 MB with 256 KiB chunks), 0.70 MB after (0.69x; 0.71 MB); SOCI with 512 KiB spans
1.22 MB before, 0.70 MB after. End to end (test_lazy.py, `cat /etc/passwd`): 5.29 MB of the
7.33 MB layer before, 1.10 MB after. A sequential read of a 64 MiB file is unchanged: `cat` in
a container over loopback 0.65 s before and after (median of 5; 0.62-0.81 s, 0.63-0.75 s),
and the same GETs and misses with a simulated 100 Mbit/s + 20 ms link (eStargz, SOCI).

A package's modules are imported in the order its code asks for them, not in blob order, so
half of a first start's misses go backward and form no streak. A miss's own window reaches
back over the small files of its directory just before it (`layers.estargz.BEHIND_WINDOW`),
and the directory prediction (`DIRECTORY_FILES`, `layers/directories.py`) covers the rest.
SOCI layers do not tell their directories: a span already holds a run of neighbouring files.
"""

from __future__ import annotations

import bisect
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .batching import batch_jobs
from .prefetch import FetchQueue
from .progress import Progress
from .units import FetchableLayer, Unit, units_in

log = logging.getLogger(__name__)

SMALL_FILE = 256 << 10
"""Compressed bytes up to which a file no read has touched yet may be fetched ahead (by
readahead, or in a miss's fetch window): a package's next module is, the first chunk of a
large file nobody opened is not. Issue 15: reading busybox, /etc/passwd and a small file of
a 6.5 MiB layer swept in the first 4 MiB chunk of a large unread file after them (78 % of
the layer). Python modules and /etc files are well under it; a larger file that a start
does read costs one miss more at its start (the streak then continues within it).

Measured on python-app's first start without a profile (100 Mbit/s + 20 ms; 9 cold runs in
three interleaved rounds, pooled median; benchmarks/RESULTS.md): 64 KiB 10.09 s, 41.3 MiB,
255 GETs (3 runs); 256 KiB 9.48 s, 48.4 MiB, 153 GETs; 512 KiB 9.03 s, 50.4 MiB (3 runs);
1 MiB 9.03 s, 50.1 MiB, 137 GETs; 2 MiB 10.37 s, 50.4 MiB (6 runs). Between 256 KiB and 1 MiB
the difference is within the rounds' drift (one round put 256 KiB first), so the bound
that fetches the fewest bytes stays."""


def fetch_ahead(unit: Unit, read_file: int) -> bool:
    """Whether `unit`, which follows a read of the file starting at `read_file`, is likely read
    soon: more of that file, or a small file; not a large file no read has reached."""
    return unit.file == read_file or unit.file_bytes <= SMALL_FILE


FIRST_AHEAD = 1 << 20
MAX_AHEAD = 8 << 20
STREAK_GAP = 1 << 20
"""A miss starting at most this far after the end of the last fetch (or readahead) continues a streak."""
GETS = 2
"""Readahead GETs in flight at once, across all layers."""
DIRECTORY_FILES = 2
"""Files of one directory that must miss before readahead fetches the rest of its small files:
one read of /etc/passwd fetches no other file of /etc; a second module of a package does.
Measured on python-app's first start without a profile (100 Mbit/s + 20 ms, 3 runs each,
benchmarks/RESULTS.md): 9.77 s [9.53-10.11] and 45.6 MiB fetched without it, 9.45 s
[9.44-9.50] and 48.4 MiB with it; 9.46 s and 48.3 MiB with 1 file instead of 2."""
MAX_DIRECTORY = 2 << 20
"""Compressed bytes a directory's prediction fetches at most, the files nearest the misses first."""


@dataclass
class _Directories:
    """A layer's directories whose files reads have reached, and those already fetched ahead."""

    missed: dict[int, set[int]] = field(default_factory=dict)
    fetched: set[int] = field(default_factory=set)


@dataclass
class _Stream:
    end: int
    """Where the last fetch or readahead of this layer ended."""
    ahead: int = 0


class Readahead:
    """Each layer's streak of misses (`miss` is the `FetchActivity.on_miss` hook), and the
    fetches it starts."""

    def __init__(self, spawn: Callable[[FetchableLayer, list[Unit]], None], first: int = FIRST_AHEAD,
                 maximum: int = MAX_AHEAD) -> None:
        self.spawn = spawn
        """Starts a task that runs `fetch` for the units (the manager owns the tasks: each is one
        of its layer's)."""
        self.first, self.maximum = first, maximum
        self._streams: weakref.WeakKeyDictionary[FetchableLayer, _Stream] = weakref.WeakKeyDictionary()
        self._directories: weakref.WeakKeyDictionary[FetchableLayer, _Directories] = weakref.WeakKeyDictionary()
        self._queue = FetchQueue(trio.CapacityLimiter(GETS))

    async def fetch(self, layer: FetchableLayer, units: list[Unit], progress: Progress) -> None:
        """Fetch the uncached ones of `units`, in batches, `GETS` at a time across all layers."""
        todo = batch_jobs((0.0, u) for u in units if not layer.is_cached(u))  # ties: first come, first fetched
        failure = await self._queue.fetch(layer, todo, progress)
        if failure:
            log.debug("readahead stopped: %s", failure)

    def miss(self, layer: FetchableLayer, start: int, end: int) -> None:
        unit = _unit_at(layer, start)
        if unit is not None:
            self._directory(layer, unit, start)
        self._streak(layer, start, end, unit.file if unit is not None else -1)

    def _directory(self, layer: FetchableLayer, unit: Unit, start: int) -> None:
        """Once misses reach `DIRECTORY_FILES` files of one directory, fetch its other small files."""
        directory = layer.directory(unit)
        if directory < 0:
            return
        seen = self._directories.setdefault(layer, _Directories())
        if directory in seen.fetched:
            return
        files = seen.missed.setdefault(directory, set())
        files.add(unit.file)
        if len(files) < DIRECTORY_FILES:
            return
        seen.fetched.add(directory)
        del seen.missed[directory]
        wanted = [u for u in layer.directory_units(directory)
                  if u.file_bytes <= SMALL_FILE and u.file not in files and not layer.is_cached(u)]
        wanted.sort(key=lambda u: abs(u.start - start))
        units, total = [], 0
        for u in wanted:
            total += u.end - u.start
            if total > MAX_DIRECTORY:
                break
            units.append(u)
        if units:
            self.spawn(layer, sorted(units))

    def _streak(self, layer: FetchableLayer, start: int, end: int, read_file: int) -> None:
        """`read_file`: where the file the miss read starts (`Unit.file`; -1 if unknown)."""
        stream = self._streams.get(layer)
        if stream is None or not stream.end - STREAK_GAP <= start <= stream.end + STREAK_GAP:
            self._streams[layer] = _Stream(end)
            return
        stream.ahead = min(self.maximum, stream.ahead * 2 if stream.ahead else self.first)
        lo = max(end, stream.end)
        units = [u for u in units_in(layer.units, [(lo, lo + stream.ahead)]) if u.start >= lo]
        stop = next((k for k, u in enumerate(units) if not fetch_ahead(u, read_file)), None)
        if stop is None:
            stream.end = max(end, lo + stream.ahead)
        else:  # a read that goes on into the large file is the streak's next miss
            units = units[:stop]
            stream.end = max(end, units[-1].end if units else lo)
        if units:
            self.spawn(layer, units)


def _unit_at(layer: FetchableLayer, offset: int) -> Unit | None:
    """The unit holding blob offset `offset` (the last one starting at or before it)."""
    i = bisect.bisect_right(layer.units, offset, key=lambda u: u.start) - 1
    return layer.units[i] if i >= 0 else None
