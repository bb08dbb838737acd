"""The control plane's side: find the data planes under the root, adopt or start one, attach and detach layers.

At start, every `<root>/dataplane/<n>/` is asked `hello`. One that does not answer is
gone (SIGKILLed, or the node rebooted): its dead FUSE mount is dropped and its
directory removed. The newest live generation built from the same code as this control
plane is adopted, with the layers it serves; otherwise a new generation is started.
Older generations are *retired*: they keep serving their layers, so no running
container notices an upgrade, and exit once the last of them is released.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from ..atomic import write_atomically
from ..layers import erofs
from ..layers.served import AttachError, PlaneStats
from ..store import LayerRecord
from . import DIR, MNT_DIR
from .wire import PROTOCOL, Channel, ChannelClosed, Message, RemoteError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
"""A data plane that does not answer `hello` in this long is taken for dead."""
STATS_TIMEOUT = 2.0
"""A data plane that does not report its counters in this long is left out of `status` and metrics."""
START_TIMEOUT = 30.0
"""How long a new data plane may take to mount and listen."""


class DataPlaneError(AttachError):
    """A data plane could not be started, or would not attach a layer; the message says why."""


class UnitServer(Protocol):
    """What answers a data plane's calls: the layer manager."""

    async def serve_unit(self, layer: str, key: str) -> bytes:
        """The verified bytes of one unit of `layer` (a digest), fetched if missing."""
        ...

    def first_reads(self, layers: dict[str, list[list[int]]]) -> None:
        """Units read for the first time, per layer digest: [[blob start, blob end], ...]."""
        ...


@dataclass(frozen=True)
class PlaneOptions:
    root: Path
    read_timeout: float = 30.0
    fuse_xattrs: bool = True
    cache_dir: Path | None = None
    log_level: str = "info"


@dataclass(eq=False)
class _Generation:
    number: int
    dir: Path
    channel: Channel
    build: str
    pid: int
    layers: set[int] = field(default_factory=set)
    retiring: bool = False
    popen: subprocess.Popen[bytes] | None = None


@functools.cache
def build_id() -> str:
    """A digest of this package's source: a data plane of another build is retired, not adopted."""
    package = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        h.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


