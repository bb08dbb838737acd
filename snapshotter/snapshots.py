"""The snapshotter: containerd's snapshot state machine over the store and directories.

Modelled on containerd's `snapshots/overlay`: every method is one store transaction;
a new snapshot's directories are made in a temporary directory and renamed to
`<root>/snapshots/<id>` inside the transaction that records it, so a crash leaves
either nothing or a whole snapshot; directories of removed snapshots are deleted after
the transaction commits, and anything the store does not know is deleted by
`cleanup` (which also runs at start-up).
"""

from __future__ import annotations

import builtins  # `list` below a class's own list() method means the method to a type checker
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import filters, labels as L
from .errors import AlreadyExists, InvalidArgument, ResourceExhausted
from .mounts import Mount, compose
from .store import Kind, LayerRecord, Parent, Snapshot, Store

log = logging.getLogger(__name__)

FUSE_DIR = "fuse"
"""Under the root: the one FUSE mount, where each lazily served layer is a directory."""

MAX_LABEL_BYTES = 4096
"""containerd's limit on one label's key plus value."""


@dataclass(frozen=True)
class Usage:
    size: int
    inodes: int


class RemoteLayers(Protocol):
    """Lazily served layers (`layers/manager.py`). Without one, every layer is pulled whole."""

    def mount(self, request: L.LayerRequest) -> int | None:
        """Blocking: the id of a layer record serving `request`, or None to fall back."""
        ...

    def release(self, layers: list[LayerRecord]) -> None:
        """Stop serving layers that no snapshot uses any more."""
        ...

    def pull_whole(self, request: L.LayerRequest, dest: Path, parents: list[Path]) -> bool:
        """Blocking: fetch and apply a layer that cannot be served lazily into the empty dir `dest`
        (`parents`: the lower dirs, nearest first); False leaves it to containerd."""
        ...

    def layer_path(self, layer_id: int) -> Path:
        """Where the layer's tree is mounted (its FUSE directory, or its own EROFS mount)."""
        ...


