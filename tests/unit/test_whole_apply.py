"""snapshotter/whole/apply.py: a layer tar applied as containerd's overlayfs applier applies it.

Needs root (lchown, mknod, trusted.* xattrs), like the rest of the suite. Every tar is built
in memory with tarfile. Each test applies it into an empty `target` next to an `outside`
directory, and hostile layers must leave `outside` untouched.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import stat
import tarfile
from pathlib import Path

import pytest

from snapshotter.formats.errors import FormatError
from snapshotter.whole.apply import Applied, ApplyError, apply_layer, copy_up_parents

PAX = tarfile.PAX_FORMAT
GNU = tarfile.GNU_FORMAT


# -- building layers -------------------------------------------------------------------------

def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", *, mode: int = 0o644, uid: int = 0,
           gid: int = 0, mtime: int = 1_600_000_000, linkname: str = "", pax: dict[str, str] | None = None,
           dev: tuple[int, int] = (0, 0)) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode, info.uid, info.gid, info.mtime = mode, uid, gid, mtime
    info.uname = info.gname = ""
    info.linkname = linkname
    info.devmajor, info.devminor = dev
    info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.GNUTYPE_SPARSE) else 0
    info.pax_headers = dict(pax or {})
    return info, data


def d(name: str, **kw) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, tarfile.DIRTYPE, mode=kw.pop("mode", 0o755), **kw)


def f(name: str, data: bytes = b"", **kw) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, tarfile.REGTYPE, data, **kw)


def sym(name: str, target: str, **kw) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, tarfile.SYMTYPE, linkname=target, mode=kw.pop("mode", 0o777), **kw)


def hard(name: str, target: str, **kw) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, tarfile.LNKTYPE, linkname=target, **kw)


def layer(*members: tuple[tarfile.TarInfo, bytes], fmt: int = PAX, trailer: bool = True,
          global_pax: dict[str, str] | None = None) -> bytes:
    """A tar of `members`; without `trailer`, the bytes stop where the end-of-archive marker would start."""
    buf = io.BytesIO()
    tar = tarfile.open(fileobj=buf, mode="w", format=fmt, pax_headers=global_pax)
    for info, data in members:
        tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    end = tar.offset
    tar.close()
    return buf.getvalue() if trailer else buf.getvalue()[:end]


class OneWay:
    """A stream that can only be read forward, as the decompressor's output will be."""

    def __init__(self, data: bytes, fail_after: int | None = None) -> None:
        self._buf = io.BytesIO(data)
        self._fail_after = fail_after

    def read(self, size: int = -1) -> bytes:
        if self._fail_after is not None and self._buf.tell() >= self._fail_after:
            raise ConnectionResetError(errno.ECONNRESET, "connection reset by registry")
        return self._buf.read(size)


@pytest.fixture
def target(tmp_path: Path) -> Path:
    (tmp_path / "target").mkdir()
    return tmp_path / "target"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A sentinel directory beside the target, holding one file: hostile layers must not touch it."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "victim").write_bytes(b"untouched")
    os.utime(path / "victim", ns=(1, 1))
    return path


def apply(data: bytes, target: Path, **kw) -> Applied:
    return apply_layer(OneWay(data), target, **kw)  # type: ignore[arg-type]


def refused(data: bytes, target: Path, match: str) -> ApplyError:
    with pytest.raises(ApplyError, match=match) as raised:
        apply(data, target)
    return raised.value


def untouched(outside: Path) -> None:
    assert sorted(os.listdir(outside)) == ["victim"]
    assert (outside / "victim").read_bytes() == b"untouched"
    assert os.lstat(outside / "victim").st_mtime_ns == 1


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# -- entry types -----------------------------------------------------------------------------

