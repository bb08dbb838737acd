"""Kernel overlayfs over FUSE layer directories, composed as the snapshotter composes them."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from snapshotter.fuse import LayerFilesystem
from snapshotter.layers.tree import EntryType, LayerEntry
from snapshotter.mounts import compose, overlay_index_off
from snapshotter.store import Kind
from tests.harness.procs import unmount_below
from tests.unit.fuse_layers import blocking, drop_kernel_caches, memory_layer, mounted, reg, serving

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

D = EntryType.DIR
BUSYBOX = Path("/bin/busybox")


def lower_entries() -> list[LayerEntry]:
    return [
        LayerEntry("bin", D, mode=0o755),
        reg("bin/busybox", BUSYBOX.read_bytes(), mode=0o755),
        reg("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        reg("etc/group", b"root:x:0:\n"),
        reg("opt/old", b"old\n"),
        reg("opt/sub/deeper", b"deeper\n"),
        reg("keep/file", b"kept\n"),
    ]


def upper_entries() -> list[LayerEntry]:
    return [
        LayerEntry("etc/.wh.passwd", EntryType.REG),
        reg("etc/motd", b"hello from upper\n"),
        LayerEntry("opt", D, mode=0o755),
        LayerEntry("opt/.wh..wh..opq", EntryType.REG),
        reg("opt/new", b"new\n"),
    ]


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    try:
        yield tmp_path
    finally:
        unmount_below(tmp_path)


async def overlay(fuse: Path, work: Path) -> Path:
    """Mount an active snapshot whose parents are the `upper` then `lower` layer directories."""
    target, upperdir, workdir = work / "rootfs", work / "fs", work / "work"
    for d in (target, upperdir, workdir):
        d.mkdir()
    (m,) = compose(Kind.ACTIVE, upperdir, workdir, [fuse / "upper", fuse / "lower"], index_off=overlay_index_off())
    assert m.type == "overlay"
    # mount(8) stats the lowerdirs through our FUSE mount: a process, so the loop stays free to answer.
    await trio.run_process(["mount", "-t", "overlay", "overlay", "-o", ",".join(m.options), str(target)])
    return target


async def test_overlay_over_fuse_layers(work: Path) -> None:
    fuse = work / "fuse"
    fuse.mkdir()
    fs = LayerFilesystem(root_timeout=0.2)
    fs.attach("lower", memory_layer(lower_entries()))
    fs.attach("upper", memory_layer(upper_entries()))
    async with serving(fuse, fs):
        root = await overlay(fuse, work)
        try:
            assert sorted(await blocking(os.listdir, root / "etc")) == ["group", "motd"]
            with pytest.raises(FileNotFoundError):  # whited out by the upper layer
                await blocking(os.stat, root / "etc/passwd")
            assert await blocking(os.listdir, root / "opt") == ["new"]  # opaque: lower content hidden
            with pytest.raises(FileNotFoundError):
                await blocking(os.stat, root / "opt/sub")
            assert await blocking((root / "etc/motd").read_bytes) == b"hello from upper\n"
            assert await blocking((root / "keep/file").read_bytes) == b"kept\n"

            # A container's view: exec a binary served lazily through FUSE, under the overlay.
            done = await trio.run_process(
                ["chroot", str(root), "/bin/busybox", "sh", "-c", "busybox cat /etc/group /etc/motd; busybox ls /opt"],
                capture_stdout=True)
            assert done.stdout == b"root:x:0:\nhello from upper\nnew\n"

            # Writes copy a FUSE file up into the snapshot's own directory; the layer is untouched.
            await blocking((root / "etc/group").write_bytes, b"root:x:0:\nstaff:x:50:\n")
            assert (work / "fs/etc/group").read_bytes() == b"root:x:0:\nstaff:x:50:\n"
            assert await blocking((fuse / "lower/etc/group").read_bytes) == b"root:x:0:\n"
            with pytest.raises(OSError) as e:
                await blocking((fuse / "lower/etc/group").write_bytes, b"x")
            assert e.value.errno == errno.EROFS

            # Other layers come and go under the same FUSE mount; the overlay keeps working,
            # even when the kernel has dropped its caches and must ask FUSE again.
            for i in range(3):
                fs.attach(f"other{i}", memory_layer([reg("f", f"other {i}".encode())]))
                assert await blocking((fuse / f"other{i}/f").read_bytes) == f"other {i}".encode()
                await fs.detach(f"other{i}")
                await blocking(drop_kernel_caches)
                assert await blocking((root / "keep/file").read_bytes) == b"kept\n"
                assert sorted(await blocking(os.listdir, root / "etc")) == ["group", "motd"]
                assert await blocking((root / "bin/busybox").read_bytes) == BUSYBOX.read_bytes()
            assert fs.layers() == ["lower", "upper"]
        finally:
            await trio.run_process(["umount", str(root)], check=False)
    assert not mounted(fuse)
    shutil.rmtree(work / "fs")
