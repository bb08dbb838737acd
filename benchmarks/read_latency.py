"""Read latency of a running container while another image is pulled lazily (issue 12).

    python -m benchmarks.read_latency [--out DIR] [--rounds 3] [--pulls-per-round 2] [--passes 2]

The claim under test: once FUSE reads are served by a data plane process of their own,
they no longer share a GIL (and an event loop) with what `lazysnap serve` does during a
pull: TOC parsing, building the layer tree and its EROFS image, the registry client.

One node on loopback (the benchmark registry, a fresh containerd, a fresh `lazysnap serve`
with `background_fetch`, `prefetch` and `record_profiles` off, so that nothing but the
pulls runs in the daemon between phases):

1. `lazysnap rpull` of `bench/read-file:estargz` (busybox + one 256 MiB incompressible
   file) and a container from it (`busybox sleep`), started detached.
2. The file is read once, sequentially, through the container's root
   (`/proc/<container pid>/root/data/file.bin`): every chunk is fetched into lazysnap's
   cache (its sha256 is checked against the image's). It is then read a second time with
   the page cache of the file evicted, and the registry must see no GET of the layer: from
   here on every read is a cache hit in lazysnap.
3. Phases, alternating: `idle` (`--passes` passes over the read plan, nothing else running)
   and `pull` (the reader loops over the plan while `lazysnap rpull` pulls
   `--pulls-per-round` images one after another: each a distinct 30,000-file eStargz image,
   `bench/many-files-<n>:estargz`, so each pull parses a new TOC and builds a new EROFS
   image). `--rounds` rounds, then a last idle phase: idle, pull, idle, pull, ..., idle.
   Only reads that start and end inside an rpull's run count for `pull`; reads in the
   gaps around the pulls are dropped (their number is recorded).

The reader is a separate host process (Python, so that it shares nothing with the
orchestrator), reading through the container's root as the container itself would see
the file: overlayfs -> EROFS -> lazysnap's FUSE data device -> the daemon, which answers
from its chunk cache. Its plan: the file cut into 2,048 slots of 128 KiB; in each slot one
block of 4, 8, 16, 32, 64 or 128 KiB at a random 4 KiB-aligned offset inside the slot; the
slots in a random order (seeded: every run reads the same plan). Each read is one
`preadv` into a preallocated buffer, timed with CLOCK_MONOTONIC around the call alone;
the bytes are compared with the expected ones after the clock stops.

The page cache: EROFS keeps what it reads in the page cache of the file (lazysnap's data
device is direct-I/O, so FUSE caches nothing), and a read of a cached page never reaches
lazysnap. So the reader evicts the file's pages (`posix_fadvise(DONTNEED)`, which overlayfs
passes to the EROFS file) before each pass, and sets `POSIX_FADV_RANDOM`, which turns
readahead off: every read of a pass reaches lazysnap exactly once, for exactly its block.
`fincore` checks the eviction at the start of each phase. The daemon's own chunk cache
files stay in the page cache (they were just written, and the machine has room): the
figure is FUSE + the daemon's answer, not the disk, which is what the claim is about.
`echo 3 > drop_caches` would have added disk reads of the cache to every read, and
evicted the daemon's and the tools' code too.

Also recorded per phase: the machine's busy share and /proc/loadavg, the CPU seconds of
each lazysnap process (serve, and a data plane when there is one), and of every process
that is not ours (other test suites on the same cores). Writes
`<out>/<stamp>-read-latency.json` and `.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import hashlib
import json
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .run import write_results

RESULTS = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
READ_IMAGE = "read-file"
FILE_IN_IMAGE = "data/file.bin"
SLOT = 128 << 10
SIZES = tuple(k << 10 for k in (4, 8, 16, 32, 64, 128))
PLAN_SEED = 1
CONFIG = ["background_fetch = false", "prefetch = false", "record_profiles = false"]
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- the reader process

def plan(file_size: int) -> list[tuple[int, int]]:
    rng = random.Random(PLAN_SEED)
    blocks = []
    for slot in range(file_size // SLOT):
        size = rng.choice(SIZES)
        blocks.append((slot * SLOT + rng.randrange(0, (SLOT - size) // 4096 + 1) * 4096, size))
    rng.shuffle(blocks)
    return blocks


def reader(spec_path: Path) -> int:
    """Read the plan `passes` times (or until the stop file appears); write every read's timing."""
    spec = json.loads(spec_path.read_text())
    blocks = [tuple(b) for b in spec["blocks"]]
    expected = None
    if spec["verify"]:
        from .images import read_file_bytes
        expected = read_file_bytes()
    stop = Path(spec["stop"])
    fd = os.open(spec["path"], os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    buf = bytearray(max(SIZES))
    mv = memoryview(buf)
    views = {s: [mv[:s]] for s in SIZES}
    starts, durs, sizes, bad = [], [], [], 0
    clock = time.monotonic_ns
    gc.collect()
    gc.disable()
    Path(spec["ready"]).touch()
    passes, done = spec["passes"], 0
    while (done < passes) if passes else not stop.exists():
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        for i, (off, size) in enumerate(blocks):
            t0 = clock()
            n = os.preadv(fd, views[size], off)
            t1 = clock()
            starts.append(t0)
            durs.append(t1 - t0)
            sizes.append(size)
            if n != size or (expected is not None and buf[:size] != expected[off:off + size]):
                bad += 1
            if not passes and i % 32 == 31 and stop.exists():
                break
        done += 1
    os.close(fd)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    Path(spec["out"]).write_text(json.dumps({"start_ns": starts, "dur_ns": durs, "size": sizes, "bad": bad,
                                             "passes": done, "cpu_s": ru.ru_utime + ru.ru_stime}))
    return 0


# --------------------------------------------------------------------------- machine accounting

def _proc_cpu_and_ppid(pid: int) -> tuple[float, int, str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, int(fields[1]), comm


def processes() -> dict[int, tuple[float, int, str]]:
    """pid -> (CPU seconds so far, parent pid, comm) of every process."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (info := _proc_cpu_and_ppid(int(entry))) is not None:
            out[int(entry)] = info
    return out


def descendants(procs: dict[int, tuple[float, int, str]], root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo += children.get(pid, [])
    return out


def lazysnap_processes(node) -> dict[int, str]:
    """pid -> role of lazysnap's processes: serve, and whatever else runs with its root in its
    command line (a data plane)."""
    assert node.lazysnap is not None
    serve = node.lazysnap.proc.popen.pid if node.lazysnap.proc and node.lazysnap.proc.popen else None
    root = str(node.lazysnap.root).encode()
    out = {serve: "serve"} if serve else {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == serve:
            continue
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            if b"snapshotter" in cmd and root in cmd:
                out[int(entry)] = "dataplane" if b"dataplane" in cmd else cmd.replace(b"\0", b" ").decode()[:80]
    return out


class Accounting:
    """CPU of the machine, of lazysnap's processes and of everyone else's, between start and stop.

    "Everyone else" counts the processes alive at both ends only: a short-lived process of
    another test suite shows in `machine_cpu_busy` alone."""

    def __init__(self, node) -> None:
        from .node import cpu_busy
        self._cpu_busy = cpu_busy
        self.node = node
        self.load0 = Path("/proc/loadavg").read_text().split()[:3]
        self.busy0 = cpu_busy()
        self.procs0 = processes()
        self.t0 = time.monotonic()

    def stop(self) -> dict:
        busy1 = self._cpu_busy()
        procs1 = processes()
        seconds = time.monotonic() - self.t0
        ls = lazysnap_processes(self.node)
        ours = descendants(procs1, os.getpid()) | descendants(self.procs0, os.getpid()) | set(ls)
        for pid in ls:
            ours |= descendants(procs1, pid)
        others: dict[str, float] = {}
        for pid, (cpu, _, comm) in procs1.items():
            if pid in ours or pid not in self.procs0 or self.procs0[pid][2] != comm:
                continue
            d = cpu - self.procs0[pid][0]
            if d > 0:
                others[comm] = others.get(comm, 0.0) + d
        top = sorted(others.items(), key=lambda kv: -kv[1])[:4]
        return {
            "seconds": seconds,
            "machine_cpu_busy": (busy1[0] - self.busy0[0]) / max(1, busy1[1] - self.busy0[1]),
            "loadavg_before": self.load0, "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
            "lazysnap_cpu_s": {f"{role} ({pid})": round(procs1[pid][0] - self.procs0.get(pid, (0.0,))[0], 2)
                               for pid, role in ls.items() if pid in procs1},
            "others_cpu_s": round(sum(others.values()), 2),
            "others_top": {k: round(v, 2) for k, v in top},
        }


# --------------------------------------------------------------------------- statistics

def pct(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def summary(durs_ns: list[int]) -> dict:
    if not durs_ns:
        return {"count": 0}
    s = sorted(durs_ns)
    def us(v: float) -> float:
        return round(v / 1000, 1)
    return {"count": len(s), "mean_us": us(sum(s) / len(s)), "p50_us": us(pct(s, 0.50)), "p90_us": us(pct(s, 0.90)),
            "p99_us": us(pct(s, 0.99)), "p999_us": us(pct(s, 0.999)), "max_us": us(s[-1]),
            "over_10ms": sum(1 for v in s if v > 10_000_000), "over_100ms": sum(1 for v in s if v > 100_000_000)}


def histogram(durs_ns: list[int]) -> dict:
    """Reads per power-of-two bucket of microseconds: {"<=64": n, ...}."""
    out: dict[str, int] = {}
    for v in durs_ns:
        b = 1 << max(0, math.ceil(math.log2(max(1, v / 1000))))
        out[f"<={b}"] = out.get(f"<={b}", 0) + 1
    return dict(sorted(out.items(), key=lambda kv: int(kv[0][2:])))


# --------------------------------------------------------------------------- the benchmark

class Bench:
    def __init__(self, node, path: Path, blocks: list[tuple[int, int]], tmp: Path, verify: bool) -> None:
        self.node, self.path, self.blocks, self.tmp, self.verify = node, path, blocks, tmp, verify
        self.n = 0

    def resident(self) -> int:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", str(self.path)],
                             capture_output=True, text=True, timeout=60, check=False).stdout.split()
        return int(out[0]) if out and out[0].isdigit() else -1

    def evict(self) -> int:
        """Drop the file's pages (EROFS's page cache, through overlayfs); the bytes still resident."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return self.resident()

    def start_reader(self, passes: int) -> tuple[subprocess.Popen, dict]:
        self.n += 1
        d = self.tmp / f"reader-{self.n}"
        d.mkdir()
        spec = {"path": str(self.path), "blocks": self.blocks, "passes": passes, "verify": self.verify,
                "stop": str(d / "stop"), "ready": str(d / "ready"), "out": str(d / "out.json")}
        (d / "spec.json").write_text(json.dumps(spec))
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.read_latency", "--reader", str(d / "spec.json")],
                                cwd=REPO_ROOT)
        deadline = time.monotonic() + 60
        while not Path(spec["ready"]).exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"the reader did not start (exit {proc.returncode})")
            time.sleep(0.02)
        return proc, spec

    @staticmethod
    def finish_reader(proc: subprocess.Popen, spec: dict, timeout: float) -> dict:
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise RuntimeError("the reader did not finish") from None
        if rc != 0:
            raise RuntimeError(f"the reader failed (exit {rc})")
        out = json.loads(Path(spec["out"]).read_text())
        if out["bad"]:
            raise RuntimeError(f"{out['bad']} reads returned wrong bytes or short reads")
        return out

    def idle(self, passes: int) -> dict:
        resident = self.evict()
        acct = Accounting(self.node)
        proc, spec = self.start_reader(passes)
        out = self.finish_reader(proc, spec, timeout=600)
        reads = list(zip(out["start_ns"], out["dur_ns"], out["size"], strict=True))
        return {"kind": "idle", "resident_at_start": resident, "reader_passes": out["passes"],
                "reader_cpu_s": round(out["cpu_s"], 2), "machine": acct.stop(), "reads": reads}

    def pull(self, refs: list[str]) -> dict:
        resident = self.evict()
        acct = Accounting(self.node)
        proc, spec = self.start_reader(0)
        pulls = []
        try:
            time.sleep(0.3)
            for ref in refs:
                t0 = time.monotonic_ns()
                out = self.node.pull(ref)
                t1 = time.monotonic_ns()
                pulls.append({"ref": ref, "start_ns": t0, "end_ns": t1, "seconds": (t1 - t0) / 1e9,
                              "output": out.strip()[-1500:]})
                print(f"    rpull {ref.rsplit('/', 1)[-1]}: {(t1 - t0) / 1e9:.2f} s", flush=True)
            time.sleep(0.3)
        finally:
            Path(spec["stop"]).touch()
        out = self.finish_reader(proc, spec, timeout=120)
        inside, outside = [], 0
        for r in zip(out["start_ns"], out["dur_ns"], out["size"], strict=True):
            if any(p["start_ns"] <= r[0] and r[0] + r[1] <= p["end_ns"] for p in pulls):
                inside.append(r)
            else:
                outside += 1
        return {"kind": "pull", "resident_at_start": resident, "reader_passes": out["passes"],
                "reader_cpu_s": round(out["cpu_s"], 2), "machine": acct.stop(), "pulls": pulls, "reads": inside,
                "reads_outside_pulls": outside}


