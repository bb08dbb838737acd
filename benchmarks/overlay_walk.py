"""Walk the 30,000-file layer where lazysnap serves it and through a container's overlay
mount on top of it: where the many-files start time goes, and which FUSE requests each
walk costs.

    python -m benchmarks.overlay_walk [--runs 3]

Pulls `bench/many-files:estargz` lazily from a loopback registry, creates a container, and
mounts its snapshot as containerd would (`ctr snapshots mounts`). Then, for `find | wc -l`
and `du -s`, in three places:

- `layer dir`: where lazysnap serves the layer: its EROFS mount (the default), or its
  directory under the FUSE mount with `kernel_metadata = false`;
- `overlay, cold`: through a new overlay mount, page cache and dentries dropped first
  (a container's first start on this node);
- `overlay, new`: through a new overlay mount while the FUSE side stays cached (every
  further container of the image: each one gets its own overlay mount).

Each line gives the median time of `--runs` runs, and the FUSE requests the first of them
sent to lazysnap (from `lazysnap status`).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from snapshotter.status import StatusClient
from tests.harness.tree import mount_snapshot

from . import images as bench_images
from .micro import find_in_layers
from .netem import ShapedLink
from .node import NAMESPACE, Node, drop_caches

COMMANDS = ("find {root} -type f | wc -l", "du -s {root}")


def fuse_ops(status: StatusClient) -> dict[str, int]:
    """Requests lazysnap's FUSE mount has answered so far, per operation."""
    return {op.name: op.count for op in status.layers().fuse.ops}


def timed(cmd: str) -> float:
    t = time.monotonic()
    subprocess.run(cmd, shell=True, capture_output=True, check=True, timeout=600)
    return time.monotonic() - t


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    bench_images.ensure(["many-files"], ["estargz"])
    tmp = Path(tempfile.mkdtemp(prefix="lzsb-ovl-", dir="/var/tmp"))
    node = None
    try:
        with ShapedLink(storage=bench_images.STORAGE, workdir=tmp / "link", loopback=True) as link:
            node = Node(tmp / "n", lazy=True).start()
            ref = f"{link.host}/bench/many-files:estargz"
            node.pull(ref)
            cid = node.create(ref, ["/bench.sh"])
            assert node.lazysnap is not None and node.containerd is not None
            containerd = node.containerd
            status = StatusClient(node.lazysnap.address)
            layer = find_in_layers(node.lazysnap.root, "app/node_modules")

            @contextlib.contextmanager
            def new_overlay() -> Iterator[Path]:
                with mount_snapshot(containerd, "lazysnap", cid, tmp / "mnt", namespace=NAMESPACE) as mnt:
                    yield mnt / "app/node_modules"

            @contextlib.contextmanager
            def layer_dir() -> Iterator[Path]:
                yield layer

            places = (("layer dir, cold", layer_dir, True), ("layer dir, warm", layer_dir, False),
                      ("overlay, cold", new_overlay, True), ("overlay, new", new_overlay, False))
            for template in COMMANDS:
                for where, place, cold in places:
                    times, ops = [], {}
                    for run in range(args.runs):
                        with place() as root:
                            if cold:
                                drop_caches()
                            before = fuse_ops(status)
                            times.append(timed(template.format(root=root)))
                            if run == 0:
                                after = fuse_ops(status)
                                ops = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
                    shown = " ".join(f"{k}={v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1]))
                    print(f"{template.split()[0]:5} {where:15} {statistics.median(times):6.2f} s "
                          f"[{min(times):.2f}-{max(times):.2f}]  {shown}", flush=True)
            status.close()
            node.remove(cid)
    finally:
        if node is not None:
            node.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
