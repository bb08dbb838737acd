"""Warming (`layers/warming.py`, `lazysnap prefetch`): what is fetched in which order within
the cache's bound, each blob byte once, layers complete in `lazysnap status`, a released
layer stops its warming, and followers get progress lines.

The manager is real (store, chunk cache, resolver, eStargz layers) with a fake registry
and data plane, as in test_manager.py; the image is "pulled" by mounting its layers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from snapshotter.cache import ChunkCache
from snapshotter.formats.profile import LayerProfile, Profile
from snapshotter.api.lazysnap.v1 import status_pb2
from snapshotter.cli import fetch_state
from snapshotter.fetch.batching import BATCH_BYTES
from snapshotter.fetch.progress import Progress, completeness
from snapshotter.fetch.units import Unit
from snapshotter.layers.manager import open_manager
from snapshotter.layers.warming import REST, plan
from snapshotter.profiles import ProfileStore
from snapshotter.layer_modes import LayerMode
from snapshotter.pull_records import LayerOutcome, PullReport, format_warm_report
from snapshotter.store import Store
from tests.unit.fakes import Built, FakePlane, FakeRegistry, build
from tests.unit.test_manager import REF, Env, quiet_options, request_for

MANIFEST = "sha256:" + "d" * 64


def units(*spans: tuple[int, int], size: int = 100) -> list[Unit]:
    return [Unit(start, end, i, size) for i, (start, end) in enumerate(spans)]


# --------------------------------------------------------------------------- the plan

def test_what_the_image_reads_first_comes_first_then_the_rest_round_robin() -> None:
    a = units((0, 10), (10, 20), (BATCH_BYTES, BATCH_BYTES + 10))
    b = units((0, 10), (BATCH_BYTES, BATCH_BYTES + 10))
    jobs, left_out = plan([(a, [], set()), (b, [(5.0, b[1])], set())], budget=10_000)
    assert left_out == 0
    assert jobs[1] == [(5.0, [b[1]]), (REST, [b[0]])], "b's profile unit first, then its first region"
    assert jobs[0] == [(REST, [a[0], a[1]]), (REST + 1, [a[2]])], "neighbours share a GET; regions in blob order"


def test_cached_units_are_not_fetched_but_take_room() -> None:
    a = units((0, 10), (100_000, 100_010), (200_000, 200_010))
    jobs, left_out = plan([(a, [(1.0, a[2])], {0})], budget=250)
    assert jobs == [[(1.0, [a[2]])]], "a[0] is cached; a[2] is urgent; a[1] no longer fits"
    assert left_out == 100


def test_once_a_unit_does_not_fit_nothing_after_it_is_warmed() -> None:
    a = units((0, 10), (100_000, 100_010), size=300)
    b = units((0, 10), size=50)
    jobs, left_out = plan([(a, [], set()), (b, [], set())], budget=400)
    assert jobs == [[(REST, [a[0]])], []] and left_out == 350


# --------------------------------------------------------------------------- through the manager

@asynccontextmanager
async def opened(tmp_path: Path, registry: FakeRegistry, cache_bytes: int = 1 << 30,
                 profile: Profile | None = None, **options: Any) -> AsyncIterator[Env]:
    root = tmp_path / "root"
    root.mkdir(parents=True, exist_ok=True)
    if profile is not None:
        ProfileStore(root / "profiles").put(profile)
    plane = FakePlane(root)
    store = Store(root / "metadata.db")
    try:
        cache = ChunkCache(root / "cache", cache_bytes)
        async with open_manager(root, store, registry, cache, plane,  # type: ignore[arg-type]
                                quiet_options(**options)) as manager:
            yield Env(manager, plane, registry, store, root)
    finally:
        store.close()


async def pull(env: Env, layers: list[Built]) -> PullReport:
    """What rpull does to the manager: every layer mounted, with the image's labels."""
    digests = tuple(b.digest for b in layers)
    for i, built in enumerate(layers):
        req = request_for(built, layers=digests[i:])
        with trio.fail_after(5):
            assert await env.manager._mount(type(req)(**{**req.__dict__, "manifest_digest": MANIFEST})) is not None
    return PullReport(REF, MANIFEST, [LayerOutcome(b.digest, len(b.blob), LayerMode.ESTARGZ) for b in layers], 0.1)


