"""Lazy pulling end to end: `lazysnap rpull` (and `ctr-remote image rpull`) of eStargz images
built by the tests, containers run from FUSE-served layers, bytes fetched, fallbacks with
their reasons, corrupt and unavailable registries, restarts, and garbage collection.

Each test runs its own containerd and lazysnap (conftest.py). The images are built once
per module (`lazy_images`) and pushed to the session registry; tests that stop the
registry push what they need to a registry of their own (`own_registry`).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapshotter.fuse.filesystem import DEFAULT_FAIL_FAST
from tests.harness.containerd import Containerd
from tests.harness.estargz import TOC_DIGEST_ANNOTATION, build_estargz
from tests.harness.faultproxy import FaultProxy
from tests.harness.images import (
    HELLO_OUTPUT,
    MIDDLE_TEXT,
    XATTR_NAME,
    XATTR_VALUE,
    File,
    Image,
    Layer,
    OCILayout,
    push,
    sample_layers,
)
from tests.harness.lazysnap import Lazysnap, mounts_below
from tests.harness.procs import run, wait_until
from tests.harness.registry import Registry
from tests.harness.tree import diff_trees, mount_snapshot, snapshot_tree

from .conftest import short_tmpdir

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

LAZY = "lazysnap"
OVERLAY = "overlayfs"
SAMPLE_CHUNK = 256 << 10          # busybox (1.9 MiB) spans several chunks
BIG_CHUNK = 1 << 20
BIG_SIZE = 20 << 20
SECRET_SIZE = 512 << 10           # one chunk: a failed read returns no byte at all
SMALL_TEXT = "the only file the small workload reads\n"
READ_TIMEOUT = 3.0
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


# ---------------------------------------------------------------------------- images

@dataclass
class Pushed:
    tag: str
    image: Image
    ref: str

    @property
    def layer_digests(self) -> list[str]:
        return [layer.digest for layer in self.image.layers]


@dataclass
class LazyImages:
    layout: Path
    estargz: Pushed           # the sample image (3 layers), every layer eStargz with its TOC digest
    big: Pushed               # estargz + a 4th layer: small.txt, secret.bin (1 chunk), big.bin (20 chunks)
    wrong_toc: Pushed         # estargz, but layer 1's toc.digest annotation is wrong
    no_toc: Pushed            # estargz, but layer 2 has no toc.digest annotation
    gzip: Pushed              # the sample image as plain tar.gz layers
    big_data: bytes
    secret: bytes

    def push_to(self, pushed: Pushed, registry: Registry) -> str:
        return push(self.layout, pushed.tag, registry, f"lazysnap/{pushed.tag}:latest", image=pushed.image)


@pytest.fixture(scope="module")
def lazy_images(registry: Registry) -> Iterator[LazyImages]:
    tmp = short_tmpdir("lzs-lazy-")
    try:
        layout = OCILayout(tmp / "layout")
        rng = random.Random(20260507)
        big_data, secret = rng.randbytes(BIG_SIZE), rng.randbytes(SECRET_SIZE)
        sample = [build_estargz(entries, chunk_size=SAMPLE_CHUNK).layer() for entries in sample_layers()]
        data = build_estargz([File("small.txt", SMALL_TEXT), File("secret.bin", secret), File("big.bin", big_data)],
                             chunk_size=BIG_CHUNK).layer()
        wrong = Layer(sample[1].blob, sample[1].diff_id, sample[1].media_type,
                      {**sample[1].annotations, TOC_DIGEST_ANNOTATION: "sha256:" + "0" * 64})
        bare = Layer(sample[2].blob, sample[2].diff_id, sample[2].media_type,
                     {k: v for k, v in sample[2].annotations.items() if k != TOC_DIGEST_ANNOTATION})
        plain = [Layer.from_entries(entries) for entries in sample_layers()]
        stacks = {"lazy-estargz": sample, "lazy-big": [*sample, data], "lazy-wrong-toc": [sample[0], wrong, sample[2]],
                  "lazy-no-toc": [sample[0], sample[1], bare], "lazy-gzip": plain}
        pushed = {}
        for tag, layers in stacks.items():
            image = layout.add_image(tag, layers, cmd=["/hello.sh"])
            pushed[tag] = Pushed(tag, image, "")
        images = LazyImages(layout.root, pushed["lazy-estargz"], pushed["lazy-big"], pushed["lazy-wrong-toc"],
                            pushed["lazy-no-toc"], pushed["lazy-gzip"], big_data, secret)
        for p in pushed.values():
            p.ref = images.push_to(p, registry)
        yield images
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- helpers

@dataclass
class PullRow:
    digest: str               # sha256:<12 hex>, as the table prints it
    how: str
    why: str


PULL_ROW = re.compile(r"^(?P<digest>sha256:[0-9a-f]{12})\s+(?P<size>[\d.]+ [KMG]?i?B)\s+"
                      r"(?P<how>lazy(?: [a-z:]+)?|pulled whole(?: by lazysnap)?)\s+(?P<seconds>\d+\.\d+)(?:\s+(?P<why>.*))?$")
STATUS_ROW = re.compile(r"^(?P<digest>sha256:[0-9a-f]{12})\s+(?P<mode>\S*)\s+(?P<size>[\d.]+ [KMG]?i?B|-)\s+"
                        r"(?P<fetched>[\d.]+ [KMG]?i?B)\s+(?P<resolve>[\d.]+s)\s+(?P<rest>.*)$")


def short(digest: str) -> str:
    return digest[:19]


def lazysnap_cli(*args: str, timeout: float = 120.0, check: bool = False):
    return run([sys.executable, "-m", "snapshotter", *args], timeout=timeout, check=check)


def rpull(containerd: Containerd, daemon: Lazysnap, ref: str) -> tuple[str, dict[str, PullRow]]:
    """`lazysnap rpull`; returns its output and its table, by short layer digest (bottom layer first)."""
    done = lazysnap_cli("rpull", ref, "--plain-http", "--containerd", str(containerd.address),
                        "--address", str(daemon.address))
    output = f"$ lazysnap rpull {ref}\n{done.stdout}{done.stderr}"
    assert done.returncode == 0, f"{output}\n{daemon.log_tail()}"
    rows = {}
    for line in done.stdout.splitlines():
        m = PULL_ROW.match(line)
        if m:
            rows[m["digest"]] = PullRow(m["digest"], m["how"], (m["why"] or "").strip())
    assert rows, f"no table in rpull's output:\n{output}"
    return output, rows


def status(daemon: Lazysnap) -> tuple[str, dict[str, dict[str, str]]]:
    """`lazysnap status`: its output and its rows, by short layer digest."""
    done = lazysnap_cli("status", "--address", str(daemon.address), timeout=30)
    assert done.returncode == 0, f"lazysnap status failed:\n{done.stdout}{done.stderr}\n{daemon.log_tail()}"
    lines = done.stdout.splitlines()
    assert lines and lines[0].split()[:5] == ["LAYER", "MODE", "SIZE", "FETCHED", "RESOLVE"], done.stdout
    assert lines[-1].startswith("cache: "), done.stdout
    rows = {}
    for line in lines[1:-1]:
        m = STATUS_ROW.match(line)
        assert m, f"unparsable status line {line!r}\n{done.stdout}"
        rows[m["digest"]] = m.groupdict()
    return done.stdout, rows


def content_digests(containerd: Containerd) -> set[str]:
    lines = containerd.ctr("content", "ls").stdout.splitlines()
    return {line.split()[0] for line in lines[1:] if line.strip()}


def snapshot_keys(containerd: Containerd, snapshotter: str = LAZY) -> list[str]:
    lines = containerd.ctr("snapshots", "--snapshotter", snapshotter, "ls").stdout.splitlines()
    return sorted(line.split()[0] for line in lines[1:] if line.strip())


def erofs_mounts(daemon: Lazysnap) -> list[Path]:
    """Mountpoints of the daemon's EROFS layer mounts (`<root>/mnt/<id>`)."""
    return [path for path, kind in mounts_below(daemon.mnt_dir) if kind == "erofs"]


