"""A shaped link to a registry: its own network namespace, a veth pair, `tbf` both ways,
and a user-space delay proxy for round-trip time. Or, with `loopback`, none of that.

    root namespace (containerd, lazysnap, ctr)          namespace lzsb-reg
    10.213.7.1/30  lzsb0 ──── veth ──── lzsb1  10.213.7.2/30
      tbf (requests)                     tbf (responses)
                                         delayproxy 10.213.7.2:5000 ──▶ docker-registry 127.0.0.1:5001

The addresses are a private /30 that exists only on this veth pair; nothing leaves the
machine. This kernel has `tbf` but no `netem` (checked: `tc qdisc add ... netem` says
"Specified qdisc kind is unknown"), hence the proxy (`benchmarks/delayproxy.py`).

`ShapedLink` is a context manager; everything it made (processes, qdiscs, veths, the
namespace) is removed on exit, also after an error or Ctrl-C, and leftovers of an
earlier crashed run are removed before starting. `python -m benchmarks.netem` checks the
link: latency of a small request, throughput of a large one, and the proxy's CPU cost.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from tests.harness.procs import (
    HarnessError,
    ManagedProcess,
    require_tool,
    run,
    wait_until,
)
from tests.harness.registry import CONFIG_TEMPLATE, Registry

NAMESPACE = "lzsb-reg"
VETH_ROOT, VETH_NS = "lzsb0", "lzsb1"
ADDR_ROOT, ADDR_NS, PREFIX = "10.213.7.1", "10.213.7.2", 30
PROXY_PORT, REGISTRY_PORT = 5000, 5001

_RATE = re.compile(r"^(\d+(?:\.\d+)?)(kbit|mbit|gbit|bit)$")
_TIME = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|us)$")


def parse_rate(text: str) -> float:
    """'100mbit' -> bits per second."""
    m = _RATE.match(text.strip().lower())
    if not m:
        raise ValueError(f"rate must look like 100mbit, 1gbit, 500kbit; got {text!r}")
    return float(m[1]) * {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[m[2]]


def parse_time(text: str) -> float:
    """'20ms' -> seconds."""
    m = _TIME.match(text.strip().lower())
    if not m:
        raise ValueError(f"time must look like 20ms, 0.1s; got {text!r}")
    return float(m[1]) * {"s": 1.0, "ms": 1e-3, "us": 1e-6}[m[2]]


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    return run(argv, check=check, timeout=30)


def cleanup_leftovers() -> None:
    """Remove the namespace and veth of an earlier run that did not get to clean up."""
    if subprocess.run(["ip", "link", "show", VETH_ROOT], capture_output=True, check=False).returncode == 0:
        subprocess.run(["ip", "link", "del", VETH_ROOT], capture_output=True, check=False)
    if NAMESPACE in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout.split():
        # Any process still living in it would keep it alive: stop those first.
        pids = subprocess.run(["ip", "netns", "pids", NAMESPACE], capture_output=True, text=True, check=False).stdout.split()
        for pid in pids:
            subprocess.run(["kill", "-9", pid], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", NAMESPACE], capture_output=True, check=False)


@dataclass
class NetnsRegistry(Registry):
    """The harness registry, started inside the namespace on its loopback, over a shared storage dir."""

    namespace: str = NAMESPACE
    storage: Path | None = None

    def start(self, timeout: float = 30.0) -> NetnsRegistry:
        binary = require_tool("docker-registry", "docker-registry")
        assert self.workdir is not None and self.storage is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.yml"
        config.write_text(CONFIG_TEMPLATE.format(storage=self.storage, port=self.port))
        self.proc = ManagedProcess("docker-registry", ["ip", "netns", "exec", self.namespace, binary, "serve",
                                                       str(config)], self.log_path).start()
        wait_until(self._in_ns_answers, timeout, f"registry in {self.namespace}", self.proc)
        return self

    def _in_ns_answers(self) -> bool:
        return subprocess.run(["ip", "netns", "exec", self.namespace, sys.executable, "-c",
                               (f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{self.port}/v2/', "
                               "timeout=1)")], capture_output=True, check=False).returncode == 0


@dataclass
class ShapedLink:
    """The registry behind a shaped link (or on loopback), for the duration of a `with` block.

    `rate` is a tc rate ('100mbit'), `rtt` seconds. `storage` is the registry's
    filesystem storage (shared across runs, never written by the benchmark).
    `host` is what image references and hosts.toml use.
    """

    storage: Path
    workdir: Path
    rate: str = "100mbit"
    rtt: float = 0.020
    loopback: bool = False
    registry: Registry | None = field(default=None, init=False)
    proxy: ManagedProcess | None = field(default=None, init=False)
    _made: bool = field(default=False, init=False)

    @property
    def host(self) -> str:
        assert self.registry is not None
        return self.registry.host if self.loopback else f"{ADDR_NS}:{PROXY_PORT}"

    @property
    def proxy_stats_path(self) -> Path:
        return self.workdir / "proxy-stats.json"

    def describe(self) -> str:
        return "loopback (unshaped)" if self.loopback else f"{self.rate}, {self.rtt * 1000:g} ms RTT (tbf + delay proxy)"

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def make_link(self) -> None:
        """The namespace, the veth pair between it and us, and tbf shaping on both ends."""
        _ip("ip", "netns", "add", NAMESPACE)
        _ip("ip", "link", "set", "lo", "up", ns=NAMESPACE)
        _ip("ip", "link", "add", VETH_ROOT, "type", "veth", "peer", "name", VETH_NS)
        _ip("ip", "link", "set", VETH_NS, "netns", NAMESPACE)
        _ip("ip", "addr", "add", f"{ADDR_ROOT}/{PREFIX}", "dev", VETH_ROOT)
        _ip("ip", "link", "set", VETH_ROOT, "up")
        _ip("ip", "addr", "add", f"{ADDR_NS}/{PREFIX}", "dev", VETH_NS, ns=NAMESPACE)
        _ip("ip", "link", "set", VETH_NS, "up", ns=NAMESPACE)
        for dev, ns in ((VETH_ROOT, None), (VETH_NS, NAMESPACE)):
            _ip("tc", "qdisc", "add", "dev", dev, "root", *self.tbf_args(), ns=ns)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.loopback:
            self.registry = _StorageRegistry(workdir=self.workdir / "registry", storage=self.storage).start()
            return
        require_tool("tc", "iproute2")
        cleanup_leftovers()
        self._made = True
        self.make_link()
        self.registry = NetnsRegistry(workdir=self.workdir / "registry", port=REGISTRY_PORT,
                                      storage=self.storage).start()
        self.proxy = ManagedProcess("delayproxy", [
            "ip", "netns", "exec", NAMESPACE, sys.executable, "-m", "benchmarks.delayproxy",
            "--listen", f"{ADDR_NS}:{PROXY_PORT}", "--upstream", f"127.0.0.1:{REGISTRY_PORT}",
            "--delay", f"{self.rtt / 2:.6f}", "--stats", str(self.proxy_stats_path)],
            self.workdir / "delayproxy.log", cwd=Path(__file__).resolve().parent.parent).start()
        wait_until(self._answers, 30, "registry through the delay proxy", self.proxy)

    def tbf_args(self) -> list[str]:
        """tbf: the token bucket holds a few ms of traffic; the queue about 50 ms of it."""
        bps = parse_rate(self.rate) / 8
        burst = max(16 * 1024, int(bps * 0.004))
        limit = max(64 * 1024, int(bps * 0.050))
        return ["tbf", "rate", self.rate, "burst", str(burst), "limit", str(limit)]

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def proxy_stats(self) -> dict:
        """The delay proxy's counters and CPU seconds (empty on loopback)."""
        if self.loopback:
            return {}
        try:
            return json.loads(self.proxy_stats_path.read_text())
        except (OSError, ValueError):
            return {}

    def tc_stats(self) -> str:
        if self.loopback:
            return ""
        a = _ip("tc", "-s", "qdisc", "show", "dev", VETH_ROOT, check=False).stdout
        b = _ip("tc", "-s", "qdisc", "show", "dev", VETH_NS, ns=NAMESPACE, check=False).stdout
        return a + b

    def close(self) -> None:
        """Stop processes, then remove qdiscs, veths and the namespace. Safe to call twice."""
        for proc in (self.proxy, self.registry.proc if self.registry is not None else None):
            if proc is not None:
                try:
                    proc.stop()
                except Exception as e:  # noqa: BLE001 (whatever it was, keep tearing down)
                    print(f"warning: stopping {proc.name}: {e}", file=sys.stderr)
        if self._made:
            subprocess.run(["tc", "qdisc", "del", "dev", VETH_ROOT, "root"], capture_output=True, check=False)
            subprocess.run(["ip", "netns", "exec", NAMESPACE, "tc", "qdisc", "del", "dev", VETH_NS, "root"],
                           capture_output=True, check=False)
            cleanup_leftovers()
            self._made = False


