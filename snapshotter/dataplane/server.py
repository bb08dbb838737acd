"""The data plane process: one FUSE mount, the layers attached to it, and a line to the control plane.

It holds no registry client and no gRPC: every layer it serves is rebuilt from the files
the control plane saved (`layers/saved.py`), every byte it serves comes from the chunk
cache (read-only here) or from the control plane on a miss, and is verified here
before a reader sees it. While no control plane is connected, a miss waits for one;
the FUSE read's own `read_timeout` bounds the wait, and the reader then gets EIO.

The control plane connects to `<generation>/sock` and calls `hello`, `attach`,
`detach`, `stats` and `retire`; this side calls `fetch` (a unit it misses) and
`reads` (the first read of each unit, for start profiles). A new connection replaces
the old one: that is how a restarted control plane takes over.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import trio

from ..cache import ChunkCache
from ..fetch.blob import StoredBlob
from ..formats.errors import FormatError
from ..fuse.filesystem import LayerFilesystem
from ..fuse.mount import serve_fuse
from ..layer_modes import CHUNKED
from ..layers import device, erofs, saved
from ..layers.device import HeldUnits, MappedDevice
from ..layers.estargz import EStargzLayer
from ..layers.layer import ReadError
from ..layers.soci import SociLayer
from ..store import LayerRecord
from . import MNT_DIR
from .wire import PROTOCOL, Channel, ChannelClosed, Handler, Message, RemoteError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    root: Path
    generation: int
    build: str
    read_timeout: float = 30.0
    fuse_xattrs: bool = True
    cache_dir: Path | None = None
    """Default `<root>/cache`."""


@dataclass
class _Served:
    record: LayerRecord
    metadata: str
    """"erofs" (the kernel serves the tree, we serve its data device) or "fuse" (we serve the tree)."""
    device: MappedDevice | None = None
    """The data device, when it runs tasks of its own (stopped on detach)."""


class ControlLink:
    """The current control plane, as this data plane's layers see it (their `UnitSource`)."""

    def __init__(self) -> None:
        self.channel: Channel | None = None
        self._connected = trio.Event()
        self._reads: dict[str, set[int]] = {}
        """Per layer digest, the units whose first read was already reported."""
        self._pending: dict[str, list[list[int]]] = {}
        self._wake = trio.Event()

    def connect(self, channel: Channel) -> None:
        self.channel = channel
        self._connected.set()

    def disconnect(self, channel: Channel) -> None:
        if self.channel is channel:
            self.channel = None
            self._connected = trio.Event()

    async def fetch(self, layer: str, key: str) -> bytes:
        """Ask the control plane for a unit; wait for one to connect (the caller's read timeout bounds it)."""
        while True:
            channel = self.channel
            if channel is None:
                log.info("a read of layer %s waits for the control plane", layer)
                await self._connected.wait()
                continue
            try:
                return (await channel.call("fetch", layer=layer, key=key)).payload
            except ChannelClosed:
                self.disconnect(channel)  # it went away mid-call: ask the next one
            except RemoteError as e:
                raise ReadError(str(e)) from None

    def touch(self, layer: str, start: int, end: int) -> None:
        """A unit of `layer` was read (a layer's `recordings` hook): reported once per unit."""
        seen = self._reads.setdefault(layer, set())
        if start in seen:
            return
        seen.add(start)
        self._pending.setdefault(layer, []).append([start, end])
        self._wake.set()

    async def report_reads(self) -> None:
        """Send first reads in batches, as fast as the control plane takes them; none are queued while it is away."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            pending, self._pending = self._pending, {}
            channel = self.channel
            if channel is not None:
                try:
                    await channel.call("reads", layers=pending)
                except (ChannelClosed, RemoteError) as e:
                    log.debug("first reads not reported: %s", e)

    def forget(self, layer: str) -> None:
        self._reads.pop(layer, None)


class DataPlane:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = settings.root / "dataplane" / str(settings.generation)
        self.fuse_dir = self.dir / "fuse"
        self.mnt_dir = settings.root / MNT_DIR
        self.fs = LayerFilesystem(read_timeout=settings.read_timeout, xattrs=settings.fuse_xattrs)
        self.cache = ChunkCache(settings.cache_dir or settings.root / "cache", max_bytes=1 << 62, writer=False)
        self.held = HeldUnits()
        self.link = ControlLink()
        self.layers: dict[int, _Served] = {}
        self.retiring = False
        self.done = trio.Event()
        """Set to stop: a signal, or retired with nothing left to serve."""
        self._nursery: trio.Nursery | None = None
        """`run`'s, where each served layer's own tasks run."""
        self._readahead_warned = False
        """The kernel could not raise a mount's readahead: said once as a warning, then at debug level."""
        self._handlers: dict[str, Handler] = {"hello": self._hello, "attach": self._attach,
                                              "detach": self._detach, "stats": self._stats, "retire": self._retire}

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mnt_dir.mkdir(parents=True, exist_ok=True)
        sock = self.dir / "sock"
        sock.unlink(missing_ok=True)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(serve_fuse, self.fuse_dir, self.fs)
            listener = trio.SocketListener(await _listen(sock))
            (self.dir / "pid").write_text(f"{os.getpid()}\n")
            nursery.start_soon(self._accept, listener)
            nursery.start_soon(self.link.report_reads)
            nursery.start_soon(self._signals)
            log.info("data plane %d (build %s, pid %d) serving at %s", self.settings.generation,
                     self.settings.build[:12], os.getpid(), self.fuse_dir)
            task_status.started()
            await self.done.wait()
            await self._unmount_all()
            nursery.cancel_scope.cancel()
        (self.dir / "pid").unlink(missing_ok=True)
        sock.unlink(missing_ok=True)
        log.info("data plane %d stopped", self.settings.generation)

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s: unmounting %d layers and stopping", signal.Signals(signum).name,
                         len(self.layers))
                self.done.set()
                return

    async def _accept(self, listener: trio.SocketListener) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                nursery.start_soon(self._serve_connection, await listener.accept())

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        """Serve one control plane until it goes. The newest connection wins: the one before
        it is closed, and misses waiting on it ask the new one."""
        channel = Channel(stream, self._handlers, name="control plane")
        old = self.link.channel
        self.link.connect(channel)
        if old is not None:
            await trio.aclose_forcefully(old.stream)
        log.info("control plane connected")
        try:
            await channel.run()
        finally:
            self.link.disconnect(channel)
            log.info("control plane disconnected; reads that miss wait for the next one")

    # -- calls from the control plane -------------------------------------------------

    async def _hello(self, request: Message) -> Message:
        return Message({"protocol": PROTOCOL, "build": self.settings.build, "generation": self.settings.generation,
                        "pid": os.getpid(),
                        "layers": sorted(self.layers), "retiring": self.retiring})

    async def _attach(self, request: Message) -> Message:
        """Serve a layer from its saved files and mount it at `<root>/mnt/<id>`; how its metadata is served."""
        record = LayerRecord(**request.header["record"])
        if record.id in self.layers:
            return Message({"metadata": self.layers[record.id].metadata})
        name = str(record.id)
        target = self.mnt_dir / name
        await trio.to_thread.run_sync(erofs.release, target)  # a dead mount a lost data plane left
        metadata = ""
        mapped: MappedDevice | None = None
        if request.header.get("erofs"):
            try:
                data_device = await self._device(record)
                self.fs.attach(name, data_device)
                try:
                    await trio.to_thread.run_sync(erofs.mount, saved.files_of(self.settings.root, record).meta,
                                                  self.fuse_dir / name / "data", target)
                    await self._raise_readahead(target)
                    metadata = "erofs"
                    if isinstance(data_device, MappedDevice) and self._nursery is not None:
                        mapped = data_device
                        await self._nursery.start(mapped.run)
                except OSError:
                    await self.fs.detach(name)
                    raise
            except (OSError, FormatError, RemoteError) as e:
                log.warning("layer %s: metadata served by FUSE, not EROFS: %s", record.digest, e)
        if not metadata:
            self.fs.attach(name, await self._load(record))
            try:
                await trio.to_thread.run_sync(erofs.bind, self.fuse_dir / name, target)
            except OSError as e:
                await self.fs.detach(name)
                raise RemoteError(f"cannot mount layer {record.digest} at {target}: {e}") from None
            metadata = "fuse"
        self.layers[record.id] = _Served(record, metadata, mapped)
        log.info("serving layer %s at %s (metadata by %s)", record.digest, target, metadata)
        return Message({"metadata": metadata})

    async def _raise_readahead(self, mountpoint: Path) -> None:
        """Best effort: where the kernel cannot raise it, cached reads stay at 128 KiB requests."""
        try:
            await trio.to_thread.run_sync(raise_readahead, mountpoint, EROFS_READAHEAD_KB)
        except OSError as e:
            log.log(logging.DEBUG if self._readahead_warned else logging.WARNING,
                    "cannot raise the readahead of %s (%s): its data device is read 128 KiB at a time",
                    mountpoint, e)
            self._readahead_warned = True

    async def _device(self, record: LayerRecord) -> MappedDevice | erofs.DataDevice:
        """The layer's data device: from its device map (eStargz, zstd:chunked: no TOC to parse), else from its zTOC."""
        files = saved.files_of(self.settings.root, record)
        if record.format in CHUNKED:
            mapped = device.decode(await trio.to_thread.run_sync(files.device.read_bytes))
            served = MappedDevice(mapped, record.digest, self.cache, self.link, self.held)
            served.recordings.append(self.link)
            return served
        size, extents = saved.decode_extents(await trio.to_thread.run_sync(files.extents.read_bytes))
        return erofs.DataDevice(await self._load(record), size, extents)

    async def _load(self, record: LayerRecord) -> EStargzLayer | SociLayer:
        """The whole layer, tree included, from its saved index."""
        blob = StoredBlob(record.digest, record.blob_size)
        try:
            layer = await trio.to_thread.run_sync(saved.load_layer, self.settings.root, record, blob, self.cache,
                                                  None, self.link)
        except (OSError, FormatError) as e:
            raise RemoteError(f"cannot load layer {record.digest}: {e}") from None
        layer.recordings.append(self.link)
        return layer

    async def _detach(self, request: Message) -> Message:
        layer_id = int(request.header["layer"])
        served = self.layers.pop(layer_id, None)
        if served is not None:
            await self._unmount(layer_id)
            if served.device is not None:
                served.device.stop()
            self.link.forget(served.record.digest)
            log.info("stopped serving layer %s", served.record.digest)
        if self.retiring and not self.layers:
            self.done.set()
        return Message({})

    async def _stats(self, request: Message) -> Message:
        stats = self.cache.stats
        return Message({"fuse": self.fs.stats.report(), "cache": {"hits": stats.hits, "misses": stats.misses},
                        "read_failures": self.fs.stats.failures()})

    async def _retire(self, request: Message) -> Message:
        """A newer generation takes new layers: stop once the last of ours is released."""
        self.retiring = True
        log.info("retiring: %d layers left to serve", len(self.layers))
        if not self.layers:
            self.done.set()
        return Message({"layers": sorted(self.layers)})

    async def _unmount(self, layer_id: int) -> None:
        name = str(layer_id)
        try:
            await trio.to_thread.run_sync(erofs.release, self.mnt_dir / name)
        except OSError as e:
            log.warning("cannot unmount layer %d: %s", layer_id, e)
        if name in self.fs.layers():
            await self.fs.detach(name)

    async def _unmount_all(self) -> None:
        for layer_id in list(self.layers):
            await self._unmount(layer_id)