def listing(path: Path) -> list[str]:
    """The names in directory `path` ([] if it does not exist)."""
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def settled_mark(registry: Registry) -> int:
    """A position in the access log once the lines of requests already answered have landed."""
    return len(registry.requests(settle=0.3))


def run_script(containerd: Containerd, ref: str, script: str, cid: str, check: bool = True):
    """`sh -c script` in a fresh container (stderr folded into stdout); returns (result, seconds)."""
    start = time.monotonic()
    done = containerd.run_container(ref, cid, "sh", "-c", f"exec 2>&1; {script}", snapshotter=LAZY, check=check,
                                    timeout=120)
    return done, time.monotonic() - start


READ_SECRET = "cat /secret.bin > /tmp/out; echo cat-rc=$?; sha256sum /tmp/out"


def secret_outcome(output: str) -> tuple[int, str]:
    """(cat's exit status, sha256 of the bytes cat returned) from READ_SECRET's output."""
    rc = re.search(r"^cat-rc=(\d+)$", output, re.MULTILINE)
    digest = re.search(r"^([0-9a-f]{64})\s+/tmp/out$", output, re.MULTILINE)
    assert rc and digest, f"unexpected output of the reading container:\n{output}"
    return int(rc[1]), digest[1]


def assert_secret_fails(output: str, secret: bytes) -> None:
    """The read failed with EIO, and not one byte (let alone a wrong one) came back."""
    rc, digest = secret_outcome(output)
    assert rc != 0, f"cat succeeded, it must fail with EIO:\n{output}"
    assert re.search(r"Input/output error|I/O error", output), f"cat must fail with EIO:\n{output}"
    assert digest != hashlib.sha256(secret).hexdigest(), output
    assert digest == EMPTY_SHA256, f"cat returned bytes that are not the file's:\n{output}"


