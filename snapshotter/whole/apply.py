"""Unpack an uncompressed OCI layer tar stream into an empty overlayfs upper directory.

This does what containerd does when it unpacks a layer for its overlayfs snapshotter. There,
`diff/apply/apply_linux.go` calls `archive.Apply(upperdir, r, WithConvertWhiteout(
OverlayConvertWhiteout), WithParents(lowerdirs))`. The functions named below are from
containerd v1.6.20 `archive/` (the same code is in 2.x `pkg/archive/`). `apply_layer` reads the
tar sequentially (`tarfile` stream mode: no seeking, nothing held whole) and returns what it
did. It raises `ApplyError` for anything it refuses, naming the member. On an error, `target`
holds part of the layer. The caller discards it and commits nothing.

Names (`applyNaive`, `fs.RootPath` from continuity):
- A member name is cleaned as `filepath.Clean` does: a leading `/` and `.` components are
  dropped and `a/..` pairs are folded. A name that resolves to the root itself (`./`) is
  skipped, as containerd skips it ("resolved to root").
- **Deviation:** a `..` that climbs above the layer root (`../../etc/x`, `a/../../b`,
  `/../x`) is refused. containerd clamps it to the root instead, because `fs.RootPath` joins
  the name to `/`. moby refuses it (`breakoutError`). No layer builder writes such a name,
  and issue 13 asks for refusal. An empty name and a NUL byte in a name are refused too.
  containerd would skip the empty name and fail the syscall on the NUL.
- The parent of each member is resolved inside `target` as `fs.RootPath` does. A symlink met
  on the way is read and resolved as if `target` were `/`: absolute targets restart at
  `target`, and `..` stops at `target`. The walk never asks the kernel to follow a link. It
  uses directory fds and `O_NOFOLLOW`, reading links with `readlink`. A member `evil -> /etc`
  followed by `evil/passwd` therefore writes `target/etc/passwd`, as containerd does, and
  never `/etc/passwd`. More than 255 links in one walk is refused, as `RootPath` refuses it.
- Missing parents are created with mode 0755 (`mkparent`). If `parents` (the overlay
  lowerdirs, nearest first) are given, a new parent takes its owner, mode, times and
  non-`trusted.*` xattrs from the nearest lower layer that has that path, as
  `mkparent` / `copyDirInfo` / `copyUpXAttrs` do. A lower layer where the path is not a
  directory stops the search.

Entries (`createTarFile`, `tar_unix.go`, `tar_mostunix.go`):
- An existing path is removed first unless both it and the member are directories. Two
  directories merge: the later header's metadata wins.
- Regular files are streamed in chunks. Directories, symlinks (the target is only a string
  and may point anywhere), and char/block devices and fifos (`mknod`, mode & 07777) are
  supported. Hardlinks work as `hardlinkRootPath` resolves them: the link target must be in
  the layer (anything outside is refused) and must already exist in `target`, which
  started empty, so it came from this layer. It must not be a directory. The link is made
  without following a symlink target (`linkat` with flags 0).
- Then, for every entry: `lchown` to the numeric uid/gid; xattrs from PAX `SCHILY.xattr.*`
  records; the mode with setuid/setgid/sticky (never on a symlink); then atime = max(atime,
  mtime) and mtime, with ns precision from PAX records, clamped to the epoch outside
  [0, 2^63) ns (`boundTime`, `latestTime`). Directory times are set again in a final pass,
  after their children are written. Hardlink headers apply their metadata to the shared
  inode, as in containerd.
- `trusted.*` xattrs are never taken from a layer (`setxattr` in `tar_unix.go`). Otherwise a
  layer could forge `trusted.overlay.*`. Like xattrs the filesystem does not support
  (ENOTSUP), and `user.*` on entries that cannot carry it (EPERM on a symlink or device),
  they are skipped with a warning and counted.
- Types containerd does not handle are refused (`unhandled tar header type`): for example
  contiguous files ('7') and unknown flags. So are GNU sparse members of every form.
  containerd refuses the old 'S' form but writes the PAX forms out densely. No image
  builder writes sparse members, and writing them out densely lets a tiny layer claim
  terabytes.
- PAX global headers are ignored, as containerd ignores them. Python would otherwise apply
  them to every later member. A PAX or GNU long-name header over 1 MiB is refused, as Go's
  `archive/tar` refuses it (`maxSpecialFileSize`). tarfile would read it into memory whole.

Whiteouts (`OverlayConvertWhiteout`, `validateWhiteout`):
- `dir/.wh..wh..opq` sets `trusted.overlay.opaque=y` on `dir`, which is created if it is
  missing. It may be `target` itself.
- Any other `dir/.wh.NAME` makes `dir/NAME` a character device 0/0 with mode 0, owned by the
  header's uid/gid. It is never written as a file. NAME may not be empty, `.` or `..`. If
  NAME already exists, which means this layer created it, the member is refused (`mknod`
  fails with EEXIST in containerd). A later member may replace the whiteout.

The stream:
- **Deviation:** the archive must end with its end-of-archive zero block. Go's reader, and
  so containerd, takes a clean EOF at a header boundary as the end. Then a stream truncated
  between two members would be applied in part without any error. A stream truncated inside
  a header or inside data, a bad header checksum, or an empty stream are refused as well.
  After the end marker the rest of the stream is read and discarded, as containerd's
  `diff/apply` drains it, so a digest computed by the caller covers the whole blob.
- An exception raised by `stream.read` (a network error, a digest check) reaches the caller
  unchanged. It is not turned into `ApplyError`.
- `OSError`s that describe the machine and not the layer (ENOSPC, EDQUOT, EIO, EROFS,
  ENOMEM, EMFILE, ENFILE) propagate as they are. Every other `OSError` met while creating a
  member becomes `ApplyError` for that member.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import stat
import tarfile
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from snapshotter.formats.errors import FormatError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
"""Bytes of file data read and written at a time."""
MAX_META_SIZE = 1 << 20
"""The largest PAX or GNU long-name header accepted (Go's archive/tar maxSpecialFileSize)."""
MAX_LINKS = 255
"""Symlinks followed while resolving one path (continuity's fs.RootPath)."""

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
PAX_XATTR = "SCHILY.xattr."

_MAX_NS = (1 << 63) - 1
_NO_ID = 0xFFFFFFFF  # (uid_t)-1: "leave unchanged" to chown, never a real owner
_ENVIRONMENT = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENOMEM, errno.EMFILE,
                          errno.ENFILE})
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NODES = {tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK, tarfile.FIFOTYPE: stat.S_IFIFO}
_SUPPORTED = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                        *_NODES})
_META_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
               tarfile.GNUTYPE_LONGLINK)
