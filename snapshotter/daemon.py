"""`lazysnap serve`: the long-running process containerd talks to.

The daemon owns a trio event loop (where FUSE and fetching will live) and a gRPC
server, whose worker threads call into the snapshotter. Start-up reconciles the
snapshot directories with the store before the socket accepts a call; systemd is
told READY only once it does.
"""

from __future__ import annotations

import logging
import signal

import trio

from . import service
from .config import Config
from .mounts import overlay_index_off
from .sdnotify import notify
from .snapshots import Snapshotter
from .store import Store

log = logging.getLogger(__name__)


async def serve(config: Config) -> None:
    config.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = Store(config.root / "metadata.db")
    try:
        snapshotter = Snapshotter(config.root, store, index_off=overlay_index_off())
        snapshotter.cleanup()
        server = service.start_server(snapshotter, config.address, config.grpc_workers)
        log.info("serving containerd snapshots API on %s (root %s)", config.address, config.root)
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
    finally:
        store.close()


def run(config: Config) -> None:
    trio.run(serve, config)
