"""Restarting `lazysnap serve` under running containers (issue 12, the restart-proof data plane).

`lazysnap serve` is the control plane; the FUSE mount that containers read their lazy
layers through belongs to a separate, long-lived data plane process that a restarted
(or upgraded, or crashed) serve adopts. These tests start long-running containers, stop
or kill serve under them, and then read files that were never fetched, so that each
read must go data plane -> new control plane -> registry:

- SIGTERM and SIGKILL of serve, then a restart: every container reads right bytes;
- a read started while serve is down waits for the new serve and gets right bytes;
- an upgrade (serve from a copy of the package whose build id differs) starts a second
  data plane for new layers, and the old one keeps serving the old containers;
- with the registry down across a restart, a miss fails with EIO (not SIGBUS) within
  read_timeout, and reads again once the registry is back;
- a second serve on the same root, or on the same socket, is refused and leaves the
  first one serving;
- SIGKILL in the middle of an rpull leaves nothing a restart cannot fix, and no mount
  that no served layer needs;
- a retired data plane exits once the last of its layers is released (its image
  removed), and the new generation keeps serving;
- a SIGKILLed data plane is replaced: its containers' reads fail (never with wrong
  bytes), a new generation serves the layers, and new containers read right bytes;
- with `kernel_metadata = false` (layers' trees served through FUSE, bind-mounted), and
  with SOCI layers (an ordinary gzip image and its zTOCs), restarts are just as harmless.

The image: the sample image (eStargz) plus a data layer of N_FILES files of random
bytes, each one chunk, with a random filler between any two of them, so a read of one
file never fetches another one (a miss fetches its chunk plus following chunks that end
within 512 KiB, and kernel readahead on the data device stays within the filler).
Nothing is fetched except on read: no background fetch, prefetch, readahead or profile.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

import snapshotter
from snapshotter.fuse.filesystem import DEFAULT_FAIL_FAST
from tests.harness.containerd import Containerd
from tests.harness.estargz import build_estargz
from tests.harness.faultproxy import FaultProxy
from tests.harness.images import File, Image, OCILayout, push, sample_layers
from tests.harness.lazysnap import Lazysnap, mounts_below
from tests.harness.procs import unix_socket_accepts, wait_until
from tests.harness.registry import Registry

from .conftest import SociImage, short_tmpdir
from .test_lazy import LAZY, lazysnap_cli, rpull, run_script, settled_mark, short, snapshot_keys, status

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

N_CONTAINERS = 10
N_FILES = 13                      # f00..f09: one per container after the restart; f10..f12: spares
FILE_SIZE = 1 << 20
FILLER_SIZE = 2 << 20             # more than the fetch window and the data device's readahead
CHUNK_SIZE = 4 << 20              # every file and every filler is a single chunk
SAMPLE_CHUNK = 256 << 10
QUIET = ("background_fetch = false", "prefetch = false", "readahead_max_mib = 0", "record_profiles = false")
SIGBUS_STATUS = 128 + signal.SIGBUS
EIO_TEXT = re.compile(r"Input/output error|I/O error")


def data_path(i: int) -> str:
    return f"/data/f{i:02d}.bin"


# ---------------------------------------------------------------------------- images

@dataclass
class RestartImages:
    layout: Path
    image: Image                  # sample (3 eStargz layers) + the data layer
    ref: str                      # `image` in the session registry
    upgrade: Image                # the same 3 sample layers + a data layer of its own
    upgrade_ref: str
    sha256: dict[str, str]        # path in `image` -> sha256 hex of its bytes
    extra_sha256: str             # /extra/new.bin in `upgrade`

    @property
    def data_digest(self) -> str:
        return self.image.layers[-1].digest

    def push_to(self, registry: Registry) -> str:
        return push(self.layout, "restart", registry, "lazysnap/restart:latest", image=self.image)


@pytest.fixture(scope="module")
def restart_images(registry: Registry) -> Iterator[RestartImages]:
    tmp = short_tmpdir("lzs-restart-")
    try:
        layout = OCILayout(tmp / "layout")
        rng = random.Random(20261212)
        sample = [build_estargz(entries, chunk_size=SAMPLE_CHUNK).layer() for entries in sample_layers()]
        entries, sha256 = [], {}
        for i in range(N_FILES):
            data = rng.randbytes(FILE_SIZE)
            filler = File(f"data/filler{i:02d}.bin", rng.randbytes(FILLER_SIZE))
            entries += [File(data_path(i).lstrip("/"), data), filler]
            sha256[data_path(i)] = hashlib.sha256(data).hexdigest()
        data_layer = build_estargz(entries, chunk_size=CHUNK_SIZE, level=1).layer()
        extra = rng.randbytes(FILE_SIZE)
        extra_layer = build_estargz([File("extra/new.bin", extra)], chunk_size=CHUNK_SIZE, level=1).layer()
        image = layout.add_image("restart", [*sample, data_layer], cmd=["/hello.sh"])
        upgrade = layout.add_image("upgrade", [*sample, extra_layer], cmd=["/hello.sh"])
        ref = push(layout.root, "restart", registry, "lazysnap/restart:latest", image=image)
        upgrade_ref = push(layout.root, "upgrade", registry, "lazysnap/restart-upgrade:latest", image=upgrade)
        yield RestartImages(layout.root, image, ref, upgrade, upgrade_ref, sha256, hashlib.sha256(extra).hexdigest())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class FreshImage:
    """An image that shares no layer with `RestartImages`: busybox (plus a file of its own) and a data layer."""

    image: Image
    ref: str
    sha256: dict[str, str]        # path -> sha256 hex; N_FRESH files, each one chunk between fillers


N_FRESH = 3


def fresh_path(i: int) -> str:
    return f"/fresh/g{i:02d}.bin"


@pytest.fixture(scope="module")
def fresh_image(registry: Registry) -> Iterator[FreshImage]:
    tmp = short_tmpdir("lzs-fresh-")
    try:
        layout = OCILayout(tmp / "layout")
        rng = random.Random(20261213)
        base = build_estargz([*sample_layers()[0], File("fresh.txt", "a layer of the fresh image\n")],
                             chunk_size=SAMPLE_CHUNK).layer()
        entries, sha256 = [], {}
        for i in range(N_FRESH):
            data = rng.randbytes(FILE_SIZE)
            entries += [File(fresh_path(i).lstrip("/"), data), File(f"fresh/filler{i:02d}.bin",
                                                                     rng.randbytes(FILLER_SIZE))]
            sha256[fresh_path(i)] = hashlib.sha256(data).hexdigest()
        data_layer = build_estargz(entries, chunk_size=CHUNK_SIZE, level=1).layer()
        image = layout.add_image("fresh", [base, data_layer], cmd=["/bin/sh"])
        ref = push(layout.root, "fresh", registry, "lazysnap/restart-fresh:latest", image=image)
        yield FreshImage(image, ref, sha256)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- helpers

@dataclass
class Read:
    """`sha256sum PATH` run in a container with `ctr tasks exec`."""

    container: str
    path: str
    status: int                   # ctr's exit status: the command's, or 128 + the signal that killed it
    output: str
    seconds: float

    @property
    def digest(self) -> str:
        words = self.output.split()
        return words[0] if words else ""

    def right(self, expected: str) -> bool:
        return self.status == 0 and self.digest == expected

    def describe(self) -> str:
        what = ("SIGBUS" if self.status == SIGBUS_STATUS else "EIO" if EIO_TEXT.search(self.output)
                else f"exit {self.status}")
        return f"{self.container}: sha256sum {self.path} -> {what} after {self.seconds:.1f} s: {self.output.strip()!r}"


def read_file(containerd: Containerd, container: str, path: str, timeout: float = 90.0) -> Read:
    start = time.monotonic()
    done = containerd.exec(container, "sha256sum", path, check=False, timeout=timeout)
    return Read(container, path, done.returncode, done.stdout + done.stderr, time.monotonic() - start)


def read_all(containerd: Containerd, reads: list[tuple[str, str]]) -> list[Read]:
    """(container, path) pairs, read in parallel (misses reach the daemon at the same time)."""
    with ThreadPoolExecutor(max_workers=len(reads)) as pool:
        return list(pool.map(lambda r: read_file(containerd, *r), reads))


def assert_right(reads: list[Read], images: RestartImages, daemon: Lazysnap) -> None:
    wrong = [r for r in reads if not r.right(images.sha256[r.path])]
    assert not wrong, (f"{len(wrong)} of {len(reads)} reads of never-fetched files failed or returned wrong bytes:\n"
                       + "\n".join(r.describe() for r in wrong) + f"\n{daemon.log_tail()}")


def start_containers(containerd: Containerd, ref: str, cid: str, n: int = N_CONTAINERS) -> list[str]:
    """`n` containers of `ref` running `sleep`, each reading nothing but busybox."""
    ids = [f"{cid}-{i}" for i in range(n)]
    for container in ids:
        containerd.run_detached(ref, container, "sleep", "3600", snapshotter=LAZY)
    return ids


def pull_and_start(containerd: Containerd, daemon: Lazysnap, images: RestartImages, cid: str, ref: str | None = None,
                   n: int = N_CONTAINERS) -> list[str]:
    """rpull (every layer lazy), start `n` sleeping containers, and check a read before anything is restarted."""
    ref = ref or images.ref
    output, rows = rpull(containerd, daemon, ref)
    assert all(row.how == "lazy estargz" for row in rows.values()), output
    containers = start_containers(containerd, ref, cid, n)
    # The spare f12 reads fine before the restart: the image and the reads are sound.
    assert_right([read_file(containerd, containers[0], data_path(12))], images, daemon)
    return containers


def restart(daemon: Lazysnap, containerd: Containerd, sig: int) -> None:
    """Stop serve alone with `sig` (the data plane is not signalled) and start it again."""
    daemon.kill(sig)
    daemon.start()
    containerd.wait_for_snapshotter(LAZY)


def fetched_since(registry: Registry, images: RestartImages, mark: int) -> int:
    return registry.blob_bytes_served(images.data_digest, since=mark, settle=0.3)


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, which nobody may reap here, has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def mounts_at(path: Path) -> list[tuple[int, str]]:
    """(mount id, device) of each mount at `path`, several if stacked, from /proc/self/mountinfo.

    Mount ids and anonymous device numbers are reused once freed, so the pair tells mounts
    apart only while both live; that a mount is gone shows as its path no longer mounted.
    """
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return [(int(fields[0]), fields[2]) for fields in map(str.split, f) if fields[4] == target]


def fuse_mounts_below(path: Path) -> list[Path]:
    """Mountpoints of the FUSE mounts below `path`, once per mount stacked on them."""
    return [mountpoint for mountpoint, kind in mounts_below(path) if kind.startswith("fuse")]


@dataclass(frozen=True)
class PlaneLine:
    """One line of `lazysnap status --dataplanes`."""

    pid: int
    layers: int
    build: str
    retiring: bool


DATAPLANE_LINE = re.compile(r"^data plane (?P<generation>\d+): pid (?P<pid>\d+), (?P<layers>\d+) layers, "
                            r"build (?P<build>[0-9a-f]+)(?P<retiring> \(retiring: .+\))?$")


def status_dataplanes(daemon: Lazysnap) -> tuple[str, dict[int, PlaneLine]]:
    """`lazysnap status --dataplanes`: its output, and its data plane lines by generation."""
    done = lazysnap_cli("status", "--dataplanes", "--address", str(daemon.address), timeout=30)
    assert done.returncode == 0, f"lazysnap status --dataplanes failed:\n{done.stdout}{done.stderr}"
    lines = done.stdout.splitlines()
    cache = [i for i, line in enumerate(lines) if line.startswith("cache: ")]
    assert cache, f"no cache line in lazysnap status --dataplanes:\n{done.stdout}"
    planes = {}
    for line in lines[cache[-1] + 1:]:
        m = DATAPLANE_LINE.match(line)
        assert m, f"unparsable data plane line {line!r}:\n{done.stdout}"
        planes[int(m["generation"])] = PlaneLine(int(m["pid"]), int(m["layers"]), m["build"], bool(m["retiring"]))
    return done.stdout, planes


def remove_containers(containerd: Containerd, containers: list[str]) -> None:
    """Kill the containers' tasks and remove them (and their snapshots)."""
    for container in containers:
        containerd.ctr("tasks", "kill", "-a", "-s", "SIGKILL", container, check=False, timeout=30)
        containerd.ctr("tasks", "delete", "-f", container, timeout=30)
    containerd.ctr("containers", "rm", *containers, timeout=30)