def assert_secret_reads(output: str, secret: bytes) -> None:
    rc, digest = secret_outcome(output)
    assert rc == 0 and digest == hashlib.sha256(secret).hexdigest(), output


# ---------------------------------------------------------------------------- 1. rpull + run, nothing downloaded

def test_rpull_lazily_and_run(containerd: Containerd, lazysnap: Lazysnap, lazy_images: LazyImages,
                              cid: str) -> None:
    pushed = lazy_images.estargz
    output, rows = rpull(containerd, lazysnap, pushed.ref)
    assert list(rows) == [short(d) for d in pushed.layer_digests], output
    assert all(row.how == "lazy estargz" and row.why == "" for row in rows.values()), output
    assert snapshot_keys(containerd) == sorted(pushed.image.chain_ids)

    done, _ = run_script(containerd, pushed.ref, "/hello.sh; cat /middle.txt; sha256sum /bin/busybox", cid)
    lines = done.stdout.splitlines()
    assert lines[:2] == [HELLO_OUTPUT, MIDDLE_TEXT.strip()], done.stdout
    assert lines[2].split()[0] == hashlib.sha256(Path("/bin/busybox").read_bytes()).hexdigest(), done.stdout

    content = content_digests(containerd)
    assert {pushed.image.manifest_digest, pushed.image.config_digest} <= content, content
    downloaded = set(pushed.layer_digests) & content
    assert not downloaded, f"layer blobs were downloaded into containerd: {sorted(downloaded)}"


# ---------------------------------------------------------------------------- 2. same tree as overlayfs

def lazysnap_and_overlayfs_trees(containerd: Containerd, ref: str, workdir: Path,
                                 namespace: str = "default") -> dict[str, dict]:
    """The root tree of a container of `ref` on lazysnap (pulled already) and on containerd's overlayfs."""
    containerd.ctr("containers", "create", "--snapshotter", LAZY, ref, "tree-lazy", namespace=namespace)
    containerd.pull(ref, OVERLAY, namespace=namespace)
    containerd.ctr("containers", "create", "--snapshotter", OVERLAY, ref, "tree-overlay", namespace=namespace)
    trees = {}
    for snapshotter, container in ((LAZY, "tree-lazy"), (OVERLAY, "tree-overlay")):
        with mount_snapshot(containerd, snapshotter, container, workdir / f"mnt-{snapshotter}",
                            namespace=namespace) as root:
            trees[snapshotter] = snapshot_tree(root)
    return trees


def test_tree_equals_overlayfs_pull(containerd: Containerd, lazysnap: Lazysnap, lazy_images: LazyImages,
                                    workdir: Path) -> None:
    pushed = lazy_images.estargz
    output, rows = rpull(containerd, lazysnap, pushed.ref)
    assert all(row.how == "lazy estargz" for row in rows.values()), output
    trees = lazysnap_and_overlayfs_trees(containerd, pushed.ref, workdir)

    overlay = trees[OVERLAY]
    # The reference really is the sample image, eStargz-packed (no vacuous comparison).
    assert overlay["bin/busybox"].hardlinks == ("bin/busybox", "bin/ls")
    assert "data/doomed.txt" not in overlay and "data/gone-dir" not in overlay
    assert sorted(p for p in overlay if p.startswith("opaque/")) == ["opaque/new.txt"]
    assert dict(overlay["xattr.txt"].xattrs)[XATTR_NAME] == XATTR_VALUE.encode()
    assert overlay["modes/suid"].mode == 0o104755
    assert overlay["dev/null-ish"].rdev == (1, 3)
    assert overlay["stargz.index.json"].type == "file"
    assert diff_trees(overlay, trees[LAZY], OVERLAY, LAZY) == []