def test_regular_file_with_owner_mode_ns_times_and_xattrs(target: Path) -> None:
    pax = {"mtime": "1700000000.123456789", "atime": "1700000001.5",
           "SCHILY.xattr.user.text": "hello", "SCHILY.xattr.user.bin": "\x00\udcff\x01",
           "SCHILY.xattr.trusted.overlay.opaque": "y", "SCHILY.xattr.trusted.overlay.redirect": "/etc"}
    done = apply(layer(f("suid", b"#!/bin/sh\n", mode=0o4755, uid=1234, gid=5678, pax=pax),
                       f("sgid", b"x" * 70_000, mode=0o2750, uid=1, gid=2)), target)
    st = os.lstat(target / "suid")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o4755
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert st.st_mtime_ns == 1_700_000_000_123_456_789
    assert st.st_atime_ns == 1_700_000_001_500_000_000  # atime = max(atime, mtime)
    assert (target / "suid").read_bytes() == b"#!/bin/sh\n"
    assert os.getxattr(target / "suid", "user.text") == b"hello"
    assert os.getxattr(target / "suid", "user.bin") == b"\x00\xff\x01"
    assert [n for n in os.listxattr(target / "suid") if n.startswith("trusted.")] == []  # never from a layer
    st = os.lstat(target / "sgid")
    assert stat.S_IMODE(st.st_mode) == 0o2750 and st.st_size == 70_000 and st.st_atime_ns == st.st_mtime_ns
    assert done == Applied(entries=2, bytes_written=70_010, whiteouts=0, opaque_dirs=0, ignored_xattrs=2)


def test_directory_times_are_set_after_children_are_written(target: Path) -> None:
    apply(layer(d("dir", mode=0o1777, uid=7, gid=8, pax={"mtime": "1500000000.000000042",
                                                          "SCHILY.xattr.user.d": "1"}),
                f("dir/a", b"a"), d("dir/sub", mode=0o700), f("dir/sub/b", b"b"), sym("dir/l", "a")), target)
    st = os.lstat(target / "dir")
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o1777 and (st.st_uid, st.st_gid) == (7, 8)
    assert st.st_mtime_ns == 1_500_000_000_000_000_042
    assert os.getxattr(target / "dir", "user.d") == b"1"
    assert os.lstat(target / "dir/sub").st_mtime_ns == 1_600_000_000 * 10**9
    assert stat.S_IMODE(os.lstat(target / "dir/sub").st_mode) == 0o700


def test_symlink_keeps_its_target_string_and_is_never_followed(target: Path, outside: Path) -> None:
    done = apply(layer(sym("abs", str(outside / "victim"), uid=3, gid=4, pax={"mtime": "1400000000.987654321",
                                                                             "SCHILY.xattr.user.x": "1"}),
                       sym("rel", "../../x")), target)
    st = os.lstat(target / "abs")
    assert stat.S_ISLNK(st.st_mode) and (st.st_uid, st.st_gid) == (3, 4)
    assert st.st_mtime_ns == 1_400_000_000_987_654_321
    assert os.readlink(target / "abs") == str(outside / "victim")
    assert os.readlink(target / "rel") == "../../x"
    assert done.ignored_xattrs == 1  # user.* cannot go on a symlink (EPERM), as containerd ignores it
    untouched(outside)


def test_hardlinks_share_an_inode_and_take_the_link_header_metadata(target: Path) -> None:
    apply(layer(d("a"), f("a/file", b"shared", mode=0o640, uid=9), hard("b", "a/file", mode=0o600, uid=10),
                hard("c", "./a/file", mode=0o600, uid=10)), target)
    first, second, third = (os.lstat(target / p) for p in ("a/file", "b", "c"))
    assert first.st_ino == second.st_ino == third.st_ino and first.st_nlink == 3
    assert stat.S_IMODE(first.st_mode) == 0o600 and first.st_uid == 10
    assert (target / "b").read_bytes() == b"shared"


def test_hardlink_to_a_symlink_links_the_symlink_itself(target: Path, outside: Path) -> None:
    apply(layer(sym("s", str(outside / "victim")), hard("h", "s")), target)
    assert os.lstat(target / "h").st_ino == os.lstat(target / "s").st_ino
    assert os.readlink(target / "h") == str(outside / "victim")
    untouched(outside)