_PAX_TIME = re.compile(r"(-?)(\d+)(?:\.(\d*))?")
_READ_ERRORS = (tarfile.TarError, ValueError, LookupError, OverflowError)


class ApplyError(FormatError):
    """The layer's tar stream is refused: malformed, truncated, or asking for something unsafe."""


@dataclass(frozen=True)
class Applied:
    """What one `apply_layer` did."""

    entries: int
    """Filesystem objects created or merged: files, directories, links, devices, fifos."""
    bytes_written: int
    """Bytes of regular-file data written."""
    whiteouts: int
    """`.wh.NAME` members turned into 0/0 character devices."""
    opaque_dirs: int
    """`.wh..wh..opq` markers turned into `trusted.overlay.opaque=y`."""
    ignored_xattrs: int = 0
    """Xattrs not set: `trusted.*` ones, or ones the filesystem or entry type does not support."""


def apply_layer(stream: BinaryIO, target: Path, *, parents: Sequence[Path] = ()) -> Applied:
    """Apply the uncompressed layer tar read from `stream` to `target`, an existing empty directory.

    `parents` are the lower directories of the overlay the layer sits on, nearest first (as in
    `lowerdir=`). Parent directories the layer does not list take their attributes from them.
    Synchronous, and blocking: run it in a worker thread. Raises `ApplyError` for the layer's
    faults, `ValueError` if `target` is not empty, and passes `stream`'s own exceptions through.
    """
    root = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    lowers: list[int] = []
    try:
        if os.listdir(root):
            raise ValueError(f"{target} is not an empty directory")
        for parent in parents:
            lowers.append(os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        applier = _Applier(root, lowers)
        source = _Source(stream)
        try:
            try:
                applier.run(source)
            finally:
                applier.close()
            while source.read(CHUNK):
                pass  # what follows the end marker: read so the caller's digest covers it, ignored
        except _SourceFailed as failed:
            raise failed.error from None
        return applier.result()
    finally:
        for fd in (root, *lowers):
            os.close(fd)


class _SourceFailed(Exception):
    """Carries an exception raised by the caller's stream through tarfile, to be re-raised as it was."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _Source:
    """The caller's stream as tarfile reads it, marking the stream's own failures as such."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        try:
            return self._stream.read(size)
        except Exception as e:
            raise _SourceFailed(e) from e


class _Header(tarfile.TarInfo):
    """tarfile's header parsing, with the end of the archive recorded and Go's limits applied."""

    @classmethod
    def fromtarfile(cls, tarfile_: _Reader) -> tarfile.TarInfo:  # type: ignore[override]
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as e:
            tarfile_.stopped_by = e  # the outermost call sets it last
            raise

    def _proc_member(self, tarfile_: _Reader) -> tarfile.TarInfo:  # tarfile's documented hook
        if self.type in _META_TYPES and self.size > MAX_META_SIZE:
            raise ApplyError(f"a {self.type.decode('ascii', 'replace')!r} header of {self.size} bytes "
                             f"(at most {MAX_META_SIZE})")
        if self.type == tarfile.XGLTYPE:  # ignored, as containerd ignores it
            tarfile_.fileobj.read(self._block(self.size))
            return self.fromtarfile(tarfile_)
        return super()._proc_member(tarfile_)


class _Reader(tarfile.TarFile):
    tarinfo = _Header
    stopped_by: tarfile.HeaderError | None = None


class _Applier:
    """One layer being applied: the target's root fd, the lower layers' fds, and the counts."""

    def __init__(self, root: int, lowers: list[int]) -> None:
        self.root = root
        self.lowers = lowers
        self.entries = self.bytes_written = self.whiteouts = self.opaque_dirs = self.ignored_xattrs = 0
        self.dir_times: dict[tuple[str, ...], tuple[int, int]] = {}
        # The last parent directory resolved: (name parts, fd, real parts). Dropped after a removal.
        self._cached: tuple[tuple[str, ...], int, tuple[str, ...]] | None = None
        self._stale = False

    def result(self) -> Applied:
        return Applied(entries=self.entries, bytes_written=self.bytes_written, whiteouts=self.whiteouts,
                       opaque_dirs=self.opaque_dirs, ignored_xattrs=self.ignored_xattrs)

    def close(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    # -- the stream ------------------------------------------------------------------------

    def run(self, source: _Source) -> None:
        try:
            tar = _Reader.open(fileobj=source, mode="r|", encoding="utf-8", errors="surrogateescape")
        except ApplyError:
            raise
        except _READ_ERRORS as e:
            raise ApplyError(f"at the start of the stream: {e}") from e
        with tar:
            member, tar.firstmember, last = tar.firstmember, None, None
            while member is not None:
                tar.members.clear()  # stream mode would keep every header
                self._apply(tar, member)
                last = member.name
                tar.stopped_by = None
                try:
                    member = tar.next()
                except ApplyError:
                    raise
                except _READ_ERRORS as e:
                    raise ApplyError(f"after member {last!r}: {e}") from e
            if not isinstance(tar.stopped_by, tarfile.EOFHeaderError):
                where = "at the start of the stream" if last is None else f"after member {last!r}"
                why = {tarfile.EmptyHeaderError: "the stream ends without the end-of-archive marker (truncated?)",
                       tarfile.TruncatedHeaderError: "the stream ends inside a header (truncated)"}.get(
                    type(tar.stopped_by), f"invalid header ({tar.stopped_by})")
                raise ApplyError(f"{where}: {why}")
        self._set_dir_times()

    def _apply(self, tar: _Reader, member: tarfile.TarInfo) -> None:
        try:
            self._apply_member(tar, member)
        except (ApplyError, _SourceFailed):
            raise
        except OSError as e:
            if e.errno in _ENVIRONMENT:
                raise
            detail = e.strerror or str(e)
            if e.filename is not None and not str(e.filename).startswith("/proc/"):
                detail += f": {e.filename!r}"
            raise ApplyError(f"member {member.name!r}: {detail}") from e
        except _READ_ERRORS as e:
            raise ApplyError(f"member {member.name!r}: {e}") from e

    # -- one member --------------------------------------------------------------------------

    def _apply_member(self, tar: _Reader, m: tarfile.TarInfo) -> None:
        parts = _parts(m.name, "member")
        if not parts:
            return  # the layer root itself ("./"): containerd skips it
        if not parts[-1].startswith(WHITEOUT_PREFIX):  # a whiteout's type does not matter
            if (m.type == tarfile.GNUTYPE_SPARSE or m.sparse is not None
                    or any(k.startswith("GNU.sparse.") for k in m.pax_headers)):
                raise ApplyError(f"member {m.name!r}: GNU sparse files are not supported")
            if m.type not in _SUPPORTED:
                raise ApplyError(f"member {m.name!r}: tar type {m.type!r} is not supported")
        uid, gid = _ids(m)
        times = _times(m)
        xattrs = _xattr_records(m)

        parent, real_parent = self._parent(parts[:-1])
        base = parts[-1]
        if base == OPAQUE_MARKER:
            os.setxattr(parent, OPAQUE_XATTR, b"y")
            self.opaque_dirs += 1
            return
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parent, base, m, uid, gid)
            return

        is_dir = m.type == tarfile.DIRTYPE
        if self._remove_existing(parent, base, keep_dir=is_dir):
            fd = os.open(base, _DIR_FLAGS, dir_fd=parent)  # a directory over a directory: merge
        elif is_dir:
            os.mkdir(base, 0o700, dir_fd=parent)
            fd = os.open(base, _DIR_FLAGS, dir_fd=parent)
        elif m.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
            fd = os.open(base, _FILE_FLAGS, 0o600, dir_fd=parent)
            try:
                self._write(tar, m, fd)
            except BaseException:
                os.close(fd)
                raise
        else:
            fd = None
        if fd is not None:
            try:
                os.fchown(fd, uid, gid)
                self._xattrs(fd, m, xattrs, plain=True)
                os.fchmod(fd, m.mode & 0o7777)
                if is_dir:
                    self.dir_times[(*real_parent, base)] = times
                else:
                    os.utime(fd, ns=times)
            finally:
                os.close(fd)
            self.entries += 1
            return

        if m.type == tarfile.SYMTYPE:
            _check_nul(m.linkname, m)
            os.symlink(m.linkname, base, dir_fd=parent)
        elif m.type == tarfile.LNKTYPE:
            self._hardlink(parent, base, m)
        else:
            os.mknod(base, _NODES[m.type] | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=parent)
        st = os.lstat(base, dir_fd=parent)
        os.chown(base, uid, gid, dir_fd=parent, follow_symlinks=False)
        self._xattrs(f"/proc/self/fd/{parent}/{base}", m, xattrs, plain=stat.S_ISREG(st.st_mode))
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(base, m.mode & 0o7777, dir_fd=parent, follow_symlinks=False)
        os.utime(base, ns=times, dir_fd=parent, follow_symlinks=False)
        self.entries += 1

    def _write(self, tar: _Reader, m: tarfile.TarInfo, fd: int) -> None:
        src = tar.extractfile(m)
        assert src is not None  # a regular member
        written = 0
        with open(fd, "wb", closefd=False) as out:
            while chunk := src.read(CHUNK):
                out.write(chunk)
                written += len(chunk)
        if written != m.size:
            raise ApplyError(f"member {m.name!r}: {written} of {m.size} bytes (truncated)")
        self.bytes_written += written

    def _whiteout(self, parent: int, base: str, m: tarfile.TarInfo, uid: int, gid: int) -> None:
        name = base[len(WHITEOUT_PREFIX):]
        if name in ("", ".", ".."):
            raise ApplyError(f"member {m.name!r}: invalid whiteout name")
        try:
            os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=parent)
        except FileExistsError:
            raise ApplyError(f"member {m.name!r}: a whiteout for {name!r}, which this layer already holds") from None
        os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)
        self.whiteouts += 1

    def _hardlink(self, parent: int, base: str, m: tarfile.TarInfo) -> None:
        _check_nul(m.linkname, m)
        parts = _parts(m.linkname, f"member {m.name!r}: hardlink target")
        missing = ApplyError(f"member {m.name!r}: hardlink to {m.linkname!r}, which this layer does not hold")
        if not parts:
            raise ApplyError(f"member {m.name!r}: hardlink to the layer root")
        try:
            source, _ = self._walk(self.root, parts[:-1], create=False)
        except (FileNotFoundError, NotADirectoryError):
            raise missing from None
        try:
            try:
                st = os.lstat(parts[-1], dir_fd=source)
            except FileNotFoundError:
                raise missing from None
            if stat.S_ISDIR(st.st_mode):
                raise ApplyError(f"member {m.name!r}: hardlink to directory {m.linkname!r}")
            os.link(parts[-1], base, src_dir_fd=source, dst_dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(source)

    def _xattrs(self, where: int | str, m: tarfile.TarInfo, xattrs: list[tuple[str, bytes]], *, plain: bool) -> None:
        """Set the member's xattrs on an fd, or on a path (not following a final symlink)."""
        for name, data in xattrs:
            if name.startswith("trusted."):
                self._ignore(m, name, "trusted.* attributes are never taken from a layer")
                continue
            try:
                if isinstance(where, int):
                    os.setxattr(where, name, data)
                else:
                    os.setxattr(where, name, data, follow_symlinks=False)
            except OSError as e:
                if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                    self._ignore(m, name, "not supported here")
                elif e.errno == errno.EPERM and name.startswith("user.") and not plain:
                    self._ignore(m, name, "user.* xattrs only go on files and directories")
                else:
                    raise

    def _ignore(self, m: tarfile.TarInfo, name: str, why: str) -> None:
        self.ignored_xattrs += 1
        log.warning("layer member %r: xattr %s ignored: %s", m.name, name, why)

    def _remove_existing(self, parent: int, base: str, *, keep_dir: bool) -> bool:
        """Remove what is at `base` unless it and the member are both directories; whether a directory was kept."""
        try:
            st = os.lstat(base, dir_fd=parent)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            shutil.rmtree(base, dir_fd=parent)
        else:
            os.unlink(base, dir_fd=parent)
        self._stale = True  # a cached resolution may pass through what was removed
        return False

    # -- paths -------------------------------------------------------------------------------

    def _parent(self, parts: list[str]) -> tuple[int, tuple[str, ...]]:
        """The directory a member goes in, created if missing (borrowed fd), and its real path."""
        key = tuple(parts)
        if self._cached is not None and not self._stale and self._cached[0] == key:
            return self._cached[1], self._cached[2]
        self.close()
        self._stale = False
        fd, real = self._walk(self.root, parts, create=True)
        self._cached = (key, fd, real)
        return fd, real

    def _walk(self, base: int, parts: Sequence[str], *, create: bool) -> tuple[int, tuple[str, ...]]:
        """Open the directory `parts` names below `base`, resolving symlinks as if `base` were `/`.

        Returns a new fd and the real path. Without `create`, a missing component raises
        FileNotFoundError. A component that is not a directory raises NotADirectoryError.
        """
        stack: list[tuple[str, int]] = []
        pending = deque(parts)
        links = 0
        try:
            while pending:
                part = pending.popleft()
                if part in ("", "."):
                    continue
                if part == "..":
                    if stack:
                        os.close(stack.pop()[1])
                    continue
                here = stack[-1][1] if stack else base
                try:
                    st = os.lstat(part, dir_fd=here)
                except FileNotFoundError:
                    if not create:
                        raise
                    stack.append((part, self._mkparent(here, part, [p for p, _ in stack])))
                    continue
                if stat.S_ISLNK(st.st_mode):
                    links += 1
                    if links > MAX_LINKS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), "/".join(parts))
                    dest = os.readlink(part, dir_fd=here)
                    if dest.startswith("/"):
                        while stack:
                            os.close(stack.pop()[1])
                    pending.extendleft(reversed(dest.split("/")))
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR),
                                             "/".join([*(p for p, _ in stack), part]))
                stack.append((part, os.open(part, _DIR_FLAGS, dir_fd=here)))
            real = tuple(p for p, _ in stack)
            return (stack.pop()[1] if stack else os.dup(base)), real
        finally:
            for _, fd in stack:
                os.close(fd)

    def _mkparent(self, here: int, part: str, real_above: list[str]) -> int:
        """Create a missing parent directory (0755, or as in the nearest lower layer); its fd."""
        os.mkdir(part, 0o755, dir_fd=here)
        fd = os.open(part, _DIR_FLAGS, dir_fd=here)
        try:
            os.fchmod(fd, 0o755)
            self._copy_up(fd, [*real_above, part])
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _copy_up(self, fd: int, parts: list[str]) -> None:
        for lower in self.lowers:
            try:
                found, _ = self._walk(lower, parts, create=False)
            except FileNotFoundError:
                continue
            except OSError as e:
                if e.errno in (errno.ENOTDIR, errno.ELOOP):
                    return  # replaced in that layer: keep the defaults
                raise
            try:
                st = os.fstat(found)
                os.fchown(fd, st.st_uid, st.st_gid)
                os.fchmod(fd, stat.S_IMODE(st.st_mode))
                os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
                _copy_xattrs(found, fd)
            finally:
                os.close(found)
            return

    def _set_dir_times(self) -> None:
        """Directory times, once nothing more is written in them (the final pass of `applyNaive`)."""
        for real, times in self.dir_times.items():
            fd = os.dup(self.root)
            try:
                for part in real:
                    try:
                        below = os.open(part, _DIR_FLAGS, dir_fd=fd)
                    except OSError as e:
                        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                            break  # replaced by a later member
                        raise
                    os.close(fd)
                    fd = below
                else:
                    os.utime(fd, ns=times)
            finally:
                os.close(fd)


