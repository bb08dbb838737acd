"""`lazysnap rpull`: pull an image into containerd so that its layers can be served lazily.

It does what containerd's own unpacker does, with the remote-snapshot labels on every
Prepare: containerd passes them to lazysnap, which serves the layer lazily or pulls it
whole itself, and either way answers AlreadyExists, so that containerd downloads nothing.
The same mechanism serves the ctr-remote and CRI paths; rpull adds the manifest and config
to containerd's content store, the image record, and a report of how each layer came.

Unlike containerd's unpacker, a layer that cannot be lazy does not make every layer above
it fall back too: each layer gets its own chance to be lazy.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import trio

from .. import labels as L
from ..errors import AlreadyExists, NotFound, SnapshotterError
from ..layers.served import Explanation
from ..pull_records import (
    LayerOutcome,
    PrefetchEvent,
    PullEvent,
    PullOrder,
    PullReport,
    WarmReport,
)
from ..registry.client import RegistryClient
from ..registry.errors import RegistryError
from ..registry.manifest import Descriptor
from .client import ContainerdClient

if TYPE_CHECKING:
    from ..layers.warming import Warming

log = logging.getLogger(__name__)


class PullError(SnapshotterError):
    """The image could not be pulled (the message says which step failed)."""


class _SnapshotGone(Exception):
    """A layer snapshot this pull counted on was removed under it: containerd's garbage collector
    took what an earlier, failed pull left, between two Prepares. containerd's own unpacker
    retries then too; the new attempt's Prepares hold the pull's lease on what they find."""


UNPACK_ATTEMPTS = 3


Ending = TypeVar("Ending", PullReport, WarmReport)
"""The report a pull (`PullReport`) or a prefetch (`WarmReport`) ends its stream of events with."""


def chain_ids(diff_ids: list[str]) -> list[str]:
    """containerd's snapshot names for a layer stack (the OCI ChainID of each prefix)."""
    out: list[str] = []
    for diff_id in diff_ids:
        out.append(diff_id if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest())
    return out


async def rpull(ref: str, *, registry: RegistryClient, containerd: ContainerdClient, snapshotter: str = "lazysnap",
                explain: Callable[[str], Explanation] | None = None,
                progress: Callable[[str], None] = lambda line: None,
                expect: Callable[[L.LayerRequest], None] | None = None) -> PullReport:
    """Pull `ref` into containerd for `snapshotter`; `explain(digest)` says how lazysnap obtained a layer.

    `expect(request)` (the daemon's layer manager) hears of the image as soon as its manifest
    is resolved, with what its first Prepare will say, so that its layers' indexes are fetched
    while the config is fetched and containerd's content, lease and Prepares go by.
    """
    start = time.monotonic()
    manifest = await registry.resolve(ref)
    image_name = str(manifest.ref)
    if expect is not None and manifest.layers:
        # The snapshot names (chain IDs) need the config; resolving a layer does not use them.
        described = tuple(manifest.layers)
        first = L.LayerRequest.from_labels(_layer_labels(
            ImageLayers(snapshotter, image_name, manifest.digest, described, tuple(d.digest for d in described)), 0))
        if first is not None:
            expect(first)
    config_desc = manifest.config
    config_raw = await registry.fetch_blob(ref, config_desc.digest)
    try:
        diff_ids = list(json.loads(config_raw)["rootfs"]["diff_ids"])
    except (ValueError, KeyError, TypeError) as e:
        raise PullError(f"image config {config_desc.digest} has no rootfs.diff_ids: {e}") from None
    layers = manifest.layers
    if len(diff_ids) != len(layers):
        raise PullError(f"manifest has {len(layers)} layers but the config lists {len(diff_ids)} diff ids")
    chain = chain_ids(diff_ids)
    progress(f"{image_name}: manifest {manifest.digest}, {len(layers)} layers")
    async with _leased(containerd):
        manifest_labels = {"containerd.io/gc.ref.content.config": config_desc.digest} | {
            f"containerd.io/gc.ref.content.l.{i}": layer.digest for i, layer in enumerate(layers)
        }
        await trio.to_thread.run_sync(containerd.write_content, config_desc, [config_raw], None)
        manifest_desc = Descriptor(manifest.media_type, manifest.digest, len(manifest.raw))
        await trio.to_thread.run_sync(containerd.write_content, manifest_desc, [manifest.raw], manifest_labels)
        image = ImageLayers(snapshotter, image_name, manifest.digest, tuple(layers), tuple(chain))
        outcomes = await unpack_image(containerd, image, explain, progress)
        await trio.to_thread.run_sync(
            containerd.set_content_labels, config_desc.digest,
            {f"containerd.io/gc.ref.snapshot.{snapshotter}": chain[-1]} if chain else {},
        )
        await trio.to_thread.run_sync(containerd.put_image, image_name, manifest_desc, None)
    return PullReport(image_name, manifest.digest, outcomes, time.monotonic() - start)