def test_devices_and_fifos(target: Path) -> None:
    apply(layer(member("null", tarfile.CHRTYPE, mode=0o666, uid=5, gid=6, dev=(1, 3),
                       pax={"mtime": "1300000000.000000123"}),
                member("loop0", tarfile.BLKTYPE, mode=0o660, dev=(7, 0)),
                member("pipe", tarfile.FIFOTYPE, mode=0o4620, uid=11)), target)
    st = os.lstat(target / "null")
    assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
    assert stat.S_IMODE(st.st_mode) == 0o666 and (st.st_uid, st.st_gid) == (5, 6)
    assert st.st_mtime_ns == 1_300_000_000_000_000_123
    st = os.lstat(target / "loop0")
    assert stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (7, 0)
    st = os.lstat(target / "pipe")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o4620 and st.st_uid == 11


def test_missing_parents_are_created_0755(target: Path) -> None:
    apply(layer(f("x/y/z", b"1")), target)
    for path in ("x", "x/y"):
        st = os.lstat(target / path)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755 and st.st_uid == 0


def test_the_root_entry_is_skipped(target: Path) -> None:
    before = os.lstat(target)
    done = apply(layer(d("./", mode=0o700, uid=5), d(".", mode=0o711), f("./a", b"1")), target)
    after = os.lstat(target)
    assert (stat.S_IMODE(after.st_mode), after.st_uid) == (stat.S_IMODE(before.st_mode), before.st_uid)
    assert done.entries == 1 and tree(target) == ["a"]


def test_times_outside_the_representable_range_become_the_epoch(target: Path) -> None:
    apply(layer(f("old", pax={"mtime": "-5.5"}), f("late", pax={"mtime": "99999999999999999999"}),
                f("ustar", mtime=1234567890)), target)
    assert os.lstat(target / "old").st_mtime_ns == 0
    assert os.lstat(target / "late").st_mtime_ns == 0
    assert os.lstat(target / "ustar").st_mtime_ns == 1_234_567_890 * 10**9


# -- whiteouts -------------------------------------------------------------------------------

def test_whiteout_becomes_a_0_0_character_device(target: Path) -> None:
    done = apply(layer(d("etc"), f("etc/.wh.passwd", uid=3, gid=4), f(".wh.top")), target)
    for path, owner in (("etc/passwd", (3, 4)), ("top", (0, 0))):
        st = os.lstat(target / path)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and stat.S_IMODE(st.st_mode) == 0
        assert (st.st_uid, st.st_gid) == owner
    assert tree(target) == ["etc", "etc/passwd", "top"]  # no .wh. file is ever written
    assert (done.whiteouts, done.entries) == (2, 1)


def test_opaque_marker_sets_the_overlay_xattr(target: Path) -> None:
    done = apply(layer(f("new/.wh..wh..opq"), f("new/kept", b"1"), d("new", mode=0o750), d("dir"),
                       f("dir/.wh..wh..opq"), f(".wh..wh..opq")), target)
    for path in ("new", "dir", "."):
        assert os.getxattr(target / path, "trusted.overlay.opaque") == b"y"
    assert stat.S_IMODE(os.lstat(target / "new").st_mode) == 0o750  # the later header merged
    assert tree(target) == ["dir", "new", "new/kept"]
    assert done.opaque_dirs == 3


@pytest.mark.parametrize("name", ["a/.wh.", "a/.wh..", ".wh..."])
def test_invalid_whiteout_names_are_refused(target: Path, name: str) -> None:
    refused(layer(f(name)), target, "invalid whiteout name")


def test_whiteout_of_an_entry_of_the_same_layer_is_refused(target: Path) -> None:
    refused(layer(f("a", b"1"), f(".wh.a")), target, "whiteout for 'a'")


def test_a_later_member_replaces_a_whiteout(target: Path) -> None:
    apply(layer(f(".wh.a"), f("a", b"back")), target)
    assert (target / "a").read_bytes() == b"back"


# -- a later member over an earlier one ------------------------------------------------------

