"""EROFS metadata images: checked by erofs-utils' fsck, and mounted by the real kernel."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from snapshotter.formats import erofs
from snapshotter.formats.errors import FormatError
from snapshotter.layers.erofs import DataDevice, image_of, kernel_supports_erofs, mount, release, unmount
from snapshotter.layers.tree import ROOT_INO, EntryType, LayerEntry, LayerTree, Node, build_tree
from tests.harness.procs import require_tool

MTIME = 1_700_000_000_250_000_000


def entries() -> list[LayerEntry]:
    """One of everything a layer holds, with names that sort before `.` and span directory blocks."""
    out = [
        LayerEntry("etc/", EntryType.DIR, mode=0o750, uid=3, gid=4, mtime_ns=MTIME),
        LayerEntry("etc/hello.txt", EntryType.REG, mode=0o640, uid=1000, gid=100, size=13, mtime_ns=MTIME),
        LayerEntry("etc/big.bin", EntryType.REG, mode=0o600, size=3 * erofs.BLOCK_SIZE + 17),
        LayerEntry("etc/empty", EntryType.REG, size=0),
        LayerEntry("etc/link", EntryType.SYMLINK, mode=0o777, link_name="hello.txt"),
        LayerEntry("etc/long-link", EntryType.SYMLINK, mode=0o777, link_name="x/" * 2000),
        LayerEntry("etc/hard", EntryType.HARDLINK, mode=0o640, uid=1000, gid=100, mtime_ns=MTIME,
                   link_name="etc/hello.txt"),
        LayerEntry("opaque/.wh..wh..opq", EntryType.REG),
        LayerEntry("opaque/kept", EntryType.REG, size=3),
        LayerEntry(".wh.gone", EntryType.REG),
        LayerEntry("dev/null", EntryType.CHAR, mode=0o666, dev_major=1, dev_minor=3),
        LayerEntry("dev/sda1", EntryType.BLOCK, mode=0o660, dev_major=8, dev_minor=300),
        LayerEntry("fifo", EntryType.FIFO, mode=0o644),
        LayerEntry("-dash", EntryType.REG, size=1),
        LayerEntry("!bang", EntryType.DIR, mode=0o755),
        LayerEntry("tagged", EntryType.REG, size=2, xattrs={"user.origin": b"lazysnap", "trusted.t": b"1"}),
    ]
    out += [LayerEntry(f"many/{i:04d}-{'n' * (i % 200)}", EntryType.REG, size=i % 7) for i in range(700)]
    return out


def content(ino: int, size: int) -> bytes:
    return bytes((ino * 7 + i) % 251 for i in range(size))


class FakeLayer:
    """A layer whose files hold `content(ino, size)`; records each read."""

    def __init__(self, tree: LayerTree) -> None:
        self.tree = tree
        self.reads: list[tuple[int, int, int]] = []

    async def read(self, node: Node, offset: int, size: int) -> bytes:
        self.reads.append((node.ino, offset, size))
        return content(node.ino, node.size)[offset:offset + size]


@pytest.fixture
def layer() -> FakeLayer:
    return FakeLayer(build_tree(entries()))


def write(tmp_path: Path, layer: FakeLayer) -> tuple[Path, Path, erofs.Image]:
    """The image and a data device file holding every file's bytes at the image's offsets."""
    image = image_of(layer)
    meta, data = tmp_path / "meta.erofs", tmp_path / "data"
    meta.write_bytes(image.meta)
    device = bytearray(image.data_size)
    for extent in image.extents:
        device[extent.offset:extent.offset + extent.size] = content(extent.ino, extent.size)
    data.write_bytes(device)
    return meta, data, image


@pytest.fixture
def mounted(tmp_path: Path, layer: FakeLayer) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("mounting EROFS needs root (CI has it)", pytrace=False)
    meta, data, _ = write(tmp_path, layer)
    target = tmp_path / "mnt"
    mount(meta, data, target)
    try:
        yield target
    finally:
        release(target)


def expected_paths(tree: LayerTree, ino: int = ROOT_INO, prefix: str = "") -> Iterator[tuple[str, Node]]:
    for name, node in tree.entries(ino):
        path = prefix + os.fsdecode(name)
        yield path, node
        if node.is_dir:
            yield from expected_paths(tree, node.ino, path + "/")


def test_fsck_accepts_the_image_and_extracts_the_same_tree(tmp_path: Path, layer: FakeLayer) -> None:
    fsck = require_tool("fsck.erofs", "erofs-utils")
    meta, data, _ = write(tmp_path, layer)
    out = tmp_path / "out"
    done = subprocess.run([fsck, f"--device={data}", f"--extract={out}", str(meta)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr + done.stdout
    for path, node in expected_paths(layer.tree):
        st = os.lstat(out / path)
        assert stat.S_IFMT(st.st_mode) == stat.S_IFMT(node.mode), path
        if stat.S_ISREG(node.mode):
            assert (out / path).read_bytes() == content(node.ino, node.size), path
        elif stat.S_ISLNK(node.mode):
            assert os.readlink(out / path) == os.fsdecode(node.target), path


def test_the_kernel_serves_every_inode_as_the_tree_says(mounted: Path, layer: FakeLayer) -> None:
    for path, node in expected_paths(layer.tree):
        st = os.lstat(mounted / path)
        assert (st.st_mode, st.st_uid, st.st_gid, st.st_nlink) == (node.mode, node.uid, node.gid, node.nlink), path
        assert st.st_mtime_ns == node.mtime_ns, path
        assert st.st_rdev == node.rdev, path
        if stat.S_ISREG(node.mode):
            assert (mounted / path).read_bytes() == content(node.ino, node.size), path
        elif stat.S_ISLNK(node.mode):
            assert os.readlink(mounted / path) == os.fsdecode(node.target), path
        elif node.is_dir:
            assert sorted(os.listdir(mounted / path)) == sorted(os.fsdecode(n) for n in node.children or {}), path
        assert sorted(os.listxattr(mounted / path, follow_symlinks=False)) == sorted(
            os.fsdecode(k) for k in node.xattrs), path
        for key, value in node.xattrs.items():
            assert os.getxattr(mounted / path, key, follow_symlinks=False) == value, path


def test_overlay_markers_reach_the_kernel_in_overlay_form(mounted: Path) -> None:
    assert os.getxattr(mounted / "opaque", "trusted.overlay.opaque") == b"y"
    gone = os.lstat(mounted / "gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert os.stat(mounted / "etc/hard").st_ino == os.stat(mounted / "etc/hello.txt").st_ino
    assert os.stat(mounted / "dev/sda1").st_rdev == os.makedev(8, 300)
    with pytest.raises(OSError):
        os.getxattr(mounted / "etc", "trusted.overlay.opaque")


def test_a_large_directory_is_found_by_every_name(mounted: Path, layer: FakeLayer) -> None:
    many = layer.tree.resolve("many")
    assert many is not None and many.children is not None
    assert len(many.children) == 700
    for name in many.children:
        assert (mounted / "many" / os.fsdecode(name)).exists(), name  # a lookup: binary search across blocks
    assert not (mounted / "many" / "0000-missing").exists()


def test_image_layout_is_block_aligned_and_deterministic(layer: FakeLayer) -> None:
    image = image_of(layer)
    assert image == image_of(layer)
    assert len(image.meta) % erofs.BLOCK_SIZE == 0 and image.data_size % erofs.BLOCK_SIZE == 0
    assert int.from_bytes(image.meta[1024:1028], "little") == erofs.MAGIC
    offsets = [e.offset for e in image.extents]
    assert offsets == sorted(offsets) and all(o % erofs.BLOCK_SIZE == 0 for o in offsets)
    regular = [n for n in layer.tree.nodes.values() if stat.S_ISREG(n.mode) and n.size]
    assert sorted(e.ino for e in image.extents) == sorted(n.ino for n in regular)


@pytest.mark.parametrize("xattrs, why", [
    ({b"system.nfs4_acl": b"x"}, "namespace"),
    ({b"user.big": b"v" * 5000}, "do not fit"),
    ({b"user." + b"n" * 256: b"v"}, "too long"),
])
def test_what_erofs_cannot_store_is_a_format_error(xattrs: dict[bytes, bytes], why: str) -> None:
    tree = build_tree([LayerEntry("f", EntryType.REG, size=1)])
    node = tree.resolve("f")
    assert node is not None
    node.xattrs = xattrs
    with pytest.raises(FormatError, match=why):
        erofs.build(tree.nodes, ROOT_INO)


@pytest.mark.parametrize("field, value", [("uid", 1 << 32), ("gid", 1 << 40), ("rdev", os.makedev(5000, 1))])
def test_numbers_beyond_erofs_fields_are_a_format_error(field: str, value: int) -> None:
    tree = build_tree([LayerEntry("dev/x", EntryType.CHAR, dev_major=1, dev_minor=1)])
    node = tree.resolve("dev/x")
    assert node is not None
    setattr(node, field, value)
    with pytest.raises(FormatError, match="cannot store|more than EROFS"):
        erofs.build(tree.nodes, ROOT_INO)


def test_a_root_that_is_not_a_directory_is_a_format_error() -> None:
    tree = build_tree([LayerEntry("f", EntryType.REG, size=1)])
    node = tree.resolve("f")
    assert node is not None
    with pytest.raises(FormatError, match="directory"):
        erofs.build(tree.nodes, node.ino)


async def test_data_device_reads_files_and_zero_padding(layer: FakeLayer) -> None:
    image = image_of(layer)
    device = DataDevice(layer, image.data_size, image.extents)
    node = device.tree.resolve("data")
    assert node is not None and node.size == image.data_size and device.direct_io
    expected = bytearray(image.data_size)
    for extent in image.extents:
        expected[extent.offset:extent.offset + extent.size] = content(extent.ino, extent.size)
    big = next(e for e in image.extents if e.size > erofs.BLOCK_SIZE)
    for offset, size in [(0, image.data_size), (big.offset + 5, 100), (big.offset + big.size - 3, 10_000),
                         (image.data_size - 10, 100), (image.data_size, 10)]:
        assert await device.read(node, offset, size) == bytes(expected[offset:offset + size]), (offset, size)
    layer.reads.clear()
    await device.read(node, big.offset + big.size, erofs.BLOCK_SIZE - big.size % erofs.BLOCK_SIZE)
    assert layer.reads == [], "padding after a file is zeros, not a read of the layer"


def test_the_probe_mounts_and_cleans_up(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("mounting EROFS needs root (CI has it)", pytrace=False)
    assert kernel_supports_erofs(tmp_path / "probe") is None
    assert list((tmp_path / "probe").iterdir()) == []


def test_unmount_of_nothing_is_an_error_that_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(OSError, match=str(tmp_path)):
        unmount(tmp_path)


async def test_reads_through_fuse_reach_the_layer(tmp_path: Path, layer: FakeLayer) -> None:
    """The whole path: kernel EROFS -> FUSE data device -> layer.read."""
    from snapshotter.fuse.filesystem import LayerFilesystem
    from snapshotter.fuse.mount import serve_fuse

    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.fail("needs root and /dev/fuse (CI has both)", pytrace=False)
    image = image_of(layer)
    meta = tmp_path / "meta.erofs"
    meta.write_bytes(image.meta)
    fs = LayerFilesystem()
    target = tmp_path / "erofs"

    def walk() -> dict[str, bytes]:
        mount(meta, tmp_path / "fuse" / "x" / "data", target)
        try:
            return {path: (target / path).read_bytes() for path, node in expected_paths(layer.tree)
                    if stat.S_ISREG(node.mode)}
        finally:
            release(target)

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_fuse, tmp_path / "fuse", fs)
        fs.attach("x", DataDevice(layer, image.data_size, image.extents))
        files = await trio.to_thread.run_sync(walk)
        nursery.cancel_scope.cancel()
    for path, node in expected_paths(layer.tree):
        if stat.S_ISREG(node.mode):
            assert files[path] == content(node.ino, node.size), path
    assert {ino for ino, _, _ in layer.reads} == {e.ino for e in image.extents}