@dataclass(frozen=True)
class ImageLayers:
    """An image's layers to unpack for `snapshotter`, bottom up, with their snapshot names (chain IDs)."""

    snapshotter: str
    image_name: str
    manifest_digest: str
    layers: tuple[Descriptor, ...]
    chain: tuple[str, ...]


async def unpack_image(containerd: ContainerdClient, image: ImageLayers,
                       explain: Callable[[str], Explanation] | None,
                       progress: Callable[[str], None]) -> list[LayerOutcome]:
    """`_unpack_layers`, again from the bottom when a snapshot it counted on was collected meanwhile."""
    for attempt in range(1, UNPACK_ATTEMPTS + 1):
        try:
            return await _unpack_layers(containerd, image, explain, progress)
        except _SnapshotGone as e:
            if attempt == UNPACK_ATTEMPTS:
                raise PullError(f"{e} (gone {attempt} times: containerd kept collecting this image's "
                                "snapshots; try again)") from None
            log.info("pull of %s: %s; unpacking again (attempt %d)", image.image_name, e, attempt + 1)
            progress(f"  {e}: unpacking again")
    raise AssertionError("unreachable")


async def _unpack_layers(containerd: ContainerdClient, image: ImageLayers,
                         explain: Callable[[str], Explanation] | None,
                         progress: Callable[[str], None]) -> list[LayerOutcome]:
    """Prepare each layer on its parent, bottom up; how each came."""
    outcomes: list[LayerOutcome] = []
    parent = ""
    layers, chain = image.layers, image.chain
    for i, layer in enumerate(layers):
        layer_start = time.monotonic()
        labels = _layer_labels(image, i)
        await _unpack_layer(containerd, image.snapshotter, layer, chain[i], parent, labels, explain)
        explained = explain(layer.digest) if explain is not None else Explanation()
        outcome = LayerOutcome(layer.digest, layer.size, explained.mode, explained.reason,
                               time.monotonic() - layer_start)
        outcomes.append(outcome)
        progress(f"  layer {i + 1}/{len(layers)} {layer.digest[:19]}: {outcome.how} in {outcome.seconds:.2f} s"
                 + (f" ({outcome.reason})" if outcome.reason else ""))
        parent = chain[i]
    return outcomes


def _layer_labels(image: ImageLayers, i: int) -> dict[str, str]:
    """What the Prepare of layer `i` tells lazysnap: the CRI labels, and the layer's own annotations for it."""
    layer = image.layers[i]
    labels = L.cri_labels(image.chain[i], image.image_name, image.manifest_digest, layer.digest,
                          [above.digest for above in image.layers[i:]])
    return labels | {k: v for k, v in layer.annotations.items() if k.startswith(L.PREFIX)}


async def _unpack_layer(containerd: ContainerdClient, snapshotter: str, layer: Descriptor, chain_id: str,
                        parent: str, labels: dict[str, str], explain: Callable[[str], Explanation] | None) -> None:
    """Have lazysnap obtain the layer (it answers the Prepare AlreadyExists); PullError if it could not."""
    key = f"extract-{time.time_ns()}-{secrets.token_hex(4)} {chain_id}"
    try:
        await trio.to_thread.run_sync(containerd.prepare, snapshotter, key, parent, labels)
    except AlreadyExists:
        if not await trio.to_thread.run_sync(containerd.snapshot_exists, snapshotter, chain_id):
            raise _SnapshotGone(f"layer {layer.digest} was answered as existing, then its snapshot "
                                f"{chain_id} was gone") from None
        return
    except NotFound:
        if parent and not await trio.to_thread.run_sync(containerd.snapshot_exists, snapshotter, parent):
            raise _SnapshotGone(f"the snapshot {parent} below layer {layer.digest} was gone") from None
        raise
    # Ordinary mounts: lazysnap neither serves the layer nor could pull it. Nothing to unpack into.
    with trio.CancelScope(shield=True):
        try:
            await trio.to_thread.run_sync(containerd.remove_snapshot, snapshotter, key)
        except SnapshotterError:
            pass
    if explain is None:
        raise PullError(f"layer {layer.digest}: lazysnap serves no layers itself (lazy = false); "
                        "pull with `ctr image pull --snapshotter lazysnap` instead")
    raise PullError(f"layer {layer.digest}: lazysnap could not obtain it: {explain(layer.digest).reason}")


