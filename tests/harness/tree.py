"""Compare mounted filesystem trees, and mount snapshots on the host to get them.

`snapshot_tree` records, for every path below a root (symlinks are not
followed), what a container could observe: type, full st_mode, owner, size and
content hash of regular files, symlink targets, device numbers, all xattrs, and
which paths share an inode (hard-link groups). Timestamps and nlink are left
out: they legitimately differ between two unpacks of the same image.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from .procs import HarnessError

if TYPE_CHECKING:
    from .containerd import Containerd


@dataclass(frozen=True)
class Entry:
    type: str                              # file, dir, symlink, char, block, fifo, socket
    mode: int                              # full st_mode, file type and setuid/setgid/sticky included
    uid: int
    gid: int
    size: int | None = None                # regular files only
    sha256: str | None = None              # regular files only
    target: str | None = None              # symlinks only
    rdev: tuple[int, int] | None = None    # (major, minor), devices only
    xattrs: tuple[tuple[str, bytes], ...] = ()
    hardlinks: tuple[str, ...] = ()        # every path of this tree sharing the inode, when more than one

    def describe(self) -> str:
        parts = [self.type, f"mode={self.mode:o}", f"owner={self.uid}:{self.gid}"]
        if self.size is not None:
            parts.append(f"size={self.size}")
        if self.sha256 is not None:
            parts.append(f"sha256={self.sha256[:12]}")
        if self.target is not None:
            parts.append(f"-> {self.target!r}")
        if self.rdev is not None:
            parts.append(f"rdev={self.rdev[0]},{self.rdev[1]}")
        if self.xattrs:
            parts.append(f"xattrs={dict(self.xattrs)}")
        if self.hardlinks:
            parts.append(f"hardlinks={list(self.hardlinks)}")
        return " ".join(parts)


def _type_of(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "unknown"


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for name in sorted(names):
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError as e:
            out.append((name, f"<getxattr failed: {e.strerror}>".encode()))
    return tuple(out)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def snapshot_tree(root: Path | str) -> dict[str, Entry]:
    """Every path below `root` ("." for root itself) → what it looks like."""
    root = os.fspath(root)
    raw: dict[str, tuple[os.stat_result, Entry]] = {}

    def visit(rel: str, full: str) -> None:
        st = os.lstat(full)
        kind = _type_of(st.st_mode)
        entry = Entry(
            type=kind, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
            size=st.st_size if kind == "file" else None,
            sha256=_sha256(full) if kind == "file" else None,
            target=os.readlink(full) if kind == "symlink" else None,
            rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("char", "block") else None,
            xattrs=_xattrs(full),
        )
        raw[rel] = (st, entry)
        if kind == "dir":
            for name in sorted(os.listdir(full)):
                visit(name if rel == "." else f"{rel}/{name}", os.path.join(full, name))

    visit(".", root)

    groups: dict[tuple[int, int], list[str]] = {}
    for rel, (st, entry) in raw.items():
        if entry.type != "dir":
            groups.setdefault((st.st_dev, st.st_ino), []).append(rel)
    tree: dict[str, Entry] = {}
    for rel, (st, entry) in raw.items():
        group = groups.get((st.st_dev, st.st_ino), [])
        if len(group) > 1:
            entry = Entry(**{**{f.name: getattr(entry, f.name) for f in fields(Entry)},
                             "hardlinks": tuple(sorted(group))})
        tree[rel] = entry
    return tree


def diff_trees(a: dict[str, Entry], b: dict[str, Entry], a_name: str = "a", b_name: str = "b") -> list[str]:
    """Human-readable differences between two `snapshot_tree` results; empty when equal."""
    out = []
    for path in sorted(a.keys() | b.keys()):
        ea, eb = a.get(path), b.get(path)
        if ea is None:
            out.append(f"{path}: only in {b_name}: {eb.describe()}")
        elif eb is None:
            out.append(f"{path}: only in {a_name}: {ea.describe()}")
        elif ea != eb:
            for f in fields(Entry):
                va, vb = getattr(ea, f.name), getattr(eb, f.name)
                if va != vb:
                    if f.name == "mode":
                        va, vb = f"{va:o}", f"{vb:o}"
                    out.append(f"{path}: {f.name} differs: {a_name}={va!r} {b_name}={vb!r}")
    return out


@contextlib.contextmanager
def mount_snapshot(containerd: Containerd, snapshotter: str, key: str, target: Path | str,
                   namespace: str = "default") -> Iterator[Path]:
    """Mount snapshot `key` at `target` the way containerd would, for the duration of the block.

    Runs the `mount ...` command lines that `ctr snapshots mounts` prints.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    script = containerd.ctr("snapshots", "--snapshotter", snapshotter, "mounts", str(target), key,
                            namespace=namespace).stdout
    lines = [line for line in script.splitlines() if line.strip()]
    if not lines or not all(line.startswith("mount ") for line in lines):
        raise HarnessError(f"unexpected output of ctr snapshots mounts for {key!r}:\n{script}")
    mounted = 0
    try:
        for line in lines:
            done = subprocess.run(["sh", "-c", line], capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                raise HarnessError(f"mounting snapshot {key!r} failed: {line}\n{done.stderr}")
            mounted += 1
        yield target
    finally:
        for _ in range(mounted):
            if subprocess.run(["umount", str(target)], capture_output=True, timeout=60).returncode != 0:
                subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=60)
