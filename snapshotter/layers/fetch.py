"""Fetching ahead of reads: the units a layer is fetched in, batching them into range GETs,
and recording which of them a container's start reads.

A layer (eStargz or SOCI) is cut into *units*: the smallest pieces that can be fetched,
verified and cached on their own (an eStargz chunk, a SOCI span). Reads fetch one unit
(and perhaps its small neighbours) at a time. Prefetch and background fetch instead
fetch many units with few, large range GETs: `batches` groups units that sit close
together in the blob, and `FetchableLayer.fetch_batch` fetches one group with one GET.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from ..formats.profile import LayerProfile, Profile

BATCH_BYTES = 4 << 20
"""Largest compressed range one prefetch GET asks for: big enough that round trips stop
mattering at 100 Mbit/s (4 MiB is ~0.3 s on the wire against a 20 ms RTT), small enough
that several run in parallel and an early unit is not stuck behind a huge body."""
BATCH_GAP = 64 << 10
"""Units this close together share a GET; the bytes between them are fetched and thrown away."""


@dataclass(frozen=True, order=True)
class Unit:
    """A piece of a layer blob that is fetched, verified and cached as a whole."""

    start: int
    end: int
    index: int
    """Its position in the layer's unit list (the layer maps it back to a chunk or span)."""
    cached_size: int = 0
    """Bytes it takes in the chunk cache (uncompressed for eStargz, compressed for SOCI)."""
    file: int = -1
    """Where the file whose bytes it holds starts, so that fetching ahead can tell the rest of a
    file being read from another file (eStargz: its first chunk's blob offset; SOCI, whose
    spans hold many files: the uncompressed offset of the file the span begins with; -1: none)."""
    file_bytes: int = 0
    """That file's size (eStargz: compressed; SOCI: uncompressed)."""


class FetchableLayer(Protocol):
    """What prefetch and background fetch need of a layer."""

    activity: FetchActivity
    recordings: list[Recording]

    @property
    def units(self) -> Sequence[Unit]:
        """Every unit, in blob order."""
        ...

    def is_cached(self, unit: Unit) -> bool: ...

    async def fetch_batch(self, units: Sequence[Unit]) -> int:
        """Fetch the uncached ones of `units` with one range GET, verify and cache each; bytes cached.

        Units that fail verification are skipped (a read fetches them again and reports
        the error); a registry failure raises.
        """
        ...


@dataclass
class Progress:
    """How far ahead of its reads a layer has been fetched (for `lazysnap status`)."""

    state: str = "on demand"
    """"on demand", "prefetching", "background", "complete", or why background fetch skips it."""
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


@dataclass
class FetchActivity:
    """Foreground fetching, shared by all layers: background work stays out of its way, and
    readahead (`on_miss`) learns where reads are heading."""

    last_foreground: float = field(default_factory=time.monotonic)
    """`time.monotonic()` of the latest read that had to go to the registry, or of the
    latest mount (its container is about to start reading)."""
    foreground_fetches: int = 0
    on_miss: Callable[[FetchableLayer, int, int], None] | None = None

    def mounted(self) -> None:
        self.last_foreground = time.monotonic()

    def foreground(self, layer: FetchableLayer, start: int, end: int) -> None:
        """A read of `layer` had to fetch blob bytes [start, end) itself."""
        self.last_foreground = time.monotonic()
        self.foreground_fetches += 1
        if self.on_miss is not None:
            self.on_miss(layer, start, end)

    def quiet_for(self) -> float:
        return time.monotonic() - self.last_foreground


SCAN_STEP = 4096
"""Units checked between two yields to other tasks (~3 ms), so a count never holds up a read."""


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
    for i, unit in enumerate(layer.units):
        size = unit.end - unit.start
        total += size
        if layer.is_cached(unit):
            done += size
        if i % SCAN_STEP == SCAN_STEP - 1:
            await trio.lowlevel.checkpoint()
    progress.complete_bytes, progress.content_bytes, progress.counted_at = done, total, state
    return done, total