def warm(path: Path, expect: str) -> dict:
    """Read the whole file once (fetching it into lazysnap's cache); its sha256 must be the image's."""
    h = hashlib.sha256()
    t = time.monotonic()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    seconds = time.monotonic() - t
    if h.hexdigest() != expect:
        raise RuntimeError(f"{path}: sha256 {h.hexdigest()} is not the image's {expect}")
    return {"bytes": n, "seconds": seconds, "mib_s": n / 2**20 / seconds}


def task_pid(node, cid: str) -> int:
    for line in node.ctr("tasks", "ls").stdout.splitlines()[1:]:
        f = line.split()
        if f and f[0] == cid:
            return int(f[1])
    raise RuntimeError(f"no task {cid}")


def commit() -> dict:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=REPO_ROOT, check=False).stdout.strip()
    return {"commit": git("rev-parse", "HEAD"), "source": str(REPO_ROOT),
            "snapshotter_dirty": bool(git("status", "--porcelain", "snapshotter"))}


def phase_summary(phases: list[dict], kind: str) -> dict:
    durs = [r[1] for p in phases if p["kind"] == kind for r in p["reads"]]
    out = summary(durs)
    out["by_size"] = {f"{s >> 10}K": summary([r[1] for p in phases if p["kind"] == kind for r in p["reads"]
                                              if r[2] == s]) for s in SIZES}
    out["histogram_us"] = histogram(durs)
    return out