def test_later_members_replace_earlier_ones(target: Path) -> None:
    apply(layer(f("file", b"first"), f("file", b"second", mode=0o600),
                f("f2d", b"x"), d("f2d"), f("f2d/in", b"1"),
                d("d2f"), d("d2f/deep"), f("d2f/deep/x", b"1"), f("d2f", b"now a file"),
                d("merge", mode=0o700), f("merge/kept", b"1"), d("merge", mode=0o751, uid=3),
                sym("s2d", "somewhere"), d("s2d")), target)
    assert (target / "file").read_bytes() == b"second"
    assert stat.S_IMODE(os.lstat(target / "file").st_mode) == 0o600
    assert stat.S_ISDIR(os.lstat(target / "f2d").st_mode) and (target / "f2d/in").exists()
    assert (target / "d2f").read_bytes() == b"now a file"
    st = os.lstat(target / "merge")
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o751, 3) and (target / "merge/kept").exists()
    assert stat.S_ISDIR(os.lstat(target / "s2d").st_mode)
    assert tree(target) == ["d2f", "f2d", "f2d/in", "file", "merge", "merge/kept", "s2d"]


def test_a_file_over_a_symlink_replaces_the_link_and_never_writes_through_it(target: Path, outside: Path) -> None:
    apply(layer(sym("x", str(outside / "victim")), f("x", b"pwned", mode=0o777),
                sym("y", str(outside)), d("y", mode=0o777)), target)
    assert (target / "x").read_bytes() == b"pwned" and not os.path.islink(target / "x")
    assert stat.S_ISDIR(os.lstat(target / "y").st_mode)
    untouched(outside)
    assert stat.S_IMODE(os.lstat(outside).st_mode) != 0o777


# -- long names ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [PAX, GNU])
def test_long_names_and_long_link_names(target: Path, fmt: int) -> None:
    deep = "/".join(["d" * 60] * 5)  # 304 characters: past ustar's 100 + 155
    long_file = deep + "/" + "f" * 200
    apply(layer(d("d" * 60), f(long_file, b"long"), sym("s" * 150, long_file), hard("h" * 150, long_file),
                fmt=fmt), target)
    assert (target / long_file).read_bytes() == b"long"
    assert os.readlink(target / ("s" * 150)) == long_file
    assert os.lstat(target / ("h" * 150)).st_ino == os.lstat(target / long_file).st_ino


def test_non_utf8_names_keep_their_bytes(target: Path) -> None:
    name = b"caf\xe9".decode("utf-8", "surrogateescape")
    apply(layer(f(name, b"1"), fmt=GNU), target)
    assert os.listdir(os.fsencode(target)) == [b"caf\xe9"]


# -- hostile names ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../etc/x", "a/../../b", "/../x", "..", "a/b/../../../c"])
def test_names_that_climb_out_are_refused(target: Path, outside: Path, name: str) -> None:
    refused(layer(f(name, b"pwned")), target, "climbs out of the layer")
    untouched(outside)
    assert not Path("/etc/x").exists()


def test_absolute_and_dotted_names_stay_inside(target: Path) -> None:
    apply(layer(f("/abs/path", b"1"), f("./dot/./x", b"2"), f("a/../b", b"3"), f("c//d/", b"4")), target)
    assert (target / "abs/path").read_bytes() == b"1"
    assert (target / "dot/x").read_bytes() == b"2"
    assert (target / "b").read_bytes() == b"3"
    assert (target / "c/d").read_bytes() == b"4"
    assert tree(target) == ["abs", "abs/path", "b", "c", "c/d", "dot", "dot/x"]  # `a/..` is folded away first


def test_a_member_through_a_symlink_is_written_inside_the_layer(target: Path, outside: Path) -> None:
    """containerd resolves the symlink as if the layer root were `/` (fs.RootPath): inside, never out."""
    apply(layer(sym("evil", str(outside)), f("evil/victim", b"pwned"), f("evil/new", b"pwned"),
                sym("up", "../../../.."), f("up/top", b"1"),
                sym("rel", "../" + outside.name), f("rel/victim", b"pwned")), target)
    untouched(outside)
    inside = target / str(outside).lstrip("/")
    assert (inside / "victim").read_bytes() == b"pwned" and (inside / "new").read_bytes() == b"pwned"
    assert (target / "top").read_bytes() == b"1"
    assert (target / outside.name / "victim").read_bytes() == b"pwned"
    assert os.path.islink(target / "evil")


