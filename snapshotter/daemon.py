"""`lazysnap serve`: the control plane containerd talks to.

One trio event loop owns everything that lives as long as the daemon: the registry
client, the layer manager's background resolutions and fetches, the pulls `lazysnap
rpull` asks for, and the channels to the data planes. The gRPC server's worker threads
call into the snapshotter, which reaches the trio side through `trio.from_thread`.

The FUSE mount is not ours: it belongs to a data plane process (`dataplane/`), which
this daemon adopts if one is running and starts otherwise, and which outlives it, so
that stopping, killing or upgrading the daemon never breaks a running container.

Start-up order matters: the root and socket are claimed first (one daemon per root);
the data planes are adopted, layers restored and the snapshot directories reconciled
with the store before the socket accepts a call; systemd is told READY only then. On
SIGTERM the socket closes; the data planes serve on.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import trio

from . import cri_proxy, metrics, root_lock, service
from .cache import ChunkCache
from .config import Config
from .containerd.pull import Puller
from .dataplane.client import DataPlanes, PlaneOptions
from .fetch.background import BackgroundOptions
from .layers.manager import LayerManager, ManagerOptions, open_manager, start_background
from .mounts import overlay_index_off
from .registry.client import RegistryClient
from .registry.credentials import Renewals
from .registry.cri_credentials import CriCredentials
from .registry.errors import RegistryError
from .registry.keychain import Keychain
from .registry.options import RegistryOptions
from .registry.reference import parse as parse_reference
from .sdnotify import notify
from .snapshots import Snapshotter
from .store import Store

log = logging.getLogger(__name__)


async def serve(config: Config) -> None:
    cri = CriCredentials() if config.cri_image_service_address is not None else None
    keychain = Keychain.for_options(registry_options(config), cri)  # a broken provider config stops us here
    lock = root_lock.claim(config.root, config.address)
    store = Store(config.root / "metadata.db")
    try:
        async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
            remote = None
            if config.lazy:
                remote = await stack.enter_async_context(_open_lazy_side(config, store, keychain))
            snapshotter = Snapshotter(config.root, store, index_off=overlay_index_off(), remote=remote)
            await trio.to_thread.run_sync(snapshotter.cleanup)
            puller = Puller(nursery, remote.registry if remote else None, remote.explain if remote else None,
                            remote.warm if remote else None, remote.expect if remote else None)
            # The handler is in place before the socket accepts: a SIGTERM as soon as it does (systemd,
            # a test) stops the daemon cleanly; CI once killed it in the gap between the two. It is
            # gone again before the shutdown, so that a second signal still stops a stuck one.
            server = proxy = None
            try:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    server = service.start_server(snapshotter, config.address, config.grpc_workers, status=remote,
                                                  puller=puller, registry=registry_options(config),
                                                  renewed=functools.partial(last_renewed, keychain.renewals))
                    if cri is not None and config.cri_image_service_address is not None:
                        proxy = cri_proxy.start(config.cri_image_service_address, config.cri_containerd_address,
                                                cri, config.grpc_workers)
                    log.info("serving containerd snapshots API on %s (root %s, lazy %s)", config.address,
                             config.root, "on" if config.lazy else "off")
                    if config.metrics_address and remote is not None:
                        stack.callback(metrics.serve(config.metrics_address, remote.metrics))
                    notify("READY=1")
                    async for signum in signals:
                        log.info("received %s, shutting down (data planes keep serving running containers)",
                                 signal.Signals(signum).name)
                        break
            finally:
                notify("STOPPING=1")
                if proxy is not None:  # first: a pull it forwards may still need the snapshots API
                    await trio.to_thread.run_sync(proxy.stop)
                if server is not None:
                    await trio.to_thread.run_sync(server.stop(grace=5).wait)
                config.address.unlink(missing_ok=True)
                nursery.cancel_scope.cancel()
    finally:
        store.close()
        os.close(lock)


@asynccontextmanager
async def _open_lazy_side(config: Config, store: Store, keychain: Keychain) -> AsyncIterator[LayerManager]:
    """Registry client, chunk cache, data planes and layer manager, torn down in reverse (data planes stay)."""
    async with RegistryClient(registry_options(config), keychain=keychain) as registry:
        cache = ChunkCache(config.root / "cache", config.cache_max_mib << 20)
        planes = DataPlanes(PlaneOptions(config.root, read_timeout=config.read_timeout,
                                         fuse_xattrs=config.fuse_xattrs, log_level=config.log_level))
        background = BackgroundOptions(quiet=config.background_quiet_seconds,
                                       rate=config.background_rate_mib * (1 << 20))
        manager_options = ManagerOptions(resolve_timeout=config.resolve_timeout,
                                         allow_unverified=config.allow_unverified, prefetch=config.prefetch,
                                         record_profiles=config.record_profiles,
                                         profile_seconds=config.profile_seconds,
                                         fetch_concurrency=config.fetch_concurrency,
                                         readahead_max=config.readahead_max_mib << 20,
                                         kernel_metadata=config.kernel_metadata, fuse_xattrs=config.fuse_xattrs,
                                         background=background if config.background_fetch else None)
        async with open_manager(config.root, store, registry, cache, planes, manager_options) as manager:
            planes.on_lost = manager.served.reattach
            await planes.open(manager.nursery, manager)
            await manager.served.restore()
            manager.nursery.start_soon(start_background, manager)
            yield manager


def last_renewed(renewals: Renewals, image: str) -> float:
    """When credentials were last obtained for `image`'s registry and repository (0: never, or not a reference)."""
    try:
        ref = parse_reference(image)
    except RegistryError:
        return 0.0
    return renewals.last(ref.domain, ref.path)


def registry_options(config: Config) -> RegistryOptions:
    """The registry settings of `config`: where hosts.toml files and credentials are."""
    return RegistryOptions(certs_dir=config.certs_dir, docker_config=config.docker_config,
                           credential_provider_config=config.image_credential_provider_config,
                           credential_provider_bin_dir=config.image_credential_provider_bin_dir)


def run(config: Config) -> None:
    trio.run(serve, config)