EROFS_READAHEAD_KB = 4096
"""Readahead of each layer's EROFS mount, which sets how large the reads of its data device are.

A file-backed EROFS mount has a bdi of its own (`erofs-<n>`) at the kernel's default 128 KiB,
so a sequential reader got 128 KiB FUSE reads with two in flight, each costing ~0.5-1 ms here:
a 1 GiB file read from the chunk cache (page cache dropped) ran at 225 MB/s (median of 3,
`python -m benchmarks.cached_read`), 306 MB/s on a second pass. At 4 MiB the kernel sends
1 MiB reads (FUSE's largest), several in flight: about 2.5x faster (up to 870 MB/s on a quiet
machine). 1 MiB was slower (400-750 MB/s); 16 MiB no faster than 4 on that pass. Bytes fetched
barely change: readahead stays within the file being read, and its window grows only while
reads stay sequential; a random reader (fadvise RANDOM) gets none."""
FS_IOC_GETFSSYSFSPATH = (2 << 30) | (129 << 16) | (0x15 << 8) | 1
"""_IOR(0x15, 1, struct fs_sysfs_path {u8 len; u8 name[128]}): a superblock's sysfs name (Linux 6.9+)."""


def raise_readahead(mountpoint: Path, kb: int) -> int:
    """Set the readahead of the file-backed EROFS mount at `mountpoint`; what is now set.

    The kernel names the mount's sysfs directory after its bdi (`erofs/erofs-<n>`, and
    `/sys/class/bdi/erofs-<n>`). OSError where the kernel cannot say.
    """
    buf = bytearray(129)
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FS_IOC_GETFSSYSFSPATH, buf)
    finally:
        os.close(fd)
    name = bytes(buf[1:1 + buf[0]]).decode(errors="replace").rpartition("/")[2]
    if not name.startswith("erofs-"):
        raise OSError(errno.ENODEV, f"{name!r} is not a file-backed EROFS mount's bdi")
    knob = Path("/sys/class/bdi") / name / "read_ahead_kb"
    knob.write_text(f"{kb}\n")
    try:
        return int(knob.read_text())
    except ValueError as e:
        raise OSError(errno.EINVAL, f"{knob} reads {e}") from None


async def _listen(path: Path) -> trio.socket.SocketType:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(16)
    except OSError as e:
        sock.close()
        raise OSError(e.errno or errno.EIO, f"cannot listen on {path}: {e}") from None
    return sock