def test_opaque_and_whiteout_through_a_symlink_stay_inside(target: Path, outside: Path) -> None:
    apply(layer(sym("evil", str(outside)), f("evil/.wh.victim"), f("evil/.wh..wh..opq")), target)
    untouched(outside)
    assert "trusted.overlay.opaque" not in os.listxattr(outside)
    inside = target / str(outside).lstrip("/")
    assert stat.S_ISCHR(os.lstat(inside / "victim").st_mode)


def test_symlink_loops_are_refused(target: Path) -> None:
    refused(layer(sym("a", "b"), sym("b", "a"), f("a/x")), target, "Too many levels of symbolic links")


def test_a_parent_that_is_a_file_is_refused(target: Path) -> None:
    refused(layer(f("a", b"1"), f("a/b", b"2")), target, "Not a directory")


@pytest.mark.parametrize("link,why", [
    ("missing", "which this layer does not hold"),
    ("../../etc/passwd", "climbs out of the layer"),
    ("/etc/passwd", "which this layer does not hold"),
    ("dir", "hardlink to directory"),
    ("evil/victim", "which this layer does not hold"),
    (".", "hardlink to the layer root"),
])
def test_hardlinks_must_point_at_members_of_the_layer(target: Path, outside: Path, link: str, why: str) -> None:
    refused(layer(d("dir"), sym("evil", str(outside)), hard("h", link)), target, why)
    untouched(outside)
    assert os.lstat(outside / "victim").st_nlink == 1


def test_hardlink_to_itself_is_refused(target: Path) -> None:
    refused(layer(f("a", b"1"), hard("a", "a")), target, "which this layer does not hold")


@pytest.mark.parametrize("info", [
    f("a\x00b", pax={"path": "a\x00b"}),
    sym("s", "x", pax={"linkpath": "/etc\x00x"}),
    f("", b"1"),
    f("x", pax={"SCHILY.xattr.user.a\x00b": "1"}),
])
def test_nul_bytes_and_empty_names_are_refused(target: Path, info: tuple[tarfile.TarInfo, bytes]) -> None:
    refused(layer(info), target, "NUL byte|empty name|invalid xattr name")
    assert os.listdir(target) == []


def test_unsupported_types_are_refused(target: Path) -> None:
    refused(layer(member("c", tarfile.CONTTYPE, b"1")), target, "tar type b'7' is not supported")
    refused(layer(member("z", b"Z", b"1")), target, "tar type b'Z' is not supported")


def test_sparse_members_are_refused(target: Path) -> None:
    refused(layer(member("s", tarfile.GNUTYPE_SPARSE, b"data"), fmt=GNU), target, "sparse files are not supported")
    sparse_map = b"1\n0\n4\n".ljust(512, b"\x00") + b"data"
    pax = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "s", "GNU.sparse.realsize": "8192"}
    refused(layer(f("GNUSparseFile.0/s", sparse_map, pax=pax)), target, "sparse files are not supported")


def test_out_of_range_ids_are_refused(target: Path) -> None:
    refused(layer(f("a", pax={"uid": "4294967295"})), target, "uid 4294967295 is out of range")


def test_pax_global_headers_are_ignored(target: Path) -> None:
    apply(layer(f("a", b"1", uid=1), global_pax={"uid": "4242", "SCHILY.xattr.user.g": "1", "path": "evil"}),
          target)
    assert tree(target) == ["a"] and os.lstat(target / "a").st_uid == 1
    assert "user.g" not in os.listxattr(target / "a")


def test_huge_pax_headers_are_refused(target: Path) -> None:
    refused(layer(f("a", pax={"comment": "x" * (2 << 20)})), target, "header of .* bytes")


# -- truncated and malformed streams ---------------------------------------------------------

def full_layer() -> bytes:
    return layer(d("d"), f("d/a", b"a" * 5000), f("d/b", b"b" * 100))


