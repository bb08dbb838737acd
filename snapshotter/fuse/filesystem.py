"""The pyfuse3 operations: many read-only layers under one mount, one directory each.

pyfuse3 serves one FUSE session per process, so the mount root lists the attached
layers by name (`<mount>/<layer>/...`) and every other inode belongs to one of them
(see `inodes.py`). Layers are immutable, so entries and attributes are cached by the
kernel for a long time and files are opened with `keep_cache`; only the root, whose
names come and go with attach/detach, is cached briefly. That short root timeout is
also what makes a detached layer disappear: no reverse notification into the kernel
is needed (those can block, and race with the session closing).

Every handler answers with data or a `FUSEError`: pyfuse3 lets anything else end
the whole session, taking every layer and container with it.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, NoReturn, ParamSpec, TypeVar

import pyfuse3
import trio

from ..layers.layer import Layer, ReadError
from ..layers.tree import ROOT_INO, LayerTree, Node
from .counters import FuseStats, ReadFailure
from .inodes import FUSE_ROOT_INO, NAME_MAX, Attachment, InodeTable, UnknownInode

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 24 * 3600.0
"""Entry/attr cache time for layer contents: they never change (timeout 0 costs ~60x on find+stat)."""
DEFAULT_ROOT_TIMEOUT = 1.0
"""Cache time for the mount root's names and attributes: bounds how long a detached layer stays visible."""
DEFAULT_READ_TIMEOUT = 30.0
"""The longest a FUSE read waits on a layer before the reader gets EIO."""
DEFAULT_FAIL_FAST = 0.1
"""Seconds after a failed read during which reads through the same open file fail at once,
each such failure extending it. The kernel follows a failed readahead with a page-sized
retry within a millisecond, which must not wait the whole read timeout again; a reader
that comes later must try the layer afresh, even through the same open file: the kernel
keeps an EROFS data device open for every reader of its layer."""
BLOCK_SIZE = 4096

P = ParamSpec("P")
T = TypeVar("T")


class XattrsUnsupported(ValueError):
    """A layer with extended attributes, offered to a mount that serves none (`xattrs=False`)."""


@dataclass(eq=False)
class _OpenFile:
    att: Attachment
    node: Node
    failed_until: float = 0.0
    """After a failed read, further reads of its bytes through this open file fail at once until then."""
    failed: tuple[int, int] = (0, 0)
    """The bytes [start, end) of that read. Only they fail fast: the kernel retries a failed
    readahead page by page within it, while one data device serves every container of a
    layer, whose reads elsewhere must not fail for another's bad chunk."""

    def fails_fast(self, off: int, size: int, now: float) -> bool:
        return self.failed_until > now and off < self.failed[1] and off + size > self.failed[0]

    def failed_at(self, off: int, size: int, until: float) -> None:
        self.failed_until, self.failed = until, (off, off + size)


@dataclass(eq=False)
class _OpenDir:
    """A directory listing fixed at opendir, so readdir offsets (indexes) stay stable."""

    att: Attachment | None  # None: the mount root
    entries: list[tuple[bytes, Attachment, Node]]


