"""A private containerd 1.6 for tests: its own config, dirs and socket, torn down completely.

Nothing here touches /etc/containerd, /var/lib/containerd or a system containerd.
What containerd 1.6 and ctr put outside the configured dirs, and how we handle it:

- runc state (`/run/containerd/runc/<ns>` by default) and task I/O FIFOs
  (`/run/containerd/fifo`): `run_container` passes `--runc-root` and `--fifo-dir`
  under this instance's state dir.
- cgroups: ctr puts a container in `/<ns>/<id>` of every hierarchy and runc
  leaves the `/<ns>` parent behind; `run_container` uses `/<cgroup_parent>/<id>`
  instead and `stop()` removes that parent.
- shim sockets: `/run/containerd/s/<sha256(address/ns/id)>` is hard-coded in 1.6;
  the name includes our socket path, so it never collides with another instance,
  and `stop()` removes the ones a killed shim left behind (the empty
  `/run/containerd/s` directory itself stays).
- the `opt` plugin (`/opt/containerd`) and, with CRI, the CNI dirs are pointed
  into the temp dir by the generated config.
- CRI pod sandboxes ask runc for oom_score_adj -998, which needs CAP_SYS_RESOURCE (runc
  fails with "can't get final child's PID from pipe" without it, as in some CI
  containers): `restrict_oom_score_adj` keeps it no lower than containerd's own.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .procs import HarnessError, ManagedProcess, require_tool, run, unix_socket_accepts, unmount_below, wait_until

SHIM_SOCKET_DIR = Path("/run/containerd/s")

CONFIG_TEMPLATE = """\
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [{disabled}]

[grpc]
  address = "{address}"

[ttrpc]
  address = "{address}.ttrpc"

[debug]
  level = "debug"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
{cri}{proxy}"""

CRI_TEMPLATE = """
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snapshotter}"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni}/bin"
    conf_dir = "{cni}/net.d"
"""

PROXY_TEMPLATE = """
[proxy_plugins.{name}]
  type = "snapshot"
  address = "{address}"
