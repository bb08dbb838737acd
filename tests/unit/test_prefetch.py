"""Fetching ahead of reads: profiles (format, record, replay), batching, the cache's batch
single-flight, SOCI prefetch artifacts, and background completion of layers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import trio

from snapshotter.cache import ChunkCache
from snapshotter.formats import profile as fmt
from snapshotter.formats.digest import content_digest
from snapshotter.formats import soci_index, ztoc
from snapshotter.formats.errors import FormatError
from snapshotter.fetch.activity import FetchActivity
from snapshotter.fetch.background import BackgroundFetcher, BackgroundOptions
from snapshotter.fetch.batching import batches
from snapshotter.fetch.prefetch import FetchQueue, prefetch
from snapshotter.fetch.progress import COMPLETE, ON_DEMAND, Phase, Progress
from snapshotter.fetch.readahead import Readahead
from snapshotter.fetch.units import Unit, first_reached, units_in
from snapshotter.layers.estargz import EStargzLayer, fetch_index
from snapshotter.layers.soci import SociLayer
from snapshotter.profiles import ProfileStore
from snapshotter.recording import Recording
from tests.harness.estargz import build_estargz
from tests.harness.images import File
from tests.unit.blobs import MemoryBlob
from tests.unit.test_soci_layer import gzip_layer, layer_files

IMAGE = "sha256:" + "1" * 64
LAYER = "sha256:" + "2" * 64


# ---------------------------------------------------------------- the profile format

def test_a_profile_round_trips_in_order() -> None:
    p = fmt.Profile(IMAGE, (fmt.LayerProfile(LAYER, ((500, 900), (0, 100))),), 30.0)
    back = fmt.parse(fmt.encode(p))
    assert back == p
    assert back.bytes == 500 and back.for_layer(LAYER) is not None and back.for_layer(IMAGE) is None


def test_read_times_round_trip_and_may_be_absent() -> None:
    timed = fmt.Profile(IMAGE, (fmt.LayerProfile(LAYER, ((500, 900), (0, 100)), (0, 250)),), 30.0)
    assert fmt.parse(fmt.encode(timed)) == timed
    untimed = json.dumps({"mediaType": fmt.ARTIFACT_TYPE, "version": 1, "image": IMAGE,
                          "layers": [{"digest": LAYER, "ranges": [[0, 10]]}]}).encode()
    assert fmt.parse(untimed).layers[0].at == ()
    with pytest.raises(ValueError, match="1 read times for 2 ranges"):
        fmt.LayerProfile(LAYER, ((0, 1), (2, 3)), (5,))


@pytest.mark.parametrize("at", [[1, 2], [-1], [1.5], "0", [True]])
def test_bad_read_times_are_a_clear_error(at: object) -> None:
    doc = json.dumps({"mediaType": fmt.ARTIFACT_TYPE, "version": 1, "image": IMAGE,
                      "layers": [{"digest": LAYER, "ranges": [[0, 10]], "at": at}]}).encode()
    with pytest.raises(FormatError, match="bad read times"):
        fmt.parse(doc)


def test_a_recording_keeps_when_each_range_was_first_read(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([100.0, 100.2, 100.25, 101.0])
    monkeypatch.setattr("snapshotter.recording.time.monotonic", lambda: next(clock))
    other = "sha256:" + "3" * 64
    rec = Recording(IMAGE, (LAYER, other), 30.0)
    rec.touch(LAYER, 0, 10)
    rec.touch(other, 50, 60)
    rec.touch(LAYER, 10, 20)   # adjacent to the first: merged, keeping the earlier time
    rec.touch(LAYER, 90, 95)
    assert rec.profile().layers == (fmt.LayerProfile(LAYER, ((0, 20), (90, 95)), (0, 1000)),
                                    fmt.LayerProfile(other, ((50, 60),), (200,)))


@pytest.mark.parametrize("doc, why", [
    (b"not json", "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),  # too deep for json: RecursionError
    (b"[]", "want an object"),
    (json.dumps({"mediaType": "x", "version": 1}).encode(), "not a lazysnap profile"),
    (json.dumps({"mediaType": fmt.ARTIFACT_TYPE, "version": 9}).encode(), "unsupported profile version"),
    (json.dumps({"mediaType": fmt.ARTIFACT_TYPE, "version": 1, "image": "latest", "layers": []}).encode(),
     "no valid image digest"),
    (json.dumps({"mediaType": fmt.ARTIFACT_TYPE, "version": 1, "image": IMAGE,
                 "layers": [{"digest": LAYER, "ranges": [[10, 5]]}]}).encode(), "bad range"),
    (json.dumps({"mediaType": fmt.ARTIFACT_TYPE, "version": 1, "image": IMAGE,
                 "layers": [{"digest": LAYER, "ranges": [[0, True]]}]}).encode(), "bad range"),
    (json.dumps({"mediaType": fmt.ARTIFACT_TYPE, "version": 1, "image": IMAGE,
                 "layers": [{"digest": "../x", "ranges": []}]}).encode(), "no valid digest"),
])
def test_a_malformed_profile_is_a_clear_error(doc: bytes, why: str) -> None:
    with pytest.raises(FormatError, match=why):
        fmt.parse(doc)


def test_a_profile_too_big_is_refused_before_parsing() -> None:
    with pytest.raises(FormatError, match="more than"):
        fmt.parse(b" " * (fmt.MAX_SIZE + 1))


def test_the_pushed_manifest_names_the_profile_and_its_image() -> None:
    raw = fmt.encode(fmt.Profile(IMAGE, ()))
    manifest = fmt.build_manifest(raw, "application/vnd.oci.image.manifest.v1+json", IMAGE, 1234)
    doc = json.loads(manifest)
    assert doc["subject"]["digest"] == IMAGE and doc["config"]["mediaType"] == fmt.ARTIFACT_TYPE
    assert fmt.profile_blob(manifest) == (content_digest(raw), len(raw))
    with pytest.raises(FormatError, match="carries no profile"):
        fmt.profile_blob(json.dumps({"layers": []}).encode())


def test_the_store_keeps_one_profile_per_image_and_ignores_garbage(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path / "profiles")
    assert store.get(IMAGE) is None
    p = fmt.Profile(IMAGE, (fmt.LayerProfile(LAYER, ((0, 10),)),), 5.0)
    store.put(p)
    assert store.get(IMAGE) == p and store.all() == [p]
    (tmp_path / "profiles" / f"{'3' * 64}.json").write_text("{garbage")
    assert store.all() == [p]


# ---------------------------------------------------------------- SOCI prefetch artifacts

def test_soci_prefetch_artifacts_are_read_per_layer() -> None:
    artifact = json.dumps({"version": "1.0", "prefetch_spans": [{"start_span": 2, "end_span": 4}, {"start_span": 0,
                                                                                                    "end_span": 0}]})
    assert soci_index.parse_prefetch(artifact.encode()) == [(2, 4), (0, 0)]
    with pytest.raises(FormatError, match="bad span range"):
        soci_index.parse_prefetch(b'{"version":"1.0","prefetch_spans":[{"start_span":3,"end_span":1}]}')
    with pytest.raises(FormatError, match="version"):
        soci_index.parse_prefetch(b'{"version":"2","prefetch_spans":[]}')
    with pytest.raises(FormatError, match="not valid JSON"):
        soci_index.parse_prefetch(b"[" * 100_000 + b"]" * 100_000)
    ztoc_ref = soci_index.ztoc_ref("sha256:" + "4" * 64, 10, LAYER, "application/vnd.oci.image.layer.v1.tar+gzip", 1)
    prefetch_ref = soci_index.Descriptor(soci_index.PREFETCH_MEDIA_TYPE, "sha256:" + "5" * 64, 20,
                                  {soci_index.LAYER_DIGEST: LAYER})
    raw = soci_index.build_index([ztoc_ref, prefetch_ref], subject=None, artifact_type=soci_index.INDEX_V2)
    index = soci_index.parse_index(raw)
    assert index.prefetches == {LAYER: prefetch_ref} and set(index.ztocs) == {LAYER}


# ---------------------------------------------------------------- units and batches

def _units(*ranges: tuple[int, int]) -> list[Unit]:
    return [Unit(s, e, i) for i, (s, e) in enumerate(ranges)]


def test_units_in_finds_overlaps_in_the_order_ranges_reach_them() -> None:
    units = _units((0, 10), (10, 20), (20, 30), (30, 40))
    assert [u.index for u in units_in(units, [(25, 35), (0, 5), (21, 22)])] == [2, 3, 0]
    assert [(u.index, k) for u, k in first_reached(units, [(25, 35), (0, 5), (21, 22)])] == [(2, 0), (3, 0), (0, 1)]
    assert units_in(units, [(40, 50)]) == []


def test_batches_join_close_units_and_keep_urgency_order() -> None:
    units = _units((0, 10), (12, 20), (1000, 1010), (1010, 1020), (5000, 9000))
    runs = batches([units[3], units[4], units[0], units[1], units[2]], max_bytes=100, max_gap=5)
    assert [[u.index for u in run] for run in runs] == [[2, 3], [4], [0, 1]]
    assert [[u.index for u in run] for run in batches(units, max_bytes=15, max_gap=5)][0] == [0]


def test_a_recording_keeps_first_reads_in_order_and_joins_neighbours() -> None:
    rec = Recording(IMAGE, (LAYER,), 30.0)
    assert rec.started is None
    for start, end in [(100, 200), (200, 300), (0, 100), (100, 200)]:
        rec.touch(LAYER, start, end)
    assert rec.started is not None
    profile = rec.profile()
    assert profile.seconds == 30.0 and profile.layers[0].ranges == ((100, 300), (0, 100))


# ---------------------------------------------------------------- the cache's batch fill

async def test_fill_serves_waiting_readers_and_sends_left_out_keys_back_to_them(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "c", 1 << 30)
    release = trio.Event()
    own_fetches: list[str] = []

    async def batch(keys: list[str]) -> dict[str, bytes]:
        await release.wait()
        return {"a": b"A"}  # "b" failed verification: left out

    async def own(key: str) -> bytes:
        own_fetches.append(key)
        return key.upper().encode()

    got: dict[str, bytes] = {}
    async with trio.open_nursery() as nursery:
        async def filler() -> None:
            got["stored"] = bytes([await cache.fill(["a", "b"], batch)])
        nursery.start_soon(filler)
        await trio.testing.wait_all_tasks_blocked()

        async def reader(key: str) -> None:
            got[key] = await cache.get_or_fetch(key, lambda: own(key))
        nursery.start_soon(reader, "a")
        nursery.start_soon(reader, "b")
        await trio.testing.wait_all_tasks_blocked()
        assert own_fetches == [], "readers must wait for the batch that claimed their keys"
        release.set()
    assert got["a"] == b"A" and got["b"] == b"B" and own_fetches == ["b"]
    assert await cache.fill(["a", "b"], batch) == 0, "nothing left to fetch"


async def test_a_failed_fill_never_fails_a_reader(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "c", 1 << 30)

    async def broken(keys: list[str]) -> dict[str, bytes]:
        await trio.sleep(0.01)
        raise OSError("registry went away")

    async def fill() -> None:
        with pytest.raises(OSError):
            await cache.fill(["k"], broken)

    async def read() -> bytes:
        await trio.sleep(0)
        return await cache.get_or_fetch("k", _fetch_k)

    async def _fetch_k() -> bytes:
        return b"K"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fill)
        result: list[bytes] = []

        async def reader() -> None:
            result.append(await read())
        nursery.start_soon(reader)
    assert result == [b"K"]


# ---------------------------------------------------------------- record, then replay

def _estargz_files() -> dict[str, bytes]:
    rng = random.Random(11)
    out = {f"lib/mod{i}.py": rng.randbytes(200_000) for i in range(60)}
    out["data/big.bin"] = rng.randbytes(3 << 20)
    return out


async def _estargz_layer(built: bytes, cache_dir: Path) -> tuple[EStargzLayer, MemoryBlob]:
    blob = MemoryBlob(built, LAYER)
    index = await fetch_index(blob)
    blob.reads = blob.fetched_bytes = 0
    return EStargzLayer(index, blob, ChunkCache(cache_dir, 1 << 30)), blob


async def test_a_recorded_start_replays_in_few_gets_and_then_reads_need_none(tmp_path: Path) -> None:
    files = _estargz_files()
    built = build_estargz([File(n, d) for n, d in files.items()], chunk_size=64 << 10).blob
    wanted = [f"lib/mod{i}.py" for i in range(20)] + ["data/big.bin"]

    first, first_blob = await _estargz_layer(built, tmp_path / "node-a")
    rec = Recording(IMAGE, (LAYER,), 30.0)
    first.recordings.append(rec)
    for name in wanted:
        node = first.tree.resolve(name)
        assert node is not None
        await first.read(node, 0, 4096 if name == "data/big.bin" else node.size)
    profile = fmt.parse(fmt.encode(rec.profile()))
    assert first_blob.reads > 5, "the first start reads a few files at a time"

    second, blob = await _estargz_layer(built, tmp_path / "node-b")
    recorded = profile.for_layer(LAYER)
    assert recorded is not None
    progress = Progress()
    await prefetch(LAYER, second, [(0.0, u) for u in units_in(second.units, recorded.ranges)], progress,
                   FetchQueue(trio.CapacityLimiter(4)))
    assert 0 < blob.reads <= 3, f"replay took {blob.reads} GETs"
    assert blob.fetched_bytes < 2 * recorded.bytes + (64 << 10) * 20, "replay fetches what was read, not the layer"
    assert progress.prefetched_bytes > 0 and progress.state == ON_DEMAND
    reads = blob.reads
    for name in wanted:
        node = second.tree.resolve(name)
        assert node is not None
        size = 4096 if name == "data/big.bin" else node.size
        assert await second.read(node, 0, size) == files[name][:size]
    assert blob.reads == reads, "every read of the recorded start is served from the cache"


async def test_soci_spans_fetch_in_batches_and_a_corrupt_span_is_skipped(tmp_path: Path) -> None:
    files = layer_files()
    data = gzip_layer(files)
    z = ztoc.parse_ztoc(ztoc.build_ztoc([data], 64 << 10, len(data)))
    blob = MemoryBlob(data)
    layer = SociLayer(z, blob, ChunkCache(tmp_path / "c", 1 << 30))
    victim = layer.units[1]
    blob.data[victim.start + 5] ^= 0xFF
    stored = sum([await layer.fetch_batch(run) for run in batches(layer.units)])
    assert blob.reads == len(batches(layer.units)) and stored > 0
    assert not layer.is_cached(victim) and all(layer.is_cached(u) for u in layer.units if u != victim)


class _Logged:
    """A stand-in layer whose batches only log that they were fetched (or fail, if told to)."""

    def __init__(self, name: str, log: list[tuple[str, int]], fail_at: int | None = None) -> None:
        self.name, self.log, self.fail_at = name, log, fail_at

    def is_cached(self, unit: Unit) -> bool:
        return False

    async def fetch_batch(self, batch: list[Unit]) -> int:
        await trio.sleep(0.001)
        if batch[0].start == self.fail_at:
            raise OSError("registry said no")
        self.log.append((self.name, batch[0].start))
        return 1


async def test_one_queue_fetches_several_layers_in_the_order_the_image_read_them() -> None:
    log: list[tuple[str, int]] = []
    queue = FetchQueue(trio.CapacityLimiter(1))
    base, lib = _Logged("base", log), _Logged("lib", log)
    progress = {name: Progress() for name in ("base", "lib")}

    async def replay(layer: _Logged, reads: list[tuple[float, int]]) -> None:
        units = [(t, Unit(start, start + 1, i)) for i, (t, start) in enumerate(reads)]
        await prefetch(layer.name, layer, units, progress[layer.name], queue)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(replay, base, [(0.0, 0), (300.0, 1 << 20), (40.0, 2 << 20)])
        nursery.start_soon(replay, lib, [(20.0, 0), (200.0, 1 << 20)])
    assert log == [("base", 0), ("lib", 0), ("base", 2 << 20), ("lib", 1 << 20), ("base", 1 << 20)]
    assert progress["base"].prefetched_bytes == 3 and progress["lib"].state == ON_DEMAND


async def test_a_failing_layer_stops_only_its_own_jobs() -> None:
    log: list[tuple[str, int]] = []
    queue = FetchQueue(trio.CapacityLimiter(1))
    bad, good = _Logged("bad", log, fail_at=0), _Logged("good", log)
    jobs = [(float(i), [Unit(i << 20, (i << 20) + 1, i)]) for i in range(3)]
    failures: dict[str, str] = {}

    async def run(layer: _Logged) -> None:
        failures[layer.name] = await queue.fetch(layer, jobs, Progress())  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, bad)
        nursery.start_soon(run, good)
    assert failures == {"bad": "OSError: registry said no", "good": ""}
    assert log == [("good", 0), ("good", 1 << 20), ("good", 2 << 20)]


# ---------------------------------------------------------------- background fetch

async def _run_until(fetcher: BackgroundFetcher, done, seconds: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fetcher.run)
        with trio.fail_after(seconds):
            while not done():
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()


async def test_background_fetch_completes_a_layer_so_reads_need_no_registry(tmp_path: Path) -> None:
    files = _estargz_files()
    built = build_estargz([File(n, d) for n, d in files.items()], chunk_size=64 << 10).blob
    layer, blob = await _estargz_layer(built, tmp_path / "c")
    progress = Progress()
    fetcher = BackgroundFetcher(lambda: [(LAYER, layer, progress)], FetchActivity(), 1 << 30,
                                BackgroundOptions(quiet=0.01, rate=0))
    await _run_until(fetcher, lambda: progress.state == COMPLETE)
    assert all(layer.is_cached(u) for u in layer.units)
    assert progress.background_bytes >= sum(len(d) for d in files.values())
    reads = blob.reads
    for name, data in files.items():
        node = layer.tree.resolve(name)
        assert node is not None and await layer.read(node, 0, node.size) == data
    assert blob.reads == reads


async def test_background_fetch_waits_for_reads_to_go_quiet(tmp_path: Path) -> None:
    built = build_estargz([File(n, d) for n, d in _estargz_files().items()], chunk_size=64 << 10).blob
    layer, blob = await _estargz_layer(built, tmp_path / "c")
    activity = FetchActivity()
    fetcher = BackgroundFetcher(lambda: [(LAYER, layer, Progress())], activity, 1 << 30,
                                BackgroundOptions(quiet=30.0, rate=0))
    activity.foreground(layer, 0, 1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fetcher.run)
        await trio.sleep(0.3)
        nursery.cancel_scope.cancel()
    assert blob.reads == 0, "a read 0.3 s ago must hold background fetch off"


async def test_background_fetch_leaves_a_layer_larger_than_the_cache_share_alone(tmp_path: Path) -> None:
    built = build_estargz([File(n, d) for n, d in _estargz_files().items()], chunk_size=64 << 10).blob
    layer, blob = await _estargz_layer(built, tmp_path / "c")
    progress = Progress()
    fetcher = BackgroundFetcher(lambda: [(LAYER, layer, progress)], FetchActivity(), 1 << 20,
                                BackgroundOptions(quiet=0.01, rate=0))
    await _run_until(fetcher, lambda: progress.state.phase is Phase.BACKGROUND_SKIPPED)
    assert blob.reads == 0 and "of the 1 MiB cache" in str(progress.state)


async def test_background_fetch_keeps_to_its_rate(tmp_path: Path) -> None:
    built = build_estargz([File(n, d) for n, d in _estargz_files().items()], chunk_size=64 << 10).blob
    layer, blob = await _estargz_layer(built, tmp_path / "c")
    progress = Progress()
    fetcher = BackgroundFetcher(lambda: [(LAYER, layer, progress)], FetchActivity(), 1 << 30,
                                BackgroundOptions(quiet=0.01, rate=8 << 20))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fetcher.run)
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    assert 0 < blob.fetched_bytes <= (8 << 20) * 0.5 + (4 << 20) + (64 << 10), blob.fetched_bytes


# ---------------------------------------------------------------- readahead

class _Units:
    """A stand-in layer: 1 KiB units over 64 MiB, nothing cached."""

    def __init__(self) -> None:
        self.units = [Unit(i << 10, (i + 1) << 10, i) for i in range(1 << 16)]

    def directory(self, unit: Unit) -> int:
        return -1

    def directory_units(self, directory: int) -> list[Unit]:
        return []


def test_readahead_grows_along_a_forward_streak_and_ignores_random_reads() -> None:
    spawned: list[tuple[int, int]] = []
    ra = Readahead(lambda layer, units: spawned.append((units[0].start, units[-1].end)), first=1 << 20,
                   maximum=4 << 20)
    layer = _Units()
    ra.miss(layer, 0, 512 << 10)  # type: ignore[arg-type]
    assert spawned == [], "one miss is not a streak"
    ra.miss(layer, 600 << 10, 1 << 20)  # type: ignore[arg-type]
    assert spawned == [(1 << 20, 2 << 20)]
    ra.miss(layer, 2 << 20, (2 << 20) + 1024)  # type: ignore[arg-type]
    assert spawned[-1] == ((2 << 20) + 1024, (4 << 20) + 1024), "the readahead doubles"
    for _ in range(4):
        ra.miss(layer, spawned[-1][1], spawned[-1][1] + 1024)  # type: ignore[arg-type]
    assert spawned[-1][1] - spawned[-1][0] == 4 << 20, "and stops growing at the maximum"
    count = len(spawned)
    other = _Units()
    for offset in (10 << 20, 40 << 20, 20 << 20, 60 << 20):
        ra.miss(other, offset, offset + (1 << 20))  # type: ignore[arg-type]
    assert len(spawned) == count, "reads far apart start no readahead"


async def test_background_fetch_waits_after_a_mount_too(tmp_path: Path) -> None:
    built = build_estargz([File(n, d) for n, d in _estargz_files().items()], chunk_size=64 << 10).blob
    layer, blob = await _estargz_layer(built, tmp_path / "c")
    activity = FetchActivity()
    activity.mounted()
    fetcher = BackgroundFetcher(lambda: [(LAYER, layer, Progress())], activity, 1 << 30,
                                BackgroundOptions(quiet=30.0, rate=0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fetcher.run)
        await trio.sleep(0.3)
        nursery.cancel_scope.cancel()
    assert blob.reads == 0, "a layer just mounted is about to be read: background fetch must wait"
