"""The benchmark images, built offline and kept in a registry storage dir under the cache.

Three images, each pushed as plain gzip (tag `gzip`) and as eStargz (tag `estargz`,
converted by the real converter, `ctr-remote image convert --estargz --oci`, in a
containerd of its own), into `bench/<name>` of a docker-registry whose filesystem
storage lives in `$LAZYSNAP_BENCH_CACHE` (default /var/tmp/lazysnap-bench/registry).
The runner serves that storage, unchanged, from inside the shaped namespace.

- python-app: Debian bookworm (`debootstrap --variant=minbase --include=python3,
  python3-numpy,python3-pandas`; the rootfs tarball is cached) split into base / Python
  packages / app layers; runs `python3 /app/main.py` (imports numpy and pandas).
- big-file: busybox plus one 1 GiB incompressible file; `dd` reads 1 MiB at 4 spread
  offsets and prints the sha256 of what it read.
- many-files: busybox plus a node_modules-like tree of 30,000 small files; the workload
  counts them with `find | wc -l`, stats them all with `du -s`, and reads five.

`benchmarks.read_latency` builds its own images on first use (`EXTRA_IMAGES`): read-file,
busybox plus one 256 MiB incompressible file, to read from in a running container; and
many-files-0 ... many-files-5, many-files with other contents (other seeds), so that each of
its pulls is of a new 30,000-file layer.

SOCI (tag `soci`): `lazysnap index convert` of the gzip tag, a SOCI v2 image (the same
gzip layers plus zTOCs, found through the `com.amazon.soci.index-digest` annotation).

Rebuilds (tag `estargz-v2`, python-app only): the next build of a deploy that changed
only its app. The eStargz tag's layers but the top one, byte for byte, under a new top
layer (another app/main.py, made eStargz by the test harness's builder), with a config of
its own; what a build on an eStargz base image pushes. `benchmarks.run`'s
`estargz+rebuilt-profile` mode starts it cold with only the eStargz tag's start profile in
the registry.

    python -m benchmarks.images [--images python-app,big-file,many-files] [--rebuild]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import random
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.harness.containerd import Containerd
from tests.harness.images import (
    Dir,
    Entry,
    File,
    Layer,
    OCILayout,
    Symlink,
    busybox_bytes,
    fetch_manifest,
    gzip_bytes,
    push,
    sha256_digest,
)
from tests.harness.procs import require_tool, run
from tests.harness.registry import Registry

CACHE = Path(os.environ.get("LAZYSNAP_BENCH_CACHE", "/var/tmp/lazysnap-bench"))
STORAGE = CACHE / "registry"
CATALOG = CACHE / "images.json"
ROOTFS_TAR = CACHE / "python-app-rootfs.tar"
DEBIAN_MIRROR = os.environ.get("LAZYSNAP_BENCH_MIRROR", "http://deb.debian.org/debian")
PYTHON_PACKAGES = ("python3", "python3-numpy", "python3-pandas")

BIG_FILE_MIB = 1024
BIG_FILE_OFFSETS_MIB = (10, 341, 682, 1013)
MANY_FILES = 30_000
MANY_FILES_READ = ("node_modules/pkg-0000/package.json", "node_modules/pkg-0300/index.js",
                   "node_modules/pkg-0600/lib/util-06.js", "node_modules/pkg-0900/README.md",
                   "node_modules/pkg-1199/lib/core-01.js")
BUSYBOX_APPLETS = ("sh", "cat", "dd", "du", "find", "wc", "sha256sum", "echo", "ls", "head", "cut", "xargs",
                   "stat", "true", "test", "[")


# --------------------------------------------------------------------------- images

@dataclass(frozen=True)
class BenchImage:
    name: str
    description: str
    cmd: tuple[str, ...]
    build: Callable[[], tuple[list[Layer], str]]
    """Returns the layers and a string the workload's output must contain."""
    rebuilt_top: Callable[[], list[Entry]] | None = None
    """The top layer of the image's next build (`REBUILDS`), when it has one."""

    @property
    def repo(self) -> str:
        return f"bench/{self.name}"


def _busybox_layer() -> list[Entry]:
    return [Dir("bin"), Dir("etc"), Dir("tmp", mode=0o1777), Dir("dev"), Dir("proc", mode=0o555),
            Dir("sys", mode=0o555), File("bin/busybox", busybox_bytes(), mode=0o755),
            *[Symlink(f"bin/{a}", "busybox") for a in BUSYBOX_APPLETS],
            File("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"), File("etc/group", "root:x:0:\n")]


