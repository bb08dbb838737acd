"""Per-operation FUSE request counters, through a real mount, and how `lazysnap status` prints them."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.api.lazysnap.v1 import status_pb2
from snapshotter.cli import format_fuse
from snapshotter.fuse import FuseStats, LayerFilesystem
from tests.unit.fuse_layers import blocking, failing, force_unmount, memory_layer, reg, serving

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    try:
        yield path
    finally:
        force_unmount(path)


def test_record_and_report() -> None:
    stats = FuseStats()
    stats.record("lookup", 0.25)
    stats.record("lookup", 0.5)
    stats.record("read", 1.0)
    stats.read_bytes = 10
    assert stats.count("lookup") == 2 and stats.count("read") == 1 and stats.count("open") == 0
    assert stats.report() == {
        "ops": [{"name": "lookup", "count": 2, "seconds": 0.75}, {"name": "read", "count": 1, "seconds": 1.0}],
        "read_bytes": 10, "read_errors": 0,
    }
    reply = status_pb2.Fuse(**stats.report())  # type: ignore[arg-type]
    assert [(op.name, op.count) for op in reply.ops] == [("lookup", 2), ("read", 1)]


def test_format_fuse() -> None:
    text = format_fuse(status_pb2.Fuse(ops=[status_pb2.FuseOp(name="readdir", count=4, seconds=0.002)],
                                       read_bytes=3 * 1024 * 1024, read_errors=1))
    header, row, total = text.splitlines()
    assert header.split() == ["FUSE", "OP", "REQUESTS", "SECONDS", "US/REQ"]
    assert row.split() == ["readdir", "4", "0.002", "500"]
    assert "1 read errors" in total


@pytest.mark.usefixtures("needs_fuse")
async def test_requests_counted_by_operation(mnt: Path) -> None:
    fs = LayerFilesystem()
    fs.attach("layer", memory_layer([reg(f"d/f{i}", b"data") for i in range(50)] + [reg("bad", failing(), size=10)]))
    async with serving(mnt, fs):
        names = await blocking(os.listdir, mnt / "layer" / "d")
        data = await blocking((mnt / "layer" / "d" / "f7").read_bytes)
        with pytest.raises(OSError) as caught:
            await blocking((mnt / "layer" / "bad").read_bytes)
    assert len(names) == 50 and data == b"data" and caught.value.errno == errno.EIO
    for op in ("lookup", "opendir", "readdir", "releasedir", "open", "read", "release"):
        assert fs.stats.count(op) >= 1, op
    assert fs.stats.read_bytes == 4 and fs.stats.read_errors >= 1
    assert all(c.seconds >= 0 for c in fs.stats.ops.values())
