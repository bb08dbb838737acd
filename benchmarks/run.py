"""Cold container starts: overlayfs (containerd's own pull) against lazysnap, on a shaped link.

    python -m benchmarks.run [--images python-app,big-file,many-files] [--modes overlayfs,estargz[,soci]]
                             [--runs 3] [--rate 100mbit --rtt 20ms | --loopback] [--out DIR]

For each run × image × mode, on a cold node (fresh containerd root, fresh lazysnap root,
page cache dropped; the registry's blobs are then read back into its page cache and the
tools' own code too, so only the image is cold):

- pull:   `ctr images pull --plain-http --snapshotter overlayfs` | `lazysnap rpull --plain-http`
- create: `ctr containers create`
- run:    `ctr tasks start` until the workload exits (its output is checked)
- total = pull + create + run; warm = create + run of a second container right after
- registry bytes: body bytes of the registry's access log over pull+create+run
- workload bytes: the page cache the workload fills (fincore over the unpacked overlayfs
  snapshot after dropping caches and running it once more; readahead included)
- lazysnap peak RSS: VmHWM of the daemon at the end

Writes `<out>/<stamp>-<link>.json` and `.md` (default out: benchmarks/results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.harness.procs import run

from . import images as bench_images
from .netem import ShapedLink, parse_time
from .node import Node, cpu_busy, drop_caches, page_cache_bytes, read_files, warm_tools

RESULTS = Path(__file__).resolve().parent / "results"
TEACH_SECONDS = 40.0
"""The teaching run's recording window: longer than any workload's cold start here."""


@dataclass(frozen=True)
class Mode:
    name: str
    variant: str          # which image tag (benchmarks/images.py VARIANTS)
    lazy: bool            # pulled with lazysnap rpull and run on the lazysnap snapshotter
    profile: bool = False
    """The image's start profile is in the registry: recorded by a teaching run on another
    node and pushed with `lazysnap profile push` before the cold runs."""
    taught: str = ""
    """The variant the teaching run records and pushes, when not `variant` itself: a rebuild
    (`estargz-v2`) is started with only its previous build's profile in the registry."""

    @property
    def teach_variant(self) -> str:
        return self.taught or self.variant

    @property
    def config(self) -> list[str]:
        """lazysnap settings: background fetch off (the bytes target counts only what the start
        needs); without `profile`, no prefetch either, as on an image's first start anywhere."""
        return ["background_fetch = false"] + ([] if self.profile else ["prefetch = false"])


MODES = {m.name: m for m in (
    Mode("overlayfs", "gzip", lazy=False),
    Mode("estargz", "estargz", lazy=True),
    Mode("soci", "soci", lazy=True),       # SOCI v2 image from `lazysnap index convert` (benchmarks/images.py)
    Mode("whole", "gzip", lazy=True),      # the plain image, no index: every layer pulled whole by lazysnap
    Mode("estargz+profile", "estargz", lazy=True, profile=True),
    Mode("soci+profile", "soci", lazy=True, profile=True),
    Mode("soci-1m", "soci-1m", lazy=True),    # the same SOCI index with 1 MiB spans (span-size experiment)
    Mode("soci-512k", "soci-512k", lazy=True),
    # python-app's next build (a new top layer only; benchmarks/images.py REBUILDS), cold on a node
    # that never saw it, with only the previous build's profile in the registry: it borrows
    # that profile's ranges of the layers the two builds share
    Mode("estargz+rebuilt-profile", "estargz-v2", lazy=True, profile=True, taught="estargz"),
)}


def blob_paths(info: dict) -> list[Path]:
    base = bench_images.STORAGE / "docker/registry/v2/blobs/sha256"
    return [base / layer["digest"][7:9] / layer["digest"][7:] / "data" for layer in info["layers"]]


def write_certs(certs: Path, host: str) -> Path:
    """containerd-style hosts.toml so lazysnap reaches the namespace's registry by plain HTTP."""
    d = certs / host
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts.toml").write_text(f'server = "http://{host}"\n\n[host."http://{host}"]\n'
                                  '  capabilities = ["pull", "resolve"]\n')
    return certs


