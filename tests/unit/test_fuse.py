"""The layer filesystem through a real kernel FUSE mount, served by the test's own trio loop."""

from __future__ import annotations

import errno
import logging
import os
import random
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from snapshotter.fuse import LayerFilesystem
from snapshotter.layers.tree import OPAQUE_XATTR, EntryType, LayerEntry, LayerTree, Node
from tests.unit.fuse_layers import (
    HANG, Gated, MemoryLayer, blocking, drop_kernel_caches, failing, memory_layer, mounted,
    reg, serving,
)

pytestmark = [
    pytest.mark.usefixtures("needs_fuse"),
    pytest.mark.timeout(120),
]

D, L, H, C, B, F = EntryType.DIR, EntryType.SYMLINK, EntryType.HARDLINK, EntryType.CHAR, EntryType.BLOCK, EntryType.FIFO
T0 = 1_700_000_000_123_456_789
BIG = random.Random(7).randbytes(5 * 1024 * 1024 + 12_345)
DEEP = "/".join(f"d{i}" for i in range(40))
UNICODE = "données/naïve-文件 ✓.txt"
MANY = 3000
CAP_NET_RAW = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)  # vfs_cap_data v2, effective; the kernel parses it


def base_entries() -> list[LayerEntry]:
    return [
        LayerEntry("etc", D, mode=0o755, mtime_ns=T0),
        reg("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", mode=0o644, mtime_ns=T0 + 1),
        reg("etc/hosts", b"127.0.0.1 localhost\n", mode=0o600, uid=12, gid=34, mtime_ns=T0 + 2),
        LayerEntry("usr/bin", D, mode=0o711, uid=5, gid=6, mtime_ns=T0 + 3),
        reg("usr/bin/tool", b"#!/bin/sh\necho hi\n", mode=0o4755, uid=1000, gid=2000, mtime_ns=T0 + 4,
            xattrs={"security.capability": CAP_NET_RAW, "user.note": b"hello"}),
        # a hardlink header carries its target's attributes, as tar writes it
        LayerEntry("usr/bin/tool-link", H, link_name="usr/bin/tool", mode=0o4755, uid=1000, gid=2000,
                   mtime_ns=T0 + 4),
        LayerEntry("usr/lib64", L, link_name="lib", mtime_ns=T0 + 5, uid=7),
        LayerEntry("usr/abs", L, link_name="/etc/../usr/bin/tool"),
        LayerEntry("dev/null", C, mode=0o666, dev_major=1, dev_minor=3),
        LayerEntry("dev/sda", B, mode=0o660, gid=6, dev_major=8, dev_minor=16),
        LayerEntry("run/fifo", F, mode=0o600),
        reg("empty", b"", mtime_ns=T0 + 6),
        reg("big.bin", BIG, mode=0o640),
        reg(UNICODE, "unicode\n".encode()),
        reg(f"{DEEP}/bottom", b"deep\n"),
        *(reg(f"many/f{i:05d}", b"x" * (i % 7)) for i in range(MANY)),
    ]


def upper_entries() -> list[LayerEntry]:
    return [
        LayerEntry("etc", D, mode=0o755),
        LayerEntry("etc/.wh.passwd", EntryType.REG),
        LayerEntry("opt", D, mode=0o700, xattrs={"user.mark": b"upper"}),
        LayerEntry("opt/.wh..wh..opq", EntryType.REG),
        reg("opt/new", b"new in upper\n"),
    ]


def walk(tree: LayerTree) -> Iterator[tuple[str, Node]]:
    """Every (relative path, node) of a tree, parents first."""
    stack = [("", tree.root)]
    while stack:
        path, node = stack.pop()
        yield path, node
        if node.is_dir:
            for name, child in tree.entries(node.ino):
                stack.append((f"{path}/{os.fsdecode(name)}" if path else os.fsdecode(name), child))


@pytest.fixture
def base() -> MemoryLayer:
    return memory_layer(base_entries())


@pytest.fixture
def upper() -> MemoryLayer:
    return memory_layer(upper_entries())


@pytest.fixture
def fs(base: MemoryLayer, upper: MemoryLayer) -> LayerFilesystem:
    fs = LayerFilesystem(root_timeout=0.2, read_timeout=0.5)
    fs.attach("base", base)
    fs.attach("upper", upper)
    return fs


