"""Preheating end to end: `lazysnap prefetch IMAGE` warms a node's cache for an image
without running it. With `--wait` it prints progress until every lazy layer is complete
in the cache, after which a container of the image starts without one registry GET;
without it the command returns once the image is pulled and the daemon completes the
layers on its own; Ctrl-C stops waiting (one line, exit 130) but not the warming. An
image with a start profile is warmed profile first; one larger than the cache as far as
it fits, without evicting what it warmed.

Each test runs its own node (containerd + lazysnap, fresh root) with background fetch
off, so whatever completes the layers is the warming. A fault proxy that holds every
request for the app layer's blob makes a warming last long enough to watch.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from snapshotter.layers.estargz import TAIL_READ
from tests.harness.faultproxy import FaultProxy
from tests.harness.procs import wait_until
from tests.harness.registry import Registry

from .test_lazy import lazysnap_cli, rpull, settled_mark, short, status
from .conftest import short_tmpdir
from .test_prefetch import MODULES, AppImage, Node, _cat, _push_app, _workload, node

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

QUIET = ("background_fetch = false", "record_profiles = false")
HOLD = 2.0
"""Seconds the proxy holds each request for the app layer's blob."""


def prefetch_argv(n: Node, ref: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "snapshotter", "prefetch", ref, "--plain-http", "--containerd",
            str(n.containerd.address), "--address", str(n.lazysnap.address), *args]


def fetch_states(n: Node, image: AppImage) -> dict[str, str]:
    """Short layer digest -> its FETCH STATE column in `lazysnap status`."""
    _, rows = status(n.lazysnap)
    return {short(layer.digest): rows[short(layer.digest)]["rest"].split("  ")[0]
            for layer in image.image.layers}


def all_complete(n: Node, image: AppImage) -> bool:
    return all(state == "complete" for state in fetch_states(n, image).values())


@pytest.fixture(scope="module")
def app(registry: Registry) -> Iterator[AppImage]:
    """test_prefetch.py's image: three small base layers and a 5.6 MiB app layer of 64 KiB chunks."""
    tmp = short_tmpdir("lzs-ph-")
    try:
        yield _push_app(registry, tmp / "layout", "preheat")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def held(registry: Registry, app: AppImage) -> Iterator[tuple[FaultProxy, str]]:
    """A proxy before the registry that holds the app layer's blob requests; the image's ref through it."""
    with FaultProxy(registry.host) as proxy:
        proxy.delay, proxy.delay_match = HOLD, app.app_digest
        yield proxy, app.ref.replace(registry.host, proxy.host, 1)


def test_prefetch_wait_warms_every_layer_and_the_container_needs_no_registry(registry: Registry,
                                                                             app: AppImage) -> None:
    with node(*QUIET) as n:
        mark = settled_mark(registry)
        start = time.monotonic()
        done = lazysnap_cli(*prefetch_argv(n, app.ref, "--wait")[3:], timeout=180)
        seconds = time.monotonic() - start
        output = done.stdout + done.stderr
        assert done.returncode == 0, output + n.lazysnap.log_tail()
        assert f"warming {app.ref}: 4 lazy layer(s)" in output and "whole layers" in output, output
        assert re.search(r"in the cache \(100 %\), [\d.]+ [KM]iB fetched, in [\d.]+ s$", done.stdout.strip()), output
        assert done.stdout.count(", complete\n") == 4, "a progress line says when each layer is complete"
        assert all_complete(n, app), status(n.lazysnap)[0]

        requests = registry.requests(settle=0.3)[mark:]
        total = 0
        for layer in app.image.layers:
            served = sum(r.bytes for r in requests if r.method == "GET" and r.blob and r.blob[1] == layer.digest)
            # Each chunk once: beyond the blob's size, only the resolve's tail read (which reaches
            # back into the last chunks before the TOC) is served twice.
            assert 0 < served <= len(layer.blob) + TAIL_READ, f"{layer.digest}: {served} of {len(layer.blob)}"
            total += served
        blobs = sum(len(layer.blob) for layer in app.image.layers)
        print(f"{done.stdout}prefetch --wait: {total} of {blobs} blob bytes from the registry in {seconds:.2f} s")

        mark = settled_mark(registry)
        assert _workload(n, app, "ph-run", _cat(MODULES)) == app.everything
        gets = [r for r in registry.requests(settle=0.3)[mark:] if r.method == "GET" and r.blob is not None]
        assert gets == [], f"the container fetched blobs: {gets}"


