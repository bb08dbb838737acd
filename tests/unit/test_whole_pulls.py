"""`layers/whole_pulls.py`: whole layers pulled ahead of their Prepare, claimed by it."""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from snapshotter.layers import whole_pulls
from snapshotter.layers.whole_pulls import LAYERS_AT_ONCE, WholePulls
from snapshotter.registry.errors import BadResponse, RegistryUnavailable

from tests.unit.test_whole_pull import Location, layer_tar


class Registry:
    """Several small blobs, streamed slowly; counts pulls in flight and failures to inject."""

    def __init__(self, n: int) -> None:
        self.blobs = {}
        for i in range(n):
            blob = gzip.compress(layer_tar() + bytes(i))  # distinct digests
            self.blobs["sha256:" + hashlib.sha256(blob).hexdigest()] = blob
        self.streams = self.in_flight = self.most_in_flight = 0
        self.fail: dict[str, Exception] = {}

    async def open_blob(self, ref: str, digest: str) -> Location:
        return Location(digest, len(self.blobs[digest]))

    async def stream_blob(self, location: Location, chunk_size: int | None = None) -> AsyncIterator[bytes]:
        self.streams += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await trio.sleep(0.05)
            error = self.fail.pop(location.digest, None)
            if error is not None:
                raise error
            yield self.blobs[location.digest]
        finally:
            self.in_flight -= 1


def claim_dest(tmp_path: Path, name: str) -> Path:
    dest = tmp_path / "snapshots" / name
    dest.mkdir(parents=True)
    return dest


async def test_pulls_started_ahead_run_bounded_and_are_moved_in_by_their_claim(tmp_path: Path) -> None:
    registry = Registry(LAYERS_AT_ONCE + 2)
    async with trio.open_nursery() as nursery:
        pulls = WholePulls(registry, tmp_path, nursery)  # type: ignore[arg-type]
        pulls.clear()
        for digest in registry.blobs:
            pulls.start("r/x:1", digest)
            pulls.start("r/x:1", digest)  # once only
        for i, digest in enumerate(registry.blobs):
            dest = claim_dest(tmp_path, str(i))
            pulled = await pulls.claim("r/x:1", digest, dest)
            assert pulled.digest == digest and (dest / "etc/hello").read_bytes() == b"hello\n"
    assert registry.streams == len(registry.blobs)  # each blob fetched once
    assert registry.most_in_flight == LAYERS_AT_ONCE
    assert list((tmp_path / whole_pulls.DIR).iterdir()) == []  # every result moved into its snapshot


async def test_a_claim_without_a_pull_ahead_pulls_now(tmp_path: Path) -> None:
    registry = Registry(1)
    (digest,) = registry.blobs
    async with trio.open_nursery() as nursery:
        pulls = WholePulls(registry, tmp_path, nursery)  # type: ignore[arg-type]
        pulls.clear()
        dest = claim_dest(tmp_path, "0")
        await pulls.claim("r/x:1", digest, dest)
    assert (dest / "etc/hello").exists() and registry.streams == 1


async def test_a_transient_failure_ahead_is_retried_by_the_claim_and_a_bad_blob_is_not(tmp_path: Path) -> None:
    registry = Registry(2)
    flaky, bad = registry.blobs
    registry.fail = {flaky: RegistryUnavailable("connection refused"), bad: BadResponse("digest mismatch")}
    async with trio.open_nursery() as nursery:
        pulls = WholePulls(registry, tmp_path, nursery)  # type: ignore[arg-type]
        pulls.clear()
        pulls.start("r/x:1", flaky)
        pulls.start("r/x:1", bad)
        dest = claim_dest(tmp_path, "0")
        await pulls.claim("r/x:1", flaky, dest)
        assert (dest / "etc/hello").exists()
        with pytest.raises(BadResponse, match="digest mismatch"):
            await pulls.claim("r/x:1", bad, claim_dest(tmp_path, "1"))
    assert registry.streams == 3
    assert list((tmp_path / whole_pulls.DIR).iterdir()) == []  # failed pulls leave nothing behind


async def test_an_unclaimed_result_is_deleted_after_its_ttl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry(2)
    first, second = registry.blobs
    async with trio.open_nursery() as nursery:
        pulls = WholePulls(registry, tmp_path, nursery)  # type: ignore[arg-type]
        pulls.clear()
        pulls.start("r/x:1", first)
        while not (pulls._pulls[first].done.is_set()):
            await trio.sleep(0.01)
        monkeypatch.setattr(whole_pulls, "UNCLAIMED_TTL", 0.0)
        pulls.start("r/x:1", second)  # any start looks for expired results
        assert not pulls.started(first)
    assert [p.name.startswith(first[7:23]) for p in (tmp_path / whole_pulls.DIR).iterdir()] == [False]