class Snapshotter:
    """Snapshots under `<root>/snapshots`, lazily served layers under `<root>/fuse`, metadata in `store`."""

    def __init__(self, root: Path, store: Store, *, index_off: bool = False, remote: RemoteLayers | None = None
                 ) -> None:
        self.root = root
        self.dir = root / "snapshots"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fuse_dir = root / FUSE_DIR
        self.store = store
        self.index_off = index_off
        self.remote = remote

    # -- creating ------------------------------------------------------------------

    def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        """An active snapshot; or, for a layer that can be served lazily, AlreadyExists.

        The remote-snapshot handshake: a Prepare whose labels name a target chain id
        and a layer asks the snapshotter to provide that layer itself. The layer is served
        lazily, or else pulled whole by lazysnap (so that containerd, which would pull every
        layer above it too, pulls none), committed under the target name, and the answer is
        AlreadyExists. Only if both fail is the ordinary active snapshot made, and
        containerd pulls the layer into it.
        """
        request = L.LayerRequest.from_labels(labels) if self.remote is not None else None
        if request is not None:
            self._serve_remotely(parent, labels, request)
        return self._create(Kind.ACTIVE, key, parent, labels)

    def _serve_remotely(self, parent: str, labels: dict[str, str], request: L.LayerRequest) -> None:
        """Raise AlreadyExists when the target is (now) a lazily served snapshot or one lazysnap pulled
        whole; return to leave the layer to containerd (lazysnap could not pull it either)."""
        assert self.remote is not None
        with self.store.transaction() as tx:
            if tx.exists(request.target):
                raise AlreadyExists(f"target snapshot {request.target!r} already exists")
        layer_id = self.remote.mount(request)
        if layer_id is None:
            self._pull_whole(parent, labels, request)
            return
        with self.store.transaction() as tx:
            snap = tx.create_remote(request.target, parent, checked_labels(labels | {L.REMOTE: "lazysnap"}), layer_id)
        log.info("layer %s served lazily as %r (snapshot id %d)", request.layer_digest, request.target, snap.id)
        raise AlreadyExists(f"target snapshot {request.target!r} already exists (served lazily)")

    def _pull_whole(self, parent: str, labels: dict[str, str], request: L.LayerRequest) -> None:
        """Raise AlreadyExists once the layer is applied and committed as the target; return to fall back.

        Applied into a temporary directory beside the snapshots, then recorded and renamed
        into place in one transaction, as `_create` does: a crash leaves nothing `cleanup`
        does not remove. Layers above stay lazy: containerd never downloads this one.
        """
        assert self.remote is not None
        with _no_space_is_exhausted(f"layer {request.layer_digest}", self.dir):
            staging = Path(tempfile.mkdtemp(prefix="new-", dir=self.dir))
        try:
            (staging / "fs").mkdir(0o755)
            lowers = []
            if parent:
                with self.store.transaction() as tx:
                    below = tx.get(parent)
                lowers = [self.lower_path(Parent(below.id, below.layer_id))] + [self.lower_path(p) for p in below.parents]
            if not self.remote.pull_whole(request, staging / "fs", lowers):
                shutil.rmtree(staging, ignore_errors=True)
                return
            usage = disk_usage(staging / "fs")
            with self.store.transaction() as tx:
                key = f"whole-{os.path.basename(staging)}"
                active = tx.create(key, parent, Kind.ACTIVE, {})
                snap = tx.commit(key, request.target, checked_labels(labels), usage.size, usage.inodes)
                self._place(staging, active.id)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("layer %s pulled whole by lazysnap as %r (snapshot id %d)", request.layer_digest, request.target,
                 snap.id)
        raise AlreadyExists(f"target snapshot {request.target!r} already exists (pulled whole by lazysnap)")

    def view(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels)

    def _create(self, kind: Kind, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        labels = checked_labels(labels)
        with self.store.transaction() as tx, _no_space_is_exhausted(f"snapshot {key!r}", self.dir):
            staging = Path(tempfile.mkdtemp(prefix="new-", dir=self.dir))
            try:
                (staging / "fs").mkdir(0o755)
                if kind == Kind.ACTIVE:
                    (staging / "work").mkdir(0o711)
                snap = tx.create(key, parent, kind, labels)
                if snap.parents:
                    # The new upper dir is the container's "/" until written to: give it
                    # the owner of the layer below, as containerd does.
                    st = os.stat(self.lower_path(snap.parents[0]))
                    os.lchown(staging / "fs", st.st_uid, st.st_gid)
                self._place(staging, snap.id)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        log.debug("created %s snapshot %r (id %d) on %r", kind.name.lower(), key, snap.id, parent)
        return self._mounts(snap)

    def _place(self, staging: Path, snapshot_id: int) -> None:
        """Rename a new snapshot's staging directory into place (inside the transaction recording it)."""
        final = self.dir / str(snapshot_id)
        if final.exists():
            shutil.rmtree(final)  # no row has this id: left over from a crash
        staging.rename(final)

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
            return Usage(snap.size, snap.inodes)  # a lazily served layer uses no snapshot space
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

    def update(self, key: str, labels: dict[str, str], paths: builtins.list[str]) -> Snapshot:
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

    def cleanup(self) -> builtins.list[Path]:
        """Delete every directory the store has no snapshot for, and stop serving unused layers."""
        with self.store.transaction() as tx:
            known = {str(i) for i in tx.ids()}
            doomed = [p for p in self.dir.iterdir() if p.name not in known]
            unused = tx.remove_unused_layers()
        for path in doomed:
            self._delete_dir(path)
        if doomed:
            log.info("cleanup removed %d unreferenced snapshot directories", len(doomed))
        if unused and self.remote is not None:
            self.remote.release(unused)
        return doomed

    # -- paths ---------------------------------------------------------------------

    def fs_path(self, snapshot_id: int) -> Path:
        return self.dir / str(snapshot_id) / "fs"

    def layer_path(self, layer_id: int) -> Path:
        """Where a lazily served layer appears: as its server says, else its FUSE directory."""
        return self.remote.layer_path(layer_id) if self.remote is not None else self.fuse_dir / str(layer_id)

    def lower_path(self, parent: Parent) -> Path:
        return self.layer_path(parent.layer_id) if parent.layer_id is not None else self.fs_path(parent.id)

    def _mounts(self, snap: Snapshot) -> builtins.list[Mount]:
        own = self.dir / str(snap.id)
        lowers = [self.lower_path(p) for p in snap.parents]
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


@contextmanager
def _no_space_is_exhausted(what: str, where: Path) -> Iterator[None]:
    """A full disk is the caller's ResourceExhausted with the reason, not an internal error."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise ResourceExhausted(f"no room for {what} under {where}: {e.strerror}") from None


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
