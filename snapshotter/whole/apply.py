"""Unpack an uncompressed OCI layer tar stream into an empty overlayfs upper directory.

This does what containerd does when it unpacks a layer for its overlayfs snapshotter. There,
`diff/apply/apply_linux.go` calls `archive.Apply(upperdir, r, WithConvertWhiteout(
OverlayConvertWhiteout), WithParents(lowerdirs))`. The functions named below are from
containerd v1.6.20 `archive/` (the same code is in 2.x `pkg/archive/`). `apply_layer` reads the
tar sequentially (`tarfile` stream mode: no seeking, nothing held whole) and returns what it
did. It raises `ApplyError` for anything it refuses, naming the member. On an error, `target`
holds part of the layer. The caller discards it and commits nothing.

Names and paths are in `paths.py`: how a member's name is cleaned and its parent resolved
inside `target` without following a link out of it, and where that deviates from containerd.
Tar headers are in `headers.py`: the limits Go's `archive/tar` sets on them, and how owners,
ns times and xattrs are read from them.

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
import shutil
import stat
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import ApplyError
from .headers import Reader, member_ids, member_times, member_xattrs
from .paths import DIR_FLAGS, Resolver, copy_up, split_name

log = logging.getLogger(__name__)

CHUNK = 1 << 20
"""Bytes of file data read and written at a time."""

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"

_ENVIRONMENT = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENOMEM, errno.EMFILE,
                          errno.ENFILE})
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NODES = {tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK, tarfile.FIFOTYPE: stat.S_IFIFO}
_SUPPORTED = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                        *_NODES})
_READ_ERRORS = (tarfile.TarError, ValueError, LookupError, OverflowError)
# What stopped the reader (`Reader.stopped_by`), by tarfile's classes, which typeshed does not declare.
_END_MARKER: type[tarfile.HeaderError] = getattr(tarfile, "EOFHeaderError")
_CUT_SHORT: dict[type[object], str] = {
    getattr(tarfile, "EmptyHeaderError"): "the stream ends without the end-of-archive marker (truncated?)",
    getattr(tarfile, "TruncatedHeaderError"): "the stream ends inside a header (truncated)",
}


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
    implicit_dirs: tuple[tuple[str, ...], ...] = ()
    """Parent directories the layer did not list, created 0755: `copy_up_parents` completes them."""


def apply_layer(stream: BinaryIO, target: Path, *, parents: Sequence[Path] = ()) -> Applied:
    """Apply the uncompressed layer tar read from `stream` to `target`, an existing empty directory.

    `parents` are the lower directories of the overlay the layer sits on, nearest first (as in
    `lowerdir=`). Parent directories the layer does not list take their attributes from them.
    Synchronous, and blocking: run it in a worker thread. Raises `ApplyError` for the layer's
    faults, `ValueError` if `target` is not empty, and passes `stream`'s own exceptions through.
    """
    root = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if os.listdir(root):
            raise ValueError(f"{target} is not an empty directory")
        applier = _Applier(root)
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
    finally:
        os.close(root)
    applied = applier.result()
    if parents:
        copy_up_parents(target, applied, parents)
    return applied


def copy_up_parents(target: Path, applied: Applied, parents: Sequence[Path]) -> None:
    """Give the parent directories the layer at `target` did not list their lower layers' attributes.

    Separate from `apply_layer` so that a layer can be applied before the layers below it
    are in place (`parents`: the overlay's lower directories, nearest first)."""
    if not applied.implicit_dirs:
        return
    fds: list[int] = []
    try:
        for path in (target, *parents):
            fds.append(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        copy_up(fds[0], applied.implicit_dirs, fds[1:])
    finally:
        for fd in fds:
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


class _Applier:
    """One layer being applied: the target's root fd, the paths resolved in it, and the counts."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.entries = self.bytes_written = self.whiteouts = self.opaque_dirs = self.ignored_xattrs = 0
        self.dir_times: dict[tuple[str, ...], tuple[int, int]] = {}
        self.paths = Resolver(root)

    def result(self) -> Applied:
        implicit = self.paths.created - self.dir_times.keys()  # a directory member names its own attributes
        return Applied(entries=self.entries, bytes_written=self.bytes_written, whiteouts=self.whiteouts,
                       opaque_dirs=self.opaque_dirs, ignored_xattrs=self.ignored_xattrs,
                       implicit_dirs=tuple(sorted(implicit)))

    def close(self) -> None:
        self.paths.close()

    # -- the stream ------------------------------------------------------------------------

    def run(self, source: _Source) -> None:
        try:
            # typeshed wants a fileobj that can also write, seek and tell; stream mode only reads.
            tar: Reader = Reader.open(fileobj=source, mode="r|", encoding="utf-8",  # type: ignore[call-overload]
                                      errors="surrogateescape")
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
                    _skip_data(tar, last)
                    member = tar.next()
                except ApplyError:
                    raise
                except _READ_ERRORS as e:
                    raise ApplyError(f"after member {last!r}: {e}") from e
            if not isinstance(tar.stopped_by, _END_MARKER):
                where = "at the start of the stream" if last is None else f"after member {last!r}"
                why = _CUT_SHORT.get(type(tar.stopped_by), f"invalid header ({tar.stopped_by})")
                raise ApplyError(f"{where}: {why}")
        self._set_dir_times()

    def _apply(self, tar: Reader, member: tarfile.TarInfo) -> None:
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

    def _apply_member(self, tar: Reader, m: tarfile.TarInfo) -> None:
        parts = split_name(m.name, "member")
        if not parts:
            return  # the layer root itself ("./"): containerd skips it
        if not parts[-1].startswith(WHITEOUT_PREFIX):  # a whiteout's type does not matter
            if (m.type == tarfile.GNUTYPE_SPARSE or m.sparse is not None
                    or any(k.startswith("GNU.sparse.") for k in m.pax_headers)):
                raise ApplyError(f"member {m.name!r}: GNU sparse files are not supported")
            if m.type not in _SUPPORTED:
                raise ApplyError(f"member {m.name!r}: tar type {m.type!r} is not supported")
        uid, gid = member_ids(m)
        times = member_times(m)
        xattrs = member_xattrs(m)

        parent, real_parent = self.paths.parent(parts[:-1])
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
            fd = os.open(base, DIR_FLAGS, dir_fd=parent)  # a directory over a directory: merge
        elif is_dir:
            os.mkdir(base, 0o700, dir_fd=parent)
            fd = os.open(base, DIR_FLAGS, dir_fd=parent)
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

    def _write(self, tar: Reader, m: tarfile.TarInfo, fd: int) -> None:
        src = tar.extractfile(m)
        assert src is not None  # a regular member
        written = 0
        while chunk := src.read(CHUNK):  # straight to the fd: a file object per member cost 7 us of CPU, this 4
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
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
        parts = split_name(m.linkname, f"member {m.name!r}: hardlink target")
        missing = ApplyError(f"member {m.name!r}: hardlink to {m.linkname!r}, which this layer does not hold")
        if not parts:
            raise ApplyError(f"member {m.name!r}: hardlink to the layer root")
        try:
            source, _ = self.paths.walk(self.root, parts[:-1], create=False)
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
        self.paths.invalidate()
        return False

    def _set_dir_times(self) -> None:
        """Directory times, once nothing more is written in them (the final pass of `applyNaive`)."""
        for real, times in self.dir_times.items():
            fd = os.dup(self.root)
            try:
                for part in real:
                    try:
                        below = os.open(part, DIR_FLAGS, dir_fd=fd)
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


def _skip_data(tar: Reader, last: str) -> None:
    """Read on to where the next header starts, stopping at the end of the stream.

    tarfile would seek there itself, but its stream seek reads block after empty block until it
    has counted off all the data a header claims: a member of 2^63 bytes (base-256 size) whose
    data is not read (the root `./`, a whiteout, a link) made it spin for ever on a short stream.
    """
    stream = tar.fileobj
    while stream.tell() < tar.offset:
        if not stream.read(min(CHUNK, tar.offset - stream.tell())):
            raise ApplyError(f"after member {last!r}: unexpected end of data (the stream ends inside its data "
                             "or padding)")


def _check_nul(link: str, m: tarfile.TarInfo) -> None:
    if "\x00" in link:
        raise ApplyError(f"member {m.name!r}: the link target holds a NUL byte")
