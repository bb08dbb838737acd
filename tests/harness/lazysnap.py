"""A real `lazysnap serve` process for tests."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from .procs import ManagedProcess, unix_socket_accepts, unmount_below, wait_until


@dataclass
class Lazysnap:
    """`lazysnap serve` on a unix socket, with its state under `root`."""

    root: Path
    address: Path
    log_path: Path
    config: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    proc: ManagedProcess | None = field(default=None, init=False)

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "snapshotter", "serve",
                "--root", str(self.root), "--address", str(self.address), "--log-level", "debug"]
        if self.config is not None:
            argv += ["--config", str(self.config)]
        return argv + self.extra_args

    def start(self, timeout: float = 30.0) -> Lazysnap:
        self.proc = ManagedProcess("lazysnap", self.argv(), self.log_path, env=self.env).start()
        wait_until(lambda: unix_socket_accepts(self.address), timeout, "lazysnap socket", self.proc)
        return self

    def stop(self) -> int | None:
        return self.proc.stop() if self.proc is not None else None

    def restart(self) -> Lazysnap:
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the daemon and drop any mount it left behind."""
        self.stop()
        unmount_below(self.root)

    def log_tail(self) -> str:
        return self.proc.log_tail() if self.proc is not None else ""