def _copy_xattrs(src: int, dst: int) -> None:
    """The lower directory's xattrs but `trusted.*` ones, not overwriting (`copyUpXAttrs`)."""
    try:
        names = os.listxattr(src)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA):
            return
        raise
    for name in names:
        if name.startswith("trusted."):
            continue
        try:
            os.setxattr(dst, name, os.getxattr(src, name), os.XATTR_CREATE)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA, errno.EEXIST):
                raise


def _parts(name: str, what: str) -> list[str]:
    """A tar name as components below the layer root: `/a/./b/../c/` -> [a, c]; [] is the root."""
    if not name:
        raise ApplyError(f"{what} has an empty name")
    if "\x00" in name:
        raise ApplyError(f"{what} {name!r}: the name holds a NUL byte")
    out: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not out:
                raise ApplyError(f"{what} {name!r} climbs out of the layer")
            out.pop()
        else:
            out.append(part)
    return out


def _check_nul(link: str, m: tarfile.TarInfo) -> None:
    if "\x00" in link:
        raise ApplyError(f"member {m.name!r}: the link target holds a NUL byte")


def _ids(m: tarfile.TarInfo) -> tuple[int, int]:
    for what, value in (("uid", m.uid), ("gid", m.gid)):
        if not 0 <= value < _NO_ID:
            raise ApplyError(f"member {m.name!r}: {what} {value} is out of range")
    return m.uid, m.gid


