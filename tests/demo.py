"""`make demo`: lazysnap end to end on this machine, in a scratch directory.

Starts a local registry, lazysnap and a containerd wired to it, pushes a small sample
image in eStargz form (busybox, a few files, and a 64 MiB data layer), pulls it lazily with `lazysnap rpull` (no layer is downloaded),
runs a container from it, shows how each layer is served and what was fetched, and
stops everything again. It uses the same harness as the integration tests, so what it
shows is what they check.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tests.harness.containerd import Containerd
from tests.harness.estargz import build_estargz
from tests.harness.images import HELLO_OUTPUT, File, OCILayout, push, sample_layers
from tests.harness.lazysnap import Lazysnap
from tests.harness.procs import unmount_below
from tests.harness.registry import Registry

T = TypeVar("T")
DATA_MIB = 64
"""A layer of incompressible data the container never reads: lazily, it is never fetched."""


def step(title: str, action: Callable[[], T]) -> T:
    print(f"==> {title} ...", flush=True)
    start = time.monotonic()
    result = action()
    print(f"    done in {time.monotonic() - start:.2f} s", flush=True)
    return result


def main() -> int:
    scratch = Path(tempfile.mkdtemp(prefix="lzs-demo-", dir="/tmp"))
    registry = lazysnap = containerd = None
    try:
        registry = step("starting a registry on loopback", lambda: Registry().start())
        layout = OCILayout(scratch / "layout")
        data = File("data/model.bin", os.urandom(DATA_MIB << 20))  # never read by the demo's container
        layers = [build_estargz(entries, chunk_size=1 << 20).layer() for entries in [*sample_layers(), [data]]]
        image = layout.add_image("latest", layers, cmd=["/hello.sh"])
        ref = step(f"pushing a {len(image.layers)}-layer eStargz sample image",
                   lambda: push(layout.root, "latest", registry, "demo/sample", image=image))
        lazysnap = step("starting lazysnap", lambda: Lazysnap(
            root=scratch / "root", address=scratch / "ls.sock", log_path=scratch / "lazysnap.log").start())
        containerd = step("starting containerd with [proxy_plugins.lazysnap]",
                          lambda: Containerd(snapshotter_address=lazysnap.address, workdir=scratch / "ctd").start())
        lazysnap_cli = [sys.executable, "-m", "snapshotter"]
        pulled = step(f"lazysnap rpull {ref}", lambda: subprocess.run(
            [*lazysnap_cli, "rpull", "--plain-http", "--containerd", str(containerd.address),
             "--address", str(lazysnap.address), ref], capture_output=True, text=True, check=True, timeout=300))
        print(pulled.stdout.rstrip())
        out = step("running a container on lazily served layers", lambda: containerd.run_container(
            ref, "lazysnap-demo", "/hello.sh", snapshotter="lazysnap"))
        print(f"    container printed: {out.stdout.strip()!r}")
        if out.stdout.strip() != HELLO_OUTPUT:
            print(f"unexpected container output (wanted {HELLO_OUTPUT!r})", file=sys.stderr)
            return 1
        print("\n--- lazysnap status ---")
        print(subprocess.run([*lazysnap_cli, "status", "--address", str(lazysnap.address)],
                             capture_output=True, text=True, timeout=60).stdout.rstrip())
        served = sum(r.bytes for r in registry.requests(settle=0.3) if r.blob is not None)
        total = sum(len(layer.blob) for layer in layers)
        print(f"\nregistry served {served} of {total} layer bytes ({served / total:.0%}); "
              "the rest stays in the registry until something reads it")
        return 0
    finally:
        if containerd is not None:
            containerd.stop()
        if lazysnap is not None:
            lazysnap.close()
        if registry is not None:
            registry.close()
        unmount_below(scratch)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
