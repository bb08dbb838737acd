"""The snapshot state machine, called directly, with faults injected where a crash could strike."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapshotter.errors import FailedPrecondition, NotFound
from snapshotter.snapshots import Snapshotter, disk_usage
from snapshotter.store import Kind, Store


@pytest.fixture
def snapshotter(tmp_path: Path) -> Snapshotter:
    return Snapshotter(tmp_path, Store(tmp_path / "metadata.db"))


def test_failed_rename_leaves_no_row_and_no_directory(snapshotter: Snapshotter, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_rename(self: Path, target: Path) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(Path, "rename", broken_rename)
    with pytest.raises(OSError, match="disk on fire"):
        snapshotter.prepare("a", "", {})
    monkeypatch.undo()
    with pytest.raises(NotFound):
        snapshotter.stat("a")
    assert list(snapshotter.dir.iterdir()) == []


def test_directory_of_an_uncommitted_id_is_replaced(snapshotter: Snapshotter) -> None:
    """A crash after the rename but before COMMIT leaves snapshots/<id> with no row; the id comes again."""
    (snapshotter.dir / "1" / "fs").mkdir(parents=True)
    (snapshotter.dir / "1" / "fs" / "stale").write_text("old")
    mounts = snapshotter.prepare("a", "", {})
    assert list(Path(mounts[0].source).iterdir()) == []


def test_ids_are_never_reused(snapshotter: Snapshotter) -> None:
    snapshotter.prepare("a", "", {})
    first = snapshotter.mounts("a")[0].source
    snapshotter.remove("a")
    snapshotter.prepare("b", "", {})
    assert snapshotter.mounts("b")[0].source != first


def test_directory_left_by_interrupted_remove_goes_at_cleanup(snapshotter: Snapshotter, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshotter.prepare("a", "", {})
    path = Path(snapshotter.mounts("a")[0].source).parent
    monkeypatch.setattr(Snapshotter, "_delete_dir", staticmethod(lambda p: None))
    snapshotter.remove("a")
    monkeypatch.undo()
    assert path.exists()
    assert snapshotter.cleanup() == [path]
    assert not path.exists()


def test_commit_keeps_directory_and_replaces_labels(snapshotter: Snapshotter) -> None:
    mounts = snapshotter.prepare("a", "", {"containerd.io/snapshot/x": "1", "empty": ""})
    assert snapshotter.stat("a").labels == {"containerd.io/snapshot/x": "1"}
    snap = snapshotter.commit("c", "a", {"y": "2"})
    assert (snap.kind, snap.labels) == (Kind.COMMITTED, {"y": "2"})
    assert snapshotter.view("v", "c", {})[0].source == mounts[0].source


def test_only_active_snapshots_commit(snapshotter: Snapshotter) -> None:
    snapshotter.view("v", "", {})
    with pytest.raises(FailedPrecondition):
        snapshotter.commit("c", "v", {})


def test_child_owner_follows_parent_root(snapshotter: Snapshotter) -> None:
    import os

    base = snapshotter.prepare("a", "", {})
    os.chown(base[0].source, 1234, 5678)
    snapshotter.commit("c", "a", {})
    mounts = snapshotter.prepare("b", "c", {})
    upper = next(o for o in mounts[0].options if o.startswith("upperdir=")).removeprefix("upperdir=")
    st = os.stat(upper)
    assert (st.st_uid, st.st_gid) == (1234, 5678)


def test_disk_usage_counts_hardlinks_once(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 8192)
    (tmp_path / "g").hardlink_to(tmp_path / "f")
    usage = disk_usage(tmp_path)
    assert usage.inodes == 2 and 8192 <= usage.size < 2 * 8192 + 4096


class FakeRemote:
    """Serves every layer whose digest is in `lazy`; records what it was asked."""

    def __init__(self, store: Store, lazy: set[str], mnt_dir: Path, whole: frozenset[str] = frozenset()) -> None:
        self.store, self.lazy, self.mnt_dir, self.whole = store, lazy, mnt_dir, whole
        self.released: list[str] = []
        self.parents: list[list[Path]] = []

    def mount(self, request):  # type: ignore[no-untyped-def]
        if request.layer_digest not in self.lazy:
            return None
        with self.store.transaction() as tx:
            layer_id = tx.put_layer(request.layer_digest, request.image_ref, "estargz", 100, "sha256:toc", 50).id
        (self.mnt_dir / str(layer_id)).mkdir(parents=True, exist_ok=True)  # where the layer would be mounted
        return layer_id

    def pull_whole(self, request, dest: Path, parents: list[Path]) -> bool:  # type: ignore[no-untyped-def]
        if request.layer_digest not in self.whole:
            return False
        (dest / "pulled.txt").write_text(request.layer_digest)
        self.parents.append(parents)
        return True

    def release(self, layers):  # type: ignore[no-untyped-def]
        self.released += [rec.digest for rec in layers]

    def layer_path(self, layer_id: int) -> Path:
        return self.mnt_dir / str(layer_id)


def remote_labels(chain: str, layer: str) -> dict[str, str]:
    from snapshotter import labels as L

    return L.cri_labels(chain, "127.0.0.1:1/img:1", "sha256:m", layer, [layer])


def test_remote_handshake_commits_target_and_answers_already_exists(tmp_path: Path) -> None:
    from snapshotter import labels as L
    from snapshotter.errors import AlreadyExists

    store = Store(tmp_path / "metadata.db")
    remote = FakeRemote(store, lazy={"sha256:l1"}, mnt_dir=tmp_path / "mnt")
    sn = Snapshotter(tmp_path, store, remote=remote)
    with pytest.raises(AlreadyExists):
        sn.prepare("default/1/extract-1 c1", "", remote_labels("c1", "sha256:l1"))
    with pytest.raises(NotFound):
        sn.stat("default/1/extract-1 c1")  # no temporary active snapshot is left behind
    (snap,) = sn.list([f'labels."{L.TARGET}"==c1,parent==""'])
    assert (snap.key, snap.kind, snap.labels[L.REMOTE]) == ("c1", Kind.COMMITTED, "lazysnap")
    # a layer that cannot be served lazily gets an ordinary active snapshot on top
    mounts = sn.prepare("default/2/extract-2 c2", "c1", remote_labels("c2", "sha256:l2"))
    lower = next(o for o in mounts[0].options if o.startswith("lowerdir=")).removeprefix("lowerdir=")
    assert lower == str(sn.layer_path(snap.layer_id or 0))
    # the same target asked again (another namespace) is already there
    with pytest.raises(AlreadyExists):
        sn.prepare("k8s.io/1/extract-3 c1", "", remote_labels("c1", "sha256:l1"))
    sn.remove("default/2/extract-2 c2")
    sn.cleanup()
    assert remote.released == []
    # one lazysnap pulls whole itself is committed as the target too, on the layers below
    remote.whole = frozenset({"sha256:l3"})
    with pytest.raises(AlreadyExists, match="pulled whole by lazysnap"):
        sn.prepare("default/4/extract-4 c3", "c1", remote_labels("c3", "sha256:l3"))
    whole = sn.stat("c3")
    assert (whole.kind, whole.parent, whole.layer_id) == (Kind.COMMITTED, "c1", None)
    assert (sn.fs_path(whole.id) / "pulled.txt").read_text() == "sha256:l3"
    assert remote.parents == [[sn.layer_path(snap.layer_id or 0)]]
    assert not [p for p in sn.dir.iterdir() if p.name.startswith("new-")]
    sn.remove("c3")
    sn.remove("c1")
    sn.cleanup()
    assert remote.released == ["sha256:l1"]


def test_without_remote_labels_are_just_labels(tmp_path: Path) -> None:
    store = Store(tmp_path / "metadata.db")
    sn = Snapshotter(tmp_path, store, remote=FakeRemote(store, lazy={"sha256:l1"}, mnt_dir=tmp_path / "mnt"))
    sn.prepare("k", "", {"containerd.io/snapshot.ref": "c1"})  # no image/layer: not a remote request
    assert sn.stat("k").kind == Kind.ACTIVE


def test_a_full_disk_is_resource_exhausted_not_internal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import tempfile

    from snapshotter.errors import ResourceExhausted

    sn = Snapshotter(tmp_path, Store(tmp_path / "metadata.db"))

    def full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkdtemp", full)
    with pytest.raises(ResourceExhausted, match="No space left on device"):
        sn.prepare("k", "", {})
    monkeypatch.undo()
    with pytest.raises(NotFound):
        sn.stat("k")  # nothing recorded
