"""The units a lazy layer is fetched in, and which of them a set of byte ranges reaches.

A layer (eStargz, zstd:chunked or SOCI) is cut into *units*: the smallest pieces that can be
fetched, verified and cached on their own (a chunk, a span). Everything that fetches ahead
of reads (prefetch, readahead, background fetch, warming) speaks of units, whatever the format.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

import msgspec

if TYPE_CHECKING:
    from ..recording import ReadHook
    from .activity import FetchActivity


class Unit(msgspec.Struct, frozen=True, order=True, gc=False):
    """A piece of a layer blob that is fetched, verified and cached as a whole.

    A frozen msgspec struct rather than a dataclass: built and compared in C, and never tracked
    by the collector. `EStargzLayer(...)` builds one per chunk, 30,000 for benchmarks.pull_cpu's
    layer, where the dataclass's `__init__` alone took 0.022 s.
    """

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
    """What prefetch, readahead and background fetch need of a layer."""

    activity: FetchActivity
    recordings: list[ReadHook]

    @property
    def units(self) -> Sequence[Unit]:
        """Every unit, in blob order."""
        ...

    def is_cached(self, unit: Unit) -> bool: ...

    def directory(self, unit: Unit) -> int:
        """The directory of the file `unit` holds bytes of (a key); -1 where the layer cannot tell."""
        ...

    def directory_units(self, directory: int) -> list[Unit]:
        """The units of every file in `directory`, in blob order."""
        ...

    async def fetch_batch(self, units: Sequence[Unit]) -> int:
        """Fetch the uncached ones of `units` with one range GET, verify and cache each; bytes cached.

        Units that fail verification are skipped (a read fetches them again and reports
        the error); a registry failure raises.
        """
        ...


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
