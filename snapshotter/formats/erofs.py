"""EROFS metadata images: a layer's tree in the kernel's own read-only filesystem format.

Why: through FUSE, every lookup, getattr and getxattr of a file is a round trip to the
daemon, and overlayfs sends them one at a time during a path walk (a `du` of 30,000 files
through a container's overlay sent 37,000 getxattr requests). An EROFS image that holds
only the metadata (inodes, directories, symlinks, xattrs) lets the kernel answer all of
those itself, from its page cache. Regular files' bytes stay remote: the image says they
live on a second device, one flat "data device" file that the daemon serves through FUSE,
each file at a block-aligned offset chosen here (`Image.extents`).

Layout facts from the kernel's fs/erofs/erofs_fs.h: superblock at byte 1024, 4 KiB blocks,
64-byte "extended" inodes addressed by nid = byte offset / 32, directories as blocks of
name-sorted 12-byte dirents followed by their names, inline xattrs after the inode, and
chunk-based files whose 8-byte chunk indexes name a device and a block on it.
Pure: bytes out, no I/O.
"""

from __future__ import annotations

import os
import stat
import struct
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from .errors import FormatError

BLOCK_SIZE = 4096
_BLOCK_BITS = 12
MAGIC = 0xE0F5E1E2
SUPER_OFFSET = 1024
DATA_DEVICE = 1
"""The device id of the data device in chunk indexes (0 is the image itself)."""

_SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB23x")
_DEVICE_SLOT = struct.Struct("<64sII56x")
_DEVICE_TABLE_SLOT = (SUPER_OFFSET + _SUPER.size) // _DEVICE_SLOT.size
_INODE = struct.Struct("<HHHHQIIIIQII16x")
_DIRENT = struct.Struct("<QHBx")
_CHUNK_INDEX = struct.Struct("<HHI")
_XATTR_HEADER = struct.Struct("<IB7x")
_XATTR_ENTRY = struct.Struct("<BBH")
_FIRST_INODE = SUPER_OFFSET + _SUPER.size + _DEVICE_SLOT.size
_SLOT_BITS = 5  # nid = offset >> 5

_FLAT_PLAIN, _FLAT_INLINE, _CHUNK_BASED = 0, 2, 4
_CHUNK_FORMAT_INDEXES = 0x20
_INCOMPAT_CHUNKED_FILE = 0x4
_INCOMPAT_DEVICE_TABLE = 0x8
_MAX_NAME = 255

_FILE_TYPES = {stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFCHR: 3, stat.S_IFBLK: 4, stat.S_IFIFO: 5,
               stat.S_IFSOCK: 6, stat.S_IFLNK: 7}
_XATTR_PREFIXES = ((b"user.", 1), (b"trusted.", 4), (b"security.", 6))
_XATTR_FULL_NAMES = {b"system.posix_acl_access": 2, b"system.posix_acl_default": 3}


class Inode(Protocol):
    """What the writer needs of an inode (`layers.tree.Node` has it)."""

    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    rdev: int
    nlink: int
    target: bytes
    xattrs: dict[bytes, bytes]
    children: dict[bytes, int] | None


class Extent(NamedTuple):
    """Where a regular file's bytes sit on the data device (a tuple: 30,000 are made per layer)."""

    offset: int
    ino: int
    size: int


@dataclass(frozen=True)
class Image:
    meta: bytes
    """The EROFS image: superblock, device table, inodes, directories, symlinks."""
    data_size: int
    """Size of the data device in bytes (whole blocks)."""
    extents: list[Extent]
    """Every non-empty regular file, by ascending data-device offset."""


@dataclass(slots=True)
class _Slot:
    """One inode's place and shape in the image."""

    ino: int
    layout: int
    xattrs: bytes
    size: int
    file_type: int
    tail: int = 0
    """Bytes of data stored inline right after the inode (FLAT_INLINE)."""
    nid: int = 0
    blkaddr: int = 0
    """First block of the data kept outside the inode area (directories, long symlinks)."""
    data_offset: int = -1
    """Regular files: byte offset on the data device."""
    dir_blocks: list[list[tuple[bytes, int]]] | None = None


