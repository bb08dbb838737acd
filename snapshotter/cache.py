"""The chunk cache: verified, decompressed chunks on local disk, bounded, shared by all layers.

Why it is built this way:
- Only data that passed its digest check is ever `put`; a file is written under a
  temporary name and renamed into place, so a crash never leaves a torn chunk under a
  real name. Entries are re-verified when loaded from disk (cheap next to a network
  fetch), so even disk corruption is caught.
- It survives restarts: the on-disk index is rebuilt by scanning at start.
- It is bounded: past `max_bytes`, least recently used entries are evicted down to a
  low-water mark (peer snapshotters' caches grow until the disk is full).
- Concurrent misses for one key fetch once (single-flight): the others wait for it. It
  lives here, not in `fetch/`: cached, being fetched and missing are one state of a key,
  which `wanted` reads whole, and the data plane's device reads use it without `fetch/`.
- A small in-memory LRU keeps hot chunks, so a run of 128 KiB FUSE reads within one
  4 MiB chunk costs one disk load and one digest check, not thirty-two; and once a file
  has been verified in this run, a small read of it reads only the bytes it needs
  (cached files are never changed after they are renamed into place).
- A full disk costs only caching: the data is still returned.
- One writer: the control plane fetches, verifies, stores and evicts. The data plane
  opens the same directory as a reader (`writer=False`): it keeps no index, looks a
  chunk up on disk by name, verifies it once, and only ever remembers what it is given.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

log = logging.getLogger(__name__)

Verify = Callable[[bytes], bool]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    fetches: int = 0
    evictions: int = 0
    write_errors: int = 0
    corrupt: int = 0


@dataclass
class _Entry:
    size: int
    used: float


class _InFlight:
    """A fetch under way: waiters sleep on `done`, then read `data` or `error`."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: Exception | None = None
        """Set when the fetch failed; neither is set when the fetching task was cancelled."""


@dataclass
class Claim:
    """Keys a fetch has claimed (`ChunkCache.claimed`), and the verified data it got for them."""

    keys: list[str]
    got: dict[str, bytes] = field(default_factory=dict)
    stored: int = 0
    """Bytes of `got` cached when the claim ended (those of claimed keys)."""


