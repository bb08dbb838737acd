"""`lazysnap serve`: the long-running process containerd talks to.

One trio event loop owns everything that lives as long as the daemon: the FUSE mount
at `<root>/fuse` (one directory per lazily served layer), the registry client, the
layer manager's background resolutions, and the pulls `lazysnap rpull` asks for. The gRPC server's worker threads call into the
snapshotter, which reaches the trio side through `trio.from_thread`.

Start-up order matters: layers are restored from disk and the snapshot directories
reconciled with the store before the socket accepts a call; systemd is told READY
only then. On SIGTERM the socket closes first, then FUSE is unmounted.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import trio

from . import service
from .cache import ChunkCache
from .config import Config
from .containerd.pull import Puller
from .fuse.filesystem import LayerFilesystem
from .fuse.mount import clear_stale_mount, serve_fuse
from .layers.background import BackgroundOptions
from .layers.manager import LayerManager, ManagerOptions, open_manager
from .mounts import overlay_index_off
from .registry.client import RegistryClient
from .registry.options import RegistryOptions
from .sdnotify import notify
from .snapshots import FUSE_DIR, Snapshotter
from .store import Store

log = logging.getLogger(__name__)


async def serve(config: Config) -> None:
    config.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = Store(config.root / "metadata.db")
    try:
        async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
            remote = None
            if config.lazy:
                remote = await stack.enter_async_context(_open_lazy_side(config, store, nursery))
            snapshotter = Snapshotter(config.root, store, index_off=overlay_index_off(), remote=remote)
            await trio.to_thread.run_sync(snapshotter.cleanup)
            puller = Puller(nursery, remote.registry if remote else None, remote.explain if remote else None)
            server = service.start_server(snapshotter, config.address, config.grpc_workers, status=remote,
                                          puller=puller)
            log.info("serving containerd snapshots API on %s (root %s, lazy %s)", config.address, config.root,
                     "on" if config.lazy else "off")
            try:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    notify("READY=1")
                    async for signum in signals:
                        log.info("received %s, shutting down", signal.Signals(signum).name)
                        break
            finally:
                notify("STOPPING=1")
                await trio.to_thread.run_sync(lambda: server.stop(grace=5).wait())
                config.address.unlink(missing_ok=True)
                nursery.cancel_scope.cancel()
    finally:
        store.close()


@asynccontextmanager
async def _open_lazy_side(config: Config, store: Store, nursery: trio.Nursery) -> AsyncIterator[LayerManager]:
    """FUSE mount, registry client, chunk cache and layer manager, torn down in reverse."""
    mountpoint = config.root / FUSE_DIR
    if await clear_stale_mount(mountpoint):
        log.warning("cleared a stale FUSE mount at %s (left by a crashed lazysnap)", mountpoint)
    mountpoint.mkdir(exist_ok=True)
    fs = LayerFilesystem(read_timeout=config.read_timeout, xattrs=config.fuse_xattrs)
    await nursery.start(serve_fuse, mountpoint, fs)
    options = RegistryOptions(certs_dir=config.certs_dir, docker_config=config.docker_config)
    async with RegistryClient(options) as registry:
        cache = ChunkCache(config.root / "cache", config.cache_max_mib << 20)
        background = BackgroundOptions(quiet=config.background_quiet_seconds,
                                       rate=config.background_rate_mib * (1 << 20))
        manager_options = ManagerOptions(resolve_timeout=config.resolve_timeout,
                                         allow_unverified=config.allow_unverified, prefetch=config.prefetch,
                                         record_profiles=config.record_profiles,
                                         profile_seconds=config.profile_seconds,
                                         fetch_concurrency=config.fetch_concurrency,
                                         readahead_max=config.readahead_max_mib << 20,
                                         kernel_metadata=config.kernel_metadata,
                                         background=background if config.background_fetch else None)
        async with open_manager(config.root, mountpoint, store, registry, cache, fs, manager_options) as manager:
            yield manager


def run(config: Config) -> None:
    trio.run(serve, config)