@asynccontextmanager
async def _leased(containerd: ContainerdClient) -> AsyncIterator[None]:
    """`containerd.lease()`, its blocking calls kept off the trio thread (in the daemon, FUSE runs there)."""
    lease = containerd.lease()
    await trio.to_thread.run_sync(lease.__enter__)
    try:
        yield
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(lease.__exit__, None, None, None)


class Puller:
    """Runs `rpull` inside the daemon, on its trio loop, for `lazysnap rpull` and `lazysnap prefetch`.

    The daemon has the pull machinery imported (a fresh client process spends ~0.5 s on
    that before its first request), its registry connections warm, and each layer's
    status at hand to say how the layer is served.
    """

    def __init__(self, nursery: trio.Nursery, registry: RegistryClient | None,
                 explain: Callable[[str], Explanation] | None,
                 warm: Callable[[PullReport], Warming] | None = None,
                 expect: Callable[[L.LayerRequest], None] | None = None) -> None:
        """`warm` starts warming a pulled image's lazy layers, `expect` starts resolving them (the
        layer manager's; None when lazy is off)."""
        self.nursery = nursery
        self.token = trio.lowlevel.current_trio_token()
        self.registry = registry
        self.explain = explain
        self.warm = warm
        self.expect = expect

    def start(self, order: PullOrder, emit: Callable[[PullEvent], None]) -> Callable[[], None]:
        """From any thread: start pulling; `emit` gets every event on the trio thread.

        Returns a function that cancels the pull (the caller went away), safe from any thread.
        """
        return self._start(order, functools.partial(self._pull, order, emit), emit, "pull")

    def start_prefetch(self, order: PullOrder, wait: bool,
                       emit: Callable[[PrefetchEvent], None]) -> Callable[[], None]:
        """`start`, then warm the image's layers; with `wait`, follow the warming to its end.

        The returned function cancels the pull, or stops following the warming: a warming
        once started is the daemon's (the operator asked for it), and runs on.
        """
        return self._start(order, functools.partial(self._prefetch, order, wait, emit), emit, "prefetch")

    def _start(self, order: PullOrder, job: Callable[[], Awaitable[Ending]],
               emit: Callable[[Ending | SnapshotterError], None], what: str) -> Callable[[], None]:
        scope = trio.CancelScope()
        trio.from_thread.run_sync(self.nursery.start_soon, self._run, order, job, emit, scope, what,
                                  trio_token=self.token)

        def cancel() -> None:
            try:
                self.token.run_sync_soon(scope.cancel)
            except trio.RunFinishedError:
                pass  # the daemon has stopped, and the pull with it

        return cancel

    async def _run(self, order: PullOrder, job: Callable[[], Awaitable[Ending]],
                   emit: Callable[[Ending | SnapshotterError], None], scope: trio.CancelScope, what: str) -> None:
        """Always ends with one report or error, so the client's stream always ends: every error of a
        pull becomes its client's here, as lazysnap's error (the service gives it its status code)."""
        outcome: Ending | SnapshotterError = PullError(f"the {what} of {order.ref} was cancelled")
        try:
            with scope:
                try:
                    outcome = await job()
                except SnapshotterError as e:
                    outcome = e
                except RegistryError as e:
                    outcome = PullError(str(e))
                except Exception as e:
                    log.exception("pulling %s failed", order.ref)
                    outcome = PullError(f"internal error: {e!r}")
        finally:
            emit(outcome)

    async def _prefetch(self, order: PullOrder, wait: bool, emit: Callable[[PrefetchEvent], None]) -> WarmReport:
        if self.warm is None:
            raise PullError("this lazysnap serves no layers lazily (lazy = false): there is nothing to warm")
        pulled = await self._pull(order, emit)
        emit(pulled)
        warming = self.warm(pulled)
        if wait:
            await warming.follow(emit)
        else:
            await warming.planned.wait()
        return warming.report()

    async def _pull(self, order: PullOrder, progress: Callable[[str], None]) -> PullReport:
        async with AsyncExitStack() as stack:
            registry = self.registry
            if registry is None or registry.options != order.registry:
                registry = await stack.enter_async_context(RegistryClient(order.registry))
            containerd = stack.enter_context(ContainerdClient(order.containerd, order.namespace))
            await trio.to_thread.run_sync(containerd.wait_ready, abandon_on_cancel=True)
            return await rpull(order.ref, registry=registry, containerd=containerd, snapshotter=order.snapshotter,
                               explain=self.explain, progress=progress, expect=self.expect)
