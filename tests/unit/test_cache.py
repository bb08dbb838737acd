from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import pytest
import trio

from snapshotter.cache import ChunkCache, sha256_verifier


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_miss_fetches_once_then_hits(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, max_bytes=1 << 20)
    calls = 0

    async def fetch() -> bytes:
        nonlocal calls
        calls += 1
        await trio.sleep(0.05)
        return b"chunk"

    results: list[bytes] = []
    async with trio.open_nursery() as n:
        for _ in range(10):
            n.start_soon(lambda: _append(results, cache.get_or_fetch("k", fetch)))
    assert results == [b"chunk"] * 10 and calls == 1
    assert await cache.get_or_fetch("k", fetch) == b"chunk" and calls == 1


async def _append(out: list[bytes], aw) -> None:  # type: ignore[no-untyped-def]
    out.append(await aw)


async def test_fetch_error_reaches_every_waiter_and_is_not_cached(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, max_bytes=1 << 20)

    async def broken() -> bytes:
        await trio.sleep(0.02)
        raise OSError("registry gone")

    errors: list[str] = []

    async def call() -> None:
        try:
            await cache.get_or_fetch("k", broken)
        except OSError as e:
            errors.append(str(e))

    async with trio.open_nursery() as n:
        for _ in range(3):
            n.start_soon(call)
    assert errors == ["registry gone"] * 3
    assert "k" not in cache


async def test_survives_restart_and_reverifies(tmp_path: Path) -> None:
    data = b"x" * 1000
    cache = ChunkCache(tmp_path, max_bytes=1 << 20)
    await cache.put(digest(data), data)
    again = ChunkCache(tmp_path, max_bytes=1 << 20)
    assert again.size == 1000
    assert await again.get(digest(data), sha256_verifier(digest(data))) == data


async def test_askers_of_a_chunk_on_disk_share_one_load_and_digest_check(tmp_path: Path) -> None:
    data = b"y" * 4096
    key = digest(data)
    await ChunkCache(tmp_path, max_bytes=1 << 20).put(key, data)
    cache = ChunkCache(tmp_path, max_bytes=1 << 20)  # a restart: on disk, not in memory
    checks = []

    def verify(got: bytes) -> bool:
        checks.append(len(got))
        return sha256_verifier(key)(got)

    async def never() -> bytes:
        raise AssertionError("a chunk on disk is not fetched")

    got = []

    async def ask() -> None:
        got.append(await cache.get_or_fetch(key, never, verify))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(ask)
    assert got == [data] * 4
    assert checks == [4096], "one load and one digest check for four askers"


async def test_corrupt_entry_on_disk_is_dropped_not_served(tmp_path: Path) -> None:
    data = b"y" * 1000
    cache = ChunkCache(tmp_path, max_bytes=1 << 20)
    await cache.put(digest(data), data)
    (path,) = [p for p in tmp_path.rglob("*") if p.is_file()]
    path.write_bytes(b"z" * 1000)
    fresh = ChunkCache(tmp_path, max_bytes=1 << 20)  # no memory copy
    assert await fresh.get(digest(data), sha256_verifier(digest(data))) is None
    assert not path.exists() and fresh.stats.corrupt == 1 and fresh.size == 0


async def test_bounded_with_lru_eviction(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path, max_bytes=10_000, memory_bytes=0)
    for i in range(3):
        await cache.put(f"k{i}", bytes([i]) * 3000)
    assert await cache.get("k0") is not None  # k0 is now more recent than k1
    await cache.put("k3", b"3" * 3000)
    assert cache.size <= 10_000
    assert "k0" in cache and "k1" not in cache and "k2" in cache and "k3" in cache
    assert cache.stats.evictions == 1
    on_disk = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert on_disk == cache.size


async def test_torn_temporaries_are_removed_at_start(tmp_path: Path) -> None:
    ChunkCache(tmp_path, max_bytes=1 << 20)
    (tmp_path / "tmp" / "abc.1.2").write_bytes(b"half")
    cache = ChunkCache(tmp_path, max_bytes=1 << 20)
    assert list((tmp_path / "tmp").iterdir()) == [] and cache.size == 0


async def test_full_disk_still_returns_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = ChunkCache(tmp_path, max_bytes=1 << 20, memory_bytes=0)

    def full(name: str, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache, "_write", full)

    async def fetch() -> bytes:
        return b"data"

    assert await cache.get_or_fetch("k", fetch) == b"data"
    assert cache.stats.write_errors == 1 and cache.size == 0 and "k" not in cache


async def test_cancelled_fetcher_hands_over_to_a_waiter(tmp_path: Path) -> None:
    """The first reader gives up (its FUSE read timed out); the next must fetch, not inherit Cancelled."""
    cache = ChunkCache(tmp_path, max_bytes=1 << 20)
    calls = 0

    async def slow_then_fast() -> bytes:
        nonlocal calls
        calls += 1
        if calls == 1:
            await trio.sleep(10)
        return b"data"

    got: list[bytes] = []
    async with trio.open_nursery() as n:
        async def impatient() -> None:
            with trio.move_on_after(0.05):
                await cache.get_or_fetch("k", slow_then_fast)

        n.start_soon(impatient)
        await trio.sleep(0.01)
        n.start_soon(lambda: _append(got, cache.get_or_fetch("k", slow_then_fast)))
    assert got == [b"data"] and calls == 2


async def test_range_reads_verify_once_then_read_only_what_they_need(tmp_path: Path) -> None:
    data = bytes(range(256)) * 64
    first = ChunkCache(tmp_path, max_bytes=1 << 20, memory_bytes=0)
    await first.put(digest(data), data)
    cache = ChunkCache(tmp_path, max_bytes=1 << 20, memory_bytes=0)  # a restart: nothing verified yet
    checks = 0

    def counting(d: bytes) -> bool:
        nonlocal checks
        checks += 1
        return sha256_verifier(digest(data))(d)

    assert await cache.get_range(digest(data), 10, 20, counting) == data[10:20]
    assert await cache.get_range(digest(data), 1000, 1004, counting) == data[1000:1004]
    assert checks == 1, "a verified file is read in part afterwards, not re-verified"
    assert await cache.get_range("absent", 0, 4) is None