class DataPlanes:
    """Every live data plane generation under one root, and which layers each serves."""

    def __init__(self, options: PlaneOptions, on_lost: Callable[[list[int]], Awaitable[None]] | None = None) -> None:
        self.options = options
        self.base = options.root / DIR
        self.mnt_dir = options.root / MNT_DIR
        self.on_lost = on_lost
        """Called with the layers of a data plane that died, to attach them to a new one."""
        self.build = build_id()
        self._generations: dict[int, _Generation] = {}
        self._server: UnitServer | None = None
        self._nursery: trio.Nursery | None = None
        self._start_lock = trio.Lock()

    def layer_path(self, layer_id: int) -> Path:
        return self.mnt_dir / str(layer_id)

    def served(self) -> set[int]:
        return {layer for g in self._generations.values() for layer in g.layers}

    def generations(self) -> list[dict[str, object]]:
        """Each live data plane, oldest first, in the shape of the Status API's `DataPlane`."""
        return [{"generation": g.number, "pid": g.pid, "retiring": g.retiring, "layers": len(g.layers),
                 "build": g.build} for g in sorted(self._generations.values(), key=lambda g: g.number)]

    async def open(self, nursery: trio.Nursery, server: UnitServer) -> None:
        """Adopt the data planes still running, clear dead ones, and retire those of another build."""
        self._nursery, self._server = nursery, server
        self.base.mkdir(parents=True, exist_ok=True)
        self.mnt_dir.mkdir(parents=True, exist_ok=True)
        for number in sorted(_numbers(self.base)):
            gen = await self._adopt(number)
            if gen is None:
                await self._clear(number)
            else:
                log.info("adopted data plane %d (pid %d, build %s) serving %d layers", number, gen.pid,
                         gen.build[:12], len(gen.layers))
        await self._current()

    async def attach(self, record: LayerRecord, kernel_metadata: bool) -> str:
        """Serve `record` at `<root>/mnt/<id>` from the current data plane: "erofs" or "fuse" metadata."""
        gen = next((g for g in self._generations.values() if record.id in g.layers), None)
        if gen is None:
            gen = await self._current()
        try:
            answer = await gen.channel.call("attach", record=dataclasses.asdict(record), erofs=kernel_metadata)
        except (ChannelClosed, RemoteError) as e:
            raise DataPlaneError(f"data plane {gen.number}: {e}") from None
        gen.layers.add(record.id)
        return str(answer.header["metadata"])

    async def detach(self, layer_id: int) -> None:
        for gen in list(self._generations.values()):
            if layer_id in gen.layers:
                try:
                    await gen.channel.call("detach", layer=layer_id)
                except (ChannelClosed, RemoteError) as e:
                    log.warning("data plane %d could not detach layer %d: %s", gen.number, layer_id, e)
                gen.layers.discard(layer_id)

    async def stats(self) -> PlaneStats:
        """FUSE request counters, cache hits and misses of reads, EIOs by cause: summed over the live data planes."""
        ops: dict[str, list[float]] = {}
        read_bytes = read_errors = hits = misses = 0
        failures: dict[str, int] = {}
        for gen in list(self._generations.values()):
            answer = {}
            with trio.move_on_after(STATS_TIMEOUT):
                try:
                    answer = (await gen.channel.call("stats")).header
                except (ChannelClosed, RemoteError):
                    pass
            if not answer:
                continue
            for op in answer["fuse"]["ops"]:
                total = ops.setdefault(op["name"], [0, 0.0])
                total[0] += op["count"]
                total[1] += op["seconds"]
            read_bytes += int(answer["fuse"]["read_bytes"])
            read_errors += int(answer["fuse"]["read_errors"])
            hits += int(answer["cache"]["hits"])
            misses += int(answer["cache"]["misses"])
            for cause, n in answer.get("read_failures", {}).items():
                failures[cause] = failures.get(cause, 0) + int(n)
        fuse = {"ops": [{"name": name, "count": int(c), "seconds": s}
                        for name, (c, s) in sorted(ops.items(), key=lambda item: (-item[1][0], item[0]))],
                "read_bytes": read_bytes, "read_errors": read_errors}
        return PlaneStats(fuse, hits, misses, failures)

    # -- generations -------------------------------------------------------------------

    async def _current(self) -> _Generation:
        """The generation new layers go to: the newest of our build, started if there is none."""
        async with self._start_lock:
            ours = [g for g in self._generations.values() if g.build == self.build and not g.retiring]
            current = max(ours, key=lambda g: g.number) if ours else None
            if current is None:
                current = await self._start(self._next_number())
            for gen in list(self._generations.values()):
                if gen is not current and not gen.retiring:
                    await self._retire(gen)
            return current

    def _next_number(self) -> int:
        """A generation number never used under this root, so logs never name two processes alike."""
        last = self.base / "last"
        try:
            used = int(last.read_text())
        except (OSError, ValueError):
            used = 0
        number = max([*_numbers(self.base), used]) + 1
        write_atomically(last, f"{number}\n".encode())
        return number

    async def _retire(self, gen: _Generation) -> None:
        reason = "another build" if gen.build != self.build else "an older generation"
        log.info("retiring data plane %d (%s): it serves its %d layers until they are released", gen.number,
                 reason, len(gen.layers))
        gen.retiring = True
        try:
            await gen.channel.call("retire")
        except (ChannelClosed, RemoteError) as e:
            log.warning("data plane %d: retire: %s", gen.number, e)

    async def _adopt(self, number: int, popen: subprocess.Popen[bytes] | None = None) -> _Generation | None:
        """Connect to a running generation and learn what it serves; None if it does not answer."""
        path = self.base / str(number) / "sock"
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                stream = await trio.open_unix_socket(str(path))
                channel = Channel(stream, {"fetch": self._fetch, "reads": self._reads}, name=f"data plane {number}")
                assert self._nursery is not None
                self._nursery.start_soon(channel.run)
                hello = (await channel.call("hello")).header
        except (OSError, trio.TooSlowError, ChannelClosed, RemoteError) as e:
            log.debug("data plane %d does not answer: %s", number, e)
            return None
        gen = _Generation(number, self.base / str(number), channel, str(hello["build"]), int(hello["pid"]),
                          set(hello["layers"]), bool(hello["retiring"]), popen)
        if hello.get("protocol") != PROTOCOL:
            log.error("data plane %d speaks protocol %s, not %d: retiring it (misses of its %d layers may fail)",
                      number, hello.get("protocol"), PROTOCOL, len(gen.layers))
            gen.build = f"protocol {hello.get('protocol')}"  # never adopted for new layers
        self._generations[number] = gen
        self._nursery.start_soon(self._watch, gen)
        return gen

    async def _start(self, number: int) -> _Generation:
        """Start data plane `number` in a session of its own, so that nothing that stops us stops it."""
        directory = self.base / str(number)
        directory.mkdir(parents=True, exist_ok=True)
        package_parent = str(Path(__file__).resolve().parent.parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_parent,
                                                                          os.environ.get("PYTHONPATH")])))
        read_end, write_end = os.pipe()
        argv = [sys.executable, "-m", "snapshotter.dataplane", "--root", str(self.options.root),
                "--generation", str(number), "--build", self.build, "--read-timeout", str(self.options.read_timeout),
                "--log-level", self.options.log_level, "--ready-fd", str(write_end)]
        if not self.options.fuse_xattrs:
            argv.append("--no-xattrs")
        if self.options.cache_dir is not None:
            argv += ["--cache-dir", str(self.options.cache_dir)]
        try:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, pass_fds=(write_end,), start_new_session=True,
                                     cwd="/", env=env)
        finally:
            os.close(write_end)
        try:
            with trio.move_on_after(START_TIMEOUT):
                ready = await trio.to_thread.run_sync(os.read, read_end, 16, abandon_on_cancel=True)
        finally:
            os.close(read_end)
        gen = await self._adopt(number, popen) if ready == b"ready\n" else None
        if gen is None:
            popen.kill()
            code = await trio.to_thread.run_sync(popen.wait)
            raise DataPlaneError(f"data plane {number} did not start (exit code {code}; its log is ours)")
        log.info("started data plane %d (pid %d)", number, popen.pid)
        return gen

    async def _watch(self, gen: _Generation) -> None:
        """When a data plane's channel ends: expected if it was retired and empty; else it died."""
        await gen.channel.closed.wait()
        await trio.lowlevel.checkpoint()  # we are shutting down (cancelled): the data plane is not gone
        self._generations.pop(gen.number, None)
        if gen.popen is not None:
            await trio.to_thread.run_sync(gen.popen.wait)
        if gen.retiring and not gen.layers:
            log.info("data plane %d has released its last layer and stopped", gen.number)
            return
        log.error("data plane %d (pid %d) is gone with %d layers: running containers that use them get EIO; "
                  "they are served again by a new data plane", gen.number, gen.pid, len(gen.layers))
        await self._clear(gen.number)
        if self.on_lost is not None and gen.layers:
            await self.on_lost(sorted(gen.layers))

    async def _clear(self, number: int) -> None:
        """Remove a dead generation: its stale FUSE mount, its directory, a hung process if one is left."""
        directory = self.base / str(number)
        pid = _pid_of(directory)
        if pid is not None and _is_dataplane(pid):
            log.warning("data plane %d (pid %d) is running but does not answer: killing it", number, pid)
            os.kill(pid, signal.SIGKILL)
        await trio.to_thread.run_sync(erofs.release, directory / "fuse")
        await trio.to_thread.run_sync(functools.partial(shutil.rmtree, directory, ignore_errors=True))
        log.info("cleared data plane %d's remains", number)

    # -- calls from data planes ----------------------------------------------------------

    async def _fetch(self, request: Message) -> Message:
        assert self._server is not None
        return Message({}, await self._server.serve_unit(str(request.header["layer"]), str(request.header["key"])))

    async def _reads(self, request: Message) -> Message:
        assert self._server is not None
        self._server.first_reads(request.header["layers"])
        return Message({})


def _numbers(base: Path) -> list[int]:
    return [int(p.name) for p in base.iterdir() if p.name.isdigit()] if base.is_dir() else []


def _pid_of(directory: Path) -> int | None:
    try:
        return int((directory / "pid").read_text())
    except (OSError, ValueError):
        return None


def _is_dataplane(pid: int) -> bool:
    try:
        return b"snapshotter.dataplane" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