def one_run(link: ShapedLink, certs: Path, image: str, mode: Mode, catalog: dict, workdir: Path, extra: list[str],
            measure_workload: bool, keep_log: Path | None = None) -> dict:
    entry = catalog[image]
    info = entry["variants"][mode.variant]
    ref = f"{link.host}/bench/{image}:{info['tag']}"
    node = Node(workdir, lazy=mode.lazy, certs_dir=certs if mode.lazy else None, config=mode.config + extra,
                keep_log=keep_log)
    result: dict = {"image": image, "mode": mode.name, "ref": ref}
    try:
        node.start()
        drop_caches()
        read_files(blob_paths(info))
        warm_tools()
        registry = link.registry
        assert registry is not None
        mark = registry.mark()
        proxy0 = link.proxy_stats()
        busy0 = cpu_busy()
        t0 = time.monotonic()
        pull_out = node.pull(ref)
        t1 = time.monotonic()
        create_s, run_s, out = node.timed_start(ref, entry["cmd"])
        t2 = time.monotonic()
        busy1 = cpu_busy()
        reqs = registry.requests(settle=0.3)[mark:]
        if entry["expect"] not in out:
            raise RuntimeError(f"{image}/{mode.name}: workload output {out!r} lacks {entry['expect']!r}")
        proxy1 = link.proxy_stats()
        warm_create, warm_run, _ = node.timed_start(ref, entry["cmd"])
        warm_reqs = registry.requests(settle=0.3)[mark + len(reqs):]
        result.update(
            pull_s=t1 - t0, create_s=create_s, run_s=run_s, total_s=t2 - t0,
            warm_s=warm_create + warm_run, warm_create_s=warm_create, warm_run_s=warm_run,
            registry_bytes=sum(r.bytes for r in reqs if r.method == "GET"),
            registry_blob_bytes=sum(r.bytes for r in reqs if r.method == "GET" and r.blob is not None),
            registry_requests=len(reqs),
            registry_range_gets=sum(1 for r in reqs if r.method == "GET" and r.status == 206),
            warm_registry_bytes=sum(r.bytes for r in warm_reqs if r.method == "GET"),
            proxy_bytes_down=(proxy1.get("bytes_down", 0) - proxy0.get("bytes_down", 0)) if proxy1 else None,
            proxy_cpu_s=(proxy1.get("cpu_seconds", 0) - proxy0.get("cpu_seconds", 0)) if proxy1 else None,
            machine_cpu_busy=(busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]),
            lazysnap_peak_rss=node.lazysnap_peak_rss(),
            output=out.strip()[-300:],
            pull_output=pull_out.strip()[-2000:],
        )
        if mode.lazy:
            result["lazysnap_status"] = node.lazysnap_status()
        if measure_workload and not mode.lazy:
            drop_caches()
            warm_tools()
            node.timed_start(ref, entry["cmd"])
            result["workload_read_bytes"] = page_cache_bytes(node.overlay_snapshot_files())
        return result
    finally:
        node.close()


def teach(link: ShapedLink, certs: Path, image: str, mode: Mode, catalog: dict, workdir: Path) -> float:
    """Record the image's start profile on a node of its own and push it; seconds taken."""
    entry = catalog[image]
    ref = f"{link.host}/bench/{image}:{entry['variants'][mode.teach_variant]['tag']}"
    node = Node(workdir, lazy=True, certs_dir=certs, config=["background_fetch = false", "prefetch = false",
                                                             f"profile_seconds = {TEACH_SECONDS}"])
    started = time.monotonic()
    try:
        node.start()
        node.pull(ref)
        node.timed_start(ref, entry["cmd"])
        assert node.lazysnap is not None
        run([sys.executable, "-m", "snapshotter", "profile", "push", ref, "--root", str(node.lazysnap.root),
             "--plain-http", "--certs-dir", str(certs), "--wait", str(TEACH_SECONDS + 60)], timeout=300)
        return time.monotonic() - started
    finally:
        node.close()


def summarize(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def write_results(out: Path, name: str, report: dict, md: str | None = None) -> Path:
    """Write `report` as `<out>/<stamp>-<name>.json` (and `md` beside it as `.md`); the path without suffix."""
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}-{name}"
    base.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    if md is not None:
        base.with_suffix(".md").write_text(md)
    return base


def machine() -> dict:
    def first(cmd: list[str]) -> str:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip().splitlines()[0]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    return {"kernel": platform.release(), "cpu": cpu, "cores": len(__import__("os").sched_getaffinity(0)),
            "mem_mib": mem, "python": platform.python_version(), "containerd": first(["containerd", "--version"]),
            "debian": Path("/etc/debian_version").read_text().strip(), "lazysnap": lazysnap_version()}


