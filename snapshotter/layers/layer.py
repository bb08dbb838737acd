"""What the FUSE filesystem needs of a mounted layer: its tree, and a way to read bytes."""

from __future__ import annotations

from typing import Protocol

from .tree import LayerTree, Node


class ReadError(Exception):
    """A file's bytes could not be served (registry down, digest mismatch, ...): the reader gets EIO."""


class Layer(Protocol):
    """A layer whose tree is known and whose file contents are read on demand.

    A layer may also set `direct_io = True`: FUSE then bypasses its own page cache for it.
    """

    @property
    def tree(self) -> LayerTree: ...

    async def read(self, node: Node, offset: int, size: int) -> bytes | memoryview:
        """Up to `size` bytes of regular file `node` from `offset` (short only at EOF).

        A memoryview lets a layer answer from a unit it holds without copying (the data
        plane's `MappedDevice`); the mount hands either to the kernel as it is.
        Raises ReadError when the bytes cannot be had; never returns unverified data.
        """
        ...


class Blob(Protocol):
    """A layer blob in a registry, read by byte range (the registry client provides it)."""

    @property
    def digest(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def fetched_bytes(self) -> int:
        """Bytes read from the registry so far (for `lazysnap status`)."""
        ...

    async def read(self, start: int, end: int) -> bytes:
        """Exactly the bytes [start, end); raises on any failure (never short, never unverifiable garbage)."""
        ...


class UnitSource(Protocol):
    """Where a layer gets a unit it misses when it does not fetch for itself.

    In the data plane this asks the control plane (`dataplane/server.py`), which fetches,
    verifies and caches the unit. The layer verifies what it is given once more:
    nothing reaches a reader unchecked, whoever fetched it.
    """

    async def fetch(self, layer: str, key: str) -> bytes:
        """The unit's bytes as the chunk cache keeps them; ReadError when they cannot be had."""
        ...
