"""A layer's file tree, as the kernel will see it through FUSE.

Index formats (eStargz TOCs, SOCI zTOCs) describe a layer as a list of tar members;
`build_tree` turns such a list into an inode table in the form overlayfs expects of
a lower layer: whiteout files `.wh.<name>` become 0/0 character devices named
`<name>`, an opaque marker `.wh..wh..opq` becomes the `trusted.overlay.opaque=y`
xattr on its directory, hardlinks share one inode, and directories the index left out
are made up. Pure data: no I/O.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Iterable, Iterator
from typing import Any

import msgspec

from ..formats.entries import EntryType, LayerEntry, gc_paused
from ..formats.errors import FormatError

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = b"trusted.overlay.opaque"

ROOT_INO = 1


_FORMAT_BITS = {
    EntryType.DIR: stat.S_IFDIR,
    EntryType.REG: stat.S_IFREG,
    EntryType.SYMLINK: stat.S_IFLNK,
    EntryType.CHAR: stat.S_IFCHR,
    EntryType.BLOCK: stat.S_IFBLK,
    EntryType.FIFO: stat.S_IFIFO,
}

# Enum members as module constants: `EntryType.REG` is a slow class-attribute lookup on 3.11,
# and the tree builder compares types 30,000 times for a node_modules layer.
_DIR, _REG, _SYMLINK, _HARDLINK = EntryType.DIR, EntryType.REG, EntryType.SYMLINK, EntryType.HARDLINK
_CHAR, _BLOCK = EntryType.CHAR, EntryType.BLOCK


class TreeError(FormatError):
    """The index describes an impossible tree (e.g. a hardlink to nothing): a broken index,
    so the layer is pulled whole (at mount) or the read fails (at restore), like any FormatError."""


class Node(msgspec.Struct, gc=False):
    """One inode of the layer. `ino` is local to the layer (the root is 1).

    A msgspec struct for the same reasons as `LayerEntry`: built in C, and never visited
    by the collector (children are named by inode number, so no node refers to another).
    """

    ino: int
    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    rdev: int = 0
    nlink: int = 1
    target: bytes = b""
    xattrs: dict[bytes, bytes] = {}
    children: dict[bytes, int] | None = None
    parent: int = ROOT_INO
    content: Any = None

    @property
    def is_dir(self) -> bool:
        return self.children is not None


class LayerTree:
    """The inode table of one layer."""

    def __init__(self) -> None:
        root = Node(ROOT_INO, stat.S_IFDIR | 0o755, children={}, nlink=2)
        self.nodes: dict[int, Node] = {ROOT_INO: root}

    @property
    def root(self) -> Node:
        return self.nodes[ROOT_INO]

    def node(self, ino: int) -> Node:
        return self.nodes[ino]

    def lookup(self, parent: int, name: bytes) -> Node | None:
        children = self.nodes[parent].children
        if children is None or name not in children:
            return None
        return self.nodes[children[name]]

    def resolve(self, path: str) -> Node | None:
        """The node at a slash-separated path relative to the layer root, or None."""
        node = self.root
        for part in _parts(path):
            try:
                name = part.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                return None  # no name in the tree is a lone surrogate (`_encode` refuses them)
            found = self.lookup(node.ino, name)
            if found is None:
                return None
            node = found
        return node

    def entries(self, ino: int) -> Iterator[tuple[bytes, Node]]:
        """A directory's children in name order (stable readdir offsets)."""
        children = self.nodes[ino].children or {}
        for name in sorted(children):
            yield name, self.nodes[children[name]]

    @property
    def max_ino(self) -> int:
        return max(self.nodes)

    @property
    def has_xattrs(self) -> bool:
        """Whether any inode has an extended attribute (an opaque directory's marker included)."""
        return any(node.xattrs for node in self.nodes.values())


@gc_paused()
def build_tree(entries: Iterable[LayerEntry]) -> LayerTree:
    """Apply tar members in order, as `tar -x` followed by containerd's overlay conversion would."""
    tree = LayerTree()
    builder = _Builder(tree)
    for entry in entries:
        builder.add(entry)
    builder.finish()
    return tree


