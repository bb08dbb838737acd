"""Every RPC through a real gRPC client against a real `lazysnap serve` process."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.api.containerd.services.snapshots.v1.snapshots_pb2_grpc import SnapshotsStub
from tests.harness.lazysnap import Lazysnap, mounts_below
from tests.harness.procs import wait_until

REF = "containerd.io/snapshot.ref"


def prepare(client: SnapshotsStub, key: str, parent: str = "", **labels: str) -> list[pb.containerd_dot_types_dot_mount__pb2.Mount]:
    return list(client.Prepare(pb.PrepareSnapshotRequest(snapshotter="lazysnap", key=key, parent=parent, labels=labels)).mounts)


def commit(client: SnapshotsStub, name: str, key: str, **labels: str) -> None:
    client.Commit(pb.CommitSnapshotRequest(snapshotter="lazysnap", name=name, key=key, labels=labels))


def layer(client: SnapshotsStub, name: str, parent: str = "", files: dict[str, bytes] | None = None, **labels: str) -> None:
    """Prepare, write files into the upper dir as containerd's applier would, commit."""
    mounts = prepare(client, f"extract-{name}", parent)
    upper = Path(mounts[0].source if mounts[0].type == "bind" else _opt(mounts[0].options, "upperdir="))
    for rel, data in (files or {}).items():
        (upper / rel).write_bytes(data)
    commit(client, name, f"extract-{name}", **labels)


def _opt(options: list[str], prefix: str) -> str:
    return next(o.removeprefix(prefix) for o in options if o.startswith(prefix))


def code_of(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def names(client: SnapshotsStub, *filters: str) -> list[str]:
    return [i.name for resp in client.List(pb.ListSnapshotsRequest(filters=filters)) for i in resp.info]


def test_socket_is_private(daemon: Lazysnap) -> None:
    assert stat.S_IMODE(os.stat(daemon.address).st_mode) == 0o600


def test_prepare_commit_chain_gives_overlay_mounts_nearest_first(client: SnapshotsStub) -> None:
    mounts = prepare(client, "k1")
    assert [(m.type, list(m.options)) for m in mounts] == [("bind", ["rw", "rbind"])]
    Path(mounts[0].source, "layer").write_text("c1")
    commit(client, "c1", "k1")
    layer(client, "c2", "c1", files={"layer": b"c2"})
    layer(client, "c3", "c2", files={"layer": b"c3"})
    (m,) = mounts = prepare(client, "top", "c3")
    assert m.type == "overlay" and m.source == "overlay"
    assert [o.split("=")[0] for o in m.options if not o.startswith("index=")] == ["workdir", "upperdir", "lowerdir"]
    lowers = _opt(m.options, "lowerdir=").split(":")
    assert [Path(p, "layer").read_text() for p in lowers] == ["c3", "c2", "c1"]
    assert Path(_opt(m.options, "upperdir=")).is_dir() and Path(_opt(m.options, "workdir=")).is_dir()
    assert list(client.Mounts(pb.MountsRequest(key="top")).mounts) == mounts


def test_views(client: SnapshotsStub) -> None:
    layer(client, "base")
    (m,) = client.View(pb.ViewSnapshotRequest(key="v0")).mounts
    assert (m.type, list(m.options)) == ("bind", ["ro", "rbind"])
    (m,) = client.View(pb.ViewSnapshotRequest(key="v1", parent="base")).mounts
    assert (m.type, list(m.options)) == ("bind", ["ro", "rbind"])
    layer(client, "second", "base")
    (m,) = client.View(pb.ViewSnapshotRequest(key="v2", parent="second")).mounts
    assert m.type == "overlay" and not any(o.startswith(("upperdir=", "workdir=")) for o in m.options)
    assert client.Stat(pb.StatSnapshotRequest(key="v2")).info.kind == pb.VIEW
    assert code_of(lambda: commit(client, "nope", "v2")) == grpc.StatusCode.FAILED_PRECONDITION


def test_stat_reports_kind_parent_labels_and_times(client: SnapshotsStub) -> None:
    layer(client, "c1", **{REF: "c1", "containerd.io/snapshot/x": "y"})
    prepare(client, "a1", "c1")
    info = client.Stat(pb.StatSnapshotRequest(key="c1")).info
    assert info.kind == pb.COMMITTED and info.parent == ""
    assert dict(info.labels) == {REF: "c1", "containerd.io/snapshot/x": "y"}
    assert info.created_at.seconds > 0 and info.updated_at.seconds >= info.created_at.seconds
    info = client.Stat(pb.StatSnapshotRequest(key="a1")).info
    assert (info.kind, info.parent) == (pb.ACTIVE, "c1")


def test_error_codes(client: SnapshotsStub) -> None:
    layer(client, "c1")
    prepare(client, "a1", "c1")
    assert code_of(lambda: client.Stat(pb.StatSnapshotRequest(key="missing"))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.Mounts(pb.MountsRequest(key="missing"))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.Usage(pb.UsageRequest(key="missing"))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.Remove(pb.RemoveSnapshotRequest(key="missing"))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: commit(client, "x", "missing")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: prepare(client, "a2", "missing")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: prepare(client, "a1", "c1")) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(lambda: prepare(client, "c1")) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(lambda: commit(client, "c1", "a1")) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(lambda: client.Remove(pb.RemoveSnapshotRequest(key="c1"))) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: commit(client, "c2", "c1")) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: prepare(client, "")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: prepare(client, "a3", "a1")) == grpc.StatusCode.INVALID_ARGUMENT  # parent not committed
    assert code_of(lambda: prepare(client, "a4", **{"k": "v" * 4096})) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: names(client, "name==")) == grpc.StatusCode.INVALID_ARGUMENT
    bad_mask = pb.UpdateSnapshotRequest(info=pb.Info(name="c1"), update_mask=field_mask_pb2.FieldMask(paths=["parent"]))
    assert code_of(lambda: client.Update(bad_mask)) == grpc.StatusCode.INVALID_ARGUMENT
    # nothing above changed the state
    assert sorted(names(client)) == ["a1", "c1"]


