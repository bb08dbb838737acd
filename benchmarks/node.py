"""One cold node: a fresh containerd (and, for lazy modes, a fresh lazysnap) and the steps
a benchmark times on it: pull, create, run to exit, and a warm second start.

All of it lives under one work dir and in containerd namespace `lzsbench`; `close()`
stops everything and removes what the runs left in /sys/fs/cgroup and /run/containerd.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.containerd import Containerd, remove_empty_cgroups
from tests.harness.lazysnap import Lazysnap
from tests.harness.procs import HarnessError, run, unmount_below

NAMESPACE = "lzsbench"
REPO_ROOT = Path(__file__).resolve().parent.parent


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_files(paths: list[Path]) -> int:
    """Read files into the page cache (the registry's blobs: a warm registry, a cold node)."""
    n = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(8 << 20):
                n += len(chunk)
    return n


def warm_tools() -> None:
    """Bring the tools' own code back into the page cache after drop_caches: a cold node has
    containerd, runc and lazysnap installed and used before; only the image is new to it."""
    for argv in (["ctr", "--version"], ["runc", "--version"], ["containerd-shim-runc-v2", "-v"],
                 [sys.executable, "-m", "snapshotter", "--version"], ["fincore", "--version"]):
        subprocess.run(argv, capture_output=True, cwd=REPO_ROOT, check=False)


def cpu_busy() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


@dataclass
class Node:
    workdir: Path
    lazy: bool
    certs_dir: Path | None = None
    config: list[str] = field(default_factory=list)
    """Extra lazysnap config lines."""
    keep_log: Path | None = None
    """Where to copy lazysnap's log before the node's work dir goes."""
    containerd: Containerd | None = field(default=None, init=False)
    lazysnap: Lazysnap | None = field(default=None, init=False)
    _seq: int = field(default=0, init=False)

    @property
    def snapshotter(self) -> str:
        return "lazysnap" if self.lazy else "overlayfs"

    def start(self) -> Node:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.lazy:
            config = self.workdir / "lazysnap.toml"
            lines = ([f'certs_dir = "{self.certs_dir}"'] if self.certs_dir else []) + self.config
            config.write_text("\n".join(lines) + "\n")
            self.lazysnap = Lazysnap(root=self.workdir / "ls", address=self.workdir / "ls.sock",
                                     log_path=self.workdir / "lazysnap.log", config=config,
                                     extra_args=[] if any(line.startswith("log_level") for line in self.config)
                                     else ["--log-level", "info"]).start()
        self.containerd = Containerd(snapshotter_address=self.lazysnap.address if self.lazysnap else None,
                                     workdir=self.workdir / "ctd").start()
        return self

    def ctr(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        assert self.containerd is not None
        return self.containerd.ctr(*args, namespace=NAMESPACE, timeout=timeout)

    def pull(self, ref: str) -> str:
        """The image pull as a user would do it for this snapshotter; returns its output."""
        assert self.containerd is not None
        if not self.lazy:
            return self.ctr("images", "pull", "--plain-http", "--snapshotter", "overlayfs", ref).stdout
        assert self.lazysnap is not None
        argv = [sys.executable, "-m", "snapshotter", "rpull", "--plain-http", "--namespace", NAMESPACE,
                "--containerd", str(self.containerd.address), "--address", str(self.lazysnap.address), ref]
        if self.certs_dir is not None:
            argv[4:4] = ["--certs-dir", str(self.certs_dir)]
        return run(argv, timeout=900).stdout

    def create(self, ref: str, cmd: list[str]) -> str:
        self._seq += 1
        cid = f"bench-{self._seq}"
        self.ctr("containers", "create", "--snapshotter", self.snapshotter, ref, cid, *cmd)
        return cid

    def start_task(self, cid: str) -> str:
        """`ctr tasks start` (attached: returns when the container exits); returns its output."""
        assert self.containerd is not None
        out = self.ctr("tasks", "start", "--fifo-dir", str(self.containerd.fifo_dir), cid)
        return out.stdout

    def remove(self, cid: str) -> None:
        assert self.containerd is not None
        self.containerd.ctr("tasks", "rm", "-f", cid, namespace=NAMESPACE, check=False, timeout=60)
        self.containerd.ctr("containers", "rm", cid, namespace=NAMESPACE, check=False, timeout=60)

    def timed_start(self, ref: str, cmd: list[str]) -> tuple[float, float, str]:
        """(create seconds, run-to-exit seconds, output); the container is removed afterwards."""
        t0 = time.monotonic()
        cid = self.create(ref, cmd)
        t1 = time.monotonic()
        out = self.start_task(cid)
        t2 = time.monotonic()
        self.remove(cid)
        return t1 - t0, t2 - t1, out

    def lazysnap_peak_rss(self) -> int | None:
        """lazysnap's VmHWM in bytes."""
        if self.lazysnap is None or self.lazysnap.proc is None or self.lazysnap.proc.popen is None:
            return None
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.lazysnap.proc.popen.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return None

    def lazysnap_status(self) -> str:
        if self.lazysnap is None:
            return ""
        return subprocess.run([sys.executable, "-m", "snapshotter", "status", "--address", str(self.lazysnap.address)],
                              capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, check=False).stdout

    def overlay_snapshot_files(self) -> list[str]:
        """Every regular file of containerd's overlayfs snapshots (the unpacked image)."""
        assert self.containerd is not None
        root = self.containerd.root / "io.containerd.snapshotter.v1.overlayfs" / "snapshots"
        out = []
        for dirpath, _, names in os.walk(root):
            for n in names:
                p = os.path.join(dirpath, n)
                with contextlib.suppress(OSError):
                    st = os.lstat(p)
                    if st.st_size > 0 and (st.st_mode & 0o170000) == 0o100000:
                        out.append(p)
        return out

    def close(self) -> None:
        try:
            if self.containerd is not None:
                self.containerd.stop()
        finally:
            try:
                if self.lazysnap is not None:
                    self.lazysnap.close()
            finally:
                log = self.workdir / "lazysnap.log"
                if self.keep_log is not None and log.exists():
                    self.keep_log.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(log, self.keep_log)
                unmount_below(self.workdir)
                remove_namespace_leftovers()
                # A node is cold only once: its lazysnap root (chunk cache, indexes) goes too.
                shutil.rmtree(self.workdir, ignore_errors=True)


def remove_namespace_leftovers() -> None:
    """`ctr containers create` puts containers in cgroup /lzsbench/<id> and runc state in
    /run/containerd/runc/lzsbench; remove what is left of both (empty dirs only)."""
    remove_empty_cgroups(NAMESPACE)
    with contextlib.suppress(OSError):
        Path(f"/run/containerd/runc/{NAMESPACE}").rmdir()


def page_cache_bytes(files: list[str]) -> int:
    """Bytes of `files` resident in the page cache (fincore, i.e. mincore(2))."""
    total = 0
    for i in range(0, len(files), 500):
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *files[i:i + 500]],
                             capture_output=True, text=True, timeout=120, check=False)
        total += sum(int(x) for x in out.stdout.split() if x.isdigit())
    return total


__all__ = ["HarnessError", "Node", "cpu_busy", "drop_caches", "page_cache_bytes", "read_files", "warm_tools"]