def lazysnap_version() -> str:
    """The commit lazysnap ran from, and whether snapshotter/ had uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root, check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "snapshotter"], capture_output=True, text=True,
                           cwd=root, check=False).stdout.strip()
    return f"{head}{' + uncommitted changes in snapshotter/' if dirty else ''}"


def fmt(s: dict | None, unit: float = 1.0, digits: int = 2) -> str:
    if s is None:
        return "–"
    med, lo, hi = s["median"] / unit, s["min"] / unit, s["max"] / unit
    if s["n"] == 1 or abs(hi - lo) < 10 ** -digits:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} [{lo:.{digits}f}–{hi:.{digits}f}]"


def markdown(report: dict) -> str:
    lines = [f"### {report['link']} — {report['runs']} cold runs each, median [min–max]", "",
             ("| image | mode | pull s | create s | run s | **total s** | speed-up | warm start s | registry MiB "
             "| range GETs | workload read MiB | fetched ÷ read | lazysnap peak RSS MiB |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    MiB = 2 ** 20
    for image, modes in report["summary"].items():
        base = modes.get("overlayfs")
        read = base.get("workload_read_bytes") if base else None
        for mode, s in modes.items():
            speed = (f"{base['total_s']['median'] / s['total_s']['median']:.1f}×"
                     if base and s is not base else "1×" if s is base else "–")
            ratio = (f"{s['registry_bytes']['median'] / read['median']:.2f}" if read and s.get("registry_bytes")
                     else "–")
            lines.append(" | ".join([
                f"| {image}", mode, fmt(s["pull_s"]), fmt(s["create_s"]), fmt(s["run_s"]),
                f"**{fmt(s['total_s'])}**", speed, fmt(s["warm_s"]), fmt(s["registry_bytes"], MiB, 1),
                fmt(s["registry_range_gets"], 1, 0), fmt(read, MiB, 1) if read else "–", ratio,
                fmt(s["lazysnap_peak_rss"], MiB, 0)]) + " |")
    return "\n".join(lines) + "\n"


TARGETS = {"python-app": 5.0, "big-file": 20.0, "many-files": 8.0}
MODE_TARGETS = {"whole": 1.5}
"""Layers pulled whole cannot skip bytes: the target is issue 13's, whatever the image."""


def targets(report: dict) -> str:
    out = ["| image | mode | total speed-up (target) | fetched ÷ read (≤ 1.5) | warm ÷ overlayfs warm (≤ 1.2) |",
           "|---|---|---|---|---|"]
    for image, modes in report["summary"].items():
        base = modes.get("overlayfs")
        if not base:
            continue
        read = base.get("workload_read_bytes")
        for mode, s in modes.items():
            if mode == "overlayfs":
                continue
            sp = base["total_s"]["median"] / s["total_s"]["median"]
            want = MODE_TARGETS.get(mode) or TARGETS.get(image, 1.0)
            fr = s["registry_bytes"]["median"] / read["median"] if read else None
            wr = s["warm_s"]["median"] / base["warm_s"]["median"]
            out.append(f"| {image} | {mode} | {sp:.1f}× ({'met' if sp >= want else 'MISSED'}, ≥{want:g}×) | "
                       + (f"{fr:.2f} ({'met' if fr <= 1.5 else 'MISSED'})" if fr is not None else "–")
                       + f" | {wr:.2f} ({'met' if wr <= 1.2 else 'MISSED'}) |")
    return "\n".join(out) + "\n"


