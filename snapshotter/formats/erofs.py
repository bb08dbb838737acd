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
from itertools import repeat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import msgspec

from .entries import gc_paused
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


class Extent(msgspec.Struct, frozen=True, gc=False):
    """Where a regular file's bytes sit on the data device. A struct that the collector never
    visits: 30,000 are made per layer, and kept while it is served (as `Chunk`)."""

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


class _Slot(msgspec.Struct, gc=False):
    """One inode's place and shape in the image (a struct built in C, as one is made per inode)."""

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


@gc_paused()
def build(nodes: Mapping[int, Inode], root: int, *, build_time: int = 0) -> Image:
    """The image of the tree under `nodes[root]`; FormatError if EROFS cannot express it."""
    slots = _shape(nodes, root)
    pos, external, data_size, extents = _place(slots)
    next_block = _blocks(pos)
    for slot in external:
        slot.blkaddr = next_block
        next_block += _blocks(slot.size - slot.tail)
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
            _check_names(node.children)
            queue.extend(zip(node.children.values(), repeat(ino)))
            slot.dir_blocks = _pack_dir(node.children, ino, parent)
            slot.size = _dir_size(slot.dir_blocks)
            _choose_inline(slot)
    return slots


def _check_names(children: dict[bytes, int]) -> None:
    """FormatError naming the first name EROFS cannot store; checked all at once first
    (measured on 32,400 names in 2,400 directories: 0.004 s, a loop per name 0.012 s)."""
    if not children:
        return
    lengths = set(map(len, children))
    joined = b"".join(children)
    if 0 < min(lengths) and max(lengths) <= _MAX_NAME and b"/" not in joined and b"\0" not in joined:
        return
    for name in children:
        if not 0 < len(name) <= _MAX_NAME or b"/" in name or b"\0" in name:
            raise FormatError(f"file name {name!r} cannot be stored in EROFS")


def _slot(ino: int, node: Inode) -> _Slot:
    fmt = stat.S_IFMT(node.mode)
    file_type = _FILE_TYPES.get(fmt)
    if file_type is None:
        raise FormatError(f"inode {ino} has file type {fmt:o}, which EROFS cannot store")
    xattrs = _xattr_body(node.xattrs) if node.xattrs else b""
    if fmt == stat.S_IFREG:
        return _Slot(ino, _CHUNK_BASED if node.size else _FLAT_PLAIN, xattrs, node.size, file_type)
    slot = _Slot(ino, _FLAT_PLAIN, xattrs, 0, file_type)
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


def _place(slots: dict[int, _Slot]) -> tuple[int, list[_Slot], int, list[Extent]]:
    """Give each inode its nid, and each regular file its place on the data device.

    A record never straddles a block (inline data must not). Returns the end of the
    inode area, the inodes with data in blocks of their own (placed after it, in this
    order), the data device's size and its extents. One pass, alignment written out:
    it runs once per inode (three passes took 0.028 s for 32,400 inodes, this one 0.018).
    """
    pos = _FIRST_INODE
    external = []
    offset = 0
    extents = []
    for slot in slots.values():
        size = _INODE.size + len(slot.xattrs)
        if slot.layout == _CHUNK_BASED:
            size = -(-size // _CHUNK_INDEX.size) * _CHUNK_INDEX.size + _CHUNK_INDEX.size
            slot.data_offset = offset
            extents.append(Extent(offset, slot.ino, slot.size))
            offset += -(-slot.size // BLOCK_SIZE) * BLOCK_SIZE
        else:
            size += slot.tail
            if slot.size > slot.tail:
                external.append(slot)
        if pos // BLOCK_SIZE != (pos + size - 1) // BLOCK_SIZE:
            pos = _align(pos, BLOCK_SIZE)
        slot.nid = pos >> _SLOT_BITS
        pos = -(-(pos + size) >> _SLOT_BITS) << _SLOT_BITS
    root_nid = next(iter(slots.values())).nid
    if root_nid > 0xFFFF:
        raise FormatError("the root inode's nid does not fit the superblock")
    if offset // BLOCK_SIZE > 0xFFFFFFFF:
        raise FormatError("the layer's files are too large for one EROFS data device")
    return pos, external, offset, extents


def _write_inode(meta: bytearray, node: Inode, slot: _Slot, slots: dict[int, _Slot]) -> None:
    """The inode record, its xattrs and inline data, packed in place: `meta` is all zeros
    where they go. With the alignment written out, this took `build` from 0.165 s to 0.135 s
    for 32,400 inodes (collector off in both); each record was built as bytes first before."""
    pos = slot.nid << _SLOT_BITS
    fmt = stat.S_IFMT(node.mode)
    xattrs = slot.xattrs
    extra = b""
    if slot.layout == _CHUNK_BASED:
        chunk_bits = (slot.size - 1).bit_length() - _BLOCK_BITS  # the whole file is one chunk
        i_u = _CHUNK_FORMAT_INDEXES | chunk_bits if chunk_bits > 0 else _CHUNK_FORMAT_INDEXES
        index_at = pos + -(-(_INODE.size + len(xattrs)) // _CHUNK_INDEX.size) * _CHUNK_INDEX.size  # zeros before it
        _CHUNK_INDEX.pack_into(meta, index_at, 0, DATA_DEVICE, slot.data_offset // BLOCK_SIZE)
    elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
        i_u = _encode_dev(node.rdev)
    else:
        i_u = slot.blkaddr
        data = _dir_data(slot, slots) if slot.dir_blocks is not None else node.target if fmt == stat.S_IFLNK else b""
        external = len(data) - slot.tail
        meta[slot.blkaddr * BLOCK_SIZE:slot.blkaddr * BLOCK_SIZE + external] = data[:external]
        extra = data[external:]
    mtime_ns = node.mtime_ns
    seconds, nanos = divmod(mtime_ns, 1_000_000_000) if mtime_ns > 0 else (0, 0)
    icount = 1 + (len(xattrs) - _XATTR_HEADER.size) // 4 if xattrs else 0
    try:
        _INODE.pack_into(meta, pos, 1 | slot.layout << 1, icount, node.mode & 0xFFFF, 0, slot.size, i_u,
                         slot.ino & 0xFFFFFFFF, node.uid, node.gid, seconds, nanos, node.nlink)
    except struct.error:
        raise FormatError(f"inode {slot.ino} has an owner, size, time or device number EROFS cannot store") from None
    if xattrs or extra:
        tail = xattrs + extra
        meta[pos + _INODE.size:pos + _INODE.size + len(tail)] = tail


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
