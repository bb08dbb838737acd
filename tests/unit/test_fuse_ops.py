"""Per-operation FUSE request counters, through a real mount, and how `lazysnap status` prints them."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from snapshotter.api.lazysnap.v1 import status_pb2
from snapshotter import cli, status
from snapshotter.cli import format_fuse
import trio

from snapshotter.fuse import FuseStats, LayerFilesystem, XattrsUnsupported
from snapshotter.layers.tree import EntryType, LayerEntry
from snapshotter.mounts import Kind, compose, overlay_index_off
from tests.unit.fuse_layers import blocking, failing, memory_layer, reg, serving

pytestmark = pytest.mark.timeout(120)


def package_tree(packages: int = 20, files: int = 10) -> list[LayerEntry]:
    """A small node_modules: `packages` directories of `files` files, half of them in `lib/`."""
    return [reg(f"node_modules/p{p}/{'lib/' if i % 2 else ''}f{i}.js", b"x") for p in range(packages)
            for i in range(files)]


async def container_overlay(layer_dir: Path, work: Path) -> Path:
    """An overlay mount over one layer directory, as containerd composes a container's rootfs."""
    target, upperdir, workdir = work / "rootfs", work / "fs", work / "work"
    for d in (target, upperdir, workdir):
        d.mkdir()
    (m,) = compose(Kind.ACTIVE, upperdir, workdir, [layer_dir], index_off=overlay_index_off())
    await trio.run_process(["mount", "-t", "overlay", "overlay", "-o", ",".join(m.options), str(target)])
    return target


def test_record_and_report() -> None:
    stats = FuseStats()
    stats.record("lookup", 0.25)
    stats.record("lookup", 0.5)
    stats.record("read", 1.0)
    stats.read_bytes = 10
    assert stats.count("lookup") == 2 and stats.count("read") == 1 and stats.count("open") == 0
    assert stats.report() == {
        "ops": [{"name": "lookup", "count": 2, "seconds": 0.75}, {"name": "read", "count": 1, "seconds": 1.0}],
        "read_bytes": 10, "read_errors": 0,
    }
    reply = status_pb2.Fuse(**stats.report())  # type: ignore[arg-type]
    assert [(op.name, op.count) for op in reply.ops] == [("lookup", 2), ("read", 1)]


def test_format_fuse() -> None:
    text = format_fuse(status_pb2.Fuse(ops=[status_pb2.FuseOp(name="readdir", count=4, seconds=0.002)],
                                       read_bytes=3 * 1024 * 1024, read_errors=1))
    header, row, total = text.splitlines()
    assert header.split() == ["FUSE", "OP", "REQUESTS", "SECONDS", "US/REQ"]
    assert row.split() == ["readdir", "4", "0.002", "500"]
    assert "1 read errors" in total


@pytest.mark.parametrize("flag", [[], ["--fuse"]])
def test_status_prints_fuse_requests_when_asked(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                                flag: list[str]) -> None:
    class Client:
        def __init__(self, address: Path) -> None: ...
        def close(self) -> None: ...

        def layers(self) -> status_pb2.LayersResponse:
            return status_pb2.LayersResponse(fuse=status_pb2.Fuse(ops=[status_pb2.FuseOp(name="getxattr", count=7)]))

    monkeypatch.setattr(status, "StatusClient", Client)
    with pytest.raises(SystemExit) as done:
        cli.main(["status", "--address", "/nonexistent.sock", *flag])
    out = capsys.readouterr().out.splitlines()
    assert done.value.code == 0 and out[0].startswith("LAYER")
    if flag:
        assert out[1].startswith("cache: ") and out[2].startswith("FUSE OP") and out[3].split()[:2] == ["getxattr", "7"]
    else:
        assert len(out) == 2 and out[1].startswith("cache: ")  # the default output stays as scripts parse it