def test_prefetch_returns_after_the_pull_and_the_daemon_completes_the_layers(app: AppImage,
                                                                              held: tuple[FaultProxy, str]) -> None:
    _, ref = held
    with node(*QUIET) as n:
        done = lazysnap_cli(*prefetch_argv(n, ref)[3:], timeout=180)
        returned = time.monotonic()
        assert done.returncode == 0, done.stdout + done.stderr + n.lazysnap.log_tail()
        assert "more in the daemon; `lazysnap status` shows how far" in done.stdout, done.stdout
        states = fetch_states(n, app)
        assert states[short(app.app_digest)] != "complete", "the command waited for the warming"
        assert re.fullmatch(r"\d+ %, warming", states[short(app.app_digest)]), states
        wait_until(lambda: all_complete(n, app), 60, "every layer complete", n.lazysnap.proc)
        print(f"prefetch returned {time.monotonic() - returned:.2f} s before the layers were complete")


def test_ctrl_c_stops_waiting_but_not_the_warming(app: AppImage, held: tuple[FaultProxy, str]) -> None:
    _, ref = held
    with node(*QUIET) as n:
        proc = subprocess.Popen(prefetch_argv(n, ref, "--wait"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            seen = []
            assert proc.stdout is not None
            for line in proc.stdout:
                seen.append(line)
                if line.startswith("warming "):
                    break
            assert seen and seen[-1].startswith("warming "), "".join(seen)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == 130, "".join(seen) + out + err
        assert err == f"lazysnap: interrupted; the daemon keeps warming {ref} (`lazysnap status` shows how far)\n"
        assert not all_complete(n, app)
        wait_until(lambda: all_complete(n, app), 60, "every layer complete after Ctrl-C", n.lazysnap.proc)


def test_an_image_larger_than_the_cache_is_warmed_as_far_as_it_fits(app: AppImage) -> None:
    with node(*QUIET, "cache_max_mib = 4") as n:
        done = lazysnap_cli(*prefetch_argv(n, app.ref, "--wait")[3:], timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr + n.lazysnap.log_tail()
        assert re.search(r"^note: the image takes [\d.]+ MiB in the cache, more than 80 % of its 4\.0 MiB "
                         r"\(cache_max_mib\)", done.stdout, re.MULTILINE), done.stdout
        assert "partial: no room in the cache" in done.stdout, done.stdout
        states = fetch_states(n, app)
        assert re.fullmatch(r"\d+ %, on demand", states[short(app.app_digest)]), states
        out, _ = status(n.lazysnap)
        cache = re.search(r"^cache: ([\d.]+) MiB of 4\.0 MiB, .* (\d+) evictions\)$", out, re.MULTILINE)
        assert cache and float(cache[1]) <= 3.2 and cache[2] == "0", out
        print(done.stdout)


def test_an_image_with_a_start_profile_is_warmed_profile_first(registry: Registry, app: AppImage) -> None:
    with node("background_fetch = false", "profile_seconds = 3.0") as first:
        rpull(first.containerd, first.lazysnap, app.ref)
        assert _workload(first, app, "ph-record") == app.expected
        pushed = lazysnap_cli("profile", "push", app.ref, "--root", str(first.lazysnap.root), "--plain-http",
                              "--wait", "60", timeout=120)
        assert pushed.returncode == 0, pushed.stdout + pushed.stderr + first.lazysnap.log_tail()
    with node(*QUIET) as n:
        done = lazysnap_cli(*prefetch_argv(n, app.ref, "--wait")[3:], timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr + n.lazysnap.log_tail()
        assert re.search(r"^warming .*; start profile first$", done.stdout, re.MULTILINE), done.stdout
        assert re.search(r"in the cache \(100 %\), [\d.]+ [KM]iB fetched, start profile first, in [\d.]+ s$",
                         done.stdout.rstrip()), done.stdout
        assert all_complete(n, app)
        mark = settled_mark(registry)
        assert _workload(n, app, "ph-profiled", _cat(MODULES)) == app.everything
        assert [r for r in registry.requests(settle=0.3)[mark:] if r.method == "GET" and r.blob] == []
