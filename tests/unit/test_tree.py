import os
import stat

import pytest

from snapshotter.cache import ChunkCache
from snapshotter.formats.errors import FormatError
from snapshotter.layer_modes import LayerMode
from snapshotter.layers import saved
from snapshotter.layers.tree import OPAQUE_XATTR, ROOT_INO, EntryType, LayerEntry, TreeError, build_tree
from tests.harness.estargz import encode_toc, toc_member
from tests.unit.blobs import MemoryBlob

D, R, L, H, C = EntryType.DIR, EntryType.REG, EntryType.SYMLINK, EntryType.HARDLINK, EntryType.CHAR


def test_implicit_directories_and_attributes() -> None:
    tree = build_tree([
        LayerEntry("./usr/bin/tool", R, mode=0o4755, uid=1000, gid=2000, size=5, content="h"),
        LayerEntry("usr/", D, mode=0o750),
    ])
    usr = tree.resolve("usr")
    assert usr is not None and stat.S_IMODE(usr.mode) == 0o750 and usr.is_dir
    tool = tree.resolve("/usr/bin/tool")
    assert tool is not None
    assert (stat.S_ISREG(tool.mode), stat.S_IMODE(tool.mode), tool.uid, tool.gid, tool.size, tool.content) == (
        True, 0o4755, 1000, 2000, 5, "h")
    bin_ = tree.resolve("usr/bin")
    assert bin_ is not None and stat.S_IMODE(bin_.mode) == 0o755 and bin_.parent == usr.ino


def test_whiteouts_and_opaque_dirs_in_overlay_form() -> None:
    tree = build_tree([
        LayerEntry("etc", D),
        LayerEntry("etc/.wh.passwd", R),
        LayerEntry("opt", D, mode=0o700),
        LayerEntry("opt/.wh..wh..opq", R),
        LayerEntry("opt/new", R, size=1),
    ])
    wh = tree.resolve("etc/passwd")
    assert wh is not None and stat.S_ISCHR(wh.mode) and wh.rdev == os.makedev(0, 0)
    assert tree.resolve("etc/.wh.passwd") is None
    opt = tree.resolve("opt")
    assert opt is not None and opt.xattrs == {OPAQUE_XATTR: b"y"}
    assert [name for name, _ in tree.entries(opt.ino)] == [b"new"]


def test_hardlinks_share_an_inode_and_count_links() -> None:
    tree = build_tree([
        LayerEntry("a/link", H, link_name="b/file"),  # before its target, as some indexes do
        LayerEntry("b/file", R, size=3),
        LayerEntry("b/second", H, link_name="./b/file"),
    ])
    a, b, c = (tree.resolve(p) for p in ("a/link", "b/file", "b/second"))
    assert a is b is c and b is not None and b.nlink == 3


def test_hardlink_attributes_land_on_the_shared_inode() -> None:
    """containerd's applier chowns and chmods through the link's name: the last header wins."""
    tree = build_tree([
        LayerEntry("f", R, mode=0o755, uid=1, gid=1, size=3, mtime_ns=10),
        LayerEntry("g", H, link_name="f", mode=0o600, uid=7, gid=8, mtime_ns=20, xattrs={"user.x": b"1"}),
    ])
    f = tree.resolve("f")
    assert f is not None and f is tree.resolve("g")
    assert (stat.S_IMODE(f.mode), f.uid, f.gid, f.mtime_ns, f.xattrs) == (0o600, 7, 8, 20, {b"user.x": b"1"})
    assert stat.S_ISREG(f.mode)


def test_hardlink_to_nothing_is_an_error() -> None:
    with pytest.raises(TreeError, match="hardlink"):
        build_tree([LayerEntry("x", H, link_name="missing")])


def test_tree_error_is_a_format_error() -> None:
    """A broken tree is a broken index: callers that catch FormatError (mount falls back,
    restore fails the layer) catch it too, instead of it surfacing as an INTERNAL error."""
    assert issubclass(TreeError, FormatError)
    with pytest.raises(FormatError, match="hardlink"):
        build_tree([LayerEntry("a", R, size=1), LayerEntry("b", H, link_name="nowhere")])


def test_saved_estargz_index_with_a_hardlink_to_nothing_is_a_format_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    toc = {"version": 1, "entries": [
        {"name": "dir", "type": "dir", "mode": 0o755},
        {"name": "dir/link", "type": "hardlink", "linkName": "dir/missing"},
    ]}
    member = toc_member(encode_toc(toc))
    with pytest.raises(FormatError, match="hardlink") as raised:
        saved.build_layer(LayerMode.ESTARGZ, member, 100, MemoryBlob(b"\0" * 100), ChunkCache(tmp_path, 1 << 20), None)
    assert isinstance(raised.value, TreeError)
    # The same index with its target present builds.
    toc["entries"].insert(1, {"name": "dir/missing", "type": "reg", "size": 0})
    layer, digest = saved.build_layer(LayerMode.ESTARGZ, toc_member(encode_toc(toc)), 100, MemoryBlob(b"\0" * 100),
                                      ChunkCache(tmp_path, 1 << 20), None)
    assert layer.tree.resolve("dir/link") is layer.tree.resolve("dir/missing") is not None
    assert digest.startswith("sha256:")


def test_symlinks_devices_xattrs_and_unicode() -> None:
    tree = build_tree([
        LayerEntry("bin/sh", L, link_name="busybox"),
        LayerEntry("dev/null", C, mode=0o666, dev_major=1, dev_minor=3),
        LayerEntry("données/ü.txt", R, xattrs={"user.k": b"\x00v"}),
    ])
    sh = tree.resolve("bin/sh")
    assert sh is not None and stat.S_ISLNK(sh.mode) and sh.target == b"busybox" and sh.size == 7
    null = tree.resolve("dev/null")
    assert null is not None and null.rdev == os.makedev(1, 3)
    f = tree.resolve("données/ü.txt")
    assert f is not None and f.xattrs == {b"user.k": b"\x00v"}


def test_later_entries_replace_earlier_ones() -> None:
    tree = build_tree([
        LayerEntry("d", D), LayerEntry("d/f", R, size=1),
        LayerEntry("d", D, mode=0o711),  # repeated dir: attributes change, children stay
        LayerEntry("x", D), LayerEntry("x/y", R),
        LayerEntry("x", R, size=9),  # a file replaces a whole directory
    ])
    d = tree.resolve("d")
    assert d is not None and stat.S_IMODE(d.mode) == 0o711 and tree.resolve("d/f") is not None
    x = tree.resolve("x")
    assert x is not None and x.size == 9 and not x.is_dir
    assert len(tree.nodes) == 4  # root, d, d/f, x: the old x/y is gone
    assert tree.root.nlink == 3


def test_directory_link_counts() -> None:
    tree = build_tree([LayerEntry("a", D), LayerEntry("a/b", D), LayerEntry("a/c", D), LayerEntry("f", R)])
    assert tree.node(ROOT_INO).nlink == 3
    a = tree.resolve("a")
    assert a is not None and a.nlink == 4