# ---------------------------------------------------------------------------- restarts under running containers

def _restart_under_containers(containerd: Containerd, lazysnap: Lazysnap, images: RestartImages,
                              registry: Registry, cid: str, sig: int) -> None:
    containers = pull_and_start(containerd, lazysnap, images, cid)
    planes = lazysnap.dataplanes()
    mark = settled_mark(registry)

    restart(lazysnap, containerd, sig)
    reads = read_all(containerd, [(c, data_path(i)) for i, c in enumerate(containers)])
    assert_right(reads, images, lazysnap)

    # Each of those reads really was a miss served through the new serve: the files were never fetched before.
    fetched = fetched_since(registry, images, mark)
    assert fetched >= len(containers) * FILE_SIZE, (
        f"only {fetched} bytes of the data layer were fetched for {len(containers)} reads of 1 MiB never-read files")
    assert len(planes) == 1, f"before the restart one data plane should serve the layers, found {planes}"
    assert lazysnap.dataplanes() == planes, "the restarted serve must adopt the running data plane"


@pytest.mark.lazysnap_config(*QUIET)
def test_sigterm_restart_under_running_containers(containerd: Containerd, lazysnap: Lazysnap,
                                                  restart_images: RestartImages, registry: Registry,
                                                  cid: str) -> None:
    _restart_under_containers(containerd, lazysnap, restart_images, registry, cid, signal.SIGTERM)