@dataclass
class _StorageRegistry(Registry):
    """The harness registry on a loopback port, over a storage dir kept elsewhere."""

    storage: Path | None = None

    def start(self, timeout: float = 30.0) -> _StorageRegistry:
        assert self.workdir is not None and self.storage is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        link = self.workdir / "storage"
        if not link.exists():
            link.symlink_to(self.storage, target_is_directory=True)
        return super().start(timeout)  # type: ignore[return-value]


# --------------------------------------------------------------------------- self-check

def selfcheck(rate: str, rtt: float, size_mib: int = 64) -> dict:
    """Measure the link: a tiny GET's latency (new connection and reused), a large GET's throughput,
    and the delay proxy's CPU seconds per GB. Serves a file from a Python HTTP server in the namespace.

    Uses a fake 'storage' dir: the file server, not docker-registry, answers on the upstream port.
    """
    tmp = Path(tempfile.mkdtemp(prefix="lzsb-net-", dir="/var/tmp"))
    link = ShapedLink(storage=tmp, workdir=tmp / "link", rate=rate, rtt=rtt)
    server = None
    try:
        (tmp / "www").mkdir()
        (tmp / "www" / "v2").mkdir()
        (tmp / "www" / "v2" / "index.html").write_text("{}")
        with open(tmp / "www" / "big", "wb") as f:
            f.write(os.urandom(size_mib << 20))
        (tmp / "www" / "small").write_bytes(b"x" * 100)
        # Stand in for the registry: a static file server on the namespace's loopback.
        link.registry = None
        cleanup_leftovers()
        link._made = True
        link.workdir.mkdir(parents=True)
        link.make_link()
        server = ManagedProcess("http.server", ["ip", "netns", "exec", NAMESPACE, sys.executable, "-m", "http.server",
                                                "--bind", "127.0.0.1", "--directory", str(tmp / "www"),
                                                str(REGISTRY_PORT)], tmp / "http.log").start()
        link.proxy = ManagedProcess("delayproxy", [
            "ip", "netns", "exec", NAMESPACE, sys.executable, "-m", "benchmarks.delayproxy",
            "--listen", f"{ADDR_NS}:{PROXY_PORT}", "--upstream", f"127.0.0.1:{REGISTRY_PORT}",
            "--delay", f"{rtt / 2:.6f}", "--stats", str(link.proxy_stats_path)],
            tmp / "delayproxy.log", cwd=Path(__file__).resolve().parent.parent).start()
        base = f"http://{ADDR_NS}:{PROXY_PORT}"

        def get(path: str) -> bytes:
            with urllib.request.urlopen(base + path, timeout=60) as resp:
                return resp.read()

        wait_until(lambda: _try(lambda: get("/small")), 30, "file server through the proxy", link.proxy)
        small = []
        for _ in range(10):
            t = time.monotonic()
            get("/small")
            small.append(time.monotonic() - t)
        proxy_before = _wait_stats(link)
        t = time.monotonic()
        body = get("/big")
        elapsed = time.monotonic() - t
        time.sleep(0.7)
        proxy_after = _wait_stats(link)
        assert len(body) == size_mib << 20
        forwarded = proxy_after["bytes_down"] + proxy_after["bytes_up"] - proxy_before["bytes_down"] - proxy_before["bytes_up"]
        cpu = proxy_after["cpu_seconds"] - proxy_before["cpu_seconds"]
        return {
            "link": link.describe(),
            "small_get_new_connection_ms": sorted(small)[len(small) // 2] * 1000,
            "large_get_mbit_per_s": len(body) * 8 / elapsed / 1e6,
            "large_get_seconds": elapsed,
            "proxy_cpu_seconds_per_gb": cpu / (forwarded / 1e9) if forwarded else None,
            "proxy_cpu_share_of_one_core": cpu / elapsed,
            "tc": link.tc_stats(),
        }
    finally:
        if server is not None:
            server.stop()
        link.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _try(fn) -> bool:
    try:
        fn()
        return True
    except OSError:
        return False


def _wait_stats(link: ShapedLink) -> dict:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        s = link.proxy_stats()
        if s:
            return s
        time.sleep(0.1)
    raise HarnessError("delay proxy wrote no stats")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Check the shaped link: latency, throughput, proxy CPU.")
    p.add_argument("--rate", default="100mbit")
    p.add_argument("--rtt", default="20ms")
    p.add_argument("--size-mib", type=int, default=64)
    args = p.parse_args(argv)
    result = selfcheck(args.rate, parse_time(args.rtt), args.size_mib)
    tc = result.pop("tc")
    print(json.dumps(result, indent=2))
    print(tc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