def build_big_file() -> tuple[list[Layer], str]:
    rng = random.Random(5)
    data = b"".join(rng.randbytes(64 << 20) for _ in range(BIG_FILE_MIB // 64))  # incompressible, reproducible
    read = b"".join(data[o << 20:(o + 1) << 20] for o in BIG_FILE_OFFSETS_MIB)
    offsets = " ".join(str(o) for o in BIG_FILE_OFFSETS_MIB)
    script = ("#!/bin/sh\n"
              f"for off in {offsets}; do dd if=/data/big.bin bs=1048576 skip=$off count=1 2>/dev/null; done"
              " | sha256sum\n")
    layers = [Layer.from_entries(_busybox_layer()),
              Layer.from_entries([Dir("data"), File("data/big.bin", data)]),
              Layer.from_entries([File("bench.sh", script, mode=0o755)])]
    return layers, hashlib.sha256(read).hexdigest()


_WORDS = ("function", "return", "const", "let", "var", "module", "exports", "require", "this", "null", "undefined",
          "if", "else", "for", "while", "new", "Promise", "async", "await", "=>", "{", "}", "(", ")", ";", "=",
          "value", "options", "callback", "error", "result", "data", "buffer", "length", "index", "key", "object",
          "string", "number", "true", "false", "typeof", "prototype", "Object.assign", "Array.isArray", "+", "&&")


def _js(rng: random.Random, size: int) -> bytes:
    out, n = [], 0
    while n < size:
        line = " ".join(rng.choices(_WORDS, k=rng.randint(3, 14))) + "\n"
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


def many_files_entries(seed: int = 30) -> list[Entry]:
    """~30,000 small files in 1,200 packages: package.json, README.md, LICENSE, index.js, lib/*.js.
    Another `seed` gives the same tree with other file contents (another layer digest)."""
    rng = random.Random(seed)
    entries: list[Entry] = [Dir("app"), Dir("app/node_modules")]
    per_pkg = MANY_FILES // 1200                  # 25
    lib = per_pkg - 4
    for p in range(1200):
        base = f"app/node_modules/pkg-{p:04d}"
        entries += [Dir(base), Dir(f"{base}/lib"),
                    File(f"{base}/package.json", json.dumps({"name": f"pkg-{p:04d}", "version": f"1.{p % 17}.{p % 5}",
                                                             "main": "index.js", "license": "MIT"}, indent=2)),
                    File(f"{base}/README.md", _js(rng, int(rng.lognormvariate(7.2, 0.8)))),
                    File(f"{base}/LICENSE", "MIT License\n\nPermission is hereby granted, free of charge...\n"),
                    File(f"{base}/index.js", _js(rng, int(rng.lognormvariate(7.0, 1.0))))]
        for i in range(lib):
            kind = ("util", "core", "helpers")[i % 3]
            entries.append(File(f"{base}/lib/{kind}-{i:02d}.js", _js(rng, int(rng.lognormvariate(7.3, 1.0)))))
    return entries


def build_many_files(seed: int = 30) -> tuple[list[Layer], str]:
    entries = many_files_entries(seed)
    files = {e.name: e.data for e in entries if e.kind == tarfile.REGTYPE}
    read = b"".join(files[f"app/{p}"] for p in MANY_FILES_READ)
    script = ("#!/bin/sh\ncd /app\n"
              "echo files $(find node_modules -type f | wc -l)\n"
              "echo du-kib $(du -s node_modules | cut -f1)\n"
              f"cat {' '.join(MANY_FILES_READ)} | sha256sum\n")
    layers = [Layer.from_entries(_busybox_layer()), Layer.from_entries(entries),
              Layer.from_entries([File("bench.sh", script, mode=0o755)])]
    return layers, hashlib.sha256(read).hexdigest()


PYTHON_APP = """\
import numpy, pandas
df = pandas.DataFrame({"x": numpy.arange(1000)})
print("python-app ok", numpy.__version__, pandas.__version__, int(df.x.sum()))
"""
PYTHON_APP_V2 = PYTHON_APP + "# build 2: the next commit changed only the app\n"


def rootfs_tarball() -> Path:
    """Debian bookworm minbase + python3, numpy, pandas, as a tar; cached at ROOTFS_TAR."""
    if ROOTFS_TAR.exists():
        return ROOTFS_TAR
    debootstrap = require_tool("debootstrap", "debootstrap")
    work = CACHE / "rootfs-build"
    if not (work / "usr/bin/python3").exists():
        shutil.rmtree(work, ignore_errors=True)
        print(f"debootstrap bookworm into {work} (a few minutes) ...", flush=True)
        run([debootstrap, "--variant=minbase", f"--include={','.join(PYTHON_PACKAGES)}", "bookworm", str(work),
             DEBIAN_MIRROR], timeout=1800)
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (work / junk).glob("*"):
            if p.is_file():
                p.unlink()
    tmp = ROOTFS_TAR.with_suffix(".tmp")
    run(["tar", "--numeric-owner", "--xattrs", "-C", str(work), "-cf", str(tmp), "."], timeout=600)
    tmp.rename(ROOTFS_TAR)
    shutil.rmtree(work, ignore_errors=True)
    return ROOTFS_TAR


def _python_layer_of(name: str) -> int | None:
    """0 base, 1 Python packages, None skipped (contents of virtual filesystems)."""
    for skip in ("dev/", "proc/", "sys/", "run/"):
        if name.startswith(skip):
            return None
    return 1 if name == "usr/lib/python3/dist-packages" or name.startswith("usr/lib/python3/dist-packages/") else 0


def build_python_app() -> tuple[list[Layer], str]:
    outs = [io.BytesIO(), io.BytesIO()]
    tars = [tarfile.open(fileobj=o, mode="w", format=tarfile.PAX_FORMAT) for o in outs]  # noqa: SIM115 (closed below)
    names: list[set[str]] = [set(), set()]
    with tarfile.open(rootfs_tarball()) as src:
        for m in src:
            name = m.name.removeprefix("./")
            if name in ("", "."):
                continue
            which = _python_layer_of(name)
            if which is None:
                continue
            m.name = name
            if m.islnk():
                target = m.linkname.removeprefix("./")
                if target in names[which]:
                    m.linkname = target
                    tars[which].addfile(m)
                else:  # target went to the other layer: store a copy instead of a link
                    data = src.extractfile(m).read()
                    m.type, m.size, m.linkname = tarfile.REGTYPE, len(data), ""
                    tars[which].addfile(m, io.BytesIO(data))
            elif m.isreg():
                tars[which].addfile(m, src.extractfile(m))
            else:
                tars[which].addfile(m)
            names[which].add(name)
    for t in tars:
        t.close()
    layers = []
    for o in outs:
        tar = o.getvalue()
        layers.append(Layer(gzip_bytes(tar), sha256_digest(tar)))
    layers.append(Layer.from_entries([Dir("app"), File("app/main.py", PYTHON_APP)]))
    return layers, "python-app ok"


IMAGES: dict[str, BenchImage] = {i.name: i for i in (
    BenchImage("python-app", "Debian bookworm + python3, numpy, pandas; imports both",
               ("python3", "/app/main.py"), build_python_app,
               lambda: [Dir("app"), File("app/main.py", PYTHON_APP_V2)]),
    BenchImage("big-file", f"busybox + one {BIG_FILE_MIB} MiB incompressible file; dd reads 4 × 1 MiB",
               ("/bench.sh",), build_big_file),
    BenchImage("many-files", f"busybox + {MANY_FILES} small files (node_modules-like); find, du, read 5",
               ("/bench.sh",), build_many_files),
)}


# Built only for the benchmarks that use them (`benchmarks.read_latency`); not in
# `benchmarks.run`'s default `--images`.
READ_FILE_MIB = 256
READ_FILE_SEED = 12
READ_LATENCY_PULLS = 6
"""How many distinct many-files images `benchmarks.read_latency` can pull on one node (each a
new 30,000-file layer, so each pull parses a TOC and builds an EROFS image again)."""


def read_file_bytes() -> bytes:
    """The contents of read-file's /data/file.bin: incompressible and reproducible."""
    rng = random.Random(READ_FILE_SEED)
    return b"".join(rng.randbytes(64 << 20) for _ in range(READ_FILE_MIB // 64))


def build_read_file() -> tuple[list[Layer], str]:
    data = read_file_bytes()
    layers = [Layer.from_entries(_busybox_layer()), Layer.from_entries([Dir("data"), File("data/file.bin", data)])]
    return layers, hashlib.sha256(data).hexdigest()


EXTRA_IMAGES: dict[str, BenchImage] = {i.name: i for i in (
    BenchImage("read-file", f"busybox + one {READ_FILE_MIB} MiB incompressible file; sleeps (a container to read from)",
               ("/bin/busybox", "sleep", "86400"), build_read_file),
    *(BenchImage(f"many-files-{n}", f"many-files with other contents (seed {100 + n}): a 30,000-file layer to pull",
                 ("/bench.sh",), functools.partial(build_many_files, 100 + n)) for n in range(READ_LATENCY_PULLS)),
)}


def bench_image(name: str) -> BenchImage:
    return IMAGES[name] if name in IMAGES else EXTRA_IMAGES[name]


# --------------------------------------------------------------------------- variants

def _estargz(ctd: Containerd, gzip_ref: str, ref: str) -> None:
    """The real converter, in a containerd of its own; then pushed to the same registry."""
    ctr_remote = require_tool("ctr-remote", "stargz-snapshotter")
    ctd.ctr("images", "pull", "--plain-http", gzip_ref, timeout=900)
    run([ctr_remote, "--address", str(ctd.address), "--namespace", "default", "image", "convert", "--estargz",
         "--oci", gzip_ref, ref], timeout=1800)
    ctd.ctr("images", "push", "--plain-http", ref, timeout=900)


def _soci(ctd: Containerd, gzip_ref: str, ref: str, span_size: str = "") -> None:
    """SOCI v2: `lazysnap index convert` builds zTOCs for the gzip image's layers (its defaults,
    or spans of `span_size`; layers under 10 MiB get none) and pushes the image plus its index at
    `ref`. The layers themselves are the gzip image's, byte for byte. The index store is a temp dir,
    so no node state is touched and every benchmark node starts without it."""
    store = Path(tempfile.mkdtemp(prefix="lzsb-soci-", dir="/var/tmp"))
    try:
        run([sys.executable, "-m", "snapshotter", "index", "convert", "--plain-http", "--store", str(store),
             *(["--span-size", span_size] if span_size else []), gzip_ref, ref], timeout=1800)
    finally:
        shutil.rmtree(store, ignore_errors=True)


VARIANTS: dict[str, Callable[[Containerd, str, str], None] | None] = {
    "gzip": None,            # pushed from the OCI layout with skopeo, bytes unchanged
    "estargz": _estargz,
    "soci": _soci,
    # span-size experiments (issue 15, bytes): the same index with smaller spans
    "soci-1m": functools.partial(_soci, span_size="1MiB"),
    "soci-512k": functools.partial(_soci, span_size="512KiB"),
}
REBUILDS = {"estargz-v2": "estargz"}
"""A rebuild variant -> the variant whose layers but the top one it keeps."""


def _rebuild(registry: Registry, image: BenchImage, info: dict, variant: str, layout_dir: Path) -> None:
    """Push `variant`: the layers of the variant `info` describes but the top one, byte for
    byte (read from the registry's storage), under the image's rebuilt top layer."""
    from tests.harness.estargz import build_estargz
    assert image.rebuilt_top is not None, f"{image.name} has no rebuild"
    base = STORAGE / "docker/registry/v2/blobs/sha256"

    def blob(digest: str) -> bytes:
        return (base / digest[7:9] / digest[7:] / "data").read_bytes()

    _, raw = fetch_manifest(registry.host, image.repo, info["tag"])
    manifest = json.loads(raw)
    diff_ids = json.loads(blob(manifest["config"]["digest"]))["rootfs"]["diff_ids"]
    kept = [Layer(blob(d["digest"]), diff_id, d["mediaType"], d.get("annotations", {}))
            for d, diff_id in zip(manifest["layers"][:-1], diff_ids[:-1], strict=True)]
    top = build_estargz(image.rebuilt_top()).layer()
    layout = OCILayout(layout_dir)
    built = layout.add_image(variant, [*kept, top], cmd=list(image.cmd))
    push(layout.root, variant, registry, f"{image.repo}:{variant}", image=built)
    shutil.rmtree(layout.root, ignore_errors=True)


# --------------------------------------------------------------------------- catalog

def load_catalog() -> dict:
    try:
        return json.loads(CATALOG.read_text())
    except (OSError, ValueError):
        return {}


def _save_catalog(catalog: dict) -> None:
    tmp = CATALOG.with_suffix(".tmp")
    tmp.write_text(json.dumps(catalog, indent=2, sort_keys=True))
    tmp.rename(CATALOG)


def _describe(host: str, repo: str, tag: str) -> dict:
    digest, body = fetch_manifest(host, repo, tag)
    manifest = json.loads(body)
    if "manifests" in manifest:  # an image index (SOCI v2 convert writes one): take the amd64/linux image
        chosen = next(m for m in manifest["manifests"]
                      if m.get("platform", {}).get("architecture", "amd64") == "amd64")
        _, body = fetch_manifest(host, repo, chosen["digest"])
        manifest = json.loads(body)
    layers = [{"digest": d["digest"], "size": d["size"], "mediaType": d["mediaType"],
               "toc_digest": d.get("annotations", {}).get("containerd.io/snapshot/stargz/toc.digest")}
              for d in manifest["layers"]]
    return {"tag": tag, "manifest_digest": digest, "layers": layers,
            "compressed_bytes": sum(layer["size"] for layer in layers)}


def ensure(names: list[str], variants: list[str], rebuild: bool = False) -> dict:
    """Build and push whatever of names × variants is not in the catalog yet; return the catalog."""
    from .netem import _StorageRegistry
    catalog = {} if rebuild else load_catalog()
    if rebuild:
        shutil.rmtree(STORAGE, ignore_errors=True)
    wanted = ["gzip", *(w for v in variants for w in ([REBUILDS[v], v] if v in REBUILDS else [v]))]
    missing = [(n, v) for n in names for v in wanted if v not in catalog.get(n, {}).get("variants", {})
               and (v not in REBUILDS or bench_image(n).rebuilt_top is not None)]  # only images with a next build
    missing = list(dict.fromkeys(missing))
    if not missing:
        return catalog
    STORAGE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="lzsb-img-", dir="/var/tmp"))
    registry = _StorageRegistry(workdir=tmp / "registry", storage=STORAGE)
    ctd = None
    try:
        registry.start()
        for name, variant in missing:
            image = bench_image(name)
            entry = catalog.setdefault(name, {"variants": {}})
            t0 = time.monotonic()
            if variant == "gzip":
                print(f"building {name} ...", flush=True)
                layers, expect = image.build()
                layout = OCILayout(tmp / f"layout-{name}")
                built = layout.add_image("gzip", layers, cmd=list(image.cmd))
                push(layout.root, "gzip", registry, f"{image.repo}:gzip", image=built)
                shutil.rmtree(layout.root, ignore_errors=True)
                entry.update(description=image.description, cmd=list(image.cmd), expect=expect,
                             uncompressed_bytes=sum(_tar_size(layer) for layer in layers))
                del layers
            elif variant in REBUILDS:
                print(f"rebuilding {name} as {variant} ...", flush=True)
                _rebuild(registry, image, entry["variants"][REBUILDS[variant]], variant, tmp / f"layout-{variant}")
            else:
                convert = VARIANTS[variant]
                assert convert is not None
                if ctd is None:
                    ctd = Containerd(workdir=tmp / "ctd").start()
                print(f"converting {name} to {variant} ...", flush=True)
                convert(ctd, f"{registry.host}/{image.repo}:gzip", f"{registry.host}/{image.repo}:{variant}")
            entry["variants"][variant] = _describe(registry.host, image.repo, variant)
            entry["variants"][variant]["build_seconds"] = round(time.monotonic() - t0, 1)
            _save_catalog(catalog)
            print(f"  {name}:{variant} {entry['variants'][variant]['compressed_bytes'] / 2**20:.1f} MiB "
                  f"in {time.monotonic() - t0:.0f} s", flush=True)
    finally:
        if ctd is not None:
            ctd.stop()
        registry.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return catalog


def _tar_size(layer: Layer) -> int:
    import zlib
    d = zlib.decompressobj(31)
    n = 0
    for i in range(0, len(layer.blob), 1 << 24):
        n += len(d.decompress(layer.blob[i:i + (1 << 24)]))
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build and push the benchmark images (cached).")
    p.add_argument("--images", default=",".join(IMAGES))
    p.add_argument("--variants", default="estargz", help="besides gzip: estargz[,soci][,estargz-v2]")
    p.add_argument("--rebuild", action="store_true", help="drop the cached registry storage and build again")
    args = p.parse_args(argv)
    catalog = ensure(args.images.split(","), [v for v in args.variants.split(",") if v], args.rebuild)
    for name in args.images.split(","):
        for variant, info in catalog[name]["variants"].items():
            print(f"{name:11} {variant:8} {info['compressed_bytes'] / 2**20:8.1f} MiB  {len(info['layers'])} layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