async def test_layers_side_by_side(mnt: Path, fs: LayerFilesystem) -> None:
    async with serving(mnt, fs) as mount:
        assert mounted(mnt) and mount.mountpoint == mnt
        assert sorted(await blocking(os.listdir, mnt)) == ["base", "upper"]
        root = await blocking(os.stat, mnt)
        assert stat.S_ISDIR(root.st_mode) and root.st_nlink == 4 and root.st_ino == 1
        a, b = await blocking(os.stat, mnt / "base/etc"), await blocking(os.stat, mnt / "upper/etc")
        assert a.st_ino != b.st_ino and a.st_dev == b.st_dev == root.st_dev == mount.device
        assert (await blocking((mnt / "upper/opt/new").read_bytes)) == b"new in upper\n"
        assert (await blocking((mnt / "base/etc/passwd").read_bytes)).startswith(b"root:")
        mountinfo = next(line for line in open("/proc/self/mountinfo") if f" {mnt} " in line).split()
        assert "ro" in mountinfo[5].split(",")
        assert mountinfo[mountinfo.index("-") + 1:][:2] == ["fuse.lazysnap", "lazysnap"]
        assert {"allow_other", "default_permissions"} <= set(mountinfo[-1].split(","))


async def test_every_attribute_is_the_tree_s(mnt: Path, fs: LayerFilesystem, base: MemoryLayer) -> None:
    nodes = list(walk(base.tree))
    async with serving(mnt, fs):
        stats = await blocking(lambda: [os.lstat(mnt / "base" / p) for p, _ in nodes])
    inos: dict[int, int] = {}
    for (path, node), st in zip(nodes, stats):
        got = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_nlink, st.st_rdev)
        want = (node.mode, node.uid, node.gid, node.size, node.mtime_ns, node.nlink, node.rdev)
        assert got == want, path
        if stat.S_ISREG(node.mode):
            assert st.st_blocks == -(-node.size // 512), path
        assert inos.setdefault(node.ino, st.st_ino) == st.st_ino, path
    assert len(set(inos.values())) == len(inos), "distinct nodes have distinct inode numbers"


async def test_kinds_links_and_devices(mnt: Path, fs: LayerFilesystem) -> None:
    async with serving(mnt, fs):
        b = mnt / "base"
        tool, link = await blocking(os.lstat, b / "usr/bin/tool"), await blocking(os.lstat, b / "usr/bin/tool-link")
        assert tool.st_ino == link.st_ino and tool.st_nlink == link.st_nlink == 2
        assert stat.S_IMODE(tool.st_mode) == 0o4755
        assert await blocking(os.readlink, b / "usr/lib64") == "lib"
        assert await blocking(os.readlink, b / "usr/abs") == "/etc/../usr/bin/tool"
        assert stat.S_ISLNK((await blocking(os.lstat, b / "usr/lib64")).st_mode)
        null, sda = await blocking(os.lstat, b / "dev/null"), await blocking(os.lstat, b / "dev/sda")
        assert stat.S_ISCHR(null.st_mode) and (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
        assert stat.S_ISBLK(sda.st_mode) and (os.major(sda.st_rdev), os.minor(sda.st_rdev)) == (8, 16)
        assert stat.S_ISFIFO((await blocking(os.lstat, b / "run/fifo")).st_mode)
        assert await blocking((b / "usr/bin/tool-link").read_bytes) == b"#!/bin/sh\necho hi\n"
        with pytest.raises(OSError) as e:
            await blocking(os.readlink, b / "etc/passwd")
        assert e.value.errno == errno.EINVAL


async def test_whiteouts_and_opaque_dirs(mnt: Path, fs: LayerFilesystem) -> None:
    async with serving(mnt, fs):
        u = mnt / "upper"
        wh = await blocking(os.lstat, u / "etc/passwd")
        assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == os.makedev(0, 0) and stat.S_IMODE(wh.st_mode) == 0
        assert await blocking(os.getxattr, u / "opt", OPAQUE_XATTR.decode()) == b"y"
        assert sorted(await blocking(os.listxattr, u / "opt")) == ["trusted.overlay.opaque", "user.mark"]
        assert await blocking(os.listdir, u / "opt") == ["new"]
        assert await blocking(os.listxattr, u / "etc") == []
        with pytest.raises(OSError) as e:
            await blocking(os.getxattr, u / "etc", "trusted.overlay.opaque")
        assert e.value.errno == errno.ENODATA


async def test_xattrs(mnt: Path, fs: LayerFilesystem) -> None:
    async with serving(mnt, fs):
        tool = mnt / "base/usr/bin/tool"
        assert sorted(await blocking(os.listxattr, tool)) == ["security.capability", "user.note"]
        assert await blocking(os.getxattr, tool, "user.note") == b"hello"
        assert await blocking(os.getxattr, tool, "security.capability") == CAP_NET_RAW
        for path, name in ((tool, "user.missing"), (mnt, "user.x"), (mnt / "base", "user.x")):
            with pytest.raises(OSError) as e:
                await blocking(os.getxattr, path, name)
            assert e.value.errno == errno.ENODATA


async def test_names_and_trees(mnt: Path, fs: LayerFilesystem, base: MemoryLayer) -> None:
    async with serving(mnt, fs):
        b = mnt / "base"
        assert await blocking((b / UNICODE).read_bytes) == "unicode\n".encode()
        assert await blocking(os.listdir, b / "données") == ["naïve-文件 ✓.txt"]
        assert await blocking((b / DEEP / "bottom").read_bytes) == b"deep\n"
        seen = await blocking(lambda: sorted(
            os.path.relpath(os.path.join(d, n), b) for d, dirs, files in os.walk(b) for n in dirs + files))
        assert seen == sorted(p for p, _ in walk(base.tree) if p)
        assert await blocking((b / "empty").read_bytes) == b""
        with pytest.raises(FileNotFoundError):
            await blocking(os.stat, b / "etc/nope")
        with pytest.raises(FileNotFoundError):  # a miss twice: the second one from the kernel's cache
            await blocking(os.stat, b / "etc/nope")
        with pytest.raises(FileNotFoundError):
            await blocking(os.stat, mnt / "nolayer")


async def test_large_dir_listing(mnt: Path, fs: LayerFilesystem) -> None:
    async with serving(mnt, fs):
        many = mnt / "base/many"
        names = await blocking(os.listdir, many)
        assert names == [f"f{i:05d}" for i in range(MANY)]  # sorted, stable offsets, no duplicates
        sizes = await blocking(lambda: {e.name: (e.is_file(), e.stat().st_size) for e in os.scandir(many)})
        assert sizes == {f"f{i:05d}": (True, i % 7) for i in range(MANY)}


async def test_big_file_reads_at_odd_offsets(mnt: Path, fs: LayerFilesystem) -> None:
    rng = random.Random(11)
    probes = [(0, 1), (1, 4095), (4095, 2), (131071, 131074), (len(BIG) - 1, 10), (len(BIG), 10),
              (len(BIG) + 100, 5), (3_333_333, 1024 * 1024 + 7)]
    probes += [(rng.randrange(len(BIG)), rng.choice([1, 511, 4096, 65537, 300_001])) for _ in range(40)]

    def read_all(path: Path) -> list[bytes]:
        fd = os.open(path, os.O_RDONLY)
        try:
            return [os.pread(fd, size, off) for off, size in probes]
        finally:
            os.close(fd)

    async with serving(mnt, fs):
        path = mnt / "base/big.bin"
        for (off, size), got in zip(probes, await blocking(read_all, path)):
            assert got == BIG[off:off + size], (off, size)
        assert await blocking(path.read_bytes) == BIG
        with open(os.devnull, "wb") as sink:  # and in big requests, as a reader with a large buffer makes
            done = await trio.run_process(["dd", f"if={path}", "bs=4M", "iflag=direct"], stdout=sink,
                                          capture_stderr=True)
        assert f"{len(BIG)} bytes".encode() in done.stderr


async def test_read_error_gives_eio_and_a_log_line(mnt: Path, caplog: pytest.LogCaptureFixture) -> None:
    fs = LayerFilesystem(read_timeout=5)
    fs.attach("bad", memory_layer([reg("data/broken", failing("digest mismatch"), size=10_000),
                                   reg("data/oops", RuntimeError("bug in layer"), size=10),
                                   reg("data/short", b"abc", size=10),
                                   reg("data/fine", b"fine")]))
    caplog.set_level(logging.INFO, logger="snapshotter.fuse")
    async with serving(mnt, fs):
        for name, why in (("broken", "digest mismatch"), ("oops", "bug in layer"), ("short", "short read")):
            with pytest.raises(OSError) as e:
                await blocking((mnt / "bad/data" / name).read_bytes)
            assert e.value.errno == errno.EIO
            assert any(f"layer bad file /data/{name} " in r.message and "offset 0" in r.message and why in r.message
                       for r in caplog.records), caplog.text
        assert await blocking((mnt / "bad/data/fine").read_bytes) == b"fine"  # the session survived
    assert fs.stats.read_errors >= 3


async def test_hanging_read_gives_eio_after_the_timeout(mnt: Path, caplog: pytest.LogCaptureFixture) -> None:
    fs = LayerFilesystem(read_timeout=0.5)
    fs.attach("slow", memory_layer([reg("hangs", HANG, size=100), reg("ok", b"ok")]))
    async with serving(mnt, fs):
        start = trio.current_time()
        with pytest.raises(OSError) as e:
            await blocking((mnt / "slow/hangs").read_bytes)
        elapsed = trio.current_time() - start
        assert e.value.errno == errno.EIO
        # One timeout only: the kernel's page-by-page retries of the failed readahead fail at once.
        assert 0.5 <= elapsed < 0.9, elapsed
        assert caplog.text.count("no answer within 0.5 s") == 1
        assert await blocking((mnt / "slow/ok").read_bytes) == b"ok"
        start = trio.current_time()
        with pytest.raises(OSError):
            await blocking((mnt / "slow/hangs").read_bytes)
        assert trio.current_time() - start >= 0.5, "a new open of the file asks the layer again"


async def test_writes_are_refused(mnt: Path, fs: LayerFilesystem) -> None:
    attempts = [
        lambda: open(mnt / "base/etc/passwd", "r+b"),
        lambda: open(mnt / "base/etc/passwd", "wb"),
        lambda: open(mnt / "base/etc/created", "wb"),
        lambda: os.mkdir(mnt / "base/newdir"),
        lambda: os.mkdir(mnt / "newlayer"),
        lambda: os.unlink(mnt / "base/etc/hosts"),
        lambda: os.rename(mnt / "base/etc/hosts", mnt / "base/etc/hosts2"),
        lambda: os.chmod(mnt / "base/etc/hosts", 0o777),
        lambda: os.truncate(mnt / "base/etc/hosts", 0),
        lambda: os.symlink("x", mnt / "base/etc/sl"),
        lambda: os.setxattr(mnt / "base/etc/hosts", "user.x", b"1"),
    ]
    async with serving(mnt, fs):
        for i, attempt in enumerate(attempts):
            with pytest.raises(OSError) as e:
                await blocking(attempt)
            assert e.value.errno in (errno.EROFS, errno.EACCES), i
        assert await blocking((mnt / "base/etc/hosts").read_bytes) == b"127.0.0.1 localhost\n"


async def test_detach_hides_the_layer_and_attach_brings_one_back(mnt: Path, fs: LayerFilesystem) -> None:
    async with serving(mnt, fs):
        hosts = mnt / "base/etc/hosts"
        assert await blocking(hosts.read_bytes) == b"127.0.0.1 localhost\n"
        await fs.detach("base")
        assert fs.layers() == ["upper"] and await blocking(os.listdir, mnt) == ["upper"]
        await trio.sleep(fs.root_timeout + 0.1)  # the kernel's cached path to the layer lapses
        for path in (hosts, mnt / "base", mnt / "base/etc"):
            with pytest.raises(FileNotFoundError):
                await blocking(os.stat, path)
        fs.attach("base", memory_layer([reg("etc/hosts", b"new layer\n")]))
        assert await blocking(hosts.read_bytes) == b"new layer\n"
        with pytest.raises(ValueError):
            fs.attach("upper", memory_layer([]))
        for bad in ("", ".", "..", "a/b", "x" * 256):
            with pytest.raises(ValueError):
                fs.attach(bad, memory_layer([]))


async def test_detach_lets_in_flight_reads_finish(mnt: Path) -> None:
    gated = Gated(b"held in flight")
    layer = memory_layer([reg("slow", gated), reg("other", b"other")])
    fs = LayerFilesystem(read_timeout=10)
    fs.attach("l", layer)
    detached = trio.Event()

    async def detach() -> None:
        await fs.detach("l")
        detached.set()

    async with serving(mnt, fs):
        fd = await blocking(os.open, mnt / "l/other", os.O_RDONLY)
        try:
            results: list[bytes] = []

            async def read_slow() -> None:
                results.append(await blocking((mnt / "l/slow").read_bytes))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_slow)
                await gated.waiting.wait()
                nursery.start_soon(detach)
                await trio.sleep(0.2)
                assert not detached.is_set(), "detach waits for the read in flight"
                gated.gate.set()
            assert results == [b"held in flight"] and detached.is_set() and layer.in_flight == 0
            with pytest.raises(OSError) as e:  # a file left open: the layer is never called again
                await blocking(os.pread, fd, 5, 0)
            assert e.value.errno == errno.EIO
        finally:
            await blocking(os.close, fd)


async def test_forget_releases_detached_layers(mnt: Path, fs: LayerFilesystem) -> None:
    async with serving(mnt, fs):
        await blocking(lambda: [os.lstat(os.path.join(d, n)) for d, ds, fs_ in os.walk(mnt) for n in ds + fs_])
        await fs.detach("base")
        await fs.detach("upper")
        assert fs.retired == 2, "the kernel still holds their inodes"
        with trio.fail_after(10):
            while fs.retired:
                await blocking(drop_kernel_caches)
                await trio.sleep(0.05)
        assert fs.layers() == []


async def test_statfs(mnt: Path, fs: LayerFilesystem, base: MemoryLayer, upper: MemoryLayer) -> None:
    async with serving(mnt, fs):
        sv = await blocking(os.statvfs, mnt)
    assert sv.f_bsize == 4096 and sv.f_namemax == 255 and sv.f_bfree == 0
    assert sv.f_files == len(base.tree.nodes) + len(upper.tree.nodes) + 1
    assert sv.f_blocks * 4096 >= len(BIG)


async def test_find_and_stat_need_few_lookups(mnt: Path) -> None:
    """Long entry/attr timeouts plus readdirplus: stat after find is answered by the kernel."""
    fs = LayerFilesystem()
    fs.attach("tree", memory_layer([reg(f"d{i // 100:02d}/f{i:04d}", b"x") for i in range(5000)]))
    async with serving(mnt, fs):
        # External processes need no worker thread: run_process does not block the loop.
        listing = await trio.run_process(["find", str(mnt / "tree"), "-type", "f"], capture_stdout=True)
        files = listing.stdout.split()
        assert len(files) == 5000
        before = (fs.stats.count("lookup"), fs.stats.count("getattr"))
        await trio.run_process(["xargs", "stat", "--format=%i %s"], stdin=b"\n".join(files), capture_stdout=True)
        lookups, getattrs = fs.stats.count("lookup") - before[0], fs.stats.count("getattr") - before[1]
    assert lookups < 20 and getattrs < 20, (lookups, getattrs)


async def test_unmounted_when_cancelled(mnt: Path, fs: LayerFilesystem) -> None:
    with trio.CancelScope() as scope:
        async with serving(mnt, fs):
            assert mounted(mnt)
            scope.cancel()
            await trio.sleep_forever()
    assert not mounted(mnt)
    assert os.listdir(mnt) == []  # the plain directory again, safe to touch from this thread

    with pytest.RaisesGroup(ZeroDivisionError):
        async with serving(mnt, fs):
            raise ZeroDivisionError
    assert not mounted(mnt)


async def test_one_session_per_process(mnt: Path, tmp_path: Path, fs: LayerFilesystem) -> None:
    other = tmp_path / "other"
    async with serving(mnt, fs):
        with pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="one FUSE session"), flatten_subgroups=True):
            async with serving(other, LayerFilesystem()):
                pass
    assert not mounted(other) and not mounted(mnt)


async def test_readahead_is_raised(mnt: Path, fs: LayerFilesystem) -> None:
    async with serving(mnt, fs, readahead_kb=2048) as mount:
        bdi = Path(f"/sys/class/bdi/{os.major(mount.device)}:{os.minor(mount.device)}/read_ahead_kb")
        assert mount.readahead_kb == 2048 and bdi.read_text().strip() == "2048"