# ---------------------------------------------------------------------------- 3. bytes fetched

def test_reads_fetch_only_what_they_need(containerd: Containerd, lazysnap: Lazysnap, lazy_images: LazyImages,
                                         registry: Registry, cid: str) -> None:
    pushed = lazy_images.big
    data_layer = pushed.image.layers[-1]
    blob_size = len(data_layer.blob)
    before_pull = settled_mark(registry)
    output, rows = rpull(containerd, lazysnap, pushed.ref)
    assert rows[short(data_layer.digest)].how == "lazy estargz", output

    done, _ = run_script(containerd, pushed.ref, "cat /small.txt", cid)
    assert done.stdout == SMALL_TEXT
    small_workload = registry.blob_bytes_served(data_layer.digest, since=before_pull, settle=0.3)
    assert 0 < small_workload < blob_size // 10, (
        f"reading small.txt (and the index) cost {small_workload} bytes of the {blob_size}-byte layer")

    before_slice = settled_mark(registry)
    middle = 10 * BIG_CHUNK
    expected = hashlib.sha256(lazy_images.big_data[middle:middle + BIG_CHUNK]).hexdigest()
    done, _ = run_script(containerd, pushed.ref, "dd if=/big.bin bs=1048576 skip=10 count=1 2>/dev/null | sha256sum",
                         cid + "-2")
    assert done.stdout.split()[0] == expected, done.stdout
    slice_cost = registry.blob_bytes_served(data_layer.digest, since=before_slice, settle=0.3)
    # One 1 MiB chunk of incompressible data is a little over 1 MiB compressed. Kernel
    # readahead reads a little past the slice, into the next chunk, and that second
    # forward miss makes a streak, so blob readahead fetches one chunk more; nothing
    # like the rest of the file.
    assert BIG_CHUNK <= slice_cost <= 3 * BIG_CHUNK + (64 << 10), (
        f"reading 1 MiB in the middle of big.bin fetched {slice_cost} bytes")

    _, layers = status(lazysnap)
    assert layers[short(data_layer.digest)]["mode"] == "estargz"
    lazy = [row for row in rows.values() if row.how.startswith("lazy")]
    assert len(erofs_mounts(lazysnap)) == len(lazy), "each lazy layer's metadata is an EROFS mount"


def test_a_small_read_fetches_none_of_a_large_unread_file(containerd: Containerd, lazysnap: Lazysnap,
                                                          registry: Registry, cid: str) -> None:
    """Issue 15: busybox, /etc and a 6 MiB file nobody reads after them, in one eStargz layer of
    4 MiB chunks; `cat /etc/passwd` fetched the large file's first chunk (78 % of the layer)."""
    tmp = short_tmpdir("lzs-ra-")
    try:
        layout = OCILayout(tmp / "layout")
        built = build_estargz([*sample_layers()[0], File("data/model.bin", random.Random(15).randbytes(6 << 20))])
        image = layout.add_image("lazy-issue15", [built.layer()], cmd=["/bin/sh"])
        ref = push(layout.root, "lazy-issue15", registry, "lazysnap/lazy-issue15:latest", image=image)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    model = [e for e in built.toc["entries"] if e["name"] == "data/model.bin"]
    big_start, big_end = model[0]["offset"], built.toc_offset
    before_pull = settled_mark(registry)
    output, rows = rpull(containerd, lazysnap, ref)
    assert rows[short(built.digest)].how == "lazy estargz", output
    done, _ = run_script(containerd, ref, "cat /etc/passwd", cid)
    assert done.stdout.startswith("root:x:0:0:"), done.stdout
    served = registry.blob_bytes_served(built.digest, since=before_pull, settle=0.3)
    others = big_start + (len(built.blob) - big_end)   # all of the layer but the large file
    # 1,098,819 bytes at the fix (5,294,421 before): all but the large file, and the 64 KiB tail
    # read at resolve time, which ends in it.
    assert served <= others + (64 << 10), (
        f"`cat /etc/passwd` fetched {served} bytes of the {len(built.blob)}-byte layer; all but the large "
        f"unread file is {others}")