"""


@dataclass
class Containerd:
    """containerd with its root, state and socket in one short temp dir.

    `snapshotter_address` is the unix socket of the proxy snapshotter registered
    as `[proxy_plugins.<proxy_name>]`; None registers none. CRI is disabled
    unless `keep_cri`; then it sends snapshot annotations (as lazysnap needs)
    and its CNI dirs live in the temp dir.
    """

    snapshotter_address: Path | None = None
    proxy_name: str = "lazysnap"
    keep_cri: bool = False
    cri_snapshotter: str = "overlayfs"     # with keep_cri: the snapshotter CRI pulls and runs with
    cri_sandbox_image: str = "registry.k8s.io/pause:3.6"
    workdir: Path | None = None
    proc: ManagedProcess | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="lzs-ctd-", dir="/tmp"))
        self.workdir = Path(self.workdir)
        if len(str(self.address)) + len(".ttrpc") > 100:
            raise HarnessError(f"containerd socket path too long: {self.address}")

    # ------------------------------------------------------------------ paths

    @property
    def root(self) -> Path:
        return self.workdir / "root"

    @property
    def state(self) -> Path:
        return self.workdir / "state"

    @property
    def address(self) -> Path:
        return self.workdir / "c.sock"

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.toml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "containerd.log"

    @property
    def runc_root(self) -> Path:
        return self.state / "runc"

    @property
    def fifo_dir(self) -> Path:
        return self.state / "fifo"

    @property
    def cgroup_parent(self) -> str:
        return self.workdir.name

    # ------------------------------------------------------------------ lifecycle

    def config_text(self) -> str:
        disabled = [] if self.keep_cri else ["io.containerd.grpc.v1.cri"]
        cri = ""
        if self.keep_cri:
            cri = CRI_TEMPLATE.format(snapshotter=self.cri_snapshotter, sandbox_image=self.cri_sandbox_image,
                                      cni=self.workdir / "cni")
        proxy = ""
        if self.snapshotter_address is not None:
            proxy = PROXY_TEMPLATE.format(name=self.proxy_name, address=self.snapshotter_address)
        return CONFIG_TEMPLATE.format(
            root=self.root, state=self.state, address=self.address, opt=self.workdir / "opt",
            disabled=", ".join(f'"{p}"' for p in disabled), cri=cri, proxy=proxy,
        )

    def start(self, timeout: float = 30.0) -> Containerd:
        binary = require_tool("containerd", "containerd")
        require_tool("ctr", "containerd")
        for d in (self.root, self.state, self.runc_root, self.fifo_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        self.proc = ManagedProcess("containerd", [binary, "--config", str(self.config_path)], self.log_path).start()
        wait_until(lambda: unix_socket_accepts(self.address), timeout, "containerd socket", self.proc)
        wait_until(self._serving, timeout, "containerd to answer ctr version", self.proc)
        return self

    def _serving(self) -> bool:
        return self.ctr("version", check=False, timeout=10).returncode == 0

    def stop(self) -> None:
        """Kill every task and container, stop containerd and its shims, unmount, delete `workdir`."""
        try:
            if self.proc is not None and self.proc.running:
                self._remove_workloads()
        finally:
            try:
                if self.proc is not None:
                    self.proc.stop()
            finally:
                self._kill_shims()
                self._delete_runc_containers()
                self._remove_cgroups()
                if self.workdir is not None:
                    unmount_below(self.workdir)
                    shutil.rmtree(self.workdir, ignore_errors=True)

    close = stop

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _remove_workloads(self) -> None:
        """Best effort: whatever fails here, stop() still kills shims and runc containers."""
        def ctr(*args: str, ns: str, timeout: float = 15) -> str:
            try:
                return self.ctr(*args, namespace=ns, check=False, timeout=timeout).stdout
            except HarnessError:  # timed out, e.g. when the snapshotter is wedged
                return ""

        for ns in ctr("namespaces", "ls", "-q", ns="default").split():
            for task in ctr("tasks", "ls", "-q", ns=ns).split():
                ctr("tasks", "kill", "-a", "-s", "SIGKILL", task, ns=ns)
                ctr("tasks", "delete", "-f", task, ns=ns)
            containers = ctr("containers", "ls", "-q", ns=ns).split()
            if containers:
                ctr("containers", "rm", *containers, ns=ns, timeout=30)

    def shim_pids(self) -> list[tuple[int, list[str]]]:
        """(pid, argv) of the containerd-shim processes started by this instance."""
        mine = []
        address = str(self.address)
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            args = [a.decode(errors="replace") for a in argv if a]
            if args and "containerd-shim" in os.path.basename(args[0]) and address in args:
                mine.append((int(entry), args))
        return mine

    def _kill_shims(self) -> None:
        for pid, args in self.shim_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            opts = dict(zip(args[1::2], args[2::2]))
            ns, cid = opts.get("-namespace"), opts.get("-id")
            if ns and cid:
                name = hashlib.sha256(os.path.join(str(self.address), ns, cid).encode()).hexdigest()
                (SHIM_SOCKET_DIR / name).unlink(missing_ok=True)
        deadline = time.monotonic() + 5
        while self.shim_pids() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _delete_runc_containers(self) -> None:
        """Containers whose shim died leave runc state and processes; runc cleans both up."""
        if not self.runc_root.is_dir():
            return
        runc = shutil.which("runc")
        if runc is None:
            return
        for ns_root in self.runc_root.iterdir():
            if not ns_root.is_dir():
                continue
            for cid in os.listdir(ns_root):
                subprocess.run([runc, "--root", str(ns_root), "delete", "--force", cid],
                               capture_output=True, timeout=30)

    def _remove_cgroups(self) -> None:
        remove_empty_cgroups(self.cgroup_parent)

    # ------------------------------------------------------------------ clients

    def ctr(self, *args: str, namespace: str = "default", timeout: float = 120.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """`ctr --address <sock> --namespace <ns> args...`; raises with output on failure if `check`."""
        argv = ["ctr", "--address", str(self.address), "--namespace", namespace, *args]
        try:
            return run(argv, timeout=timeout, check=check)
        except HarnessError as e:
            raise HarnessError(f"{e}\n{self.log_tail()}") from None

    def pull(self, ref: str, snapshotter: str, namespace: str = "default",
             timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """`ctr image pull --plain-http --snapshotter X ref` (downloads every blob, then unpacks)."""
        return self.ctr("images", "pull", "--plain-http", "--snapshotter", snapshotter, ref,
                        namespace=namespace, timeout=timeout)

    def run_container(self, ref: str, container_id: str, *cmd: str, snapshotter: str,
                      namespace: str = "default", timeout: float = 120.0, check: bool = True,
                      extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        """`ctr run --rm` with runc state and FIFOs kept under this instance's state dir."""
        return self.ctr("run", "--rm", "--snapshotter", snapshotter,
                        "--runc-root", str(self.runc_root), "--fifo-dir", str(self.fifo_dir),
                        "--cgroup", f"/{self.cgroup_parent}/{container_id}",
                        *extra, ref, container_id, *cmd,
                        namespace=namespace, timeout=timeout, check=check)

    def run_detached(self, ref: str, container_id: str, *cmd: str, snapshotter: str, namespace: str = "default",
                     timeout: float = 120.0) -> None:
        """`ctr run -d`: start a long-running container (e.g. `sleep 3600`) and return once its task runs.

        `stop()` kills and removes it, like every other container.
        """
        self.ctr("run", "-d", "--snapshotter", snapshotter,
                 "--runc-root", str(self.runc_root), "--fifo-dir", str(self.fifo_dir),
                 "--cgroup", f"/{self.cgroup_parent}/{container_id}",
                 ref, container_id, *cmd, namespace=namespace, timeout=timeout)

    def exec_argv(self, container_id: str, *cmd: str, exec_id: str | None = None,
                  namespace: str = "default") -> list[str]:
        """The `ctr tasks exec` command line (for a test that runs it in the background itself)."""
        exec_id = exec_id or f"x{time.monotonic_ns()}"
        return ["ctr", "--address", str(self.address), "--namespace", namespace, "tasks", "exec",
                "--exec-id", exec_id, "--fifo-dir", str(self.fifo_dir), container_id, *cmd]

    def exec(self, container_id: str, *cmd: str, exec_id: str | None = None, namespace: str = "default",
             timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`ctr tasks exec`: run `cmd` in a running container; ctr exits with the process's status
        (128 + the signal when a signal killed it)."""
        argv = self.exec_argv(container_id, *cmd, exec_id=exec_id, namespace=namespace)
        try:
            return run(argv, timeout=timeout, check=check)
        except HarnessError as e:
            raise HarnessError(f"{e}\n{self.log_tail()}") from None

    def wait_for_snapshotter(self, name: str, timeout: float = 15.0) -> None:
        """Wait until containerd has redialled a restarted proxy snapshotter (its backoff caps at 3 s)."""
        wait_until(lambda: self.ctr("snapshots", "--snapshotter", name, "ls", check=False, timeout=30).returncode == 0,
                   timeout, f"containerd to reach the restarted {name}")

    def gc(self, namespace: str = "default") -> None:
        """Run containerd's garbage collector now and wait for it (and its snapshotter passes).

        containerd schedules a GC after every deletion (a pull deletes its lease),
        and that GC removes every snapshot nothing references, including ones made
        by `ctr snapshots prepare/view`. Call this to let pending collections finish.
        """
        lease = f"lzs-gc-{time.monotonic_ns()}"
        self.ctr("leases", "create", "--id", lease, namespace=namespace, timeout=30)
        self.ctr("leases", "rm", "--sync", lease, namespace=namespace, timeout=60)

    def log_text(self) -> str:
        return self.proc.log_text() if self.proc is not None else ""

    def log_tail(self, lines: int = 40) -> str:
        return self.proc.log_tail(lines) if self.proc is not None else ""


def remove_empty_cgroups(name: str) -> None:
    """Remove cgroup `name` and its children, in the unified hierarchy and in each v1
    hierarchy, where they are empty (containers that exited leave them behind)."""
    base = Path("/sys/fs/cgroup")
    parents = [base / name]
    if base.is_dir():
        parents += [h / name for h in base.iterdir() if h.is_dir() and not h.is_symlink()]
    for parent in parents:
        if not parent.is_dir():
            continue
        for child in parent.iterdir():
            if child.is_dir():
                with contextlib.suppress(OSError):
                    child.rmdir()
        with contextlib.suppress(OSError):
            parent.rmdir()
