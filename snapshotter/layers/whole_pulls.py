"""Layers pulled whole by lazysnap, started as soon as it is known that they cannot be lazy.

containerd prepares an image's layers one after another, bottom up, waiting for each. Pulled
only at its own Prepare, every unindexed layer would wait for the ones below it. But the
first Prepare of an image resolves all its layers at once (`manager.py`), so a layer without
an index is known long before its Prepare: its pull starts then, here, LAYERS_AT_ONCE at a
time, into a directory of its own, and its Prepare claims the result (waiting if need be)
and moves it into the snapshot. A layer can be applied before the layers below it exist:
only the attributes of parent directories it does not list come from below
(`whole.apply.copy_up_parents`, run by the caller at claim).

A result nobody claims (the pull was abandoned, or the layer turned out lazy after all) is
deleted UNCLAIMED_TTL after it finished, checked whenever a pull starts; the directory is
emptied at every start of the daemon.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import outcome
import trio

from ..registry.client import RegistryClient
from ..registry.errors import RegistryUnavailable
from ..whole.pull import PulledLayer, pull_layer

log = logging.getLogger(__name__)

DIR = "whole"
"""Under the root, beside `snapshots/` (a rename moves a result into its snapshot)."""
LAYERS_AT_ONCE = 3
"""Layers pulled ahead at once, each with `whole.pull.CONNECTIONS` range GETs in flight
(memory: at most 3 x 16 MiB of segments); the layer a Prepare waits for is never queued."""
UNCLAIMED_TTL = 600.0
"""Seconds a finished pull waits for its Prepare before its directory is deleted."""


@dataclass(eq=False)
class _Pull:
    image_ref: str
    dir: Path
    done: trio.Event = field(default_factory=trio.Event)
    result: outcome.Outcome | None = None
    finished: float = 0.0


class WholePulls:
    """Pulls of whole layers ahead of their Prepare, by layer digest; tasks live in `nursery`."""

    def __init__(self, registry: RegistryClient, root: Path, nursery: trio.Nursery) -> None:
        self.registry = registry
        self.dir = root / DIR
        self.nursery = nursery
        self._limiter = trio.CapacityLimiter(LAYERS_AT_ONCE)
        self._pulls: dict[str, _Pull] = {}

    def clear(self) -> None:
        """Blocking, at start: what an earlier daemon left is unclaimable."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)

    def start(self, image_ref: str, digest: str) -> None:
        """Start pulling layer `digest` of `image_ref`, unless it is under way or waiting to be claimed.

        A pull that failed is started afresh: its Prepare never came (the image's pull stopped
        at a layer below), and what failed it (a full disk, a registry) may be mended now."""
        self._expire()
        earlier = self._pulls.get(digest)
        if earlier is not None and not (earlier.done.is_set() and isinstance(earlier.result, outcome.Error)):
            return
        self._pulls[digest] = pull = _Pull(image_ref, self.dir / f"{digest.partition(':')[2][:16]}-"
                                                               f"{secrets.token_hex(4)}")
        self.nursery.start_soon(self._run, pull, digest)

    def started(self, digest: str) -> bool:
        return digest in self._pulls

    async def claim(self, image_ref: str, digest: str, dest: Path) -> PulledLayer:
        """Layer `digest` applied in `dest` (an empty directory, replaced): the pull started ahead
        if there was one and it worked, else one now. Raises the pull's error."""
        pull = self._pulls.get(digest)
        if pull is not None:
            await pull.done.wait()
            if self._pulls.get(digest) is pull:
                del self._pulls[digest]
                assert pull.result is not None
                try:
                    pulled = pull.result.unwrap()
                except (RegistryUnavailable, OSError) as e:  # may be mended: try again now, the Prepare waits anyway
                    log.info("layer %s: the pull started ahead failed (%s); pulling it again", digest, e)
                else:
                    await trio.to_thread.run_sync(_move, pull.dir, dest)
                    return pulled
                finally:
                    if not isinstance(pull.result, outcome.Value):
                        await trio.to_thread.run_sync(shutil.rmtree, pull.dir, True)
        return await pull_layer(self.registry, image_ref, digest, dest)

    async def _run(self, pull: _Pull, digest: str) -> None:
        try:
            async with self._limiter:
                await trio.to_thread.run_sync(pull.dir.mkdir)
                pull.result = await outcome.acapture(pull_layer, self.registry, pull.image_ref, digest, pull.dir)
            if isinstance(pull.result, outcome.Error):
                log.warning("layer %s of %s: pulling it whole ahead of its Prepare failed: %s", digest,
                            pull.image_ref, pull.result.error)
                await trio.to_thread.run_sync(shutil.rmtree, pull.dir, True)  # half applied: of no use
        finally:
            if pull.result is None:  # cancelled: the daemon is stopping
                pull.result = outcome.Error(RegistryUnavailable("the pull was cancelled"))
            pull.finished = time.monotonic()
            pull.done.set()

    def _expire(self) -> None:
        now = time.monotonic()
        for digest, pull in list(self._pulls.items()):
            if pull.done.is_set() and now - pull.finished > UNCLAIMED_TTL:
                del self._pulls[digest]
                log.info("layer %s was pulled whole ahead but never claimed; deleting it", digest)
                self.nursery.start_soon(trio.to_thread.run_sync, _remove, pull.dir)


def _remove(path: Path) -> None:
    """shutil.rmtree(path, ignore_errors=True) as a plain function, which start_soon(run_sync, ...) can type-check."""
    shutil.rmtree(path, ignore_errors=True)


def _move(src: Path, dest: Path) -> None:
    """Replace the empty directory `dest` with `src` (same filesystem: one rename)."""
    os.rmdir(dest)
    os.rename(src, dest)