def build(nodes: Mapping[int, Inode], root: int, *, build_time: int = 0) -> Image:
    """The image of the tree under `nodes[root]`; FormatError if EROFS cannot express it."""
    slots = _shape(nodes, root)
    pos = _place_inodes(slots)
    next_block = _blocks(pos)
    for slot in slots.values():
        external = slot.size - slot.tail if slot.layout in (_FLAT_PLAIN, _FLAT_INLINE) else 0
        if external:
            slot.blkaddr = next_block
            next_block += _blocks(external)
    data_size, extents = _place_data(slots)
    meta = bytearray(next_block * BLOCK_SIZE)
    _SUPER.pack_into(meta, SUPER_OFFSET, MAGIC, 0, 0, _BLOCK_BITS, 0, slots[root].nid, len(slots), build_time, 0,
                     next_block, 0, 0, bytes(16), b"lazysnap", _INCOMPAT_CHUNKED_FILE | _INCOMPAT_DEVICE_TABLE, 0,
                     1, _DEVICE_TABLE_SLOT, 0, 0, 0, 0, 0)
    _DEVICE_SLOT.pack_into(meta, _DEVICE_TABLE_SLOT * _DEVICE_SLOT.size, b"", data_size // BLOCK_SIZE, 0)
    for slot in slots.values():
        _write_inode(meta, nodes[slot.ino], slot, slots)
    return Image(bytes(meta), data_size, extents)


def _shape(nodes: Mapping[int, Inode], root: int) -> dict[int, _Slot]:
    """Every reachable inode, breadth first from the root (so the root gets a small nid)."""
    if nodes[root].children is None:
        raise FormatError("the root of an EROFS image must be a directory")
    slots: dict[int, _Slot] = {}
    queue = deque([(root, root)])
    while queue:
        ino, parent = queue.popleft()
        if ino in slots:
            continue  # a hardlink: one inode, many names
        node = nodes[ino]
        slot = slots[ino] = _slot(ino, node)
        if node.children is not None:
            for name, child in node.children.items():
                if not 0 < len(name) <= _MAX_NAME or b"/" in name or b"\0" in name:
                    raise FormatError(f"file name {name!r} cannot be stored in EROFS")
                queue.append((child, ino))
            slot.dir_blocks = _pack_dir(node.children, ino, parent)
            slot.size = _dir_size(slot.dir_blocks)
            _choose_inline(slot)
    return slots


def _slot(ino: int, node: Inode) -> _Slot:
    fmt = stat.S_IFMT(node.mode)
    if fmt not in _FILE_TYPES:
        raise FormatError(f"inode {ino} has file type {fmt:o}, which EROFS cannot store")
    xattrs = _xattr_body(node.xattrs)
    if fmt == stat.S_IFREG:
        return _Slot(ino, _CHUNK_BASED if node.size else _FLAT_PLAIN, xattrs, node.size, _FILE_TYPES[fmt])
    slot = _Slot(ino, _FLAT_PLAIN, xattrs, 0, _FILE_TYPES[fmt])
    if fmt == stat.S_IFLNK:
        slot.size = len(node.target)
        _choose_inline(slot)
    return slot


def _choose_inline(slot: _Slot) -> None:
    """Keep the last partial block in the inode's own block when it fits: no block of its own."""
    tail = slot.size % BLOCK_SIZE
    if tail and _INODE.size + len(slot.xattrs) + tail <= BLOCK_SIZE:
        slot.layout, slot.tail = _FLAT_INLINE, tail
    else:
        slot.layout, slot.tail = _FLAT_PLAIN, 0


def _xattr_body(xattrs: dict[bytes, bytes]) -> bytes:
    """Inline xattrs: a 12-byte header, then 4-byte-aligned entries of (short name, value)."""
    if not xattrs:
        return b""
    body = bytearray(_XATTR_HEADER.pack(0, 0))
    for name, value in sorted(xattrs.items()):
        index, suffix = _xattr_name(name)
        if len(suffix) > 255 or len(value) > 0xFFFF:
            raise FormatError(f"xattr {name!r} is too long for EROFS")
        body += _XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
        body += bytes(-len(body) % 4)
    if _INODE.size + len(body) > BLOCK_SIZE:
        raise FormatError(f"{len(body)} bytes of xattrs do not fit in one EROFS inode block")
    return bytes(body)


def _xattr_name(name: bytes) -> tuple[int, bytes]:
    if name in _XATTR_FULL_NAMES:
        return _XATTR_FULL_NAMES[name], b""
    for prefix, index in _XATTR_PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            return index, name[len(prefix):]
    raise FormatError(f"xattr {name!r} has a namespace EROFS cannot store")


def _pack_dir(children: dict[bytes, int], ino: int, parent: int) -> list[list[tuple[bytes, int]]]:
    """Name-sorted entries (with `.` and `..`) cut into blocks; a name never straddles two."""
    entries = sorted([(b".", ino), (b"..", parent), *children.items()])
    blocks: list[list[tuple[bytes, int]]] = [[]]
    used = 0
    for name, child in entries:
        need = _DIRENT.size + len(name)
        if used + need > BLOCK_SIZE:
            blocks.append([])
            used = 0
        blocks[-1].append((name, child))
        used += need
    return blocks


def _dir_size(blocks: list[list[tuple[bytes, int]]]) -> int:
    last = sum(_DIRENT.size + len(name) for name, _ in blocks[-1])
    return (len(blocks) - 1) * BLOCK_SIZE + last


def _record_size(slot: _Slot) -> int:
    size = _INODE.size + len(slot.xattrs)
    if slot.layout == _CHUNK_BASED:
        return _align(size, _CHUNK_INDEX.size) + _CHUNK_INDEX.size
    return size + slot.tail


def _place_inodes(slots: dict[int, _Slot]) -> int:
    """Give each inode its nid; a record never straddles a block (inline data must not).

    Returns the end of the inode area.
    """
    pos = _FIRST_INODE
    for slot in slots.values():
        size = _record_size(slot)
        if pos // BLOCK_SIZE != (pos + size - 1) // BLOCK_SIZE:
            pos = _align(pos, BLOCK_SIZE)
        slot.nid = pos >> _SLOT_BITS
        pos = _align(pos + size, 1 << _SLOT_BITS)
    root_nid = next(iter(slots.values())).nid
    if root_nid > 0xFFFF:
        raise FormatError("the root inode's nid does not fit the superblock")
    return pos


def _place_data(slots: dict[int, _Slot]) -> tuple[int, list[Extent]]:
    offset = 0
    extents = []
    for slot in slots.values():
        if slot.layout == _CHUNK_BASED:
            slot.data_offset = offset
            extents.append(Extent(offset, slot.ino, slot.size))
            offset += _align(slot.size, BLOCK_SIZE)
    if offset // BLOCK_SIZE > 0xFFFFFFFF:
        raise FormatError("the layer's files are too large for one EROFS data device")
    return offset, extents


def _write_inode(meta: bytearray, node: Inode, slot: _Slot, slots: dict[int, _Slot]) -> None:
    pos = slot.nid << _SLOT_BITS
    fmt = stat.S_IFMT(node.mode)
    extra = b""
    if slot.layout == _CHUNK_BASED:
        chunk_bits = max(0, (slot.size - 1).bit_length() - _BLOCK_BITS)  # the whole file is one chunk
        i_u = _CHUNK_FORMAT_INDEXES | chunk_bits
        pad = _align(_INODE.size + len(slot.xattrs), _CHUNK_INDEX.size) - _INODE.size - len(slot.xattrs)
        extra = bytes(pad) + _CHUNK_INDEX.pack(0, DATA_DEVICE, slot.data_offset // BLOCK_SIZE)
    elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
        i_u = _encode_dev(node.rdev)
    else:
        i_u = slot.blkaddr
        data = _dir_data(slot, slots) if slot.dir_blocks is not None else node.target if fmt == stat.S_IFLNK else b""
        external = len(data) - slot.tail
        meta[slot.blkaddr * BLOCK_SIZE:slot.blkaddr * BLOCK_SIZE + external] = data[:external]
        extra = data[external:]
    seconds, nanos = divmod(max(node.mtime_ns, 0), 1_000_000_000)
    icount = 1 + (len(slot.xattrs) - _XATTR_HEADER.size) // 4 if slot.xattrs else 0
    try:
        record = _INODE.pack(1 | slot.layout << 1, icount, node.mode & 0xFFFF, 0, slot.size, i_u,
                             slot.ino & 0xFFFFFFFF, node.uid, node.gid, seconds, nanos, node.nlink) + slot.xattrs + extra
    except struct.error:
        raise FormatError(f"inode {slot.ino} has an owner, size, time or device number EROFS cannot store") from None
    meta[pos:pos + len(record)] = record


def _dir_data(slot: _Slot, slots: dict[int, _Slot]) -> bytes:
    assert slot.dir_blocks is not None
    out = bytearray()
    for i, block in enumerate(slot.dir_blocks):
        if i:
            out += bytes(-len(out) % BLOCK_SIZE)
        nameoff = _DIRENT.size * len(block)
        names = bytearray()
        for name, ino in block:
            child = slots[ino]
            out += _DIRENT.pack(child.nid, nameoff + len(names), child.file_type)
            names += name
        out += names
    return bytes(out)


def _encode_dev(rdev: int) -> int:
    """The kernel's new_encode_dev: 12 bits of major, 20 of minor, minor's low byte lowest."""
    major, minor = os.major(rdev), os.minor(rdev)
    if major > 0xFFF or minor > 0xFFFFF:
        raise FormatError(f"device number {major}:{minor} is more than EROFS can store")
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def _blocks(size: int) -> int:
    return -(-size // BLOCK_SIZE)


def _align(value: int, unit: int) -> int:
    return -(-value // unit) * unit