def _xattr_records(m: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    """The member's PAX `SCHILY.xattr.*` records as (name, value bytes), as tarfile decoded them."""
    out = []
    for key, value in m.pax_headers.items():
        if key.startswith(PAX_XATTR):
            name = key[len(PAX_XATTR):]
            if not name or "\x00" in name:
                raise ApplyError(f"member {m.name!r}: invalid xattr name {name!r}")
            out.append((name, value.encode("utf-8", "surrogateescape")))
    return out


def _times(m: tarfile.TarInfo) -> tuple[int, int]:
    """(atime, mtime) in ns as containerd sets them: atime = max(atime, mtime), both bounded."""
    text = m.pax_headers.get("mtime")
    mtime = _pax_ns(text, m) if text is not None else int(m.mtime) * 1_000_000_000
    text = m.pax_headers.get("atime")
    atime = max(_pax_ns(text, m), mtime) if text is not None else mtime
    return _bound(atime), _bound(mtime)


def _pax_ns(text: str, m: tarfile.TarInfo) -> int:
    """A PAX time (`1700000000.123456789`, `-1.5`) in ns, exactly; tarfile's float loses the ns."""
    match = _PAX_TIME.fullmatch(text)
    if match is None:
        raise ApplyError(f"member {m.name!r}: invalid PAX time {text!r}")
    ns = int(match[2]) * 1_000_000_000 + int((match[3] or "")[:9].ljust(9, "0"))
    return -ns if match[1] else ns


def _bound(ns: int) -> int:
    """containerd's boundTime: a time before the epoch or past 2^63-1 ns becomes the epoch."""
    return ns if 0 <= ns <= _MAX_NS else 0