@pytest.mark.lazysnap_config("kernel_metadata = false")
def test_metadata_is_served_through_fuse_when_kernel_metadata_is_off(containerd: Containerd, lazysnap: Lazysnap,
                                                                     lazy_images: LazyImages, cid: str) -> None:
    pushed = lazy_images.estargz
    output, rows = rpull(containerd, lazysnap, pushed.ref)
    assert all(row.how == "lazy estargz" for row in rows.values()), output
    done, _ = run_script(containerd, pushed.ref, "/hello.sh; cat /middle.txt", cid)
    assert done.stdout.splitlines() == [HELLO_OUTPUT, MIDDLE_TEXT.strip()]
    assert erofs_mounts(lazysnap) == []
    # Each layer is a bind mount of its directory in the data plane's FUSE mount.
    mounts = mounts_below(lazysnap.mnt_dir)
    assert len(mounts) == len(rows) and all(kind.startswith("fuse") for _, kind in mounts), mounts


# ---------------------------------------------------------------------------- 4. ctr-remote

def test_ctr_remote_rpull(containerd: Containerd, lazysnap: Lazysnap, lazy_images: LazyImages, cid: str) -> None:
    pushed = lazy_images.estargz
    run(["ctr-remote", "--address", str(containerd.address), "--namespace", "default", "image", "rpull",
         "--plain-http", "--snapshotter", LAZY, pushed.ref], timeout=120)
    done, _ = run_script(containerd, pushed.ref, "/hello.sh; cat /middle.txt", cid)
    assert done.stdout.splitlines() == [HELLO_OUTPUT, MIDDLE_TEXT.strip()]

    output, layers = status(lazysnap)
    for digest in pushed.layer_digests:
        assert short(digest) in layers, f"layer {digest} missing from lazysnap status:\n{output}"
        assert layers[short(digest)]["mode"] == "estargz", output
    downloaded = set(pushed.layer_digests) & content_digests(containerd)
    assert not downloaded, f"ctr-remote downloaded layer blobs into containerd: {sorted(downloaded)}"


# ---------------------------------------------------------------------------- 5. bad input

def test_wrong_toc_digest_is_pulled_whole(containerd: Containerd, lazysnap: Lazysnap, lazy_images: LazyImages,
                                          cid: str) -> None:
    pushed = lazy_images.wrong_toc
    output, rows = rpull(containerd, lazysnap, pushed.ref)
    bottom, wrong, top = (rows[short(d)] for d in pushed.layer_digests)
    assert wrong.how == "pulled whole by lazysnap", output
    assert re.search(r"TOC digest", wrong.why, re.IGNORECASE), f"the reason must name the TOC digest:\n{output}"
    assert bottom.how == top.how == "lazy estargz", output
    done, _ = run_script(containerd, pushed.ref, "/hello.sh; cat /middle.txt", cid)
    assert done.stdout.splitlines() == [HELLO_OUTPUT, MIDDLE_TEXT.strip()]


def test_layer_without_toc_digest_is_pulled_whole(containerd: Containerd, lazysnap: Lazysnap,
                                                  lazy_images: LazyImages, cid: str) -> None:
    pushed = lazy_images.no_toc
    output, rows = rpull(containerd, lazysnap, pushed.ref)
    *below, bare = (rows[short(d)] for d in pushed.layer_digests)
    assert bare.how == "pulled whole by lazysnap", output
    assert "toc.digest" in bare.why and re.search(r"\bno\b|\bwithout\b|\bmissing\b", bare.why), (
        f"the reason must say the annotation is missing:\n{output}")
    assert all(row.how == "lazy estargz" for row in below), output
    done, _ = run_script(containerd, pushed.ref, "/hello.sh; cat /middle.txt", cid)
    assert done.stdout.splitlines() == [HELLO_OUTPUT, MIDDLE_TEXT.strip()]


def _pull_and_warm(containerd: Containerd, lazysnap: Lazysnap, ref: str, cid: str) -> None:
    """rpull `ref` lazily and read what every later container needs (busybox, /small.txt)."""
    output, rows = rpull(containerd, lazysnap, ref)
    assert all(row.how == "lazy estargz" for row in rows.values()), output
    done, _ = run_script(containerd, ref, "sha256sum /bin/busybox >/dev/null && cat /small.txt", cid)
    assert done.stdout == SMALL_TEXT


