"""A real `lazysnap serve` process for tests, and the data plane processes it leaves behind.

`lazysnap serve` (the control plane) starts a long-lived *data plane* process in a
session of its own; the data plane owns the FUSE mount and outlives serve, so stopping
serve (`stop`, `kill`) leaves it running, as a restart must. `close` stops everything:
serve, every data plane under the root, then whatever is still mounted below the root.

Layout under `root` that these helpers read: `dataplane/<generation>/{pid,sock,fuse/}`
for each data plane generation, and `mnt/<layer id>` where each lazily served layer is
mounted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .procs import ManagedProcess, unix_socket_accepts, unmount_below, wait_until

DATAPLANE_DIR = "dataplane"
MNT_DIR = "mnt"


@dataclass
class Lazysnap:
    """`lazysnap serve` on a unix socket, with its state under `root`.

    `cwd` is the directory serve runs in: `python -m snapshotter` imports the package
    from there first, so pointing it at the parent of a copy of `snapshotter/` runs
    that copy (an "upgraded" daemon).
    """

    root: Path
    address: Path
    log_path: Path
    config: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    cwd: Path | None = None
    proc: ManagedProcess | None = field(default=None, init=False)

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "snapshotter", "serve",
                "--root", str(self.root), "--address", str(self.address), "--log-level", "debug"]
        if self.config is not None:
            argv += ["--config", str(self.config)]
        return argv + self.extra_args

    def spawn(self) -> ManagedProcess:
        """Start serve without waiting for its socket (e.g. one that is expected to refuse to run)."""
        self.proc = ManagedProcess("lazysnap", self.argv(), self.log_path, env=self.env, cwd=self.cwd).start()
        return self.proc

    def start(self, timeout: float = 30.0) -> Lazysnap:
        proc = self.spawn()
        wait_until(lambda: unix_socket_accepts(self.address), timeout, "lazysnap socket", proc)
        return self

    @property
    def pid(self) -> int | None:
        """Serve's pid while it runs."""
        return self.proc.popen.pid if self.proc is not None and self.proc.running and self.proc.popen else None

    def stop(self) -> int | None:
        """SIGTERM serve's process group (escalating to SIGKILL); data planes keep running."""
        return self.proc.stop() if self.proc is not None else None

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int | None:
        """Send `sig` to serve's process alone (as systemd's KillMode=process does) and reap it.

        Serve's exit status, or None if it was not running. A serve that has not exited
        `timeout` seconds after the signal is killed with SIGKILL.
        """
        if self.proc is None or self.proc.popen is None:
            return None
        popen = self.proc.popen
        if popen.poll() is None:
            try:
                os.kill(popen.pid, sig)
            except ProcessLookupError:
                pass
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(timeout)
        return popen.returncode

    def restart(self) -> Lazysnap:
        self.stop()
        return self.start()

    # ------------------------------------------------------------------ data planes

    @property
    def dataplane_dir(self) -> Path:
        return self.root / DATAPLANE_DIR

    @property
    def mnt_dir(self) -> Path:
        return self.root / MNT_DIR

    def dataplanes(self) -> dict[int, int]:
        """Generation -> pid of every data plane under the root whose process is alive."""
        out = {}
        for gen, pid in self._recorded_dataplanes().items():
            if _is_dataplane(pid):
                out[gen] = pid
        return out

    def dataplane_pids(self) -> list[int]:
        """Pids of the live data planes under the root, oldest generation first."""
        planes = self.dataplanes()
        return [planes[g] for g in sorted(planes)]

    def _recorded_dataplanes(self) -> dict[int, int]:
        """Generation -> the pid its `pid` file names (alive or not)."""
        out = {}
        try:
            entries = list(self.dataplane_dir.iterdir())
        except OSError:
            return out
        for entry in entries:
            try:
                gen = int(entry.name)
                pid = int((entry / "pid").read_text().strip())
            except (OSError, ValueError):
                continue
            out[gen] = pid
        return out

    def stop_dataplanes(self, timeout: float = 10.0) -> None:
        """SIGTERM every live data plane under the root, wait up to `timeout`, then SIGKILL what is left."""
        pids = self.dataplane_pids()
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_is_dataplane(p) for p in pids):
            time.sleep(0.05)
        left = [p for p in pids if _is_dataplane(p)]
        for pid in left:
            _signal(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_is_dataplane(p) for p in left):
            time.sleep(0.05)

    def close(self) -> None:
        """Stop serve and every data plane under the root, then drop any mount left behind."""
        try:
            self.stop()
        finally:
            try:
                self.stop_dataplanes()
            finally:
                unmount_below(self.root)

    def log_text(self) -> str:
        return self.proc.log_text() if self.proc is not None else ""

    def log_tail(self) -> str:
        return self.proc.log_tail() if self.proc is not None else ""


def mounts_below(path: Path) -> list[tuple[Path, str]]:
    """(mountpoint, filesystem type) of everything mounted strictly below `path`, in mount order.

    A mountpoint appears once per mount stacked on it, so a mount left under a newer one shows.
    """
    base = os.path.realpath(path) + "/"
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].startswith(base):
                out.append((Path(fields[4]), fields[fields.index("-") + 1]))
    return out


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _is_dataplane(pid: int) -> bool:
    """Whether `pid` is a live (not zombie) data plane process.

    Checked by its command line (`python -m snapshotter.dataplane ...`), so that a pid
    file left by a dead data plane never makes the harness signal whatever process has
    reused the pid since.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    if state in ("Z", "X"):
        return False
    return b"dataplane" in cmdline
