"""`whole/pull.py`: a layer blob streamed, decompressed (gzip, zstd, none) and applied as it arrives."""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import zstandard

from snapshotter.formats.errors import FormatError
from snapshotter.registry.errors import BadResponse
from snapshotter.whole.pull import CONNECTIONS, SEGMENT, pull_layer


def layer_tar() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("etc/hello", b"hello\n"), ("big.bin", bytes(range(256)) * 8192)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o640
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@dataclass
class Location:
    digest: str
    size: int

    @property
    def what(self) -> str:
        return f"blob {self.digest}"


class StreamingRegistry:
    """`open_blob` and `stream_blob` as the real client gives them: chunks, then the digest check."""

    def __init__(self, blob: bytes, lie: bool = False) -> None:
        self.blob, self.lie = blob, lie
        self.digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        self.in_flight = self.most_in_flight = 0
        self.ranges: list[tuple[int, int]] = []

    async def read_range(self, location: Location, start: int, end: int) -> bytes:
        self.ranges.append((start, end))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await trio.sleep(0.01 if start else 0.05)  # the first segment comes last: order must still hold
        finally:
            self.in_flight -= 1
        data = self.blob[start:end]
        return data[:-1] + bytes([data[-1] ^ 1]) if self.lie and start == 0 else data

    async def open_blob(self, ref: str, digest: str) -> Location:
        return Location(digest, len(self.blob))

    async def stream_blob(self, location: Location, chunk_size: int | None = None) -> AsyncIterator[bytes]:
        for i in range(0, len(self.blob), 7000):  # odd chunk boundaries
            await trio.lowlevel.checkpoint()
            yield self.blob[i:i + 7000]
        if self.lie:
            raise BadResponse(f"blob {location.digest}: digest mismatch")


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
async def test_each_compression_is_applied(tmp_path: Path, compression: str) -> None:
    raw = layer_tar()
    blob = {"gzip": gzip.compress, "zstd": zstandard.ZstdCompressor().compress, "none": bytes}[compression](raw)
    registry = StreamingRegistry(blob)
    dest = tmp_path / "fs"
    dest.mkdir()
    pulled = await pull_layer(registry, "r/x:1", registry.digest, dest)  # type: ignore[arg-type]
    assert pulled.compression == compression and pulled.compressed_bytes == len(blob)
    assert (dest / "etc/hello").read_bytes() == b"hello\n"
    assert (dest / "big.bin").read_bytes() == bytes(range(256)) * 8192
    assert (dest / "big.bin").stat().st_mode & 0o777 == 0o640


async def test_a_digest_mismatch_is_the_registry_error_not_a_group(tmp_path: Path) -> None:
    registry = StreamingRegistry(gzip.compress(layer_tar()), lie=True)
    dest = tmp_path / "fs"
    dest.mkdir()
    with pytest.raises(BadResponse, match="digest mismatch"):
        await pull_layer(registry, "r/x:1", registry.digest, dest)  # type: ignore[arg-type]


@pytest.mark.parametrize("blob", [b"\x1f\x8b" + b"\0" * 100, zstandard.ZstdCompressor().compress(layer_tar())[:-20],
                                  gzip.compress(layer_tar())[:-100], b"not a tar at all" * 100])
async def test_garbage_is_a_format_error(tmp_path: Path, blob: bytes) -> None:
    registry = StreamingRegistry(blob)
    dest = tmp_path / "fs"
    dest.mkdir()
    with trio.fail_after(10), pytest.raises(FormatError):
        await pull_layer(registry, "r/x:1", registry.digest, dest)  # type: ignore[arg-type]


def big_layer_tar() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = random.Random(3).randbytes(SEGMENT * 3 + 12345)
        info = tarfile.TarInfo("data/random.bin")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


async def test_a_big_blob_comes_as_parallel_ranges_in_order(tmp_path: Path) -> None:
    raw = big_layer_tar()
    registry = StreamingRegistry(gzip.compress(raw, compresslevel=1))
    dest = tmp_path / "fs"
    dest.mkdir()
    pulled = await pull_layer(registry, "r/x:1", registry.digest, dest)  # type: ignore[arg-type]
    assert pulled.compressed_bytes == len(registry.blob)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        member = tar.extractfile("data/random.bin")
        assert member is not None
        assert (dest / "data/random.bin").read_bytes() == member.read()
    assert len(registry.ranges) == -(-len(registry.blob) // SEGMENT)
    assert 1 < registry.most_in_flight <= CONNECTIONS


async def test_a_segment_that_does_not_match_the_digest_fails_the_pull(tmp_path: Path) -> None:
    registry = StreamingRegistry(gzip.compress(big_layer_tar(), compresslevel=1), lie=True)
    dest = tmp_path / "fs"
    dest.mkdir()
    with pytest.raises((BadResponse, FormatError)):
        await pull_layer(registry, "r/x:1", registry.digest, dest)  # type: ignore[arg-type]