def test_update_labels_by_field_mask(client: SnapshotsStub) -> None:
    layer(client, "c1", a="1", b="2")

    def update(labels: dict[str, str], *paths: str) -> dict[str, str]:
        req = pb.UpdateSnapshotRequest(info=pb.Info(name="c1", labels=labels), update_mask=field_mask_pb2.FieldMask(paths=paths))
        got = dict(client.Update(req).info.labels)
        assert got == dict(client.Stat(pb.StatSnapshotRequest(key="c1")).info.labels)
        return got

    assert update({"c": "3"}, "labels.c") == {"a": "1", "b": "2", "c": "3"}
    assert update({}, "labels.a") == {"b": "2", "c": "3"}  # a path without a value deletes
    assert update({"z": "9"}, "labels") == {"z": "9"}
    assert update({"y": "8"}) == {"y": "8"}  # no mask: replace all


def test_list_streams_all_and_honours_filters(client: SnapshotsStub) -> None:
    layer(client, "c1", **{REF: "c1"})
    layer(client, "c2", "c1", **{REF: "c2"})
    for i in range(150):  # more than one List batch
        prepare(client, f"a{i}", "c2")
    assert len(names(client)) == 152
    assert names(client, f'labels."{REF}"==c2,parent=="c1"') == ["c2"]
    assert names(client, f'labels."{REF}"==c2,parent==""') == []
    assert names(client, 'parent==""') == ["c1"]
    assert sorted(names(client, "name==c1", "name==c2")) == ["c1", "c2"]
    assert len(names(client, "kind==active")) == 150


