"""Walk the 30,000-file layer through lazysnap's FUSE layer dir and through a container's
overlay mount on top of it: where the many-files start time goes.

    python -m benchmarks.overlay_walk

Pulls `bench/many-files:estargz` lazily from a loopback registry, creates a container, and
mounts its snapshot as containerd would (`ctr snapshots mounts`). It times `find | wc -l` and
`du -s` once after dropping caches (cold) and twice more (warm) in each place. Each new
container gets a new overlay mount, so a container start always pays the cold column.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.harness.tree import mount_snapshot

from . import images as bench_images
from .micro import find_in_fuse
from .netem import ShapedLink
from .node import NAMESPACE, Node, drop_caches


def main() -> int:
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
            layer = find_in_fuse(node.lazysnap.root, "app/node_modules")
            with mount_snapshot(node.containerd, "lazysnap", cid, tmp / "mnt", namespace=NAMESPACE) as mnt:
                for where, root in (("FUSE layer dir", layer), ("overlay on FUSE", mnt / "app/node_modules")):
                    for cmd in (f"find {root} -type f | wc -l", f"du -s {root}"):
                        drop_caches()
                        times = []
                        for _ in range(3):
                            t = time.monotonic()
                            subprocess.run(cmd, shell=True, capture_output=True, check=True, timeout=600)
                            times.append(time.monotonic() - t)
                        print(f"{where:16} {cmd.split()[0]:5} cold {times[0]:.2f} s  warm {times[1]:.2f} s, "
                              f"{times[2]:.2f} s", flush=True)
            node.remove(cid)
    finally:
        if node is not None:
            node.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
