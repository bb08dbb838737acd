"""`make demo`: lazysnap end to end on this machine, in a scratch directory.

Starts a local registry, lazysnap and a containerd wired to it, pushes a small sample
image, pulls it with `--snapshotter lazysnap`, runs a container from it, prints what
happened and how long each step took, and stops everything again. It uses the same
harness as the integration tests, so what it shows is what they check.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tests.harness.containerd import Containerd
from tests.harness.images import OCILayout, push, sample_image
from tests.harness.lazysnap import Lazysnap
from tests.harness.procs import unmount_below
from tests.harness.registry import Registry

T = TypeVar("T")


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
        image = sample_image(layout, tag="latest")
        ref = step(f"pushing a {len(image.layers)}-layer sample image",
                   lambda: push(layout.root, "latest", registry, "demo/sample", image=image))
        lazysnap = step("starting lazysnap", lambda: Lazysnap(
            root=scratch / "root", address=scratch / "ls.sock", log_path=scratch / "lazysnap.log").start())
        containerd = step("starting containerd with [proxy_plugins.lazysnap]",
                          lambda: Containerd(snapshotter_address=lazysnap.address, workdir=scratch / "ctd").start())
        step(f"pulling {ref} with --snapshotter lazysnap",
             lambda: containerd.pull(ref, snapshotter="lazysnap"))
        out = step("running a container on lazysnap snapshots", lambda: containerd.run_container(
            ref, "lazysnap-demo", "/hello.sh", snapshotter="lazysnap"))
        print("\n--- container output ---")
        print(out.stdout.rstrip())
        print("\n--- ctr snapshots --snapshotter lazysnap ls ---")
        print(containerd.ctr("snapshots", "--snapshotter", "lazysnap", "ls").stdout.rstrip())
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