@pytest.mark.parametrize("cut,why", [
    (512 + 512 + 100, "unexpected end of data"),          # inside d/a's data
    (512 + 512 + 5000, "unexpected end of data"),         # inside d/a's padding
    (512 + 512 + 5120 + 200, "ends inside a header"),     # inside d/b's header
    (512 + 512 + 5120, "without the end-of-archive marker"),  # between two members
    (512 + 512 + 5120 + 512 + 512, "without the end-of-archive marker"),  # all members, no end marker
    (0, "empty file"),
])
def test_truncated_streams_are_refused(target: Path, cut: int, why: str) -> None:
    refused(full_layer()[:cut], target, why)


def test_one_zero_block_is_enough_as_the_end(target: Path) -> None:
    body = layer(f("a", b"1"), trailer=False)
    assert apply(body + bytes(512), target).entries == 1


def test_an_empty_layer_applies_nothing(target: Path) -> None:
    assert apply(layer(), target) == Applied(0, 0, 0, 0, 0)


def test_garbage_after_a_member_is_refused(target: Path) -> None:
    refused(layer(f("a", b"1"), trailer=False) + b"x" * 1024, target, "invalid header")


def test_a_huge_declared_size_with_a_short_stream_is_refused(target: Path) -> None:
    info, _ = f("big")
    info.size = 10**12
    refused(info.tobuf(PAX) + b"x" * 4096, target, "unexpected end of data")


def test_trailing_bytes_after_the_end_marker_are_read_and_ignored(target: Path) -> None:
    stream = OneWay(layer(f("a", b"1")) + b"junk" * 10_000)
    apply_layer(stream, target)  # type: ignore[arg-type]
    assert stream.read() == b""


def test_the_streams_own_errors_pass_through_unchanged(target: Path) -> None:
    with pytest.raises(ConnectionResetError):
        apply_layer(OneWay(full_layer(), fail_after=2048), target)  # type: ignore[arg-type]


def test_apply_error_is_a_format_error_and_target_must_be_empty(target: Path) -> None:
    assert issubclass(ApplyError, FormatError)
    (target / "x").write_bytes(b"")
    with pytest.raises(ValueError, match="not an empty directory"):
        apply(layer(), target)