def overlapping(reads: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    out = []
    for digest in {d for d, _, _ in reads}:
        spans = sorted((s, e) for d, s, e in reads if d == digest)
        out += [(digest, s, e) for (_, prev_end), (s, e) in zip(spans, spans[1:]) if s < prev_end]
    return out


async def test_a_warming_completes_every_layer_fetching_each_byte_once(tmp_path: Path) -> None:
    layers = [build(11), build(12)]
    registry = FakeRegistry({b.digest: b.blob for b in layers}, MANIFEST)
    async with opened(tmp_path, registry) as env:
        report = await pull(env, layers)
        mark = len(registry.reads)
        lines: list[str] = []
        with trio.fail_after(10):
            warming = env.manager.warm(report)
            await warming.follow(lines.append)
        done = warming.report()
        assert done.finished and not done.failed and done.sources == ()
        assert [str(layer.state) for layer in done.layers] == ["complete", "complete"]
        assert all(layer.complete_bytes == layer.content_bytes == layer.fetched_bytes > 0 for layer in done.layers)
        warm_reads = registry.reads[mark:]
        assert warm_reads and overlapping(warm_reads) == [], "no blob byte is fetched twice"
        assert lines[0].startswith(f"warming {REF}: 2 lazy layer(s)") and "whole layers" in lines[0]
        assert any(line.endswith(", complete") for line in lines[1:]), lines
        assert "100 %" in format_warm_report(done)

        layer_rows = (await env.manager.served.report([])).layers
        for row in layer_rows:
            assert row.complete_bytes == row.content_bytes > 0, row
            assert row.fetch_state == "complete"
        assert all(env.manager.served.status[b.digest].progress.warming is False for b in layers)

        mark = len(registry.reads)
        with trio.fail_after(5):
            again = env.manager.warm(report)
            await again.done.wait()
        assert registry.reads[mark:] == [] and again.report().layers[0].fetched_bytes == 0


async def test_the_start_profile_is_said_and_warmed(tmp_path: Path) -> None:
    """(That it comes first is `plan`'s: above. Here the mount's own prefetch fetches it too.)"""
    built = build(13)
    registry = FakeRegistry({built.digest: built.blob}, MANIFEST)
    async with opened(tmp_path, registry) as env:
        await pull(env, [built])
        status = env.manager.served.status[built.digest]
        assert status.layer is not None
        last = status.layer.units[-1]
    profile = Profile(MANIFEST, (LayerProfile(built.digest, ((last.start, last.end),), (0,)),), 30.0)
    registry = FakeRegistry({built.digest: built.blob}, MANIFEST)
    async with opened(tmp_path / "b", registry, profile=profile, prefetch=True) as env:
        report = await pull(env, [built])
        mark = len(registry.reads)
        lines: list[str] = []
        with trio.fail_after(10):
            warming = env.manager.warm(report)
            await warming.follow(lines.append)
        assert warming.report().sources == ("start profile",)
        assert lines[0].endswith("; start profile first"), lines
        assert str(warming.report().layers[0].state) == "complete"
        assert overlapping(registry.reads[mark:]) == []


async def test_an_image_larger_than_the_cache_is_warmed_as_far_as_it_fits(tmp_path: Path) -> None:
    built = build(14)
    registry = FakeRegistry({built.digest: built.blob}, MANIFEST)
    size = len(built.files["big.bin"])
    async with opened(tmp_path, registry, cache_bytes=size) as env:
        report = await pull(env, [built])
        with trio.fail_after(10):
            warming = env.manager.warm(report)
            await warming.done.wait()
        done = warming.report()
        assert "more than 80 % of its" in done.note and "cache_max_mib" in done.note
        (layer,) = done.layers
        assert str(layer.state) == "partial: no room in the cache" and 0 < layer.complete_bytes < layer.content_bytes
        assert env.manager.cache.size <= 0.8 * size + 1, "nothing the warming fetched was evicted"
        assert "note: " in format_warm_report(done)


async def test_releasing_a_layer_stops_its_warming(tmp_path: Path) -> None:
    built = build(15)
    registry = FakeRegistry({built.digest: built.blob}, MANIFEST)
    async with opened(tmp_path, registry) as env:
        report = await pull(env, [built])
        gate = trio.Event()
        original = registry.read_range

        async def hanging(location: Any, start: int, end: int) -> bytes:
            await gate.wait()
            return await original(location, start, end)

        registry.read_range = hanging  # type: ignore[method-assign]
        warming = env.manager.warm(report)
        with trio.fail_after(5):
            while env.manager.served.status[built.digest].progress.warming is False:
                await trio.sleep(0.01)
            rows = (await env.manager.served.report([built.digest])).layers
            assert rows[0].fetch_state == "warming"
            await env.manager.served.release(env.layers())
            await warming.done.wait()
        assert str(warming.report().layers[0].state) == "stopped: the layer was released"


# --------------------------------------------------------------------------- `lazysnap status`

class CountedLayer:
    def __init__(self, spans: list[tuple[int, int]], cached: set[int]) -> None:
        self.units = units(*spans)
        self.cached = cached
        self.looks = 0

    def is_cached(self, unit: Unit) -> bool:
        self.looks += 1
        return unit.index in self.cached


async def test_completeness_is_counted_again_only_when_the_cache_changed() -> None:
    layer = CountedLayer([(0, 10), (10, 30), (30, 60)], {0})
    progress, state = Progress(), [(100, 0, 0)]
    assert await completeness(layer, progress, lambda: state[0]) == (10, 60)  # type: ignore[arg-type]
    assert await completeness(layer, progress, lambda: state[0]) == (10, 60)  # type: ignore[arg-type]
    assert layer.looks == 3, "the cache did not change: no second count"
    layer.cached, state[0] = {0, 1, 2}, (200, 0, 0)
    assert await completeness(layer, progress, lambda: state[0]) == (60, 60)  # type: ignore[arg-type]
    state[0] = (300, 0, 0)
    assert await completeness(layer, progress, lambda: state[0]) == (60, 60)  # type: ignore[arg-type]
    assert layer.looks == 6, "a complete layer stays complete while nothing leaves the cache"
    layer.cached, state[0] = {2}, (250, 1, 0)
    assert await completeness(layer, progress, lambda: state[0]) == (30, 60)  # type: ignore[arg-type]


def test_the_status_table_says_how_much_of_a_layer_is_complete() -> None:
    def row(**fields: Any) -> str:
        return fetch_state(status_pb2.Layer(**fields))

    assert row(mode="estargz", fetch_state="warming", content_bytes=1000, complete_bytes=405) == "40 %, warming"
    assert row(mode="estargz", fetch_state="on demand", content_bytes=1000, complete_bytes=1000) == "complete"
    assert row(mode="soci", fetch_state="complete", content_bytes=1000, complete_bytes=999) == "99 %, on demand"
    assert row(mode="whole", pull_seconds=1.5) == "pulled in 1.50s"
    assert row(mode="fallback") == "-"
