"""The chunk cache opened as a reader (`writer=False`, the data plane) beside its one writer (the control plane)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from snapshotter.cache import ChunkCache, sha256_verifier


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def listing(directory: Path) -> dict[str, bytes | None]:
    """Every path under `directory`, with the bytes of each file (directories: None)."""
    return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(directory.rglob("*"))}


async def test_reader_gets_what_the_writer_put_verified(tmp_path: Path) -> None:
    writer = ChunkCache(tmp_path, max_bytes=1 << 20)
    reader = ChunkCache(tmp_path, max_bytes=1 << 20, writer=False)
    data = bytes(range(256)) * 40
    key = digest(data)
    assert key not in reader and await reader.get(key, sha256_verifier(key)) is None  # nothing yet
    await writer.put(key, data)
    assert key in reader and not reader.wanted(key)
    checks = 0

    def verify(d: bytes) -> bool:
        nonlocal checks
        checks += 1
        return sha256_verifier(key)(d)

    assert await reader.get(key, verify) == data
    assert checks == 1
    assert await reader.get_range(key, 100, 300, verify) == data[100:300]
    assert checks == 1, "once verified, the reader does not verify again"
    assert (reader.stats.hits, reader.stats.misses, reader.stats.corrupt) == (2, 1, 0)
    assert reader.size == 0, "a reader keeps no index, so counts no bytes"


async def test_reader_reads_a_verified_file_in_part_without_the_memory_copy(tmp_path: Path) -> None:
    writer = ChunkCache(tmp_path, max_bytes=1 << 20)
    reader = ChunkCache(tmp_path, max_bytes=1 << 20, memory_bytes=0, writer=False)
    data = bytes(range(256)) * 64
    key = digest(data)
    await writer.put(key, data)
    checks = 0

    def verify(d: bytes) -> bool:
        nonlocal checks
        checks += 1
        return sha256_verifier(key)(d)

    assert await reader.get_range(key, 10, 20, verify) == data[10:20]
    assert await reader.get_range(key, 5000, 5100, verify) == data[5000:5100]
    assert checks == 1


async def test_reader_never_writes_a_file(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    writer = ChunkCache(cache_dir, max_bytes=1 << 20)
    await writer.put("existing", b"e" * 100)
    before = listing(cache_dir)
    reader = ChunkCache(cache_dir, max_bytes=1 << 20, writer=False)
    given = {f"k{i}": bytes([i]) * 500 for i in range(5)}
    await reader.put("k0", given["k0"])
    await reader.put_many([(k, v) for k, v in given.items() if k != "k0"])
    await reader.get("existing")
    await reader.get("absent")
    assert listing(cache_dir) == before, "a reader must not add, change or remove files"
    for key, data in given.items():  # ... but it remembers what it is given
        assert key in reader
        assert await reader.get(key) == data
    assert writer.size == 100 and all(k not in writer for k in given)


async def test_reader_on_a_missing_directory_creates_nothing(tmp_path: Path) -> None:
    reader = ChunkCache(tmp_path / "nowhere", max_bytes=1 << 20, writer=False)
    assert await reader.get("k") is None and "k" not in reader
    await reader.put("k", b"data")
    assert await reader.get("k") == b"data"
    assert not (tmp_path / "nowhere").exists()


async def test_chunk_the_writer_evicted_is_a_miss_for_the_reader(tmp_path: Path) -> None:
    writer = ChunkCache(tmp_path, max_bytes=10_000, memory_bytes=0)
    reader = ChunkCache(tmp_path, max_bytes=1 << 62, memory_bytes=0, writer=False)
    chunks = {f"k{i}": bytes([i]) * 3000 for i in range(4)}
    for key in ("k0", "k1", "k2"):
        await writer.put(key, chunks[key])
    assert await reader.get("k0") == chunks["k0"]  # verified and read once by the reader: k0 is "known" to it
    assert await reader.get_range("k1", 0, 10) == chunks["k1"][:10]
    await writer.put("k3", chunks["k3"])  # over 10,000 bytes: the least recently used (k0) goes
    assert writer.stats.evictions >= 1 and "k0" not in writer
    misses = reader.stats.misses
    assert await reader.get("k0") is None, "an evicted chunk is a miss, not an error"
    assert await reader.get_range("k0", 0, 10) is None, "a partial read of an evicted chunk is a miss too"
    assert reader.stats.misses == misses + 2
    assert "k0" not in reader
    assert await reader.get("k3") == chunks["k3"]


async def test_chunk_the_writer_forgot_after_a_restart_is_a_miss_for_the_reader(tmp_path: Path) -> None:
    """The writer's start drops files over its bound; a reader that had read them sees misses."""
    first = ChunkCache(tmp_path, max_bytes=1 << 20, memory_bytes=0)
    for i in range(4):
        await first.put(f"k{i}", bytes([i]) * 3000)
    reader = ChunkCache(tmp_path, max_bytes=1 << 62, memory_bytes=0, writer=False)
    assert all([await reader.get(f"k{i}") is not None for i in range(4)])
    smaller = ChunkCache(tmp_path, max_bytes=6000, memory_bytes=0)
    gone = [f"k{i}" for i in range(4) if f"k{i}" not in smaller]
    assert gone
    for key in gone:
        assert await reader.get_range(key, 0, 100) is None
        assert await reader.get(key) is None


async def test_corrupt_file_is_a_miss_for_the_reader_and_counted(tmp_path: Path) -> None:
    data = b"y" * 1000
    key = digest(data)
    writer = ChunkCache(tmp_path, max_bytes=1 << 20, memory_bytes=0)
    await writer.put(key, data)
    (path,) = [p for p in tmp_path.rglob("*") if p.is_file()]
    path.write_bytes(b"z" * 1000)  # disk corruption under the same name
    reader = ChunkCache(tmp_path, max_bytes=1 << 20, writer=False)
    assert await reader.get(key, sha256_verifier(key)) is None
    assert reader.stats.corrupt == 1 and reader.stats.misses == 1 and reader.stats.hits == 0
    assert await reader.get_range(key, 0, 10, sha256_verifier(key)) is None, "never served in part either"
    # The writer finds the same corruption itself (or the file gone): a miss, after which it stores good data.
    assert await writer.get(key, sha256_verifier(key)) is None
    await writer.put(key, data)
    assert await reader.get(key, sha256_verifier(key)) == data