@pytest.mark.lazysnap_config(f"read_timeout = {READ_TIMEOUT}")
def test_registry_stopped_read_fails_then_recovers(containerd: Containerd, lazysnap: Lazysnap,
                                                   lazy_images: LazyImages, own_registry: Registry,
                                                   cid: str) -> None:
    ref = lazy_images.push_to(lazy_images.big, own_registry)
    _pull_and_warm(containerd, lazysnap, ref, cid)

    own_registry.stop()
    done, seconds = run_script(containerd, ref, READ_SECRET, cid + "-down", check=False)
    assert_secret_fails(done.stdout, lazy_images.secret)
    # ctr run itself takes well under a second here; the read may wait at most read_timeout.
    assert seconds < READ_TIMEOUT + 5, f"the failing read took {seconds:.1f} s (read_timeout {READ_TIMEOUT} s)"

    own_registry.start()
    done, _ = run_script(containerd, ref, READ_SECRET, cid + "-back")
    assert_secret_reads(done.stdout, lazy_images.secret)


def test_corrupt_chunk_gives_eio_never_wrong_bytes(containerd: Containerd, lazysnap: Lazysnap,
                                                  lazy_images: LazyImages, proxy: FaultProxy, cid: str) -> None:
    ref = f"{proxy.host}/lazysnap/{lazy_images.big.tag}:latest"
    data_digest = lazy_images.big.layer_digests[-1]
    _pull_and_warm(containerd, lazysnap, ref, cid)

    proxy.reset_counts()
    proxy.flip = {"blobs"}
    done, _ = run_script(containerd, ref, READ_SECRET, cid + "-bad", check=False)
    assert proxy.count("GET", data_digest) > 0, "the corrupting proxy was never asked for the chunk"
    assert_secret_fails(done.stdout, lazy_images.secret)

    # Nothing wrong was cached: once the registry serves good bytes, the file reads right.
    proxy.flip = set()
    time.sleep(2 * DEFAULT_FAIL_FAST)  # reads within DEFAULT_FAIL_FAST of a failure fail at once, by design
    done, _ = run_script(containerd, ref, READ_SECRET, cid + "-good")
    assert_secret_reads(done.stdout, lazy_images.secret)


@pytest.mark.lazysnap_config(f"read_timeout = {READ_TIMEOUT}")
def test_registry_hanging_read_fails_within_read_timeout(containerd: Containerd, lazysnap: Lazysnap,
                                                         lazy_images: LazyImages, proxy: FaultProxy,
                                                         cid: str) -> None:
    ref = f"{proxy.host}/lazysnap/{lazy_images.big.tag}:latest"
    _pull_and_warm(containerd, lazysnap, ref, cid)

    proxy.delay_match, proxy.delay = "/blobs/", 60.0      # accepts, then never answers in time
    done, seconds = run_script(containerd, ref, READ_SECRET, cid + "-hang", check=False)
    assert_secret_fails(done.stdout, lazy_images.secret)
    # read_timeout bounds what the reading process waits, not each FUSE request: the kernel
    # follows a failed readahead with a read of the single page, so every retry must fail fast.
    assert seconds < READ_TIMEOUT + 5, (
        f"the read of a file whose registry hangs took {seconds:.1f} s to fail (read_timeout {READ_TIMEOUT} s)")

    proxy.delay = 0.0
    time.sleep(2 * DEFAULT_FAIL_FAST)  # reads within DEFAULT_FAIL_FAST of a failure fail at once, by design
    done, _ = run_script(containerd, ref, READ_SECRET, cid + "-answers")
    assert_secret_reads(done.stdout, lazy_images.secret)


# ---------------------------------------------------------------------------- 6. restart

def test_restart_then_run(containerd: Containerd, lazysnap: Lazysnap, lazy_images: LazyImages, cid: str) -> None:
    pushed = lazy_images.estargz
    output, rows = rpull(containerd, lazysnap, pushed.ref)
    assert all(row.how == "lazy estargz" for row in rows.values()), output
    lazysnap.restart()
    containerd.wait_for_snapshotter(LAZY)
    done, _ = run_script(containerd, pushed.ref, "/hello.sh; cat /middle.txt", cid)
    assert done.stdout.splitlines() == [HELLO_OUTPUT, MIDDLE_TEXT.strip()]
    out, layers = status(lazysnap)
    assert all(layers.get(short(d), {}).get("mode") == "estargz" for d in pushed.layer_digests), out