class ChunkCache:
    """Chunks keyed by strings (a chunk digest, or `<blob digest>@<offset>`), under `directory`."""

    def __init__(self, directory: Path, max_bytes: int, memory_bytes: int = 64 << 20, *,
                 writer: bool = True) -> None:
        self.dir = directory
        self.writer = writer
        self.tmp = directory / "tmp"
        self.max_bytes = max_bytes
        self.memory_bytes = memory_bytes
        self.stats = CacheStats()
        self._index: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._memory: OrderedDict[str, bytes] = OrderedDict()
        self._memory_used = 0
        self._inflight: dict[str, _InFlight] = {}
        self._verified: set[str] = set()
        """Names whose file was written or verified by this process: safe to read in part."""
        if writer:
            self._load_index()

    @property
    def size(self) -> int:
        """Bytes of chunk data on disk."""
        return self._bytes

    def __contains__(self, key: str) -> bool:
        if key in self._memory:
            return True
        name = _name(key)
        return name in self._index if self.writer else self._path(name).exists()

    def _known(self, name: str) -> bool:
        """Worth opening the file: the writer knows its index; a reader must look."""
        return not self.writer or name in self._index

    def wanted(self, key: str) -> bool:
        """Neither cached nor being fetched: worth adding to a fetch."""
        return key not in self._inflight and key not in self

    async def get_or_fetch(self, key: str, fetch: Callable[[], Awaitable[bytes]], verify: Verify | None = None) -> bytes:
        """The chunk for `key`: from memory, from disk, or fetched once however many ask.

        `fetch` must return verified data; `verify` re-checks data loaded from disk. A
        fetch runs in the task of the first asker; if that task is cancelled (its reader
        gave up), a waiting asker takes over rather than inheriting the cancellation.
        Askers also share the disk load and its digest check: EROFS has several reads of one
        4 MiB chunk in flight at once, and each loaded and hashed all of it again.
        """
        while True:
            data = self._from_memory(key)
            if data is not None:
                return data
            flight = self._inflight.get(key)
            if flight is None:
                break
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            if flight.data is not None:
                return flight.data
        flight = self._inflight[key] = _InFlight()
        try:
            data = await self.get(key, verify)
            if data is None:
                self.stats.fetches += 1
                data = await fetch()
                await self.put(key, data)
            flight.data = data
            return data
        except Exception as e:
            flight.error = e
            raise
        finally:
            del self._inflight[key]
            flight.done.set()

    async def fill(self, keys: list[str], fetch: Callable[[list[str]], Awaitable[dict[str, bytes]]]) -> int:
        """Fetch, with one call of `fetch`, those `keys` that are neither cached nor being fetched.

        For prefetch and background fetch: one range GET fills many chunks. `fetch` returns
        the verified data of the keys it could get (see `claimed`). Returns the bytes stored.
        """
        async with self.claimed(keys) as claim:
            if not claim.keys:
                return 0
            self.stats.fetches += 1
            claim.got.update(await fetch(claim.keys))
        return claim.stored

    @asynccontextmanager
    async def claimed(self, keys: list[str]) -> AsyncIterator[Claim]:
        """Claim those `keys` that are neither cached nor being fetched, for a fetch that brings
        them along with something else (a miss's neighbours, a batch).

        Readers that miss a claimed key wait for the claim to end rather than fetching the
        same bytes (two readers' GETs overlapped before: tests/integration/test_load.py). The
        claimer puts the verified data it got in `claim.got`, which is cached at the end; a key
        left out, or a failure or cancellation of the claimer, sends each waiter to fetch that
        key itself, so a speculative fetch never makes a read fail.
        """
        claim = Claim([k for k in dict.fromkeys(keys) if self.wanted(k)])
        flights = {k: _InFlight() for k in claim.keys}
        self._inflight.update(flights)
        try:
            yield claim
            got = [(key, data) for key, data in claim.got.items() if key in flights]
            for key, data in got:
                flights[key].data = data
            await self.put_many(got)
            claim.stored = sum(len(data) for _, data in got)
        finally:
            for key, flight in flights.items():
                del self._inflight[key]
                flight.done.set()

    def _from_memory(self, key: str) -> bytes | None:
        data = self._memory.get(key)
        if data is not None:
            self._memory.move_to_end(key)
            self.stats.hits += 1
        return data

    async def get(self, key: str, verify: Verify | None = None) -> bytes | None:
        remembered = self._from_memory(key)
        if remembered is not None:
            return remembered
        name = _name(key)
        if not self._known(name):
            self.stats.misses += 1
            return None
        path = self._path(name)
        try:
            data, good = await trio.to_thread.run_sync(_load, path, verify)
        except FileNotFoundError:
            self._forget(name)
            self.stats.misses += 1
            return None
        if not good:
            log.error("cache entry %s for %s failed verification; dropping it", path, key)
            self.stats.corrupt += 1
            self._forget(name, unlink=self.writer)  # the writer fetches it again and replaces it
            self.stats.misses += 1
            return None
        self._verified.add(name)
        self._touch(name)
        self._remember(key, data)
        self.stats.hits += 1
        return data

    async def get_range(self, key: str, start: int, end: int, verify: Verify | None = None) -> bytes | None:
        """Bytes [start, end) of the chunk for `key`, reading no more of it than needed once verified."""
        data = self._from_memory(key)
        if data is not None:
            return data[start:end]
        name = _name(key)
        if name in self._verified and self._known(name):
            try:
                part = await trio.to_thread.run_sync(_pread, self._path(name), start, end - start)
            except FileNotFoundError:
                self._forget(name)
            else:
                self._touch(name)
                self.stats.hits += 1
                return part
        whole = await self.get(key, verify)
        return None if whole is None else whole[start:end]

    async def put(self, key: str, data: bytes) -> None:
        """Store verified data; a disk error is logged and costs only the caching."""
        await self.put_many([(key, data)])

    async def put_many(self, items: list[tuple[str, bytes]]) -> None:
        """Store several verified chunks with one trip to a worker thread (a fetch brings dozens).

        They are in the memory LRU at once, so readers need not wait for the disk.
        """
        todo = []
        for key, data in items:
            self._remember(key, data)
            if not self.writer:
                continue
            name = _name(key)
            if name not in self._index:
                todo.append((key, name, data))
        if not todo:
            return
        written = await trio.to_thread.run_sync(self._write_all, todo)
        for name, size in written:
            if name not in self._index:
                self._index[name] = _Entry(size, time.time())
                self._verified.add(name)
                self._bytes += size
        if self._bytes > self.max_bytes:
            self._evict(int(self.max_bytes * 0.9))

    def _write_all(self, todo: list[tuple[str, str, bytes]]) -> list[tuple[str, int]]:
        """Write each chunk; a disk error is logged and costs only that chunk's caching."""
        written = []
        for key, name, data in todo:
            try:
                self._write(name, data)
            except OSError as e:
                self.stats.write_errors += 1
                level = logging.WARNING if e.errno in (errno.ENOSPC, errno.EDQUOT) else logging.ERROR
                log.log(level, "could not cache %s (%d bytes): %s", key, len(data), e)
                continue
            written.append((name, len(data)))
        return written

    def _write(self, name: str, data: bytes) -> None:
        final = self._path(name)
        final.parent.mkdir(exist_ok=True)
        tmp = self.tmp / f"{name}.{os.getpid()}.{time.monotonic_ns()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _evict(self, target: int) -> None:
        while self._bytes > target and self._index:
            name, _ = next(iter(self._index.items()))
            self._forget(name, unlink=True)
            self.stats.evictions += 1

    def _forget(self, name: str, unlink: bool = False) -> None:
        self._verified.discard(name)
        entry = self._index.pop(name, None)
        if entry is not None:
            self._bytes -= entry.size
        if unlink:
            self._path(name).unlink(missing_ok=True)

    def _touch(self, name: str) -> None:
        entry = self._index.get(name)
        if entry is not None:
            entry.used = time.time()
            self._index.move_to_end(name)
        try:
            os.utime(self._path(name))  # so the LRU order survives a restart
        except OSError:
            pass

    def _remember(self, key: str, data: bytes) -> None:
        if len(data) > self.memory_bytes // 4:
            return
        if key in self._memory:
            self._memory.move_to_end(key)
            return
        self._memory[key] = data
        self._memory_used += len(data)
        while self._memory_used > self.memory_bytes:
            _, old = self._memory.popitem(last=False)
            self._memory_used -= len(old)

    def _path(self, name: str) -> Path:
        return self.dir / name[:2] / name

    async def preload(self, key: str, verify: Verify | None = None) -> bool:
        """Load the chunk for `key` from disk into memory, if it is on disk: for a reader about to
        ask for it. Never fetches. Readers that ask meanwhile wait for this load rather than
        loading the file again, and load or fetch it themselves if it was not there.
        Whether it is now in memory."""
        if key in self._memory:
            return True
        if key in self._inflight or key not in self:
            return False
        flight = self._inflight[key] = _InFlight()
        try:
            flight.data = await self.get(key, verify)
            return flight.data is not None
        finally:
            del self._inflight[key]
            flight.done.set()

    def _load_index(self) -> None:
        """Rebuild the index from disk, oldest first, dropping half-written temporaries."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(exist_ok=True)
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)
        found: list[tuple[float, str, int]] = []
        for sub in self.dir.iterdir():
            if sub == self.tmp or not sub.is_dir():
                continue
            for f in sub.iterdir():
                st = f.stat()
                found.append((st.st_mtime, f.name, st.st_size))
        for used, name, size in sorted(found):
            self._index[name] = _Entry(size, used)
            self._bytes += size
        if self._bytes > self.max_bytes:
            self._evict(int(self.max_bytes * 0.9))


def _load(path: Path, verify: Verify | None) -> tuple[bytes, bool]:
    """A chunk file's bytes, and whether they pass `verify`: both in one worker thread, so
    that the digest check (2.4 ms for a 4 MiB chunk) neither holds up the trio thread that
    answers reads nor waits for it, and two loads hash on two cores."""
    data = path.read_bytes()
    return data, verify is None or verify(data)


def _pread(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        if offset == 0:
            # A read from a chunk's start is most likely sequential (random reads rarely land
            # there): have the kernel read the rest of the chunk file in now, so the reads
            # that follow, as small as 128 KiB through EROFS, find it in the page cache.
            os.posix_fadvise(f.fileno(), length, 0, os.POSIX_FADV_WILLNEED)
        return os.pread(f.fileno(), length, offset)


def _name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def sha256_verifier(digest: str) -> Verify:
    """A `verify` for data whose digest is `sha256:<hex>`."""
    expected = digest.removeprefix("sha256:")
    return lambda data: hashlib.sha256(data).hexdigest() == expected