SMALL_FILE = 256 << 10
"""Compressed bytes up to which a file no read has touched yet may be fetched ahead (by
readahead, or in a miss's fetch window): a package's next module is, the first chunk of a
large file nobody opened is not. Issue 15: reading busybox, /etc/passwd and a small file of
a 6.5 MiB layer swept in the first 4 MiB chunk of a large unread file after them (78 % of
the layer). Python modules and /etc files are well under it; a larger file that a start
does read costs one miss more at its start (the streak then continues within it). The bound
is a choice: not yet measured against the python-app start's reads."""


def fetch_ahead(unit: Unit, read_file: int) -> bool:
    """Whether `unit`, which follows a read of the file starting at `read_file`, is likely read
    soon: more of that file, or a small file; not a large file no read has reached."""
    return unit.file == read_file or unit.file_bytes <= SMALL_FILE


def units_in(units: Sequence[Unit], ranges: Iterable[tuple[int, int]]) -> list[Unit]:
    """The units that overlap any of `ranges`, each once, in the order the ranges first reach them.

    `units` must be in blob order; ranges need not be.
    """
    return [unit for unit, _ in first_reached(units, ranges)]


def first_reached(units: Sequence[Unit], ranges: Iterable[tuple[int, int]]) -> list[tuple[Unit, int]]:
    """`units_in`, each unit paired with the index of the first range that reaches it."""
    starts = [u.start for u in units]
    seen: set[int] = set()
    out: list[tuple[Unit, int]] = []
    for k, (start, end) in enumerate(ranges):
        i = max(bisect.bisect_right(starts, start) - 1, 0)
        while i < len(units) and units[i].start < end:
            unit = units[i]
            if unit.end > start and unit.index not in seen:
                seen.add(unit.index)
                out.append((unit, k))
            i += 1
    return out


def batches(units: Iterable[Unit], max_bytes: int = BATCH_BYTES, max_gap: int = BATCH_GAP) -> list[list[Unit]]:
    """Group units into runs that one range GET each can fetch, in the order of each run's
    most urgent unit (the position it had in `units`).

    Within a run units are in blob order, at most `max_gap` apart, spanning at most
    `max_bytes` (a single larger unit is a run by itself).
    """
    unique = list({u.index: u for u in units}.values())
    rank = {u.index: i for i, u in enumerate(unique)}
    runs: list[list[Unit]] = []
    for unit in sorted(unique):
        run = runs[-1] if runs else None
        if run is not None and unit.start - run[-1].end <= max_gap and unit.end - run[0].start <= max_bytes:
            run.append(unit)
        else:
            runs.append([unit])
    runs.sort(key=lambda run: min(rank[u.index] for u in run))
    return runs


@dataclass
class Recording:
    """The units an image's layers are read in during its first start, in first-read order.

    Layers call `touch` on every read while the recording is attached to them. The
    window opens at the first read and closes `seconds` later (the manager then
    detaches it and saves the profile).
    """

    image: str
    layers: tuple[str, ...]
    seconds: float
    started: float | None = None
    first_read: trio.Event = field(default_factory=trio.Event)
    """Set by the first `touch`: the window opens."""
    touched: dict[tuple[str, int], tuple[int, int, int]] = field(default_factory=dict)
    """(layer digest, unit start) -> (start, end, milliseconds after the first read), in first-read order."""
    max_units: int = 1 << 18

    def touch(self, layer: str, start: int, end: int) -> None:
        now = time.monotonic()
        if self.started is None:
            self.started = now
            self.first_read.set()
        key = (layer, start)
        if key not in self.touched and len(self.touched) < self.max_units:
            self.touched[key] = (start, end, int(1000 * (now - self.started)))

    def profile(self) -> Profile:
        per_layer: dict[str, list[tuple[int, int, int]]] = {digest: [] for digest in self.layers}
        for (layer, _), read in self.touched.items():
            per_layer.setdefault(layer, []).append(read)
        out = []
        for digest, reads in per_layer.items():
            if reads:
                merged = _merge_adjacent(reads)
                out.append(LayerProfile(digest, tuple((s, e) for s, e, _ in merged), tuple(t for _, _, t in merged)))
        return Profile(self.image, tuple(out), self.seconds)


def _merge_adjacent(reads: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Join a read to the previous one when it starts where that one ends (order and the
    earlier time kept)."""
    out: list[tuple[int, int, int]] = []
    for start, end, at in reads:
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], end, out[-1][2])
        else:
            out.append((start, end, at))
    return out
