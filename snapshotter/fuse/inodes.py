"""Global inode numbers for many layers under one FUSE mount.

The kernel knows one inode space per mount, but every layer numbers its nodes from 1.
Each attached layer gets a range `[base + 1, base + max_ino]`; ranges are handed out in
increasing order and never reused, so an inode number the kernel still holds after a
detach can never come to mean a node of another layer (page cache kept with
`keep_cache` stays correct, and no generation numbers are needed).

A detached layer leaves the namespace at once but stays in the table, *retired*, while
the kernel still holds lookups on its inodes or files and directories of it are open;
the last `forget` or release drops it. No per-inode state is kept: one lookup counter
per layer is enough to know when the kernel has let go of all of it.
"""

from __future__ import annotations

import bisect
import stat
from dataclasses import dataclass, field

import trio

from ..layers.layer import Layer
from ..layers.tree import ROOT_INO, LayerTree, Node

FUSE_ROOT_INO = 1
"""The mount's own root (pyfuse3.ROOT_INODE); layer ranges start above it."""

NAME_MAX = 255


class UnknownInode(LookupError):
    """The kernel named an inode that no attached or retired layer holds."""


@dataclass(eq=False)
class Attachment:
    """One layer as the mount serves it, and the references that keep it alive."""

    name: bytes
    layer: Layer
    tree: LayerTree
    base: int
    span: int
    attached: bool = True
    lookups: int = 0
    """Kernel lookup references on inodes of this layer (lookup and readdirplus add, forget removes)."""
    handles: int = 0
    """Open files and directories of this layer."""
    reading: int = 0
    """`Layer.read` calls in flight."""
    idle: trio.Event = field(default_factory=trio.Event)
    """Set whenever no read is in flight (replaced when one starts)."""
    data_bytes: int = 0
    """Total size of the layer's regular files (for statfs, counted once at attach)."""
    listings: dict[int, list[tuple[bytes, Attachment, Node]]] = field(default_factory=dict)
    """Directory listings by local inode, made on the first opendir: the layer never changes,
    and every walk opens every directory again (the kernel caches no listing for us)."""

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def root_ino(self) -> int:
        return self.base + ROOT_INO

    def global_ino(self, node: Node) -> int:
        return self.base + node.ino

    def listing(self, node: Node) -> list[tuple[bytes, Attachment, Node]]:
        """The directory's entries in name order (stable readdir offsets)."""
        found = self.listings.get(node.ino)
        if found is None:
            found = self.listings[node.ino] = [(name, self, child) for name, child in self.tree.entries(node.ino)]
        return found

    @property
    def referenced(self) -> bool:
        return self.lookups > 0 or self.handles > 0 or self.reading > 0

    def begin_read(self) -> None:
        if self.reading == 0:
            self.idle = trio.Event()
        self.reading += 1

    def end_read(self) -> None:
        self.reading -= 1
        if self.reading == 0:
            self.idle.set()


class InodeTable:
    """Which layer and node each global inode number means."""

    def __init__(self) -> None:
        self._by_name: dict[bytes, Attachment] = {}
        self._bases: list[int] = []  # sorted; attached and retired layers
        self._by_base: dict[int, Attachment] = {}
        self._next_base = FUSE_ROOT_INO

    def attach(self, name: bytes, layer: Layer) -> Attachment:
        _check_name(name)
        if name in self._by_name:
            raise ValueError(f"a layer named {name!r} is already attached")
        tree = layer.tree
        span = tree.max_ino
        data_bytes = sum(n.size for n in tree.nodes.values() if stat.S_ISREG(n.mode))
        att = Attachment(name=name, layer=layer, tree=tree, base=self._next_base, span=span,
                         data_bytes=data_bytes)
        self._next_base += span
        self._by_name[name] = att
        self._bases.append(att.base)  # bases only grow, so the list stays sorted
        self._by_base[att.base] = att
        return att

    def detach(self, name: bytes) -> Attachment:
        """Take a layer out of the namespace; it stays resolvable while referenced."""
        att = self._by_name.pop(name)
        att.attached = False
        self.drop_if_unreferenced(att)
        return att

    def get(self, name: bytes) -> Attachment | None:
        return self._by_name.get(name)

    def attached(self) -> list[Attachment]:
        """Attached layers in name order (the mount root's listing)."""
        return [self._by_name[n] for n in sorted(self._by_name)]

    @property
    def retired(self) -> int:
        """Detached layers the kernel or open handles still hold."""
        return len(self._by_base) - len(self._by_name)

    def resolve(self, ino: int) -> tuple[Attachment, Node]:
        i = bisect.bisect_left(self._bases, ino) - 1
        if ino <= FUSE_ROOT_INO or i < 0:
            raise UnknownInode(ino)
        att = self._by_base[self._bases[i]]
        local = ino - att.base
        node = att.tree.nodes.get(local) if local <= att.span else None
        if node is None:
            raise UnknownInode(ino)
        return att, node

    def forget(self, ino: int, nlookup: int) -> None:
        try:
            att, _ = self.resolve(ino)
        except UnknownInode:
            return
        att.lookups = max(0, att.lookups - nlookup)
        self.drop_if_unreferenced(att)

    def drop_if_unreferenced(self, att: Attachment) -> None:
        if att.attached or att.referenced or att.base not in self._by_base:
            return
        del self._by_base[att.base]
        self._bases.remove(att.base)


def _check_name(name: bytes) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name or len(name) > NAME_MAX:
        raise ValueError(f"{name!r} is not a valid layer directory name")
