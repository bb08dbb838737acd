"""Paths inside a layer being applied: member names cleaned, then resolved without leaving the layer.

A layer is untrusted input, and its own symlinks are in the tree it writes to. The kernel is
therefore never asked to follow a link: every directory is opened relative to a directory fd
with `O_NOFOLLOW`, and links are read and resolved here. The functions named below are from
containerd v1.6.20 `archive/` (`applyNaive`, `mkparent`, `copyDirInfo`, `copyUpXAttrs`) and
from continuity (`fs.RootPath`).

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
- Missing parents are created with mode 0755 (`mkparent`) and remembered. Once the layer is
  applied, `copy_up` gives each one the layer never named itself the owner, mode and
  non-`trusted.*` xattrs of the nearest lower layer (overlay lowerdir, nearest first) that
  has that path, as `mkparent` / `copyDirInfo` / `copyUpXAttrs` do; a lower layer where the
  path is not a directory stops the search. Done afterwards rather than on creation, a layer
  can be applied before the layers below it exist (concurrent whole pulls), with the same
  result. Times are not copied: containerd's copy is overwritten by the children it creates
  next, so its directory ends with the time of its last change, as ours does.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from collections.abc import Iterable, Sequence

from .errors import ApplyError

MAX_LINKS = 255
"""Symlinks followed while resolving one path (continuity's fs.RootPath)."""
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
"""How every directory inside a layer is opened: never through a symlink."""


def split_name(name: str, what: str) -> list[str]:
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


class Resolver:
    """Directories inside the layer root (and the lower layers), opened as fds without following a link out.

    Keeps the last parent resolved open, since tar members of one directory come together.
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self.created: set[tuple[str, ...]] = set()
        """Real paths of the parent directories `_mkparent` made (for `copy_up`)."""
        # The last parent directory resolved: (name parts, fd, real parts). Dropped after a removal.
        self._cached: tuple[tuple[str, ...], int, tuple[str, ...]] | None = None
        self._stale = False

    def close(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def invalidate(self) -> None:
        """Something under the root was removed: a cached resolution may pass through it."""
        self._stale = True

    def parent(self, parts: list[str]) -> tuple[int, tuple[str, ...]]:
        """The directory a member goes in, created if missing (borrowed fd), and its real path."""
        key = tuple(parts)
        if self._cached is not None and not self._stale and self._cached[0] == key:
            return self._cached[1], self._cached[2]
        self.close()
        self._stale = False
        fd, real = self.walk(self.root, parts, create=True)
        self._cached = (key, fd, real)
        return fd, real

    def walk(self, base: int, parts: Sequence[str], *, create: bool) -> tuple[int, tuple[str, ...]]:
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
                stack.append((part, os.open(part, DIR_FLAGS, dir_fd=here)))
            real = tuple(p for p, _ in stack)
            return (stack.pop()[1] if stack else os.dup(base)), real
        finally:
            for _, fd in stack:
                os.close(fd)

    def _mkparent(self, here: int, part: str, real_above: list[str]) -> int:
        """Create a missing parent directory (0755); its fd."""
        os.mkdir(part, 0o755, dir_fd=here)
        fd = os.open(part, DIR_FLAGS, dir_fd=here)
        try:
            os.fchmod(fd, 0o755)  # whatever the umask
        except BaseException:
            os.close(fd)
            raise
        self.created.add((*real_above, part))
        return fd


def copy_up(target: int, dirs: Iterable[tuple[str, ...]], lowers: Sequence[int]) -> None:
    """Give each created parent directory in `dirs` (real paths below `target`) the owner, mode and
    xattrs of the nearest lower layer that has that path as a directory."""
    resolver = Resolver(target)
    for parts in sorted(dirs):
        try:
            fd, real = resolver.walk(target, parts, create=False)
        except OSError:
            continue  # removed or replaced later in the layer
        try:
            if real == parts:  # not reached through a link the layer made afterwards
                _copy_from_lower(resolver, fd, parts, lowers)
        finally:
            os.close(fd)


def _copy_from_lower(resolver: Resolver, fd: int, parts: tuple[str, ...], lowers: Sequence[int]) -> None:
    for lower in lowers:
        try:
            found, _ = resolver.walk(lower, parts, create=False)
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
            _copy_xattrs(found, fd)
        finally:
            os.close(found)
        return


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
