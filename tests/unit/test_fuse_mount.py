"""Mount lifecycle: stale mounts left by a killed daemon, unmounts from outside."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from snapshotter.fuse import LayerFilesystem, clear_stale_mount, serve_fuse
from tests.unit.fuse_layers import blocking, memory_layer, mounted, reg, serving

pytestmark = [
    pytest.mark.usefixtures("needs_fuse"),
    pytest.mark.timeout(120),
]

REPO = Path(__file__).resolve().parents[2]
DAEMON = """
import sys, trio
from snapshotter.fuse import LayerFilesystem, serve_fuse
async def main():
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_fuse, sys.argv[1], LayerFilesystem())
        print("ready", flush=True)
trio.run(main)
"""


def crash_a_daemon(mountpoint: Path) -> None:
    """Leave a dead FUSE mount behind, as a daemon killed with SIGKILL does."""
    proc = subprocess.Popen([sys.executable, "-c", DAEMON, str(mountpoint)], cwd=REPO, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        assert mounted(mountpoint)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


async def test_clear_stale_mount(mnt: Path) -> None:
    assert await clear_stale_mount(mnt) is False  # a plain directory
    assert await clear_stale_mount(mnt / "missing") is False
    await blocking(crash_a_daemon, mnt)
    with pytest.raises(OSError) as e:
        os.statvfs(mnt)  # no daemon to wait for: answered by the kernel at once
    assert e.value.errno == errno.ENOTCONN
    assert await clear_stale_mount(mnt) is True
    assert not mounted(mnt) and os.listdir(mnt) == []


async def test_serve_over_a_stale_mount(mnt: Path) -> None:
    await blocking(crash_a_daemon, mnt)
    fs = LayerFilesystem()
    fs.attach("l", memory_layer([reg("f", b"served again")]))
    async with serving(mnt, fs):
        assert await blocking((mnt / "l/f").read_bytes) == b"served again"
    assert not mounted(mnt)


async def test_clear_leaves_a_live_mount_alone(mnt: Path) -> None:
    async with serving(mnt, LayerFilesystem()):
        assert await clear_stale_mount(mnt) is False  # the probe runs in a thread: our loop answers it
        assert mounted(mnt)


async def test_serving_ends_when_unmounted_from_outside(mnt: Path) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_fuse, mnt, LayerFilesystem())
            await trio.run_process(["fusermount3", "-u", str(mnt)])
        # serve_fuse returned by itself, and the nursery closed
    assert not mounted(mnt)