def test_no_file_descriptor_leaks(target: Path, tmp_path: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    apply(layer(d("a"), f("a/b/c", b"1"), sym("l", "a"), f("l/x", b"2"), hard("h", "l/x")), target)
    (tmp_path / "t2").mkdir()
    with pytest.raises(ApplyError):
        apply(layer(sym("a", "b"), sym("b", "a"), f("a/x")), tmp_path / "t2")
    assert len(os.listdir("/proc/self/fd")) == before


# -- parents: the lower layers of the overlay ------------------------------------------------

def test_created_parents_copy_the_nearest_lower_directory(tmp_path: Path, target: Path) -> None:
    near, far = tmp_path / "near", tmp_path / "far"
    (near / "usr").mkdir(parents=True)
    os.chown(near / "usr", 42, 43)
    os.chmod(near / "usr", 0o2750)
    os.setxattr(near / "usr", "user.k", b"v")
    os.setxattr(near / "usr", "trusted.overlay.opaque", b"y")
    os.utime(near / "usr", ns=(5, 6))
    (far / "usr/lib").mkdir(parents=True)
    os.chmod(far / "usr/lib", 0o711)
    (far / "opt").mkdir()
    os.chmod(far / "opt", 0o700)
    os.mknod(near / "opt", stat.S_IFCHR, 0)  # a whiteout in the nearer layer hides far/opt
    apply(layer(f("usr/lib/x", b"1"), f("opt/y", b"1"), f("etc/z", b"1")), target, parents=[near, far])
    st = os.lstat(target / "usr")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (42, 43, 0o2750)
    assert os.getxattr(target / "usr", "user.k") == b"v"
    assert "trusted.overlay.opaque" not in os.listxattr(target / "usr")
    assert stat.S_IMODE(os.lstat(target / "usr/lib").st_mode) == 0o711
    assert stat.S_IMODE(os.lstat(target / "opt").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(target / "etc").st_mode) == 0o755



def test_parents_applied_later_give_the_same_tree_and_spare_listed_or_replaced_dirs(tmp_path: Path,
                                                                                    target: Path) -> None:
    """A layer applied before its lower layers exist (a concurrent whole pull) is completed afterwards
    by `copy_up_parents`: only the parents it never listed, and never through a link it made."""
    lower = tmp_path / "lower"
    for name in ("usr/lib", "opt", "srv"):
        (lower / name).mkdir(parents=True)
        os.chmod(lower / name, 0o700)
        os.chown(lower / name, 7, 8)
    applied = apply(layer(f("usr/lib/x"), f("opt/y"), d("opt", mode=0o751), f("srv/z"), f("other/w"),
                          member("srv", tarfile.SYMTYPE, linkname="other", mode=0o777)), target)
    assert applied.implicit_dirs == (("other",), ("srv",), ("usr",), ("usr", "lib"))
    copy_up_parents(target, applied, [lower])
    st = os.lstat(target / "usr/lib")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (7, 8, 0o700)
    assert stat.S_IMODE(os.lstat(target / "opt").st_mode) == 0o751  # listed by the layer: its own mode
    assert stat.S_IMODE(os.lstat(target / "other").st_mode) == 0o755  # no lower "other"; not reached via srv
    assert os.path.islink(target / "srv")

# -- the same tree as tarfile's own extraction, for benign layers ----------------------------

def random_layer(rng: random.Random) -> list[tuple[tarfile.TarInfo, bytes]]:
    dirs, files, members = [""], [], []
    for i in range(rng.randint(20, 60)):
        parent = rng.choice(dirs)
        name = f"{parent}/n{i}" if parent else f"n{i}"
        meta = {"mode": rng.choice([0o755, 0o700, 0o644, 0o4755, 0o2750, 0o1777, 0o600, 0o444, 0o000]),
                "uid": rng.randrange(70_000), "gid": rng.randrange(70_000), "mtime": rng.randrange(2**31)}
        kind = rng.choices(["dir", "file", "symlink", "hardlink", "fifo", "char"], [3, 6, 2, 1, 1, 1])[0]
        if kind == "hardlink" and not files:
            kind = "file"
        if kind == "dir":
            dirs.append(name)
            members.append(d(name, **meta))
        elif kind == "file":
            files.append(name)
            members.append(f(name, rng.randbytes(rng.choice([0, 1, 511, 512, 513, 70_000])), **meta))
        elif kind == "symlink":
            members.append(sym(name, rng.choice([f"missing{i}", f"/nonexistent/{i}", f"../gone{i}"]), **meta))
        elif kind == "hardlink":
            members.append(hard(name, rng.choice(files), **meta))
        elif kind == "fifo":
            members.append(member(name, tarfile.FIFOTYPE, **meta))
        else:
            members.append(member(name, tarfile.CHRTYPE, dev=(rng.randrange(256), rng.randrange(256)), **meta))
    return members


def snapshot(root: Path) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    inodes: dict[int, list[str]] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        st = os.lstat(path)
        kind = stat.S_IFMT(st.st_mode)
        info: tuple = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
        if stat.S_ISREG(kind):
            info += (st.st_size, hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns)
            inodes.setdefault(st.st_ino, []).append(rel)
        elif stat.S_ISLNK(kind):
            info += (os.readlink(path),)  # tarfile does not set a symlink's times
        else:
            info += (st.st_rdev if stat.S_ISCHR(kind) else 0, st.st_mtime_ns)
        out[rel] = info
    out["<hardlinks>"] = tuple(sorted(tuple(names) for names in inodes.values() if len(names) > 1))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_benign_layers_give_the_same_tree_as_tarfile(tmp_path: Path, seed: int) -> None:
    data = layer(*random_layer(random.Random(seed)))
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    apply(data, ours)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(theirs, numeric_owner=True, filter="fully_trusted")
    assert snapshot(ours) == snapshot(theirs)
