"""Micro-benchmarks: reads through lazysnap's FUSE against the same bytes on a native
filesystem, metadata walks over 30,000 files, and inflate throughput per library.

    python -m benchmarks.micro [--out DIR] [--fio-seconds 8]

Setup: the benchmark registry on loopback, a fresh lazysnap + containerd, `lazysnap rpull`
of `bench/big-file:estargz` and `bench/many-files:estargz`; the files are then read
directly where lazysnap serves the layers: their EROFS mounts (`<root>/erofs/<id>/...`, the
default), or their FUSE directories (`<root>/fuse/<id>/...`) with `kernel_metadata = false`.
The `fuse_*` keys name lazysnap's path either way; `layer_paths` says which it was. The native
copies are made with `cp` onto the same disk (ext4 on virtio) as lazysnap's cache.

- sequential: `dd bs=1M` of the 1 GiB file: first read (fetched from the registry over
  loopback), cold from lazysnap's local cache (page cache dropped), and re-read.
- random 4 KiB: `fio --rw=randread --bs=4k --ioengine=psync` for a fixed time, cold
  (page cache dropped, chunks in lazysnap's cache) and hot (after a full read, --invalidate=0).
- metadata: `find | wc -l`, `find -type f -print0 | xargs -0 stat`, `du -s`, cold and warm.
- inflate: decompress the python-app and many-files gzip layers with zlib, isal, zlib-ng.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from . import images as bench_images
from .netem import ShapedLink
from .node import Node, drop_caches
from .run import RESULTS, blob_paths, machine, write_results


def timed(argv: list[str] | str, shell: bool = False) -> tuple[float, str]:
    t = time.monotonic()
    out = subprocess.run(argv, shell=shell, capture_output=True, text=True, timeout=1800, check=True).stdout
    return time.monotonic() - t, out


def dd_mib_s(path: Path) -> float:
    size = path.stat().st_size
    seconds, _ = timed(["dd", f"if={path}", "of=/dev/null", "bs=1M"])
    return size / 2**20 / seconds


def fio_randread(path: Path, seconds: int, invalidate: bool) -> dict:
    _, out = timed(["fio", "--name=rr", f"--filename={path}", "--rw=randread", "--bs=4k", "--ioengine=psync",
                    "--numjobs=1", "--readonly", f"--runtime={seconds}", "--time_based",
                    f"--size={path.stat().st_size}", f"--invalidate={1 if invalidate else 0}",
                    "--output-format=json"])
    job = json.loads(out)["jobs"][0]["read"]
    pct = job["clat_ns"].get("percentile", {})
    return {"iops": job["iops"], "mib_s": job["bw_bytes"] / 2**20,
            "p50_us": pct.get("50.000000", 0) / 1000, "p99_us": pct.get("99.000000", 0) / 1000}


def metadata(root: Path) -> dict:
    out = {}
    for name, cmd in (("find_wc", f"find {root} | wc -l"),
                      ("find_stat", f"find {root} -type f -print0 | xargs -0 stat > /dev/null"),
                      ("du", f"du -s {root} > /dev/null")):
        drop_caches()
        cold, _ = timed(cmd, shell=True)
        warm, _ = timed(cmd, shell=True)
        out[name] = {"cold_s": cold, "warm_s": warm}
    return out


def inflate_libraries() -> dict:
    libs = {"zlib": zlib}
    try:
        from isal import isal_zlib
        libs["isal"] = isal_zlib
    except ImportError:
        pass
    try:
        from zlib_ng import zlib_ng
        libs["zlib-ng"] = zlib_ng
    except ImportError:
        pass
    return libs


def inflate_bench(catalog: dict) -> dict:
    out: dict = {}
    for image in ("python-app", "many-files", "big-file"):
        if image not in catalog:
            continue
        paths = blob_paths(catalog[image]["variants"]["gzip"])
        blob = max((p.read_bytes() for p in paths), key=len)
        for name, lib in inflate_libraries().items():
            best, size = None, 0
            for _ in range(3):
                d = lib.decompressobj(31)
                t = time.perf_counter()
                size = sum(len(d.decompress(blob[i:i + (1 << 20)])) for i in range(0, len(blob), 1 << 20))
                el = time.perf_counter() - t
                best = el if best is None else min(best, el)
            out.setdefault(image, {})[name] = {"compressed_mib": len(blob) / 2**20, "output_mib": size / 2**20,
                                               "output_mb_s": size / 1e6 / best}
    return out


def find_in_layers(root: Path, rel: str) -> Path:
    """`rel` in a served layer's mount, `<root>/mnt/<id>` (EROFS by default, else FUSE bind-mounted)."""
    mnt = root / "mnt"
    for layer in sorted(mnt.iterdir()) if mnt.is_dir() else []:
        if (layer / rel).exists():
            return layer / rel
    raise FileNotFoundError(f"{rel} in none of the layers under {mnt}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="FUSE vs native reads, metadata walks, inflate throughput.")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--fio-seconds", type=int, default=8)
    args = p.parse_args(argv)
    catalog = bench_images.ensure(["big-file", "many-files", "python-app"], ["estargz"])
    tmp = Path(tempfile.mkdtemp(prefix="lzsb-micro-", dir="/var/tmp"))
    link = ShapedLink(storage=bench_images.STORAGE, workdir=tmp / "link", loopback=True)
    results: dict = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                     "machine": machine()}
    node = None
    try:
        with link:
            node = Node(tmp / "n", lazy=True).start()
            for image in ("big-file", "many-files"):
                node.pull(f"{link.host}/bench/{image}:estargz")
            assert node.lazysnap is not None
            big = find_in_layers(node.lazysnap.root, "data/big.bin")
            tree = find_in_layers(node.lazysnap.root, "app/node_modules")
            results["layer_paths"] = [str(big), str(tree)]
            native = tmp / "native"
            native.mkdir()

            seq: dict = {}
            drop_caches()
            seq["fuse_first_read_from_registry"] = dd_mib_s(big)       # lazily fetched over loopback
            drop_caches()
            seq["fuse_cold_from_local_cache"] = dd_mib_s(big)
            seq["fuse_reread"] = dd_mib_s(big)
            shutil.copyfile(big, native / "big.bin")
            drop_caches()
            seq["native_cold"] = dd_mib_s(native / "big.bin")
            seq["native_reread"] = dd_mib_s(native / "big.bin")
            results["sequential_mib_s"] = seq
            print("sequential MiB/s", json.dumps(seq), flush=True)

            rnd: dict = {}
            drop_caches()
            rnd["fuse_cold_from_local_cache"] = fio_randread(big, args.fio_seconds, invalidate=True)
            dd_mib_s(big)
            rnd["fuse_hot"] = fio_randread(big, args.fio_seconds, invalidate=False)
            drop_caches()
            rnd["native_cold"] = fio_randread(native / "big.bin", args.fio_seconds, invalidate=True)
            dd_mib_s(native / "big.bin")
            rnd["native_hot"] = fio_randread(native / "big.bin", args.fio_seconds, invalidate=False)
            results["random_4k"] = rnd
            print("random 4 KiB", json.dumps(rnd), flush=True)

            subprocess.run(["cp", "-a", str(tree), str(native / "node_modules")], check=True, timeout=1800)
            meta = {"fuse": metadata(tree), "native": metadata(native / "node_modules")}
            results["metadata_30k_files_s"] = meta
            print("metadata", json.dumps(meta), flush=True)
            results["lazysnap_peak_rss"] = node.lazysnap_peak_rss()
    finally:
        if node is not None:
            node.close()
        shutil.rmtree(tmp, ignore_errors=True)
    results["inflate"] = inflate_bench(catalog)
    print("inflate", json.dumps(results["inflate"]), flush=True)
    print(f"wrote {write_results(args.out, 'micro', results)}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