@pytest.mark.lazysnap_config(*QUIET)
def test_sigkill_restart_under_running_containers(containerd: Containerd, lazysnap: Lazysnap,
                                                  restart_images: RestartImages, registry: Registry,
                                                  cid: str) -> None:
    _restart_under_containers(containerd, lazysnap, restart_images, registry, cid, signal.SIGKILL)


GAP = 2.0


@pytest.mark.lazysnap_config(*QUIET, "read_timeout = 30")
def test_read_during_the_restart_gap_waits_for_the_new_serve(containerd: Containerd, lazysnap: Lazysnap,
                                                             restart_images: RestartImages, cid: str) -> None:
    (container,) = pull_and_start(containerd, lazysnap, restart_images, cid, n=1)
    path = data_path(0)

    lazysnap.kill(signal.SIGTERM)
    started = time.monotonic()
    reader = subprocess.Popen(containerd.exec_argv(container, "sha256sum", path),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(GAP)
        waiting = reader.poll() is None
        lazysnap.start()
        output, _ = reader.communicate(timeout=60)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    read = Read(container, path, reader.returncode, output.decode(errors="replace"), time.monotonic() - started)
    assert_right([read], restart_images, lazysnap)
    assert waiting, (f"the read of a never-fetched file ended {read.seconds:.1f} s in, while serve was still down: "
                     "it did not wait for the control plane")


# ---------------------------------------------------------------------------- upgrade

def upgraded_copy(dest: Path) -> Path:
    """A copy of the `snapshotter` package under `dest`, one comment line longer (so its build id differs).

    Returns `dest`: run `python -m snapshotter` there to run the copy.
    """
    package = Path(snapshotter.__file__).parent
    copy = dest / "snapshotter"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    with open(copy / "__init__.py", "a") as f:
        f.write("# upgraded by tests/integration/test_restart.py\n")
    return dest


def restart_upgraded(containerd: Containerd, lazysnap: Lazysnap, workdir: Path) -> None:
    """Restart serve from a modified copy of the package: another build, so a new data plane generation."""
    copy = upgraded_copy(workdir / "upgrade")
    assert _runs_from(copy), f"python -m snapshotter in {copy} would not run the copy"
    lazysnap.kill(signal.SIGTERM)
    lazysnap.cwd = copy
    lazysnap.start()
    containerd.wait_for_snapshotter(LAZY)


def _runs_from(dest: Path) -> bool:
    """Whether `python -m snapshotter` run in `dest` imports the package from there."""
    done = subprocess.run([sys.executable, "-c", "import snapshotter; print(snapshotter.__file__)"], check=False,
                          cwd=dest,
                          capture_output=True, text=True, timeout=30)
    return done.stdout.strip().startswith(str(dest) + "/")


@pytest.mark.lazysnap_config(*QUIET)
def test_upgrade_starts_a_new_data_plane_and_the_old_one_keeps_serving(containerd: Containerd, lazysnap: Lazysnap,
                                                                       restart_images: RestartImages,
                                                                       workdir: Path, cid: str) -> None:
    containers = pull_and_start(containerd, lazysnap, restart_images, cid)
    before = lazysnap.dataplanes()
    restart_upgraded(containerd, lazysnap, workdir)

    # The containers started before the upgrade read never-fetched files through the old data plane.
    reads = read_all(containerd, [(c, data_path(i)) for i, c in enumerate(containers)])
    assert_right(reads, restart_images, lazysnap)

    # New containers work: one of the old image, and one of an image with a layer the old data plane never had.
    done, _ = run_script(containerd, restart_images.ref, f"sha256sum {data_path(10)}", cid + "-new-old")
    assert done.stdout.split()[:1] == [restart_images.sha256[data_path(10)]], done.stdout
    output, rows = rpull(containerd, lazysnap, restart_images.upgrade_ref)
    assert all(row.how == "lazy estargz" for row in rows.values()), output
    done, _ = run_script(containerd, restart_images.upgrade_ref, "/hello.sh; sha256sum /extra/new.bin", cid + "-new")
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and lines[1].split()[0] == restart_images.extra_sha256, done.stdout

    after = lazysnap.dataplanes()
    assert len(before) == 1, f"before the upgrade one data plane should serve the layers, found {before}"
    assert len(after) == 2, (f"after the upgrade the old data plane {before} and a new one should run, "
                             f"found {after}")
    (old_gen, old_pid), = before.items()
    assert after.get(old_gen) == old_pid, f"the old data plane {before} must keep serving, found {after}"
    assert max(after) > old_gen, f"the new data plane must be a newer generation than {old_gen}: {after}"
    # And the old containers still read never-fetched files, with the new data plane up.
    assert_right([read_file(containerd, containers[1], data_path(11))], restart_images, lazysnap)


# ---------------------------------------------------------------------------- registry down across a restart

REGISTRY_DOWN_TIMEOUT = 5.0


@pytest.mark.lazysnap_config(*QUIET, f"read_timeout = {REGISTRY_DOWN_TIMEOUT}")
def test_registry_down_across_a_restart_fails_with_eio_then_recovers(containerd: Containerd, lazysnap: Lazysnap,
                                                                     restart_images: RestartImages,
                                                                     own_registry: Registry, cid: str) -> None:
    ref = restart_images.push_to(own_registry)
    (container,) = pull_and_start(containerd, lazysnap, restart_images, cid, ref=ref, n=1)
    path = data_path(0)

    own_registry.stop()
    restart(lazysnap, containerd, signal.SIGTERM)
    down = read_file(containerd, container, path, timeout=60)
    assert down.status != 0, f"a never-fetched file read while the registry is down:\n{down.describe()}"
    assert down.status != SIGBUS_STATUS, f"the read must fail with EIO, not SIGBUS:\n{down.describe()}"
    assert EIO_TEXT.search(down.output), f"the read must fail with EIO:\n{down.describe()}"
    assert down.seconds < REGISTRY_DOWN_TIMEOUT + 5, (
        f"the failing read took {down.seconds:.1f} s (read_timeout {REGISTRY_DOWN_TIMEOUT} s)")

    own_registry.start()
    time.sleep(2 * DEFAULT_FAIL_FAST)  # reads within DEFAULT_FAIL_FAST of a failure fail at once, by design
    assert_right([read_file(containerd, container, path)], restart_images, lazysnap)


# ---------------------------------------------------------------------------- one daemon per root

def _assert_first_still_serves(containerd: Containerd, lazysnap: Lazysnap, images: RestartImages, container: str,
                               socket_inode: int, planes: dict[int, int], path: str) -> None:
    assert lazysnap.proc is not None and lazysnap.proc.running, f"the first serve died\n{lazysnap.log_tail()}"
    assert lazysnap.address.exists() and os.stat(lazysnap.address).st_ino == socket_inode, (
        "the first serve's socket was unlinked or replaced")
    assert unix_socket_accepts(lazysnap.address), "the first serve's socket no longer accepts"
    status(lazysnap)
    assert_right([read_file(containerd, container, path)], images, lazysnap)
    assert lazysnap.dataplanes() == planes, "the refused serve must leave the data planes alone"


def _refused(second: Lazysnap, first_pid: int, timeout: float = 10.0) -> str:
    """Start `second` and check it exits non-zero within `timeout` s, naming `first_pid`; its output."""
    proc = second.spawn()
    assert proc.popen is not None
    status_ = wait_exit(proc.popen, timeout)
    output = proc.log_text()
    assert status_ is not None, f"a second serve was still running {timeout:g} s after it started:\n{output}"
    assert status_ != 0, f"a second serve exited 0:\n{output}"
    # The pid as a number of its own (not a piece of a log line's timestamp).
    assert re.search(rf"(?<![\w,:.-]){first_pid}(?![\w:-])", output), (
        f"the refusal must name the running serve's pid {first_pid}:\n{output}")
    return output


@pytest.mark.lazysnap_config(*QUIET)
def test_second_serve_on_the_same_root_is_refused(containerd: Containerd, lazysnap: Lazysnap,
                                                  restart_images: RestartImages, workdir: Path, cid: str) -> None:
    (container,) = pull_and_start(containerd, lazysnap, restart_images, cid, n=1)
    first_pid, inode, planes = lazysnap.pid, os.stat(lazysnap.address).st_ino, lazysnap.dataplanes()
    assert first_pid is not None
    second = Lazysnap(root=lazysnap.root, address=workdir / "ls2.sock", log_path=workdir / "second.log",
                      config=lazysnap.config)
    try:
        _refused(second, first_pid)
        assert not unix_socket_accepts(second.address), "the refused serve left a socket that accepts"
    finally:
        second.stop()           # not close(): the root (and its mounts) are the first serve's
    _assert_first_still_serves(containerd, lazysnap, restart_images, container, inode, planes, data_path(0))


@pytest.mark.lazysnap_config(*QUIET)
def test_second_serve_on_the_same_socket_is_refused(containerd: Containerd, lazysnap: Lazysnap,
                                                    restart_images: RestartImages, workdir: Path, cid: str) -> None:
    (container,) = pull_and_start(containerd, lazysnap, restart_images, cid, n=1)
    first_pid, inode, planes = lazysnap.pid, os.stat(lazysnap.address).st_ino, lazysnap.dataplanes()
    assert first_pid is not None
    second = Lazysnap(root=workdir / "root2", address=lazysnap.address, log_path=workdir / "second.log",
                      config=lazysnap.config)
    try:
        _refused(second, first_pid)
        assert second.dataplane_pids() == [] and mounts_below(second.root) == [], (
            "the refused serve started a data plane or mounted something under its root")
    finally:
        second.close()          # its own root: stops anything it may have started there
    _assert_first_still_serves(containerd, lazysnap, restart_images, container, inode, planes, data_path(0))


# ---------------------------------------------------------------------------- crash during rpull

PULL_DELAY = 4.0


def _served_paths(daemon: Lazysnap) -> set[Path]:
    """Where the daemon says each lazily served layer is (the Status API's `path`)."""
    from snapshotter.status import StatusClient

    client = StatusClient(daemon.address)
    try:
        return {Path(layer.path) for layer in client.layers().layers if layer.path}
    finally:
        client.close()


@pytest.mark.lazysnap_config(*QUIET)
def test_sigkill_during_rpull_leaves_nothing_a_restart_cannot_fix(containerd: Containerd, lazysnap: Lazysnap,
                                                                  restart_images: RestartImages, proxy: FaultProxy,
                                                                  cid: str) -> None:
    ref = f"{proxy.host}/lazysnap/restart:latest"
    base = [layer.digest for layer in restart_images.image.layers[:-1]]
    # The data layer's blob answers late: serve is killed with the base layers mounted and the last one resolving.
    proxy.delay_match, proxy.delay = restart_images.data_digest, PULL_DELAY
    argv = [sys.executable, "-m", "snapshotter", "rpull", ref, "--plain-http", "--containerd",
            str(containerd.address), "--address", str(lazysnap.address)]
    puller = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + PULL_DELAY
        while time.monotonic() < deadline:
            _, layers = status(lazysnap)
            if all(layers.get(short(d), {}).get("mode") == "estargz" for d in base):
                break
            time.sleep(0.1)
        pulling = puller.poll() is None
        lazysnap.kill(signal.SIGKILL)
        proxy.delay = 0.0
        puller.communicate(timeout=60)
    finally:
        if puller.poll() is None:
            puller.kill()
            puller.wait()
    assert pulling, "rpull ended before serve was killed: the kill did not hit a pull in progress"

    lazysnap.start()
    containerd.wait_for_snapshotter(LAZY)
    output, rows = rpull(containerd, lazysnap, ref)
    assert all(row.how == "lazy estargz" for row in rows.values()), output
    done, _ = run_script(containerd, ref, f"/hello.sh; sha256sum {data_path(3)}", cid)
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and lines[1].split()[0] == restart_images.sha256[data_path(3)], done.stdout

    served = _served_paths(lazysnap)
    assert len(served) == len(restart_images.image.layers), f"every layer should be served lazily: {served}"
    assert all(p.parent == lazysnap.mnt_dir for p in served), (
        f"every served layer should be mounted at {lazysnap.mnt_dir}/<layer id>: {sorted(served)}")
    mnt = [path for path, _ in mounts_below(lazysnap.mnt_dir)]
    assert sorted(mnt) == sorted(served), (
        f"mounts under {lazysnap.mnt_dir} must be exactly one per served layer:\n"
        f"mounted {sorted(map(str, mnt))}\nserved {sorted(map(str, served))}")
    live_fuse = {lazysnap.dataplane_dir / str(gen) / "fuse" for gen in lazysnap.dataplanes()}
    stray = [f"{path} ({kind})" for path, kind in mounts_below(lazysnap.root)
             if path not in served and path not in live_fuse]
    assert not stray, f"mounted under {lazysnap.root}, needed by no served layer or live data plane: {stray}"


# ---------------------------------------------------------------------------- a retired data plane exits

RETIRED_EXIT_TIMEOUT = 15.0


@pytest.mark.lazysnap_config(*QUIET)
def test_retired_data_plane_exits_once_its_layers_are_released(containerd: Containerd, lazysnap: Lazysnap,
                                                               restart_images: RestartImages,
                                                               fresh_image: FreshImage, workdir: Path,
                                                               cid: str) -> None:
    old_containers = pull_and_start(containerd, lazysnap, restart_images, cid, n=2)
    (old_gen, old_pid), = lazysnap.dataplanes().items()
    old_fuse = lazysnap.dataplane_dir / str(old_gen) / "fuse"
    assert len(mounts_at(old_fuse)) == 1, f"data plane {old_gen}'s FUSE mount is not at {old_fuse}"

    # Upgrade: serve runs from a copy of the package, so it retires data plane `old_gen` and starts another.
    restart_upgraded(containerd, lazysnap, workdir)

    # An image that shares no layer with the old one: served by the new data plane alone.
    output, rows = rpull(containerd, lazysnap, fresh_image.ref)
    assert all(row.how == "lazy estargz" for row in rows.values()), output
    (fresh,) = start_containers(containerd, fresh_image.ref, cid + "-fresh", 1)
    first = read_file(containerd, fresh, fresh_path(0))
    assert first.right(fresh_image.sha256[fresh_path(0)]), first.describe()

    planes = lazysnap.dataplanes()
    assert len(planes) == 2 and planes.get(old_gen) == old_pid, (
        f"after the upgrade data plane {old_gen} (pid {old_pid}) and a new one should run, found {planes}")
    (new_gen, new_pid), = ((g, p) for g, p in planes.items() if g != old_gen)
    text, listed = status_dataplanes(lazysnap)
    assert set(listed) == {old_gen, new_gen}, f"status --dataplanes must list both generations:\n{text}"
    assert listed[old_gen].pid == old_pid and listed[old_gen].retiring, (
        f"data plane {old_gen} (pid {old_pid}) must be listed as retiring:\n{text}")
    assert listed[new_gen].pid == new_pid and not listed[new_gen].retiring, (
        f"data plane {new_gen} (pid {new_pid}) must be listed, not retiring:\n{text}")
    assert listed[old_gen].layers == len(restart_images.image.layers), text
    assert listed[new_gen].layers == len(fresh_image.image.layers), text
    assert listed[old_gen].build != listed[new_gen].build, f"the two generations must be of different builds:\n{text}"

    # Release every layer of the old data plane: its containers go, then its image.
    old_layers = {short(layer.digest) for layer in restart_images.image.layers}
    remove_containers(containerd, old_containers)
    started = time.monotonic()
    containerd.ctr("images", "rm", "--sync", restart_images.ref)
    old_chains = set(restart_images.image.chain_ids)
    wait_until(lambda: not old_chains & set(snapshot_keys(containerd)), RETIRED_EXIT_TIMEOUT,
               "lazysnap's snapshots of the old image to be removed")
    wait_until(lambda: not old_layers & set(status(lazysnap)[1]), RETIRED_EXIT_TIMEOUT,
               "lazysnap status to no longer list the old image's layers")
    deadline = started + RETIRED_EXIT_TIMEOUT
    while process_alive(old_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(old_pid), (
        f"the retired data plane {old_gen} (pid {old_pid}) still runs {time.monotonic() - started:.1f} s after "
        f"its image was removed and its layers released\n{lazysnap.log_tail()}")
    assert mounts_at(old_fuse) == [], (
        f"data plane {old_gen} exited, but its FUSE mount at {old_fuse} is still in /proc/self/mountinfo: "
        f"{mounts_below(lazysnap.dataplane_dir)}")
    new_fuse = lazysnap.dataplane_dir / str(new_gen) / "fuse"
    assert fuse_mounts_below(lazysnap.dataplane_dir) == [new_fuse], (
        f"only data plane {new_gen}'s FUSE mount should be left: {mounts_below(lazysnap.dataplane_dir)}")
    mnt = [path for path, _ in mounts_below(lazysnap.mnt_dir)]
    assert len(mnt) == len(fresh_image.image.layers), (
        f"only the fresh image's {len(fresh_image.image.layers)} layers should be mounted under "
        f"{lazysnap.mnt_dir}: {mnt}")

    text, listed = status_dataplanes(lazysnap)
    assert list(listed) == [new_gen] and listed[new_gen].pid == new_pid and not listed[new_gen].retiring, (
        f"status --dataplanes must list only data plane {new_gen} (pid {new_pid}), not retiring:\n{text}")
    assert lazysnap.dataplanes() == {new_gen: new_pid}, lazysnap.dataplanes()

    # The new generation keeps serving: a never-read file in the running container of the fresh image.
    later = read_file(containerd, fresh, fresh_path(1))
    assert later.right(fresh_image.sha256[fresh_path(1)]), f"{later.describe()}\n{lazysnap.log_tail()}"


# ---------------------------------------------------------------------------- a killed data plane is replaced

REPLACE_TIMEOUT = 15.0
BROKEN_READ_TIMEOUT = 20.0


@pytest.mark.lazysnap_config(*QUIET)
def test_a_killed_data_plane_is_replaced(containerd: Containerd, lazysnap: Lazysnap,
                                         restart_images: RestartImages, cid: str) -> None:
    containers = pull_and_start(containerd, lazysnap, restart_images, cid, n=3)
    (old_gen, old_pid), = lazysnap.dataplanes().items()
    old_dir = lazysnap.dataplane_dir / str(old_gen)
    assert fuse_mounts_below(lazysnap.dataplane_dir) == [old_dir / "fuse"], (
        f"data plane {old_gen}'s FUSE mount should be the only one: {mounts_below(lazysnap.dataplane_dir)}")
    # A file of our own in the generation's directory: gone once serve has removed the directory,
    # even if the next generation gets the same number.
    marker = old_dir / "put-here-by-the-test"
    marker.write_text("")
    serve_pid = lazysnap.pid
    # busybox itself lives on the layers the killed data plane served: a page of it that is not cached
    # (such as the code that reports a failed read) faults with SIGBUS once the data plane is gone. Run
    # that code now, so that what the reads below show is what the read of the data file itself got.
    for container in containers:
        warm = containerd.exec(container, "sha256sum", "/proc/self/mem", check=False, timeout=30)
        assert warm.returncode == 1 and EIO_TEXT.search(warm.stderr), (warm.returncode, warm.stdout, warm.stderr)

    killed = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: not process_alive(old_pid), 5, f"the SIGKILLed data plane (pid {old_pid}) to exit")

    # The running containers read through the dead FUSE connection: broken, but never wrong bytes.
    with ThreadPoolExecutor(max_workers=len(containers)) as pool:
        broken = list(pool.map(lambda c: read_file(containerd, c[1], data_path(c[0]), timeout=BROKEN_READ_TIMEOUT),
                               enumerate(containers)))
    wrong = [r for r in broken if r.status == 0 and r.digest != restart_images.sha256[r.path]]
    assert not wrong, "reads through a killed data plane returned wrong bytes:\n" + "\n".join(
        r.describe() for r in wrong)
    not_eio = [r for r in broken if r.status != 0 and not (r.status == 1 and EIO_TEXT.search(r.output))]
    assert not not_eio, "reads through a killed data plane must fail with EIO:\n" + "\n".join(
        r.describe() for r in not_eio)

    def replaced() -> bool:
        planes = lazysnap.dataplanes()
        return len(planes) == 1 and old_pid not in planes.values()

    wait_until(replaced, max(0.1, killed + REPLACE_TIMEOUT - time.monotonic()),
               f"serve to start a data plane in place of pid {old_pid}", lazysnap.proc)
    (new_gen, new_pid), = lazysnap.dataplanes().items()
    assert (lazysnap.dataplane_dir / str(new_gen) / "pid").read_text().strip() == str(new_pid)
    assert not marker.exists(), f"the killed data plane's directory {old_dir} was not removed"
    # One FUSE mount, the new one's (the generation number may be the old one's: its directory was removed).
    assert fuse_mounts_below(lazysnap.dataplane_dir) == [lazysnap.dataplane_dir / str(new_gen) / "fuse"], (
        f"the killed data plane's FUSE mount is left beside the new one's: {mounts_below(lazysnap.dataplane_dir)}")
    assert lazysnap.pid == serve_pid, "serve must keep running when its data plane dies"

    # The new generation serves every layer of the image again (`status --dataplanes`).
    n_layers = len(restart_images.image.layers)

    def serves_them_all() -> bool:
        listed = status_dataplanes(lazysnap)[1]
        return (list(listed) == [new_gen] and listed[new_gen].pid == new_pid and listed[new_gen].layers == n_layers
                and not listed[new_gen].retiring)

    wait_until(serves_them_all, max(0.1, killed + REPLACE_TIMEOUT - time.monotonic()),
               f"status --dataplanes to list data plane {new_gen} (pid {new_pid}) alone, serving {n_layers} layers",
               lazysnap.proc)

    # A new container of the same image starts and reads a never-read file.
    done, _ = run_script(containerd, restart_images.ref, f"sha256sum {data_path(10)}", cid + "-new")
    assert done.stdout.split()[:1] == [restart_images.sha256[data_path(10)]], f"{done.stdout}\n{lazysnap.log_tail()}"


# ---------------------------------------------------------------------------- FUSE-served metadata

@pytest.mark.lazysnap_config(*QUIET, "kernel_metadata = false")
def test_restart_with_fuse_served_metadata(containerd: Containerd, lazysnap: Lazysnap, restart_images: RestartImages,
                                           registry: Registry, cid: str) -> None:
    containers = pull_and_start(containerd, lazysnap, restart_images, cid, n=3)
    n_layers = len(restart_images.image.layers)
    before = mounts_below(lazysnap.mnt_dir)
    assert len(before) == n_layers and all(kind.startswith("fuse") for _, kind in before), (
        f"with kernel_metadata = false each of the {n_layers} layers should be a FUSE bind mount under "
        f"{lazysnap.mnt_dir}: {before}")
    mounted = {path: mounts_at(path) for path, _ in before}
    planes = lazysnap.dataplanes()
    mark = settled_mark(registry)

    restart(lazysnap, containerd, signal.SIGTERM)
    reads = read_all(containerd, [(c, data_path(i)) for i, c in enumerate(containers)])
    assert_right(reads, restart_images, lazysnap)

    fetched = fetched_since(registry, restart_images, mark)
    assert fetched >= len(containers) * FILE_SIZE, (
        f"only {fetched} bytes of the data layer were fetched for {len(containers)} reads of 1 MiB never-read files")
    assert len(planes) == 1 and lazysnap.dataplanes() == planes, (
        f"the restarted serve must adopt the running data plane {planes}, found {lazysnap.dataplanes()}")
    after = mounts_below(lazysnap.mnt_dir)
    assert len(after) == n_layers and all(kind.startswith("fuse") for _, kind in after), (
        f"after the restart each layer should still be a FUSE bind mount under {lazysnap.mnt_dir}: {after}")
    assert {path: mounts_at(path) for path, _ in after} == mounted, "the restart must leave the layer mounts alone"


# ---------------------------------------------------------------------------- SOCI layers

@pytest.mark.lazysnap_config(*QUIET)
def test_soci_layers_survive_a_restart_under_running_containers(containerd: Containerd, lazysnap: Lazysnap,
                                                                soci_image: SociImage, registry: Registry,
                                                                cid: str) -> None:
    data_layer = soci_image.layers[-1]
    assert data_layer.digest in soci_image.indexed, "the layer with /data/random.bin should have a zTOC"
    output, rows = rpull(containerd, lazysnap, soci_image.ref)
    assert rows[short(data_layer.digest)].how == "lazy soci", output
    containers = start_containers(containerd, soci_image.ref, cid, 2)
    planes = lazysnap.dataplanes()
    mark = settled_mark(registry)

    restart(lazysnap, containerd, signal.SIGKILL)
    expected = hashlib.sha256(soci_image.data).hexdigest()
    reads = read_all(containerd, [(c, "/data/random.bin") for c in containers])
    wrong = [r for r in reads if not r.right(expected)]
    assert not wrong, "reads of /data/random.bin after the restart failed or returned wrong bytes:\n" + "\n".join(
        r.describe() for r in wrong) + f"\n{lazysnap.log_tail()}"

    # The file was never fetched before: the reads went data plane -> new serve -> registry.
    fetched = registry.blob_bytes_served(data_layer.digest, since=mark, settle=0.3)
    assert fetched >= len(soci_image.data), (
        f"only {fetched} bytes of the SOCI layer were fetched after the restart for a {len(soci_image.data)}-byte "
        "never-read file")
    assert len(planes) == 1 and lazysnap.dataplanes() == planes, (
        f"the restarted serve must adopt the running data plane {planes}, found {lazysnap.dataplanes()}")