def slowest(phase: dict, n: int = 10) -> list[dict]:
    """The phase's slowest reads: when (seconds into the phase, or into which pull), how long, how big."""
    t0 = min((r[0] for r in phase["reads"]), default=0)
    out = []
    for start, dur, size in sorted(phase["reads"], key=lambda r: -r[1])[:n]:
        e = {"dur_us": round(dur / 1000, 1), "size_kib": size >> 10, "at_s": round((start - t0) / 1e9, 3)}
        for i, p in enumerate(phase.get("pulls", [])):
            if p["start_ns"] <= start <= p["end_ns"]:
                e.update(pull=i, into_pull_s=round((start - p["start_ns"]) / 1e9, 3))
        out.append(e)
    return out


def fmt_us(v: float) -> str:
    return f"{v / 1000:.2f} ms" if v >= 1000 else f"{v:.0f} µs"


def markdown(report: dict) -> str:
    dirty = " + uncommitted changes" if report["lazysnap"]["snapshotter_dirty"] else ""
    title = ("### Read latency of a running container, idle and during `lazysnap rpull` "
             f"(lazysnap {report['lazysnap']['commit'][:7]}{dirty})")
    lines = [title, "",
             "| phase | reads | p50 | p90 | p99 | p99.9 | max | reads > 10 ms | machine busy | load avg |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for kind in ("idle", "pull"):
        s = report["summary"][kind]
        ph = [p for p in report["phases"] if p["kind"] == kind]
        busy = [p["machine"]["machine_cpu_busy"] for p in ph]
        loads = [float(p["machine"]["loadavg_after"][0]) for p in ph]
        name = "idle" if kind == "idle" else "during pull"
        lines.append(f"| {name} | {s['count']} | {fmt_us(s['p50_us'])} | {fmt_us(s['p90_us'])} | {fmt_us(s['p99_us'])} | "
                     f"{fmt_us(s['p999_us'])} | {fmt_us(s['max_us'])} | {s['over_10ms']} | "
                     f"{min(busy):.2f}–{max(busy):.2f} | {min(loads):.2f}–{max(loads):.2f} |")
    lines += ["", "| phase | " + " | ".join(f"p50 / p99 {s >> 10} KiB" for s in SIZES) + " |",
              "|---|" + "---:|" * len(SIZES)]
    for kind in ("idle", "pull"):
        by = report["summary"][kind]["by_size"]
        lines.append(f"| {'idle' if kind == 'idle' else 'during pull'} | " + " | ".join(
            f"{fmt_us(by[f'{s >> 10}K']['p50_us'])} / {fmt_us(by[f'{s >> 10}K']['p99_us'])}"
            if by[f"{s >> 10}K"]["count"] else "–" for s in SIZES) + " |")
    pulls = [p["seconds"] for ph in report["phases"] for p in ph.get("pulls", [])]
    lines += ["", (f"Pulls: {len(pulls)} × rpull of a 30,000-file eStargz image, "
                   f"{min(pulls):.2f}–{max(pulls):.2f} s each. Per phase (p50 / p99 / max, machine busy, "
                   "lazysnap CPU s, other processes' CPU s):"), ""]
    for i, p in enumerate(report["phases"]):
        s = summary([r[1] for r in p["reads"]])
        m = p["machine"]
        lines.append(f"- {i} {p['kind']}: {s['count']} reads, {fmt_us(s['p50_us'])} / {fmt_us(s['p99_us'])} / "
                     f"{fmt_us(s['max_us'])}; busy {m['machine_cpu_busy']:.2f}; lazysnap "
                     f"{', '.join(f'{k} {v:.2f}' for k, v in m['lazysnap_cpu_s'].items())}; others "
                     f"{m['others_cpu_s']:.2f}" + (f" ({', '.join(f'{k} {v:.1f}' for k, v in m['others_top'].items())})"
                                                    if m["others_top"] else ""))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Read latency of a running container, idle and during lazy pulls.")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--rounds", type=int, default=3, help="idle + pull rounds (a last idle phase follows)")
    p.add_argument("--pulls-per-round", type=int, default=2)
    p.add_argument("--passes", type=int, default=2, help="passes over the read plan in each idle phase")
    p.add_argument("--no-verify", action="store_true", help="do not compare the bytes read")
    p.add_argument("--reader", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reader:
        return reader(args.reader)

    from . import images as bench_images
    from .netem import ShapedLink
    from .node import Node
    from .run import machine

    npulls = args.rounds * args.pulls_per_round
    if npulls > bench_images.READ_LATENCY_PULLS:
        p.error(f"at most {bench_images.READ_LATENCY_PULLS} pulls (rounds × pulls-per-round): "
                "each needs an image of its own")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    started = time.monotonic()
    pull_images = [f"many-files-{n}" for n in range(npulls)]
    catalog = bench_images.ensure([READ_IMAGE, *pull_images], ["estargz"])
    built_s = time.monotonic() - started
    tmp = Path(tempfile.mkdtemp(prefix="lzsb-rl-", dir="/var/tmp"))
    link = ShapedLink(storage=bench_images.STORAGE, workdir=tmp / "link", loopback=True)
    report: dict = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "command": " ".join(["python -m benchmarks.read_latency", *(argv if argv is not None
                                                                                 else sys.argv[1:])]),
                    "lazysnap": commit(), "machine": machine(), "lazysnap_config": CONFIG,
                    "loadavg_at_start": Path("/proc/loadavg").read_text().strip(),
                    "plan": {"file_bytes": None, "reads_per_pass": None, "sizes_kib": [s >> 10 for s in SIZES],
                             "slot_kib": SLOT >> 10, "seed": PLAN_SEED}}
    node = None
    try:
        with link:
            registry = link.registry
            assert registry is not None
            node = Node(tmp / "n", lazy=True, config=list(CONFIG)).start()
            a = catalog[READ_IMAGE]
            ref_a = f"{link.host}/bench/{READ_IMAGE}:{a['variants']['estargz']['tag']}"
            report["rpull_read_image"] = node.pull(ref_a).strip()[-1500:]
            cid = node.create(ref_a, a["cmd"])
            assert node.containerd is not None
            node.ctr("tasks", "start", "-d", "--fifo-dir", str(node.containerd.fifo_dir), cid)
            path = Path(f"/proc/{task_pid(node, cid)}/root") / FILE_IN_IMAGE
            size = path.stat().st_size
            blocks = plan(size)
            report["plan"].update(file_bytes=size, reads_per_pass=len(blocks))
            data_digests = {layer["digest"] for layer in a["variants"]["estargz"]["layers"]}
            mark = registry.mark()
            report["first_read"] = warm(path, a["expect"])
            fetched = sum(r.bytes for r in registry.requests(settle=0.3)[mark:]
                          if r.method == "GET" and r.blob is not None and r.blob[1] in data_digests)
            report["first_read"]["registry_bytes"] = fetched
            print(f"[{time.monotonic() - started:5.0f}s] first read of {size >> 20} MiB through the container: "
                  f"{report['first_read']['mib_s']:.0f} MiB/s, {fetched / 2**20:.1f} MiB from the registry", flush=True)
            bench = Bench(node, path, blocks, tmp, verify=not args.no_verify)
            bench.evict()
            mark = registry.mark()
            report["cached_read"] = warm(path, a["expect"])
            again = [r for r in registry.requests(settle=0.3)[mark:]
                     if r.method == "GET" and r.blob is not None and r.blob[1] in data_digests]
            if again:
                raise RuntimeError(f"the second read still fetched {len(again)} ranges: not all of the file is cached")
            print(f"[{time.monotonic() - started:5.0f}s] second read, from lazysnap's cache: "
                  f"{report['cached_read']['mib_s']:.0f} MiB/s, nothing from the registry", flush=True)

            mark = registry.mark()
            phases = []
            refs = [f"{link.host}/bench/{n}:{catalog[n]['variants']['estargz']['tag']}" for n in pull_images]
            for r in range(args.rounds + 1):
                ph = bench.idle(args.passes)
                phases.append(ph)
                s = summary([x[1] for x in ph["reads"]])
                print(f"[{time.monotonic() - started:5.0f}s] idle: {s['count']} reads, p50 {fmt_us(s['p50_us'])}, "
                      f"p99 {fmt_us(s['p99_us'])}, max {fmt_us(s['max_us'])}", flush=True)
                if r == args.rounds:
                    break
                ph = bench.pull(refs[r * args.pulls_per_round:(r + 1) * args.pulls_per_round])
                phases.append(ph)
                s = summary([x[1] for x in ph["reads"]])
                print(f"[{time.monotonic() - started:5.0f}s] during pull: {s['count']} reads, "
                      f"p50 {fmt_us(s['p50_us'])}, p99 {fmt_us(s['p99_us'])}, max {fmt_us(s['max_us'])}", flush=True)
            fetched_a = [r for r in registry.requests(settle=0.3)[mark:]
                         if r.method == "GET" and r.blob is not None and r.blob[1] in data_digests]
            report["registry_gets_of_read_image_during_phases"] = len(fetched_a)
            report["lazysnap_status"] = node.lazysnap_status()
            report["lazysnap_peak_rss"] = node.lazysnap_peak_rss()
    finally:
        if node is not None:
            node.close()
        shutil.rmtree(tmp, ignore_errors=True)

    report["summary"] = {kind: phase_summary(phases, kind) for kind in ("idle", "pull")}
    for ph in phases:
        ph["summary"] = summary([r[1] for r in ph["reads"]])
        ph["slowest"] = slowest(ph)
    md = markdown(report | {"phases": phases})
    for ph in phases:
        del ph["reads"]
        for pl in ph.get("pulls", []):
            del pl["start_ns"], pl["end_ns"]
    report["phases"] = phases
    report["loadavg_at_end"] = Path("/proc/loadavg").read_text().strip()
    report["image_build_seconds"] = built_s
    report["wall_seconds"] = time.monotonic() - started
    base = write_results(args.out, "read-latency", report, md)
    print()
    print(md)
    print(f"wrote {base}.json and .md ({report['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