def test_usage(client: SnapshotsStub) -> None:
    layer(client, "c1", files={"data": b"x" * 100_000})
    committed = client.Usage(pb.UsageRequest(key="c1"))
    assert committed.size >= 100_000 and committed.inodes == 2  # fs dir + file
    mounts = prepare(client, "a1", "c1")
    empty = client.Usage(pb.UsageRequest(key="a1"))
    Path(_opt(mounts[0].options, "upperdir="), "new").write_bytes(b"y" * 50_000)
    grown = client.Usage(pb.UsageRequest(key="a1"))
    assert grown.size >= empty.size + 50_000 and grown.inodes == empty.inodes + 1


def test_remove_deletes_directory_and_cleanup_reconciles(client: SnapshotsStub, daemon: Lazysnap) -> None:
    layer(client, "c1")
    mounts = prepare(client, "a1", "c1")
    upper_dir = Path(_opt(mounts[0].options, "upperdir=")).parent
    client.Remove(pb.RemoveSnapshotRequest(key="a1"))
    assert not upper_dir.exists()
    stray = Path(daemon.root, "snapshots", "9999")
    (stray / "fs").mkdir(parents=True)
    client.Cleanup(pb.CleanupRequest())
    assert not stray.exists()
    assert names(client) == ["c1"]


def test_state_survives_restart(client: SnapshotsStub, daemon: Lazysnap) -> None:
    layer(client, "c1", files={"f": b"hello"}, **{REF: "c1"})
    before = prepare(client, "a1", "c1")
    daemon.restart()
    assert client.Stat(pb.StatSnapshotRequest(key="c1")).info.labels[REF] == "c1"
    assert list(client.Mounts(pb.MountsRequest(key="a1")).mounts) == before
    lower = Path(_opt(before[0].options, "lowerdir="))
    assert (lower / "f").read_bytes() == b"hello"


def test_crash_leftovers_are_removed_at_start(daemon: Lazysnap) -> None:
    daemon.stop()
    snapshots = Path(daemon.root, "snapshots")
    for leftover in ("new-abc123", "42", "rm-7"):
        (snapshots / leftover / "fs").mkdir(parents=True)
    daemon.start()
    assert list(snapshots.iterdir()) == []


def test_ready_is_notified_after_socket_accepts(short_tmp: Path) -> None:
    notify_path = short_tmp / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(30)
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
        ls = Lazysnap(root=short_tmp / "root", address=short_tmp / "ls.sock", log_path=short_tmp / "log", env=env)
        ls.start()
        try:
            assert notify.recv(100) == b"READY=1"
            ls.stop()
            assert notify.recv(100) == b"STOPPING=1"
        finally:
            ls.close()
    assert not (short_tmp / "ls.sock").exists()


def test_sigterm_stops_cleanly(daemon: Lazysnap) -> None:
    assert daemon.stop() == 0
    wait_until(lambda: not daemon.address.exists(), 5, "socket removal")


def test_lazy_off_serves_every_layer_whole(short_tmp: Path) -> None:
    """With `lazy = false` a remote-snapshot Prepare gets ordinary mounts, and no FUSE mount exists."""
    config = short_tmp / "config.toml"
    config.write_text("lazy = false\n")
    ls = Lazysnap(root=short_tmp / "root", address=short_tmp / "ls.sock", log_path=short_tmp / "log", config=config)
    ls.start()
    try:
        with grpc.insecure_channel(f"unix:{ls.address}") as channel:
            client = SnapshotsStub(channel)
            labels = {REF: "sha256:c1", "containerd.io/snapshot/cri.image-ref": "127.0.0.1:1/x:1",
                      "containerd.io/snapshot/cri.layer-digest": "sha256:" + "a" * 64}
            mounts = prepare(client, "extract-1", **labels)
            assert [m.type for m in mounts] == ["bind"]
        assert mounts_below(short_tmp / "root") == [], "nothing (no FUSE mount, no layer) is mounted"
    finally:
        ls.close()