KEYS = ("pull_s", "create_s", "run_s", "total_s", "warm_s", "registry_bytes", "registry_blob_bytes",
        "registry_requests", "registry_range_gets", "warm_registry_bytes", "proxy_bytes_down", "proxy_cpu_s",
        "machine_cpu_busy", "lazysnap_peak_rss", "workload_read_bytes")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Cold-start benchmark: overlayfs vs lazysnap on a shaped link.")
    p.add_argument("--images", default=",".join(bench_images.IMAGES))
    p.add_argument("--modes", default="overlayfs,estargz")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rate", default="100mbit", help="tc rate of the link, each direction (default 100mbit)")
    p.add_argument("--rtt", default="20ms", help="round-trip time added by the delay proxy (default 20ms)")
    p.add_argument("--loopback", action="store_true", help="registry on 127.0.0.1, no shaping")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--lazysnap-config", action="append", default=[], metavar="LINE",
                   help='an extra line for every lazysnap node\'s config, e.g. "fuse_xattrs = false"')
    p.add_argument("--keep-logs", type=Path, metavar="DIR",
                   help="copy each lazysnap node's log to DIR/<image>-<mode>-<run>.log")
    args = p.parse_args(argv)
    names = args.images.split(",")
    modes = [MODES[m] for m in args.modes.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    catalog = bench_images.ensure(names, sorted({m.variant for m in modes} - {"gzip"}))

    def runs_on(image: str, mode: Mode) -> bool:
        """A rebuild mode runs only for the images that have a next build."""
        return mode.variant in catalog[image]["variants"]
    tmp = Path(tempfile.mkdtemp(prefix="lzsb-", dir="/var/tmp"))
    link = ShapedLink(storage=bench_images.STORAGE, workdir=tmp / "link", rate=args.rate,
                      rtt=parse_time(args.rtt), loopback=args.loopback)
    runs: list[dict] = []
    started = time.monotonic()
    try:
        with link:
            certs = write_certs(tmp / "certs.d", link.host)
            print(f"link: {link.describe()}; registry at {link.host}", flush=True)
            for image in names:
                for variant in dict.fromkeys(m.teach_variant for m in modes if m.profile and runs_on(image, m)):
                    mode = next(m for m in modes if m.profile and m.teach_variant == variant)
                    seconds = teach(link, certs, image, mode, catalog, tmp / f"teach-{image}-{variant}")
                    print(f"[{time.monotonic() - started:6.0f}s] taught {image} {variant}: start profile "
                          f"recorded and pushed in {seconds:.1f} s", flush=True)
            for i in range(args.runs):
                for image in names:
                    for mode in (m for m in modes if runs_on(image, m)):
                        r = one_run(link, certs, image, mode, catalog, tmp / f"n{len(runs)}", args.lazysnap_config,
                                    measure_workload=(i == args.runs - 1),
                                    keep_log=args.keep_logs / f"{image}-{mode.name}-{i}.log" if args.keep_logs else None)
                        r["run"] = i
                        runs.append(r)
                        print(f"[{time.monotonic() - started:6.0f}s] run {i} {image:10} {mode.name:9} "
                              f"pull {r['pull_s']:6.2f}  create {r['create_s']:5.2f}  run {r['run_s']:6.2f}  "
                              f"total {r['total_s']:6.2f}  warm {r['warm_s']:5.2f}  "
                              f"registry {r['registry_bytes'] / 2**20:7.1f} MiB", flush=True)
            proxy_total = link.proxy_stats()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    summary: dict = {}
    for image in names:
        for mode in (m for m in modes if runs_on(image, m)):
            rs = [r for r in runs if r["image"] == image and r["mode"] == mode.name]
            summary.setdefault(image, {})[mode.name] = {k: summarize([r.get(k) for r in rs]) for k in KEYS}
    link_name = "loopback" if args.loopback else f"{args.rate}-{args.rtt}"
    proxy_cost = None
    if proxy_total and (proxy_total["bytes_down"] + proxy_total["bytes_up"]):
        proxy_cost = proxy_total["cpu_seconds"] / ((proxy_total["bytes_down"] + proxy_total["bytes_up"]) / 1e9)
    report = {
        "link": link.describe(), "lazysnap_config": args.lazysnap_config, "runs": args.runs, "images": names, "modes": [m.name for m in modes],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "machine": machine(),
        "command": " ".join(["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])]),
        "catalog": {n: {v: {"compressed_bytes": i["compressed_bytes"], "layers": len(i["layers"])}
                        for v, i in catalog[n]["variants"].items()} | {"uncompressed_bytes":
                                                                       catalog[n]["uncompressed_bytes"]}
                    for n in names},
        "proxy": {"totals": proxy_total, "cpu_seconds_per_gb": proxy_cost},
        "wall_seconds": time.monotonic() - started,
        "summary": summary, "runs_detail": runs,
    }
    md = markdown(report) + "\n" + targets(report)
    if proxy_cost is not None:
        md += (f"\ndelay proxy: {proxy_cost:.2f} CPU s per GB forwarded "
               f"({proxy_total['cpu_seconds']:.1f} s for {(proxy_total['bytes_down'] + proxy_total['bytes_up']) / 1e9:.2f} GB)\n")
    base = write_results(args.out, link_name, report, md)
    print()
    print(md)
    print(f"wrote {base}.json and .md ({report['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
