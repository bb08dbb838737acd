"""Test support for the FUSE layer: in-memory layers, and a mount served in the test's own loop.

The mount is served by the same trio loop as the test, so every syscall that touches it
must run in a worker thread (`blocking`): a syscall on the trio thread would wait for
an answer that only that thread can give.
"""

from __future__ import annotations

import functools
import subprocess
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from snapshotter.fuse import FuseMount, LayerFilesystem, serve_fuse
from snapshotter.layers.layer import ReadError
from snapshotter.layers.tree import EntryType, LayerEntry, LayerTree, Node, build_tree

T = TypeVar("T")

HANG = object()
"""File content that makes `MemoryLayer.read` never return."""


@dataclass
class Gated:
    """File content served only once `gate` is set (a read held in flight on purpose)."""

    data: bytes
    gate: trio.Event = field(default_factory=trio.Event)
    waiting: trio.Event = field(default_factory=trio.Event)


@dataclass
class MemoryLayer:
    """A `Layer` whose file contents are `bytes` in `Node.content` (or HANG, or an exception to raise)."""

    tree: LayerTree
    reads: list[tuple[int, int, int]] = field(default_factory=list)
    """(local ino, offset, size) of every read, in order."""
    in_flight: int = 0

    async def read(self, node: Node, offset: int, size: int) -> bytes:
        self.reads.append((node.ino, offset, size))
        self.in_flight += 1
        try:
            await trio.lowlevel.checkpoint()
            content = node.content
            if content is HANG:
                await trio.sleep_forever()
            if isinstance(content, BaseException):
                raise content
            if isinstance(content, Gated):
                content.waiting.set()
                await content.gate.wait()
                content = content.data
            assert isinstance(content, bytes)
            return content[offset:offset + size]
        finally:
            self.in_flight -= 1


def reg(path: str, data: bytes | object = b"", **kwargs: Any) -> LayerEntry:
    """A regular file entry whose size is its content's (unless given)."""
    default = len(data) if isinstance(data, bytes) else len(data.data) if isinstance(data, Gated) else 4096
    size = kwargs.pop("size", default)
    return LayerEntry(path, EntryType.REG, size=size, content=data, **kwargs)


def memory_layer(entries: Iterable[LayerEntry]) -> MemoryLayer:
    return MemoryLayer(build_tree(entries))


def failing(message: str = "registry said no") -> ReadError:
    return ReadError(message)


async def blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a syscall that may reach our own FUSE mount, off the trio thread."""
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


@asynccontextmanager
async def serving(mountpoint: Path, fs: LayerFilesystem, **kwargs: Any) -> AsyncIterator[FuseMount]:
    """The mount, live for the block; unmounted on the way out, whatever happens inside."""
    async with trio.open_nursery() as nursery:
        mount: FuseMount = await nursery.start(functools.partial(serve_fuse, mountpoint, fs, **kwargs))
        try:
            yield mount
        finally:
            nursery.cancel_scope.cancel()


def mounted(path: Path) -> bool:
    """Whether `path` is a mount point in this namespace (per /proc/self/mountinfo)."""
    target = str(path.absolute())
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == target:
                return True
    return False


def force_unmount(path: Path) -> None:
    """Last resort for test teardown, should a test have left a mount behind."""
    for _ in range(5):
        if not mounted(path):
            return
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def drop_kernel_caches() -> None:
    """Make the kernel evict unused dentries and inodes, so it sends FORGET for ours."""
    Path("/proc/sys/vm/drop_caches").write_text("2\n")
