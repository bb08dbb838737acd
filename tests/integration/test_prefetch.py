"""Fetching ahead of reads, end to end: a start profile recorded on one node and pushed to
the registry is prefetched on the next node before its container reads; an eStargz
prefetch landmark is prefetched at mount; background fetch completes the layers, after
which the registry can die without a read failing.

Each test runs its own nodes (containerd + lazysnap, fresh roots), so nothing is cached
or recorded before it starts.
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.containerd import Containerd
from tests.harness.estargz import build_estargz
from tests.harness.images import File, Image, OCILayout, push, sample_layers
from tests.harness.lazysnap import Lazysnap
from tests.harness.procs import unmount_below, wait_until
from tests.harness.registry import Registry

from .conftest import short_tmpdir
from .test_lazy import LAZY, lazysnap_cli, rpull, run_script, settled_mark

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MODULES = 60
MODULE_SIZE = 96 << 10
STARTUP_MODULES = 30
"""The workload reads the first 30 modules: what a start profile should capture."""


def _cat(count: int) -> str:
    """A script that hashes the first `count` modules, in order (busybox here has no `seq`)."""
    return "cat " + " ".join(f"/app/lib/mod{i:02d}.bin" for i in range(count)) + " </dev/null | sha256sum"


WORKLOAD = _cat(STARTUP_MODULES)


@dataclass
class AppImage:
    ref: str
    image: Image
    app_digest: str
    expected: str
    """sha256 the workload prints."""
    everything: str
    """sha256 of all modules, concatenated in order."""


def _modules() -> list[bytes]:
    rng = random.Random(55)
    return [rng.randbytes(MODULE_SIZE) for _ in range(MODULES)]


def _push_app(registry: Registry, layout_dir: Path, tag: str, landmark: bool = False) -> AppImage:
    modules = _modules()
    layout = OCILayout(layout_dir)
    names = [f"app/lib/mod{i:02d}.bin" for i in range(MODULES)]
    files = [File(name, data) for name, data in zip(names, modules, strict=True)]
    base = [build_estargz(entries, chunk_size=256 << 10).layer() for entries in sample_layers()]
    app = build_estargz(files, chunk_size=64 << 10, prefetch=names[:STARTUP_MODULES] if landmark else None).layer()
    image = layout.add_image(tag, [*base, app], cmd=["/hello.sh"])
    ref = push(layout.root, tag, registry, f"lazysnap/prefetch-{tag}:latest", image=image)
    return AppImage(ref, image, app.digest, hashlib.sha256(b"".join(modules[:STARTUP_MODULES])).hexdigest(),
                    hashlib.sha256(b"".join(modules)).hexdigest())


@pytest.fixture(scope="module")
def app_image(registry: Registry) -> Iterator[AppImage]:
    tmp = short_tmpdir("lzs-pf-")
    try:
        yield _push_app(registry, tmp / "layout", "app")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Node:
    lazysnap: Lazysnap
    containerd: Containerd

    def log(self) -> str:
        return self.lazysnap.log_path.read_text(errors="replace")


@contextmanager
def node(*config: str) -> Iterator[Node]:
    """A fresh node: lazysnap (with these config lines) and a containerd using it."""
    tmp = short_tmpdir("lzs-node-")
    (tmp / "lazysnap.toml").write_text("\n".join(config) + "\n")
    daemon = Lazysnap(root=tmp / "root", address=tmp / "ls.sock", log_path=tmp / "lazysnap.log",
                      config=tmp / "lazysnap.toml")
    ctd = Containerd(snapshotter_address=daemon.address, proxy_name=LAZY, workdir=tmp / "ctd")
    try:
        daemon.start()
        ctd.start()
        yield Node(daemon, ctd)
    except BaseException:
        if daemon.log_path.exists():
            lines = daemon.log_path.read_text(errors="replace").splitlines()
            print("\n".join(line for line in lines if " DEBUG " not in line)[-20000:])
        raise
    finally:
        try:
            ctd.stop()
        finally:
            daemon.close()
            unmount_below(tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def _range_gets(registry: Registry, digest: str, since: int) -> int:
    return sum(1 for r in registry.requests(settle=0.3)[since:]
               if r.method == "GET" and r.blob is not None and r.blob[1] == digest and r.status == 206)


def _workload(n: Node, image: AppImage, cid: str, script: str = WORKLOAD) -> str:
    done, _ = run_script(n.containerd, image.ref, script, cid)
    return done.stdout.split()[0]


def test_a_start_recorded_on_one_node_is_prefetched_on_the_next(registry: Registry, app_image: AppImage) -> None:
    quiet = ["background_fetch = false", "profile_seconds = 3.0"]
    with node(*quiet) as first:
        rpull(first.containerd, first.lazysnap, app_image.ref)
        mark = settled_mark(registry)
        assert _workload(first, app_image, "pf-first") == app_image.expected
        first_gets = _range_gets(registry, app_image.app_digest, mark)
        assert first_gets >= 3, f"the first start should fetch file by file ({first_gets} GETs)"
        done = lazysnap_cli("profile", "push", app_image.ref, "--root", str(first.lazysnap.root), "--plain-http",
                            "--wait", "60", timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr + first.lazysnap.log_tail()
        assert "pushed the start profile" in done.stdout, done.stdout
        listed = lazysnap_cli("profile", "list", "--root", str(first.lazysnap.root)).stdout
        assert app_image.image.manifest_digest in listed, listed

    with node(*quiet) as second:
        rpull(second.containerd, second.lazysnap, app_image.ref)
        wait_until(lambda: re.search(rf"prefetched \d+ bytes of {app_image.app_digest}", second.log()) is not None,
                   60, "the app layer's prefetch", second.lazysnap.proc)
        log = second.log()
        assert "start profile of" in log and "from the registry" in log, log[-3000:]
        mark = settled_mark(registry)
        assert _workload(second, app_image, "pf-second") == app_image.expected
        assert _range_gets(registry, app_image.app_digest, mark) == 0, \
            "every byte the start reads was prefetched from the profile"


def test_an_estargz_prefetch_landmark_is_fetched_at_mount(registry: Registry) -> None:
    tmp = short_tmpdir("lzs-lm-")
    try:
        image = _push_app(registry, tmp / "layout", "landmark", landmark=True)
        with node("background_fetch = false", "record_profiles = false") as n:
            rpull(n.containerd, n.lazysnap, image.ref)
            wait_until(lambda: re.search(rf"prefetched \d+ bytes of {image.app_digest}", n.log()) is not None,
                       60, "the landmark prefetch", n.lazysnap.proc)
            assert "prefetch landmark" in n.log()
            mark = settled_mark(registry)
            assert _workload(n, image, "lm-run") == image.expected
            assert _range_gets(registry, image.app_digest, mark) == 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_background_fetch_completes_layers_so_a_dead_registry_breaks_nothing(app_image: AppImage) -> None:
    own = Registry().start()
    tmp = short_tmpdir("lzs-bg-")
    try:
        image = _push_app(own, tmp / "layout", "bg")
        with node("background_quiet_seconds = 0.5", "background_rate_mib = 0", "record_profiles = false") as n:
            rpull(n.containerd, n.lazysnap, image.ref)

            def complete() -> bool:
                out = lazysnap_cli("status", "--address", str(n.lazysnap.address), timeout=30).stdout
                rows = [line for line in out.splitlines() if line.startswith("sha256:")]
                return len(rows) == len(image.image.layers) and all(" complete " in row for row in rows)
            wait_until(complete, 90, "every layer complete in the cache", n.lazysnap.proc)
            own.stop()
            assert _workload(n, image, "bg-run", _cat(MODULES)) == image.everything
            assert "is complete in the cache" in n.log()
    finally:
        own.close()
        shutil.rmtree(tmp, ignore_errors=True)
