"""The snapshotter: containerd's snapshot state machine over the store and directories.

Modelled on containerd's `snapshots/overlay`: every method is one store transaction;
a new snapshot's directories are made in a temporary directory and renamed to
`<root>/snapshots/<id>` inside the transaction that records it, so a crash leaves
either nothing or a whole snapshot; directories of removed snapshots are deleted after
the transaction commits, and anything the store does not know is deleted by
`cleanup` (which also runs at start-up).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import filters
from .errors import InvalidArgument
from .mounts import Mount, compose
from .store import Kind, Snapshot, Store

log = logging.getLogger(__name__)

MAX_LABEL_BYTES = 4096
"""containerd's limit on one label's key plus value."""


@dataclass(frozen=True)
class Usage:
    size: int
    inodes: int


class Snapshotter:
    """Snapshots under `<root>/snapshots`, metadata in `store`."""

    def __init__(self, root: Path, store: Store, *, index_off: bool = False) -> None:
        self.root = root
        self.dir = root / "snapshots"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.index_off = index_off

    # -- creating ------------------------------------------------------------------

    def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._create(Kind.ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels)

    def _create(self, kind: Kind, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        labels = checked_labels(labels)
        with self.store.transaction() as tx:
            staging = Path(tempfile.mkdtemp(prefix="new-", dir=self.dir))
            try:
                (staging / "fs").mkdir(0o755)
                if kind == Kind.ACTIVE:
                    (staging / "work").mkdir(0o711)
                snap = tx.create(key, parent, kind, labels)
                if snap.parent_ids:
                    # The new upper dir is the container's "/" until written to: give it
                    # the owner of the layer below, as containerd does.
                    st = os.stat(self.fs_path(snap.parent_ids[0]))
                    os.lchown(staging / "fs", st.st_uid, st.st_gid)
                final = self.dir / str(snap.id)
                if final.exists():
                    shutil.rmtree(final)  # no row has this id: left over from a crash
                staging.rename(final)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        log.debug("created %s snapshot %r (id %d) on %r", kind.name.lower(), key, snap.id, parent)
        return self._mounts(snap)

    # -- reading -------------------------------------------------------------------

    def mounts(self, key: str) -> list[Mount]:
        with self.store.transaction() as tx:
            snap = tx.get(key)
        return self._mounts(snap)

    def stat(self, key: str) -> Snapshot:
        with self.store.transaction() as tx:
            return tx.get(key)

    def list(self, filter_strings: list[str]) -> list[Snapshot]:
        match = filters.matcher(filter_strings)
        with self.store.transaction() as tx:
            return [snap for snap in tx.list() if match(snap)]

    def usage(self, key: str) -> Usage:
        """Committed snapshots report what was measured at commit; others are measured now."""
        snap = self.stat(key)
        if snap.kind == Kind.COMMITTED:
            return Usage(snap.size, snap.inodes)
        return disk_usage(self.fs_path(snap.id))

    # -- changing ------------------------------------------------------------------

    def commit(self, name: str, key: str, labels: dict[str, str]) -> Snapshot:
        labels = checked_labels(labels)
        with self.store.transaction() as tx:
            active = tx.get(key)
            usage = disk_usage(self.fs_path(active.id)) if active.kind == Kind.ACTIVE else Usage(0, 0)
            snap = tx.commit(key, name, labels, usage.size, usage.inodes)
        log.debug("committed %r as %r (id %d, %d bytes)", key, name, snap.id, snap.size)
        return snap

    def update(self, key: str, labels: dict[str, str], paths: list[str]) -> Snapshot:
        """Change labels as containerd's storage.UpdateInfo does; only labels are mutable."""
        for path in paths:
            if path != "labels" and not path.startswith("labels."):
                raise InvalidArgument(f"cannot update field {path!r} of snapshot {key!r}")
        with self.store.transaction() as tx:
            current = tx.get(key)
            if not paths:
                new = dict(labels)
            else:
                new = dict(current.labels)
                for path in paths:
                    if path == "labels":
                        new = dict(labels)
                    else:
                        name = path.removeprefix("labels.")
                        new[name] = labels.get(name, "")
            return tx.set_labels(key, checked_labels(new))

    def remove(self, key: str) -> None:
        with self.store.transaction() as tx:
            snap = tx.remove(key)
        self._delete_dir(self.dir / str(snap.id))
        log.debug("removed snapshot %r (id %d)", key, snap.id)

    def cleanup(self) -> list[Path]:
        """Delete every directory under snapshots/ that the store has no snapshot for."""
        with self.store.transaction() as tx:
            known = {str(i) for i in tx.ids()}
            doomed = [p for p in self.dir.iterdir() if p.name not in known]
        for path in doomed:
            self._delete_dir(path)
        if doomed:
            log.info("cleanup removed %d unreferenced snapshot directories", len(doomed))
        return doomed

    # -- paths ---------------------------------------------------------------------

    def fs_path(self, snapshot_id: int) -> Path:
        return self.dir / str(snapshot_id) / "fs"

    def _mounts(self, snap: Snapshot) -> list[Mount]:
        own = self.dir / str(snap.id)
        lowers = [self.fs_path(i) for i in snap.parent_ids]
        return compose(snap.kind, own / "fs", own / "work", lowers, index_off=self.index_off)

    @staticmethod
    def _delete_dir(path: Path) -> None:
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as e:
            log.warning("could not delete %s (Cleanup will retry): %s", path, e)


def checked_labels(labels: dict[str, str]) -> dict[str, str]:
    """Labels as containerd stores them: empty values dropped, each pair at most 4096 bytes."""
    for k, v in labels.items():
        if len(k.encode()) + len(v.encode()) > MAX_LABEL_BYTES:
            raise InvalidArgument(f"label {k!r}: key and value exceed the maximum of {MAX_LABEL_BYTES} bytes")
    return {k: v for k, v in labels.items() if v}


def disk_usage(path: Path) -> Usage:
    """Blocks and inodes used below `path`, each inode counted once (as containerd's fs.DiskUsage)."""
    seen: set[tuple[int, int]] = set()
    size = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames, None]:
            full = dirpath if name is None else os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            ino = (st.st_dev, st.st_ino)
            if ino not in seen:
                seen.add(ino)
                size += st.st_blocks * 512
    return Usage(size, len(seen))