class _Builder:
    def __init__(self, tree: LayerTree) -> None:
        self.tree = tree
        self.next_ino = ROOT_INO + 1
        self.hardlinks: list[tuple[str, LayerEntry]] = []
        self.dirs: dict[str, Node] = {"": tree.root}
        """Directories by path, so each entry's parent is one lookup, not a walk from the root."""

    def add(self, entry: LayerEntry) -> None:
        if "\x00" in entry.path:
            raise TreeError(f"{entry.path!r}: a name holding a NUL byte")
        parts = _parts(entry.path)
        if not parts:
            if entry.type is _DIR:
                self._set_attrs(self.tree.root, entry)
            return
        name = parts[-1]
        parent = self._parent_dir(parts)
        if name == OPAQUE_MARKER:
            parent.xattrs[OPAQUE_XATTR] = b"y"
            return
        if name.startswith(WHITEOUT_PREFIX):
            if name[len(WHITEOUT_PREFIX):] in ("", ".", ".."):
                raise TreeError(f"{entry.path!r}: a whiteout of no name, of '.' or of '..'")
            whiteout = LayerEntry(entry.path, EntryType.CHAR, mode=0, uid=entry.uid, gid=entry.gid,
                                  mtime_ns=entry.mtime_ns)
            self._place(parent, _encode(name[len(WHITEOUT_PREFIX):], entry.path), whiteout)
            return
        if entry.type is _HARDLINK:
            self.hardlinks.append(("/".join(parts), entry))
            return
        node = self._place(parent, _encode(name, entry.path), entry)
        if entry.type is _DIR:  # its children need no walk from the root to find it (2,400 of them in many-files)
            self.dirs["/".join(parts)] = node

    def finish(self) -> None:
        """Hardlinks last: a link may come before its target in some indexes.

        The link's own owner, mode, mtime and xattrs end up on the shared inode, as
        containerd's applier leaves them (it chowns, chmods and sets xattrs through the
        new name), so a lazily served layer matches an unpacked one.
        """
        for path, entry in self.hardlinks:
            node = self.tree.resolve(entry.link_name)
            if node is None or node.is_dir:
                raise TreeError(f"hardlink {path!r} points to {entry.link_name!r}, which is not a file in the layer")
            parts = _parts(path)
            name = parts[-1]
            parent = self._parent_dir(parts)
            link = _encode(name, path)
            xattrs = _xattr_names(entry.xattrs, path)
            self._unlink(parent, link)
            if self.tree.resolve(entry.link_name) is not node:  # "a" -> "a", "d" -> "d/f", "f/x" -> "f"
                raise TreeError(f"hardlink {path!r} replaces its own target {entry.link_name!r}")
            assert parent.children is not None
            parent.children[link] = node.ino
            node.nlink += 1
            node.mode = (node.mode & ~0o7777) | (entry.mode & 0o7777)
            node.uid, node.gid, node.mtime_ns = entry.uid, entry.gid, entry.mtime_ns
            node.xattrs.update(xattrs)

    def _place(self, parent: Node, name: bytes, entry: LayerEntry) -> Node:
        """The node that `entry` makes (or, for a repeated directory, updates) at `name`."""
        assert parent.children is not None
        if name in parent.children:
            existing = self.tree.nodes[parent.children[name]]
            if existing.is_dir and entry.type is _DIR:
                self._set_attrs(existing, entry)  # a repeated directory entry updates, keeps children
                return existing
            self._unlink(parent, name)
        ino = self.next_ino
        self.next_ino += 1
        if entry.type is _REG and not entry.xattrs:  # most entries: one constructor call
            node = Node(ino, stat.S_IFREG | (entry.mode & 0o7777), entry.uid, entry.gid, entry.size, entry.mtime_ns,
                        parent=parent.ino, content=entry.content)
        else:
            node = Node(ino, 0, parent=parent.ino)
            if entry.type is _DIR:
                node.children = {}
                node.nlink = 2
                parent.nlink += 1
            self._set_attrs(node, entry)
        self.tree.nodes[ino] = node
        parent.children[name] = ino
        return node

    def _set_attrs(self, node: Node, entry: LayerEntry) -> None:
        etype = entry.type
        node.mode = _FORMAT_BITS[etype] | (entry.mode & 0o7777)
        node.uid, node.gid, node.mtime_ns = entry.uid, entry.gid, entry.mtime_ns
        if entry.xattrs or node.xattrs:
            opaque = node.xattrs.get(OPAQUE_XATTR)
            node.xattrs = _xattr_names(entry.xattrs, entry.path)
            if opaque is not None:
                node.xattrs[OPAQUE_XATTR] = opaque
        if etype is _REG:
            node.size = entry.size
            node.content = entry.content
        elif etype is _SYMLINK:
            if "\x00" in entry.link_name:
                raise TreeError(f"symlink {entry.path!r}: a target holding a NUL byte")
            node.target = _encode(entry.link_name, entry.path)
            node.size = len(node.target)
        elif etype is _CHAR or etype is _BLOCK:
            try:
                node.rdev = os.makedev(entry.dev_major, entry.dev_minor)
            except (OverflowError, ValueError):
                raise TreeError(f"device {entry.path!r}: numbers {entry.dev_major}:{entry.dev_minor} "
                                "do not fit a dev_t") from None

    def _parent_dir(self, parts: list[str]) -> Node:
        """The directory holding path `parts`, made (with its ancestors) if missing."""
        key = "/".join(parts[:-1])
        node = self.dirs.get(key)
        # Inode numbers are never reused, so a cached directory that is still in the table
        # is still at its path (tar members never move a directory, only replace it).
        if node is None or self.tree.nodes.get(node.ino) is not node or node.children is None:
            node = self.dirs[key] = self._ensure_dirs(parts[:-1])
        return node

    def _ensure_dirs(self, dirs: list[str]) -> Node:
        node = self.tree.root
        for part in dirs:
            name = _encode(part, "/".join(dirs))
            child = self.tree.lookup(node.ino, name)
            if child is None or not child.is_dir:
                self._place(node, name, LayerEntry(part, EntryType.DIR, mode=0o755))
                child = self.tree.lookup(node.ino, name)
                assert child is not None
            node = child
        return node

    def _unlink(self, parent: Node, name: bytes) -> None:
        """Drop `name` from `parent`, as tar does before extracting over an existing path."""
        assert parent.children is not None
        ino = parent.children.pop(name, None)
        if ino is None:
            return
        doomed = [(parent, ino)]  # a stack, not recursion: an index can nest directories 100,000 deep
        while doomed:
            above, ino = doomed.pop()
            old = self.tree.nodes[ino]
            if old.children is not None:
                above.nlink -= 1
                doomed.extend((old, child) for child in old.children.values())
                old.children.clear()
                del self.tree.nodes[ino]
                continue
            old.nlink -= 1
            if old.nlink == 0:
                del self.tree.nodes[ino]


def _encode(text: str, path: str) -> bytes:
    """A name or symlink target as the bytes the kernel is served. The formats decode bytes
    that are not UTF-8 as surrogate escapes (`formats.tar.decode_text`), so they come back
    as they were; a lone surrogate (only a JSON index can hold one) has no bytes at all."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise TreeError(f"{path!r}: {text!r} is not text a file system can hold (a lone surrogate)") from None


def _xattr_names(xattrs: dict[str, bytes], path: str) -> dict[bytes, bytes]:
    out = {}
    for key, value in xattrs.items():
        if not key or "\x00" in key:
            raise TreeError(f"{path!r}: invalid xattr name {key!r}")
        out[_encode(key, path)] = value
    return out


def _parts(path: str) -> list[str]:
    """Path components of a tar member name: `./a/b/`, `/a/b` and `a//b` are all a/b."""
    parts = path.split("/")
    if "" not in parts and "." not in parts and ".." not in parts:
        return parts  # already clean, as the index formats hand most paths over
    clean = posixpath.normpath("/" + path).lstrip("/")
    return [p for p in clean.split("/") if p]
