"""The first read of a 1 GiB file whose bytes are all in lazysnap's chunk cache (issue 15, "cached reads").

    python -m benchmarks.cached_read [--runs 3] [--out DIR]

Setup: the benchmark registry on loopback and `bench/big-file:estargz` (busybox + one
1 GiB incompressible file in 4 MiB eStargz chunks). A first node (containerd + lazysnap)
pulls it lazily and reads the file once with `dd`: every chunk is fetched and stored in
lazysnap's chunk cache. That cache is then kept (hard links) and the node thrown away.

Each run is a fresh node whose lazysnap root starts with that cache (so a fresh data
plane, which has verified no chunk yet: what a node sees after background fetch filled
the cache, or after a reboot). It pulls the image (metadata only), finds the file in the
layer's mount (`<root>/mnt/<id>/data/big.bin`, EROFS by default), drops the page cache
(`echo 3 > /proc/sys/vm/drop_caches`: neither the file's pages nor the cache files'
are resident) and times `dd if=big.bin of=/dev/null bs=1M`:

- `first`: this data plane's first read of each chunk (reads it from disk, checks its sha256);
- `native`: first, the same bytes from a plain file on the same disk (copied there from the
  first node), page cache dropped: what the disk gives a reader that is not lazysnap's;
- `again`: page cache dropped once more, the same data plane reads it again (chunks it
  has verified before: no sha256).

Also recorded per read: the FUSE read requests the data plane served and their mean size
(`lazysnap status`), and the CPU seconds of the data plane process. The registry must see
no GET of the layer during the timed reads (everything is a cache hit), and the bytes
read are checked (sha256, after the clock stops) against the first node's.
Writes `<out>/<stamp>-cached-read.json`.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import images as bench_images
from .micro import find_in_layers
from .netem import ShapedLink
from .node import Node, drop_caches, warm_tools
from .run import RESULTS, machine, summarize, write_results

IMAGE = "big-file"
FILE = "data/big.bin"


def dd(path: Path) -> float:
    """Seconds for `dd bs=1M` of the whole file."""
    t = time.monotonic()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], check=True, capture_output=True, timeout=1800)
    return time.monotonic() - t


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def fuse_reads(node: Node) -> tuple[int, int, float]:
    """(read requests, bytes, handler seconds) the data planes served so far."""
    out = subprocess.run([sys.executable, "-m", "snapshotter", "status", "--json", "--address",
                          str(node.lazysnap.address)], capture_output=True, text=True, timeout=60, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    fuse = json.loads(out).get("fuse") or {}
    ops = {op["name"]: op for op in fuse.get("ops", [])}
    read = ops.get("read", {})
    return int(read.get("count", 0)), int(fuse.get("read_bytes", 0)), float(read.get("seconds", 0.0))


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def timed_read(node: Node, path: Path) -> dict:
    assert node.lazysnap is not None
    pids = node.lazysnap.dataplane_pids()
    n0, b0, s0 = fuse_reads(node)
    drop_caches()
    warm_tools()
    c0 = cpu_seconds(pids)
    seconds = dd(path)
    c1 = cpu_seconds(pids)
    n1, b1, s1 = fuse_reads(node)
    size = path.stat().st_size
    requests = n1 - n0
    return {"seconds": seconds, "mb_s": size / 1e6 / seconds, "mib_s": size / 2**20 / seconds,
            "fuse_reads": requests, "mean_request_kib": (b1 - b0) / 1024 / requests if requests else 0.0,
            "handler_ms_per_request": (s1 - s0) * 1000 / requests if requests else 0.0,
            "dataplane_cpu_s": c1 - c0}


def new_node(workdir: Path, cache: Path | None) -> Node:
    if cache is not None:
        (workdir / "ls").mkdir(parents=True)
        subprocess.run(["cp", "-al", str(cache), str(workdir / "ls" / "cache")], check=True)
    return Node(workdir, lazy=True).start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="First read of a cached 1 GiB file through lazysnap.")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    bench_images.ensure([IMAGE], ["estargz"])
    tmp = Path(tempfile.mkdtemp(prefix="lzsb-cached-", dir="/var/tmp"))
    link = ShapedLink(storage=bench_images.STORAGE, workdir=tmp / "link", loopback=True)
    report: dict = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "machine": machine(), "command": "python -m benchmarks.cached_read " + " ".join(argv or sys.argv[1:]),
                    "runs": []}
    try:
        with link:
            ref = f"{link.host}/bench/{IMAGE}:estargz"
            node = new_node(tmp / "fill", None)
            try:
                node.pull(ref)
                assert node.lazysnap is not None
                path = find_in_layers(node.lazysnap.root, FILE)
                t = dd(path)
                expect = sha256_of(path)
                print(f"filled the cache through the registry: {path.stat().st_size / 1e6 / t:.0f} MB/s", flush=True)
                native = tmp / "native.bin"
                shutil.copyfile(path, native)
                node.lazysnap.stop()  # the writer of the cache, before its files are linked
                cache = tmp / "cache"
                subprocess.run(["cp", "-al", str(node.lazysnap.root / "cache"), str(cache)], check=True)
            finally:
                node.close()
            for i in range(args.runs):
                node = new_node(tmp / f"run{i}", cache)
                try:
                    node.pull(ref)
                    assert node.lazysnap is not None
                    path = find_in_layers(node.lazysnap.root, FILE)
                    mark = link.registry.mark() if link.registry is not None else 0
                    drop_caches()
                    seconds = dd(native)
                    run: dict = {"native": {"seconds": seconds, "mb_s": native.stat().st_size / 1e6 / seconds}}
                    run["first"] = timed_read(node, path)
                    if sha256_of(path) != expect:
                        raise RuntimeError("the bytes read differ from the first node's")
                    run["again"] = timed_read(node, path)
                    if link.registry is not None:
                        gets = [r for r in link.registry.requests_since(mark) if r.blob is not None and r.method == "GET"]
                        run["registry_blob_gets"] = len(gets)
                    report["runs"].append(run)
                    print(f"run {i + 1}: " + json.dumps(run), flush=True)
                finally:
                    node.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for phase in ("native", "first", "again"):
        keys = ("mb_s",) if phase == "native" else ("mb_s", "mean_request_kib", "handler_ms_per_request",
                                                    "dataplane_cpu_s")
        report[phase] = {key: summarize([r[phase][key] for r in report["runs"]]) for key in keys}
        s = report[phase]["mb_s"]
        print(f"{phase}: {s['median']:.0f} MB/s median [{s['min']:.0f}-{s['max']:.0f}] of {s['n']}", flush=True)
    print(f"wrote {write_results(args.out, 'cached-read', report)}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
