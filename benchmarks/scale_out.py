"""Scale-out on one node: N containers of one image started at once, against one.

    python -m benchmarks.scale_out [--image python-app] [--modes overlayfs,estargz,soci]
                                   [--containers 20] [--runs 3] [--rate 100mbit --rtt 20ms | --loopback]

Issue 15's row "20 containers of one image started at once: every chunk fetched once; all
started within 1.5x of one start". Per run × mode, two cold nodes (as in `benchmarks.run`):

- one:  pull, then create + start one container until its workload exits;
- many: pull, then create N containers at once and start them at once (threads, as the
  kubelet's workers do); the time until the last one's workload has exited.

Registry bytes are counted over pull + start on each node: when every chunk is fetched once,
`many` fetches what `one` fetches. The workload is CPU work too (python-app imports numpy and
pandas), and 20 of them share 2 cores, so `many / one` of overlayfs, whose image is local
after its pull, is the floor any snapshotter can reach on this machine; lazysnap's own cost
of scale-out is its ratio beside that one.

Writes `<out>/<stamp>-scale-out-<link>.json` and `.md` (default out: benchmarks/results).
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import signal
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import images as bench_images
from .netem import ShapedLink, parse_time
from .node import NAMESPACE, Node, drop_caches, read_files, warm_tools
from .run import MODES, RESULTS, Mode, blob_paths, lazysnap_version, machine, write_certs, write_results


def _start_many(node: Node, ref: str, cmd: list[str], n: int) -> list[str]:
    """Create n containers at once, then start them all at once; their outputs once all have exited."""
    assert node.containerd is not None
    containerd = node.containerd
    cids = [f"scale-{i}" for i in range(n)]
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda cid: node.ctr("containers", "create", "--snapshotter", node.snapshotter, ref, cid, *cmd),
                      cids))
        outs = list(pool.map(lambda cid: containerd.ctr("tasks", "start", "--fifo-dir", str(containerd.fifo_dir), cid,
                                                        namespace=NAMESPACE, timeout=900).stdout, cids))
        list(pool.map(node.remove, cids))
    return outs


def one_node(link: ShapedLink, certs: Path, image: str, mode: Mode, catalog: dict, workdir: Path, n: int) -> dict:
    entry = catalog[image]
    info = entry["variants"][mode.variant]
    ref = f"{link.host}/bench/{image}:{info['tag']}"
    node = Node(workdir, lazy=mode.lazy, certs_dir=certs if mode.lazy else None, config=mode.config)
    try:
        node.start()
        drop_caches()
        read_files(blob_paths(info))
        warm_tools()
        assert link.registry is not None
        mark = link.registry.mark()
        t0 = time.monotonic()
        node.pull(ref)
        t1 = time.monotonic()
        if n == 1:
            create_s, run_s, out = node.timed_start(ref, entry["cmd"])
            outs = [out]
        else:
            outs = _start_many(node, ref, entry["cmd"], n)
        t2 = time.monotonic()
        bad = [o for o in outs if entry["expect"] not in o]
        if bad:
            raise RuntimeError(f"{image}/{mode.name}: {len(bad)} of {n} workloads printed the wrong thing: {bad[0]!r}")
        reqs = link.registry.requests(settle=0.3)[mark:]
        return {"pull_s": t1 - t0, "start_s": t2 - t1, "total_s": t2 - t0,
                "registry_blob_bytes": sum(r.bytes for r in reqs if r.method == "GET" and r.blob is not None),
                "registry_requests": len(reqs)}
    finally:
        node.close()


def _median(values: list[float]) -> float:
    return statistics.median(values)


def markdown(report: dict) -> str:
    n = report["containers"]
    lines = [f"{report['image']}, {report['link']}, {report['runs']} run(s) at {report['lazysnap_commit']}: "
             f"median (min-max) seconds from the end of the pull until the last workload exits",
             "",
             f"| mode | pull | one: start | {n} at once: start | {n} / one | one: blob MiB | "
             f"{n} at once: blob MiB | bytes {n} / one |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rows in report["modes"].items():
        one, many = rows["one"], rows["many"]

        def cell(rs: list[dict], key: str, scale: float = 1.0) -> str:
            vals = [r[key] / scale for r in rs]
            return f"{_median(vals):.2f} ({min(vals):.2f}-{max(vals):.2f})"
        ratio = _median([r["start_s"] for r in many]) / _median([r["start_s"] for r in one])
        bytes_ratio = (_median([r["registry_blob_bytes"] for r in many])
                       / max(1, _median([r["registry_blob_bytes"] for r in one])))
        lines.append(f"| {name} | {cell(many, 'pull_s')} | {cell(one, 'start_s')} | {cell(many, 'start_s')} | "
                     f"{ratio:.2f}x | {cell(one, 'registry_blob_bytes', 2**20)} | "
                     f"{cell(many, 'registry_blob_bytes', 2**20)} | {bytes_ratio:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="N containers of one image at once against one, per snapshotter.")
    p.add_argument("--image", default="python-app", choices=list(bench_images.IMAGES))
    p.add_argument("--modes", default="overlayfs,estargz,soci")
    p.add_argument("--containers", type=int, default=20)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rate", default="100mbit")
    p.add_argument("--rtt", default="20ms")
    p.add_argument("--loopback", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    modes = [MODES[m] for m in args.modes.split(",")]
    if any(m.profile for m in modes):
        p.error("profile modes need a teaching run first: use benchmarks.run for those")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    catalog = bench_images.ensure([args.image], sorted({m.variant for m in modes} - {"gzip"}))
    tmp = Path(tempfile.mkdtemp(prefix="lzsb-scale-", dir="/var/tmp"))
    link = ShapedLink(storage=bench_images.STORAGE, workdir=tmp / "link", rate=args.rate,
                      rtt=parse_time(args.rtt), loopback=args.loopback)
    results: dict[str, dict[str, list[dict]]] = {m.name: {"one": [], "many": []} for m in modes}
    started = time.monotonic()
    try:
        with link:
            certs = write_certs(tmp / "certs.d", link.host)
            print(f"link: {link.describe()}; registry at {link.host}", flush=True)
            for i in range(args.runs):
                for mode in modes:
                    for kind, n in (("one", 1), ("many", args.containers)):
                        r = one_node(link, certs, args.image, mode, catalog, tmp / f"n{i}-{mode.name}-{kind}", n)
                        results[mode.name][kind].append(r)
                        print(f"[{time.monotonic() - started:6.0f}s] run {i} {mode.name:9} {n:3} at once: "
                              f"pull {r['pull_s']:6.2f}  start {r['start_s']:6.2f}  "
                              f"blob {r['registry_blob_bytes'] / 2**20:7.1f} MiB", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {"image": args.image, "containers": args.containers, "runs": args.runs,
              "link": "loopback" if args.loopback else f"{args.rate} + {args.rtt} RTT",
              "lazysnap_commit": lazysnap_version(), "machine": machine(),
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "command": " ".join(["python -m benchmarks.scale_out", *(argv if argv is not None else sys.argv[1:])]),
              "modes": results}
    md = markdown(report)
    base = write_results(args.out, f"scale-out-{'loopback' if args.loopback else f'{args.rate}-{args.rtt}'}", report, md)
    print()
    print(md)
    print(f"wrote {base}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
