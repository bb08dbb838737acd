"""`make demo`: one image started with containerd's own overlayfs pull and with lazysnap, side by side.

In a scratch directory: a registry behind a shaped link (100 Mbit/s, 20 ms round trip:
`benchmarks/netem.py`, a network namespace with tbf and a delay proxy), an image in
eStargz form pushed to it (busybox, a few files, and a 64 MiB data layer the container
never reads), and containerd with lazysnap as a proxy snapshotter. The image is pulled
and run twice: `ctr image pull` + `ctr run` on overlayfs, then `lazysnap rpull` +
`ctr run` on lazysnap. The demo prints the time and the registry bytes of each, how
lazysnap serves each layer, and stops everything again. It uses the harness of the
integration tests, so what it shows is what they check.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from benchmarks.netem import ShapedLink
from benchmarks.run import write_certs
from tests.harness.containerd import Containerd
from tests.harness.estargz import build_estargz
from tests.harness.images import HELLO_OUTPUT, File, OCILayout, push, sample_layers
from tests.harness.lazysnap import Lazysnap
from tests.harness.procs import unmount_below
from tests.harness.registry import Registry

T = TypeVar("T")
DATA_MIB = 64
"""A layer of incompressible data the container never reads: lazily, it is never fetched."""
RATE, RTT = "100mbit", 0.020
LAZY, OVERLAY = "lazysnap", "overlayfs"


def step(title: str, action: Callable[[], T]) -> T:
    """Run `action`, saying what it is, and every second how long it has taken so far."""
    print(f"==> {title} ...", flush=True)
    start = time.monotonic()
    done = threading.Event()

    def tick() -> None:
        while not done.wait(1.0):
            print(f"    ... {time.monotonic() - start:.0f} s", flush=True)

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        result = action()
    finally:
        done.set()
        ticker.join()
    print(f"    done in {time.monotonic() - start:.2f} s", flush=True)
    return result


def blob_bytes(registry: Registry, since: int) -> int:
    return sum(r.bytes for r in registry.requests(settle=0.3)[since:] if r.blob is not None and r.method == "GET")


def main() -> int:
    scratch = Path(tempfile.mkdtemp(prefix="lzs-demo-", dir="/tmp"))
    link: ShapedLink | None = None
    lazysnap = containerd = None
    try:
        origin = step("starting a registry", lambda: Registry(workdir=scratch / "registry").start())
        layout = OCILayout(scratch / "layout")
        data = File("data/model.bin", os.urandom(DATA_MIB << 20))  # never read by the demo's container
        layers = [build_estargz(entries, chunk_size=1 << 20).layer() for entries in [*sample_layers(), [data]]]
        image = layout.add_image("latest", layers, cmd=["/hello.sh"])
        size = sum(len(layer.blob) for layer in layers)
        step(f"pushing a {len(layers)}-layer eStargz image ({size / 2**20:.1f} MiB)",
             lambda: push(layout.root, "latest", origin, "demo/sample", image=image))
        origin.stop()  # its storage is served again behind the shaped link
        link = step(f"serving it behind a shaped link ({RATE}, {RTT * 1000:g} ms round trip)",
                    lambda: ShapedLink(storage=scratch / "registry" / "storage", workdir=scratch / "link",
                                       rate=RATE, rtt=RTT).__enter__())
        registry = link.registry
        assert registry is not None
        ref = f"{link.host}/demo/sample:latest"
        certs = write_certs(scratch / "certs.d", link.host)
        config = scratch / "lazysnap.toml"
        config.write_text(f'certs_dir = "{certs}"\n')
        lazysnap = step("starting lazysnap", lambda: Lazysnap(
            root=scratch / "root", address=scratch / "ls.sock", log_path=scratch / "lazysnap.log",
            config=config).start())
        containerd = step("starting containerd with [proxy_plugins.lazysnap]",
                          lambda: Containerd(snapshotter_address=lazysnap.address, workdir=scratch / "ctd").start())
        ctd = containerd
        results: dict[str, tuple[float, float, int]] = {}

        mark, start = len(registry.requests(settle=0.3)), time.monotonic()
        step(f"containerd's own pull into overlayfs: ctr image pull {ref}", lambda: ctd.pull(ref, OVERLAY))
        pulled = time.monotonic()
        out = step("running the container on overlayfs", lambda: ctd.run_container(ref, "demo-overlay", "/hello.sh",
                                                                                   snapshotter=OVERLAY))
        results[OVERLAY] = (pulled - start, time.monotonic() - pulled, blob_bytes(registry, mark))
        if out.stdout.strip() != HELLO_OUTPUT:
            print(f"unexpected container output {out.stdout!r} (wanted {HELLO_OUTPUT!r})", file=sys.stderr)
            return 1

        lazysnap_cli = [sys.executable, "-m", "snapshotter"]
        mark, start = len(registry.requests(settle=0.3)), time.monotonic()
        rpull = step(f"lazysnap rpull {ref}", lambda: subprocess.run(
            [*lazysnap_cli, "rpull", "--plain-http", "--containerd", str(ctd.address), "--address",
             str(lazysnap.address), ref], capture_output=True, text=True, check=True, timeout=300))
        pulled = time.monotonic()
        print(rpull.stdout.rstrip())
        out = step("running the container on lazysnap", lambda: ctd.run_container(ref, "demo-lazy", "/hello.sh",
                                                                                  snapshotter=LAZY))
        results[LAZY] = (pulled - start, time.monotonic() - pulled, blob_bytes(registry, mark))
        if out.stdout.strip() != HELLO_OUTPUT:
            print(f"unexpected container output {out.stdout!r} (wanted {HELLO_OUTPUT!r})", file=sys.stderr)
            return 1
        print(f"    container printed: {out.stdout.strip()!r}")

        print("\n--- lazysnap status ---")
        print(subprocess.run([*lazysnap_cli, "status", "--address", str(lazysnap.address)],
                             capture_output=True, text=True, timeout=60).stdout.rstrip())
        print(f"\n--- the same image over {RATE} with {RTT * 1000:g} ms round trips ---")
        print(f"{'':10}  {'pull':>7}  {'run':>7}  {'total':>7}  {'registry bytes':>15}")
        for name, (pull_s, run_s, fetched) in results.items():
            print(f"{name:10}  {pull_s:6.2f}s  {run_s:6.2f}s  {pull_s + run_s:6.2f}s  "
                  f"{fetched / 2**20:10.1f} MiB ({fetched / size:.0%})")
        overlay, lazy = (sum(results[n][:2]) for n in (OVERLAY, LAZY))
        print(f"lazysnap started the container {overlay / lazy:.1f}x sooner; the data layer it never read "
              "stays in the registry until something reads it")
        return 0
    finally:
        if containerd is not None:
            containerd.stop()
        if lazysnap is not None:
            lazysnap.close()
        if link is not None:
            link.close()
        unmount_below(scratch)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