def test_crash_leaves_nothing_a_restart_cannot_fix(containerd: Containerd, lazysnap: Lazysnap,
                                                  lazy_images: LazyImages, cid: str) -> None:
    """SIGKILL of serve leaves the data plane, and its FUSE mount, serving; the next start adopts it."""
    pushed = lazy_images.estargz
    output, rows = rpull(containerd, lazysnap, pushed.ref)
    assert all(row.how == "lazy estargz" for row in rows.values()), output
    planes = lazysnap.dataplanes()
    assert len(planes) == 1, f"one data plane should serve the layers, found {planes}"
    (generation, _), = planes.items()
    lazysnap.kill(signal.SIGKILL)
    os.statvfs(lazysnap.dataplane_dir / str(generation) / "fuse")  # ENOTCONN if the FUSE mount died with serve
    lazysnap.start()
    containerd.wait_for_snapshotter(LAZY)
    done, _ = run_script(containerd, pushed.ref, "/hello.sh; cat /middle.txt", cid)
    assert done.stdout.splitlines() == [HELLO_OUTPUT, MIDDLE_TEXT.strip()]
    assert lazysnap.dataplanes() == planes, "the new serve must adopt the running data plane, not start another"


@pytest.mark.lazysnap_config(f"read_timeout = {READ_TIMEOUT}")
def test_restart_with_registry_stopped_serves_cached_files(containerd: Containerd, lazysnap: Lazysnap,
                                                           lazy_images: LazyImages, own_registry: Registry,
                                                           cid: str) -> None:
    pushed = lazy_images.big
    ref = lazy_images.push_to(pushed, own_registry)
    _pull_and_warm(containerd, lazysnap, ref, cid)

    own_registry.stop()
    lazysnap.restart()
    containerd.wait_for_snapshotter(LAZY)
    out, layers = status(lazysnap)
    assert all(layers.get(short(d), {}).get("mode") == "estargz" for d in pushed.layer_digests), out
    done, _ = run_script(containerd, ref, "sha256sum /bin/busybox >/dev/null && cat /small.txt", cid + "-cached")
    assert done.stdout == SMALL_TEXT
    # The registry really is gone: what was never read cannot be served.
    done, _ = run_script(containerd, ref, READ_SECRET, cid + "-uncached", check=False)
    assert_secret_fails(done.stdout, lazy_images.secret)


# ---------------------------------------------------------------------------- 7. garbage collection

def test_image_rm_releases_lazy_layers(containerd: Containerd, lazysnap: Lazysnap, lazy_images: LazyImages,
                                       cid: str) -> None:
    pushed = lazy_images.estargz
    output, rows = rpull(containerd, lazysnap, pushed.ref)
    assert all(row.how == "lazy estargz" for row in rows.values()), output
    run_script(containerd, pushed.ref, "/hello.sh", cid)
    mnt = lazysnap.mnt_dir
    assert len(listing(mnt)) == len(pushed.layer_digests), listing(mnt)
    planes = lazysnap.dataplanes()
    assert planes, "no data plane serves the layers"
    fuse = [lazysnap.dataplane_dir / str(generation) / "fuse" for generation in planes]
    wait_until(lambda: snapshot_keys(containerd) == sorted(pushed.image.chain_ids), 10,
             "only the image's layer snapshots to remain")

    containerd.ctr("images", "rm", "--sync", pushed.ref)
    wait_until(lambda: snapshot_keys(containerd) == [], 15, "lazysnap's snapshots to be removed")
    wait_until(lambda: status(lazysnap)[1] == {}, 15, "lazysnap status to list no layers")
    wait_until(lambda: listing(mnt) == [], 15, f"{mnt} to have no layer directories")
    assert mounts_below(mnt) == [], f"layer mounts left: {mounts_below(mnt)}"
    wait_until(lambda: all(listing(f) == [] for f in fuse), 15, f"{fuse} to have no layer directories")
    layers_dir = lazysnap.root / "layers"
    assert not layers_dir.exists() or os.listdir(layers_dir) == [], f"saved indexes left: {os.listdir(layers_dir)}"
    assert lazysnap.proc is not None and lazysnap.proc.running
