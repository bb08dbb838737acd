"""Real processes for tests: started with logs on disk, waited for, always stopped.

Every helper process a test starts (registry, containerd, lazysnap) goes through
`ManagedProcess`, so that a failing test still stops it and its log is at hand
for the failure message.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class HarnessError(RuntimeError):
    """A test prerequisite (tool, port, process) is missing or misbehaved."""


def require_tool(name: str, package: str | None = None) -> str:
    """Path of an executable, or a clear failure naming the package to install."""
    path = shutil.which(name)
    if path is None:
        hint = f" (apt-get install {package})" if package else ""
        raise HarnessError(f"required tool {name!r} is not installed{hint}; run `make test`")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], bool], timeout: float, what: str, proc: ManagedProcess | None = None) -> None:
    """Poll `check` until true; fail with the process log if it dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.popen is not None and proc.popen.poll() is not None:
            raise HarnessError(f"{proc.name} exited with {proc.popen.returncode} before {what}\n{proc.log_tail()}")
        time.sleep(0.05)
    tail = proc.log_tail() if proc is not None else ""
    raise HarnessError(f"timed out after {timeout}s waiting for {what}\n{tail}")


def unix_socket_accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def tcp_port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class ManagedProcess:
    """One long-running child process whose output goes to `log_path`."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> ManagedProcess:
        if self.popen is not None and self.popen.poll() is None:
            raise HarnessError(f"{self.name} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.popen = subprocess.Popen(
                list(self.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        finally:
            log.close()
        return self

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal the process group, escalate to SIGKILL, reap. Safe to call twice."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(timeout)
        return self.popen.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        tail = "\n".join(self.log_text().splitlines()[-lines:])
        return f"--- last lines of {self.name} log ({self.log_path}) ---\n{tail}"


def run(argv: Sequence[str], *, timeout: float = 120.0, check: bool = True, env: dict[str, str] | None = None,
        input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run a short command; on failure raise with its full output."""
    try:
        result = subprocess.run(
            list(argv), capture_output=True, timeout=timeout, env=env, input=input,
        )
    except subprocess.TimeoutExpired as e:
        raise HarnessError(f"timed out after {timeout}s: {' '.join(argv)}") from e
    done = subprocess.CompletedProcess(
        result.args, result.returncode,
        result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace"),
    )
    if check and done.returncode != 0:
        raise HarnessError(
            f"command failed ({done.returncode}): {' '.join(argv)}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        )
    return done


def unmount_below(root: Path) -> None:
    """Lazily unmount everything mounted at or below `root`, deepest first."""
    root_s = os.path.realpath(root)
    with open("/proc/self/mountinfo") as f:
        targets = [line.split()[4] for line in f]
    below = [t for t in targets if t == root_s or t.startswith(root_s + "/")]
    for target in sorted(set(below), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)