def test_status_json_is_the_whole_reply_with_numbers_as_numbers(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    reply = status_pb2.LayersResponse(
        layers=[status_pb2.Layer(digest="sha256:" + "a" * 64, mode="estargz", size=3 << 30, fetched_bytes=7),
                status_pb2.Layer(digest="sha256:" + "b" * 64, mode="fallback", reason="no index")],
        cache=status_pb2.Cache(bytes=10, hits=4), data_planes=[status_pb2.DataPlane(generation=2, pid=99, layers=1)])

    class Client:
        def __init__(self, address: Path) -> None: ...
        def close(self) -> None: ...

        def layers(self) -> status_pb2.LayersResponse:
            return reply

    monkeypatch.setattr(status, "StatusClient", Client)
    with pytest.raises(SystemExit) as done:
        cli.main(["status", "--address", "/nonexistent.sock", "--json"])
    assert done.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layers"][0]["size"] == 3 << 30 and out["layers"][1]["reason"] == "no index"
    assert out["cache"]["hits"] == 4 and out["data_planes"] == [
        {"generation": 2, "pid": 99, "retiring": False, "layers": 1, "build": ""}]
    with pytest.raises(SystemExit):
        cli.main(["status", "--address", "/nonexistent.sock"])
    table = capsys.readouterr().out.splitlines()
    assert table[2].split()[:3] == ["sha256:bbbbbbbbbbbb", "fallback", "-"], "a layer containerd pulls has no size here"


@pytest.mark.usefixtures("needs_fuse")
async def test_requests_counted_by_operation(mnt: Path) -> None:
    fs = LayerFilesystem()
    fs.attach("layer", memory_layer([reg(f"d/f{i}", b"data") for i in range(50)] + [reg("bad", failing(), size=10)]))
    async with serving(mnt, fs):
        names = await blocking(os.listdir, mnt / "layer" / "d")
        data = await blocking((mnt / "layer" / "d" / "f7").read_bytes)
        with pytest.raises(OSError) as caught:
            await blocking((mnt / "layer" / "bad").read_bytes)
    assert len(names) == 50 and data == b"data" and caught.value.errno == errno.EIO
    for op in ("lookup", "opendir", "readdir", "releasedir", "open", "read", "release"):
        assert fs.stats.count(op) >= 1, op
    assert fs.stats.read_bytes == 4 and fs.stats.read_errors >= 1
    assert all(c.seconds >= 0 for c in fs.stats.ops.values())


def test_attach_refuses_xattrs_when_they_are_off() -> None:
    fs = LayerFilesystem(xattrs=False)
    fs.attach("plain", memory_layer(package_tree(2, 2)))
    caps = memory_layer([reg("bin/ping", b"x", xattrs={"security.capability": b"\x01"})])
    assert not fs.accepts(caps) and LayerFilesystem().accepts(caps)
    with pytest.raises(XattrsUnsupported):
        fs.attach("caps", memory_layer([reg("bin/ping", b"x", xattrs={"security.capability": b"\x01"})]))
    with pytest.raises(XattrsUnsupported):
        fs.attach("opaque", memory_layer([LayerEntry("etc/.wh..wh..opq", EntryType.REG)]))
    assert fs.layers() == ["plain"]


@pytest.mark.usefixtures("needs_fuse")
async def test_without_xattrs_the_kernel_asks_once(mnt: Path) -> None:
    fs = LayerFilesystem(xattrs=False)
    fs.attach("layer", memory_layer(package_tree(2, 2)))
    async with serving(mnt, fs):
        files = [mnt / "layer" / "node_modules" / f"p{p}" / name for p in range(2) for name in ("f0.js", "lib/f1.js")]
        for path in files * 3:
            with pytest.raises(OSError) as caught:
                await blocking(os.getxattr, path, "user.x")
            assert caught.value.errno == errno.EOPNOTSUPP
        with pytest.raises(OSError):
            await blocking(os.listxattr, files[0])
    assert fs.stats.count("getxattr") == 1 and fs.stats.count("listxattr") == 1


@pytest.mark.usefixtures("needs_fuse")
@pytest.mark.parametrize("xattrs", [True, False])
async def test_overlay_asks_each_lower_entry_for_xattrs(mnt: Path, tmp_path: Path, xattrs: bool) -> None:
    """Why a container's `du` over a lazy layer is slow: overlayfs sends a getxattr for
    every lower file and directory it looks up, and the kernel caches no xattr answer."""
    packages, files = 20, 10
    fs = LayerFilesystem(xattrs=xattrs)
    fs.attach("layer", memory_layer(package_tree(packages, files)))
    async with serving(mnt, fs):
        rootfs = await container_overlay(mnt / "layer", tmp_path)
        before = fs.stats.count("getxattr")
        du = await trio.run_process(["du", "-s", str(rootfs / "node_modules")], capture_stdout=True)
        asked = fs.stats.count("getxattr") - before
        await trio.run_process(["umount", str(rootfs)])
    assert du.stdout
    if xattrs:
        assert asked >= packages * files, asked  # at least one per file (trusted.overlay.metacopy)
    else:
        assert asked <= 1, asked
