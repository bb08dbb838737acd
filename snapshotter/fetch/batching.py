"""Few, large range GETs: units grouped into runs, one GET per run, cut back into verified units.

Reads fetch one unit (and perhaps its small neighbours) at a time. Prefetch, readahead,
background fetch and warming instead fetch many units: `batches` groups units that sit
close together in the blob, and `fill_batch` fetches one group with one GET into the cache.
A miss's window (`decode_each`) and a batch cut the fetched bytes the same way, whatever
the format: the layer says how one unit's bytes are verified and decoded (`Decode`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence

import trio

from ..cache import ChunkCache
from ..formats.errors import FormatError
from .units import Unit

BATCH_BYTES = 4 << 20
"""Largest compressed range one prefetch GET asks for: big enough that round trips stop
mattering at 100 Mbit/s (4 MiB is ~0.3 s on the wire against a 20 ms RTT), small enough
that several run in parallel and an early unit is not stuck behind a huge body."""
BATCH_GAP = 64 << 10
"""Units this close together share a GET; the bytes between them are fetched and thrown away."""

Decode = Callable[[Unit, bytes], bytes]
"""A unit's bytes as the chunk cache keeps them, from its bytes in the blob; raises
FormatError when they fail verification."""
Read = Callable[[int, int], Awaitable[bytes]]
"""Blob bytes [start, end) (a `Blob.read`)."""


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


Job = tuple[float, list[Unit]]
"""(priority, batch): one GET of a `prefetch.FetchQueue`; lower is sooner."""


def batch_jobs(units: Iterable[tuple[float, Unit]]) -> list[Job]:
    """`batches` of `units` ((priority, unit)), each with the priority of its most urgent unit."""
    ranked = list(units)
    priority: dict[int, float] = {}
    for p, unit in ranked:
        priority[unit.index] = min(p, priority.get(unit.index, p))
    return [(min(priority[u.index] for u in run), run) for run in batches(unit for _, unit in ranked)]


def extent(units: Sequence[Unit]) -> tuple[int, int]:
    """The blob range one GET of `units` asks for."""
    return min(u.start for u in units), max(u.end for u in units)


async def decode_each(data: bytes, start: int, units: Sequence[Unit], decode: Decode
                      ) -> list[tuple[Unit, bytes | FormatError]]:
    """Each unit's decoded bytes, or why not, from the blob bytes fetched from `start` (in a
    worker thread: decompressing and hashing megabytes must not hold up the reads)."""
    return await trio.to_thread.run_sync(_decode_each, data, start, units, decode)


def _decode_each(data: bytes, start: int, units: Sequence[Unit], decode: Decode
                 ) -> list[tuple[Unit, bytes | FormatError]]:
    out: list[tuple[Unit, bytes | FormatError]] = []
    for unit in units:
        try:
            out.append((unit, decode(unit, data[unit.start - start:unit.end - start])))
        except FormatError as e:
            out.append((unit, e))
    return out


async def fill_batch(cache: ChunkCache, read: Read, units: Sequence[Unit], key: Callable[[Unit], str],
                     decode: Decode) -> int:
    """Fetch those of `units` that are neither cached nor being fetched with one range GET,
    verify each and cache it under `key(unit)`; bytes cached (`ChunkCache.fill`).

    A unit that fails verification is left out: a read fetches it again and reports the error.
    The GET skips units another fetch holds or the cache has: claimed units on either side
    of one are fetched by one GET each (test_load.py caught a batch GET spanning a chunk a
    read was fetching, once EROFS sent larger reads).
    """
    by_key = {key(u): u for u in units}

    async def fetch(claimed: list[str]) -> dict[str, bytes]:
        got: dict[str, bytes] = {}

        async def one(run: list[Unit]) -> None:
            start, end = extent(run)
            done = await decode_each(await read(start, end), start, run, decode)
            got.update((key(unit), data) for unit, data in done if isinstance(data, bytes))

        async with trio.open_nursery() as nursery:
            for run in claimed_runs(sorted(by_key.values()), {by_key[k].index for k in claimed}):
                nursery.start_soon(one, run)
        return got

    return await cache.fill(list(by_key), fetch)


def claimed_runs(units: Sequence[Unit], claimed: set[int]) -> list[list[Unit]]:
    """The claimed ones of `units` (in blob order), cut wherever an unclaimed unit lies between two."""
    runs: list[list[Unit]] = [[]]
    for unit in units:
        if unit.index in claimed:
            runs[-1].append(unit)
        elif runs[-1]:
            runs.append([])
    return [run for run in runs if run]