def _guarded(
    op: Callable[Concatenate[LayerFilesystem, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[LayerFilesystem, P], Coroutine[Any, Any, T]]:
    """Count and time the request, and turn any unexpected exception into EIO (and a log
    line) instead of ending the session."""
    name = op.__name__

    @functools.wraps(op)
    async def handler(self: LayerFilesystem, /, *args: P.args, **kwargs: P.kwargs) -> T:
        start = time.perf_counter()
        try:
            return await op(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except UnknownInode as e:
            log.warning("FUSE %s: inode %s is not known (stale kernel reference?)", name, e)
            raise pyfuse3.FUSEError(errno.ESTALE) from None
        except Exception:
            log.exception("FUSE %s%r failed", name, args)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            self.stats.record(name, time.perf_counter() - start)

    return handler


class LayerFilesystem(pyfuse3.Operations):
    """Read-only layers side by side under one mount; attach and detach at runtime.

    Call every method from the trio thread that serves the mount (other threads go
    through `trio.from_thread`): the state here is unlocked, as trio runs one task at a time.
    """

    supports_dot_lookup = True

    def __init__(self, *, timeout: float = DEFAULT_TIMEOUT, root_timeout: float = DEFAULT_ROOT_TIMEOUT,
                 read_timeout: float = DEFAULT_READ_TIMEOUT, fail_fast: float = DEFAULT_FAIL_FAST,
                 xattrs: bool = True) -> None:
        """`xattrs=False` trades extended attributes for metadata speed under overlayfs.

        overlayfs asks every lower file it looks up for `trusted.overlay.metacopy`, and every
        lower directory for `trusted.overlay.opaque` and more, and the kernel caches no
        xattr answer of a FUSE filesystem: a `du` of 30,000 files through a container's
        overlay sends 37,000 getxattr requests (~100 us each through pyfuse3), 4.5 s instead
        of 1.8 s. Answering ENOSYS once makes the kernel stop asking for the whole mount;
        the price is that no served layer may have xattrs or opaque directories, so
        `attach` refuses such a layer (`XattrsUnsupported`) and its owner pulls it whole.
        """
        super().__init__()
        self.timeout = timeout
        self.xattrs = xattrs
        self.root_timeout = root_timeout
        self.read_timeout = read_timeout
        self.fail_fast = fail_fast
        self.stats = FuseStats()
        self._inodes = InodeTable()
        self._files: dict[int, _OpenFile] = {}
        self._dirs: dict[int, _OpenDir] = {}
        self._next_fh = 1
        self._root_mtime_ns = time.time_ns()

    # --- the namespace ---------------------------------------------------------------

    def attach(self, name: str, layer: Layer) -> None:
        """Serve `layer` at `<mount>/<name>`; visible at once (the root never caches a miss)."""
        if not self.accepts(layer):
            raise XattrsUnsupported(f"layer {name} has extended attributes or opaque directories, "
                                    "and this mount serves none")
        self._inodes.attach(os.fsencode(name), layer)
        self._root_mtime_ns = time.time_ns()

    def accepts(self, layer: Layer) -> bool:
        """Whether `attach` would take the layer (only a layer with xattrs, when they are off, is refused)."""
        return self.xattrs or not layer.tree.has_xattrs

    async def detach(self, name: str) -> None:
        """Remove `<mount>/<name>`, and return once no read of that layer is in flight.

        Lookups and opens in the layer fail with ENOENT at once; the kernel's cached
        path to it lapses within `root_timeout`. Reads already running finish (or time
        out); reads on files still open fail with EIO. After this returns the layer is
        never called again, so its owner may release it.
        """
        att = self._inodes.detach(os.fsencode(name))
        self._root_mtime_ns = time.time_ns()
        await att.idle.wait()

    def layers(self) -> list[str]:
        """Names of the attached layers, sorted."""
        return [os.fsdecode(att.name) for att in self._inodes.attached()]

    @property
    def retired(self) -> int:
        """Detached layers still held by the kernel (cached inodes) or by open files."""
        return self._inodes.retired

    # --- attributes ------------------------------------------------------------------

    def _root_attrs(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = FUSE_ROOT_INO
        a.entry_timeout = a.attr_timeout = self.root_timeout
        a.st_mode = stat.S_IFDIR | 0o755
        a.st_nlink = 2 + len(self._inodes.attached())
        a.st_blksize = BLOCK_SIZE
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._root_mtime_ns
        return a

    def _attrs(self, att: Attachment, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = att.global_ino(node)
        # A layer root's name lives in the mount root, where names come and go.
        a.entry_timeout = self.root_timeout if node.ino == ROOT_INO else self.timeout
        a.attr_timeout = self.timeout
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = node.rdev
        a.st_size = node.size
        a.st_blksize = BLOCK_SIZE
        a.st_blocks = (node.size + 511) // 512 if stat.S_ISREG(node.mode) else 0
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.mtime_ns
        return a

    def _negative(self) -> pyfuse3.EntryAttributes:
        """A cached miss: layers never gain names, and overlayfs probes every lower for each name."""
        a = pyfuse3.EntryAttributes()
        a.st_ino = 0
        a.entry_timeout = self.timeout
        return a

    def _attached(self, ino: int) -> tuple[Attachment, Node]:
        att, node = self._inodes.resolve(ino)
        if not att.attached:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return att, node

    # --- metadata --------------------------------------------------------------------

    @_guarded
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode == FUSE_ROOT_INO:
            if name in (b".", b".."):
                return self._root_attrs()
            root_att = self._inodes.get(name)
            if root_att is None:
                raise pyfuse3.FUSEError(errno.ENOENT)  # not cached: a layer may be attached later
            root_att.lookups += 1
            return self._attrs(root_att, root_att.tree.root)
        att, parent = self._attached(parent_inode)
        if not parent.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            found: Node | None = parent
        elif name == b"..":
            if parent.ino == ROOT_INO:
                return self._root_attrs()
            found = att.tree.node(parent.parent)
        else:
            found = att.tree.lookup(parent.ino, name)
        if found is None:
            return self._negative()
        att.lookups += 1
        return self._attrs(att, found)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Must not raise at all: there is no request to answer, and pyfuse3 would end the session."""
        start = time.perf_counter()
        try:
            for ino, nlookup in inode_list:
                if ino != FUSE_ROOT_INO:
                    self._inodes.forget(ino, nlookup)
        except Exception:
            log.exception("FUSE forget%r failed", inode_list)
        self.stats.record("forget", time.perf_counter() - start)

    @_guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == FUSE_ROOT_INO:
            return self._root_attrs()
        att, node = self._inodes.resolve(inode)  # still answered after detach: the kernel holds it
        return self._attrs(att, node)

    @_guarded
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        _, node = self._inodes.resolve(inode)
        if not stat.S_ISLNK(node.mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target

    @_guarded
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # the kernel answers EOPNOTSUPP itself from now on
        if inode == FUSE_ROOT_INO:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        _, node = self._inodes.resolve(inode)
        value = node.xattrs.get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return bytes(value)

    @_guarded
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        if inode == FUSE_ROOT_INO:
            return []
        _, node = self._inodes.resolve(inode)
        return sorted(node.xattrs)

    @_guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        attached = self._inodes.attached()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = BLOCK_SIZE
        s.f_blocks = sum(-(-att.data_bytes // BLOCK_SIZE) for att in attached)
        s.f_bfree = s.f_bavail = 0
        s.f_files = sum(len(att.tree.nodes) for att in attached) + 1
        s.f_ffree = s.f_favail = 0
        s.f_namemax = NAME_MAX
        return s

    # --- directories -----------------------------------------------------------------

    @_guarded
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode == FUSE_ROOT_INO:
            return self._new_dir(_OpenDir(None, [(a.name, a, a.tree.root) for a in self._inodes.attached()]))
        att, node = self._attached(inode)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        att.handles += 1
        return self._new_dir(_OpenDir(att, att.listing(node)))

    @_guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """Entries with attributes (readdirplus): a later stat needs no lookup. No `.`/`..`,
        as the kernel takes no reference for those and would leak our lookup counts."""
        d = self._dirs[fh]
        for i in range(start_id, len(d.entries)):
            name, att, node = d.entries[i]
            if d.att is None and not att.attached:
                continue  # detached since this listing of the root was taken
            if not pyfuse3.readdir_reply(token, name, self._attrs(att, node), i + 1):
                break
            att.lookups += 1

    @_guarded
    async def releasedir(self, fh: int) -> None:
        d = self._dirs.pop(fh)
        if d.att is not None:
            self._release(d.att)

    def _new_dir(self, d: _OpenDir) -> int:
        fh = self._new_fh()
        self._dirs[fh] = d
        return fh

    # --- files -----------------------------------------------------------------------

    @_guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        att, node = self._attached(inode)
        if not stat.S_ISREG(node.mode):
            raise pyfuse3.FUSEError(errno.EISDIR if node.is_dir else errno.EINVAL)
        att.handles += 1
        fh = self._new_fh()
        self._files[fh] = _OpenFile(att, node)
        # Inode numbers are never reused, so cached pages can never belong to another file.
        # A layer that asks for direct I/O is cached above us (an EROFS data device).
        direct = getattr(att.layer, "direct_io", False)
        return pyfuse3.FileInfo(fh=fh, keep_cache=not direct, direct_io=direct)

    # pyfuse3 replies with any contiguous buffer (PyObject_GetBuffer), though its stub says bytes.
    @_guarded
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        f = self._files[fh]
        att, node = f.att, f.node
        if not att.attached:
            self._read_failed(att, node, off, size, ReadFailure.DETACHED, "the layer was detached")
        if off >= node.size or size <= 0:
            return b""
        want = min(size, node.size - off)
        if f.fails_fast(off, want, trio.current_time()):
            f.failed_until = trio.current_time() + self.fail_fast
            self.stats.read_failed(ReadFailure.RETRY_TOO_SOON)
            log.debug("EIO: layer %s inode %d offset %d: failed moments ago, not retried yet",
                      os.fsdecode(att.name), node.ino, off)
            raise pyfuse3.FUSEError(errno.EIO)
        att.begin_read()
        try:
            with trio.move_on_after(self.read_timeout) as scope:
                data = await att.layer.read(node, off, want)
            if scope.cancelled_caught:
                self._read_failed(att, node, off, want, ReadFailure.TIMEOUT, f"no answer within {self.read_timeout:g} s",
                                  f)
            got = len(data)
        except ReadError as e:
            self._read_failed(att, node, off, want, ReadFailure.UNAVAILABLE, str(e) or type(e).__name__, f)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            self._read_failed(att, node, off, want, ReadFailure.UNEXPECTED, f"unexpected {e!r}", f, exc_info=True)
        finally:
            att.end_read()
        if got < want:
            # The kernel would take a short read for EOF and shrink the file it caches.
            self._read_failed(att, node, off, want, ReadFailure.SHORT, f"short read: {got} bytes", f)
        self.stats.read_bytes += want
        return data if got == want else data[:want]

    @_guarded
    async def release(self, fh: int) -> None:
        f = self._files.pop(fh)
        self._release(f.att)

    def _read_failed(self, att: Attachment, node: Node, off: int, size: int, cause: ReadFailure, why: str,
                     f: _OpenFile | None = None, exc_info: bool = False) -> NoReturn:
        self.stats.read_failed(cause)
        if f is not None:
            f.failed_at(off, size, trio.current_time() + self.fail_fast)
        log.error("EIO: layer %s file %s (inode %d) offset %d size %d: %s", os.fsdecode(att.name),
                  _path_of(att.tree, node), node.ino, off, size, why, exc_info=exc_info)
        raise pyfuse3.FUSEError(errno.EIO)

    def _release(self, att: Attachment) -> None:
        att.handles -= 1
        self._inodes.drop_if_unreferenced(att)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh


def _path_of(tree: LayerTree, node: Node) -> str:
    """A path to `node` for log lines (one of them, for a hardlink)."""
    parts: list[bytes] = []
    while node.ino != ROOT_INO and len(parts) < 4096:
        parent = tree.nodes.get(node.parent)
        if parent is None or parent.children is None:
            break
        parts.append(next((n for n, i in parent.children.items() if i == node.ino), b"?"))
        node = parent
    return "/" + "/".join(os.fsdecode(p) for p in reversed(parts))
