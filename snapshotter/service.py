"""The gRPC face of lazysnap: containerd's snapshots.v1 service on a unix socket,
and lazysnap's own Status and Images (pull, prefetch) services beside it.

The only server module that knows gRPC. Each handler converts the request to plain values,
calls the `Snapshotter` (or the layer manager, or the puller), and converts the answer
(typed records) into protobuf, here and nowhere else; lazysnap's typed errors become the
status codes containerd's errdefs expect, in the one table of `grpc_status.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import queue
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from .api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from .api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from .api.containerd.types import mount_pb2
from .api.lazysnap.v1 import pull_pb2, pull_pb2_grpc, status_pb2, status_pb2_grpc
from .errors import SnapshotterError
from .grpc_status import status_code
from .mounts import Mount
from .pull_records import PrefetchEvent, PullEvent, PullOrder, PullReport, WarmReport
from .registry.options import RegistryOptions
from .snapshots import Snapshotter
from .store import Snapshot

if TYPE_CHECKING:
    from .layers.served import StatusReport

log = logging.getLogger(__name__)

LIST_BATCH = 100
"""Infos per List message, as containerd's own snapshots service batches them."""

F = TypeVar("F", bound=Callable[..., Any])


def rpc(method: F) -> F:
    """Log the call and turn lazysnap errors into gRPC statuses."""

    @functools.wraps(method)
    def handler(self: SnapshotsService, request: Any, context: grpc.ServicerContext) -> Any:
        name = method.__name__
        start = time.monotonic()
        try:
            reply = method(self, request, context)
        except SnapshotterError as e:
            code = status_code(e)
            log.debug("%s %s -> %s: %s", name, _brief(request), code.name, e)
            context.abort(code, str(e))
        except Exception:
            log.exception("%s %s failed", name, _brief(request))
            context.abort(grpc.StatusCode.INTERNAL, f"{name}: internal error (see lazysnap log)")
        log.debug("%s %s ok in %.1f ms", name, _brief(request), (time.monotonic() - start) * 1000)
        return reply

    return cast(F, handler)


class SnapshotsService(pb_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: Snapshotter) -> None:
        self.snapshotter = snapshotter

    @rpc
    def Prepare(self, request: pb.PrepareSnapshotRequest, context: grpc.ServicerContext) -> pb.PrepareSnapshotResponse:
        mounts = self.snapshotter.prepare(request.key, request.parent, dict(request.labels))
        return pb.PrepareSnapshotResponse(mounts=to_pb_mounts(mounts))

    @rpc
    def View(self, request: pb.ViewSnapshotRequest, context: grpc.ServicerContext) -> pb.ViewSnapshotResponse:
        mounts = self.snapshotter.view(request.key, request.parent, dict(request.labels))
        return pb.ViewSnapshotResponse(mounts=to_pb_mounts(mounts))

    @rpc
    def Mounts(self, request: pb.MountsRequest, context: grpc.ServicerContext) -> pb.MountsResponse:
        return pb.MountsResponse(mounts=to_pb_mounts(self.snapshotter.mounts(request.key)))

    @rpc
    def Commit(self, request: pb.CommitSnapshotRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        self.snapshotter.commit(request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @rpc
    def Remove(self, request: pb.RemoveSnapshotRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        self.snapshotter.remove(request.key)
        return empty_pb2.Empty()

    @rpc
    def Stat(self, request: pb.StatSnapshotRequest, context: grpc.ServicerContext) -> pb.StatSnapshotResponse:
        return pb.StatSnapshotResponse(info=to_pb_info(self.snapshotter.stat(request.key)))

    @rpc
    def Update(self, request: pb.UpdateSnapshotRequest, context: grpc.ServicerContext) -> pb.UpdateSnapshotResponse:
        snap = self.snapshotter.update(request.info.name, dict(request.info.labels), list(request.update_mask.paths))
        return pb.UpdateSnapshotResponse(info=to_pb_info(snap))

    @rpc
    def List(self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext) -> Iterator[pb.ListSnapshotsResponse]:
        infos = [to_pb_info(s) for s in self.snapshotter.list(list(request.filters))]
        return iter([pb.ListSnapshotsResponse(info=infos[i:i + LIST_BATCH]) for i in range(0, len(infos), LIST_BATCH)])

    @rpc
    def Usage(self, request: pb.UsageRequest, context: grpc.ServicerContext) -> pb.UsageResponse:
        usage = self.snapshotter.usage(request.key)
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    @rpc
    def Cleanup(self, request: pb.CleanupRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        self.snapshotter.cleanup()
        return empty_pb2.Empty()


class StatusSource(Protocol):
    """What the Status API reports from (the layer manager, when lazy pulling is on)."""

    def report(self, digests: list[str]) -> StatusReport: ...


class StatusService(status_pb2_grpc.StatusServicer):
    def __init__(self, source: StatusSource | None, renewed: Callable[[str], float] = lambda image: 0.0) -> None:
        """`renewed(image reference)`: when credentials for the image's registry were last obtained (0: never)."""
        self.source = source
        self.renewed = renewed

    @rpc
    def Layers(self, request: status_pb2.LayersRequest, context: grpc.ServicerContext) -> status_pb2.LayersResponse:
        if self.source is None:
            return status_pb2.LayersResponse()
        return to_pb_status(self.source.report(list(request.digests)), self.renewed)


def to_pb_status(report: StatusReport, renewed: Callable[[str], float]) -> status_pb2.LayersResponse:
    return status_pb2.LayersResponse(
        layers=[status_pb2.Layer(
            digest=layer.digest, image_ref=layer.image_ref, mode=layer.mode or "", reason=layer.reason, size=layer.size,
            resolve_seconds=layer.resolve_seconds, path=layer.path, fetched_bytes=layer.fetched_bytes,
            fetch_state=layer.fetch_state, prefetched_bytes=layer.prefetched_bytes,
            background_bytes=layer.background_bytes, pull_seconds=layer.pull_seconds,
            content_bytes=layer.content_bytes, complete_bytes=layer.complete_bytes,
            credential_renewed=renewed(layer.image_ref)) for layer in report.layers],
        cache=status_pb2.Cache(bytes=report.cache.bytes, max_bytes=report.cache.max_bytes, hits=report.cache.hits,
                               misses=report.cache.misses, evictions=report.cache.evictions),
        fuse=status_pb2.Fuse(ops=[status_pb2.FuseOp(name=op.name, count=op.count, seconds=op.seconds)
                                  for op in report.fuse.ops],
                             read_bytes=report.fuse.read_bytes, read_errors=report.fuse.read_errors),
        data_planes=[status_pb2.DataPlane(generation=plane.generation, pid=plane.pid, retiring=plane.retiring,
                                          layers=plane.layers, build=plane.build) for plane in report.planes],
    )


class PullStarter(Protocol):
    """What the Images API pulls with (`containerd.pull.Puller`, in the daemon)."""

    def start(self, order: PullOrder, emit: Callable[[PullEvent], None]) -> Callable[[], None]: ...

    def start_prefetch(self, order: PullOrder, wait: bool,
                       emit: Callable[[PrefetchEvent], None]) -> Callable[[], None]: ...


class ImagesService(pull_pb2_grpc.ImagesServicer):
    def __init__(self, puller: PullStarter | None, registry: RegistryOptions | None = None) -> None:
        self.puller = puller
        self.registry = registry or RegistryOptions()
        """The daemon's registry settings; a request overrides where hosts.toml and config.json are."""

    def _order(self, request: pull_pb2.PullRequest) -> PullOrder:
        return PullOrder(
            ref=request.ref, namespace=request.namespace or "default", containerd=request.containerd_address,
            snapshotter=request.snapshotter or "lazysnap",
            registry=dataclasses.replace(
                self.registry, plain_http=request.plain_http,
                certs_dir=Path(request.certs_dir) if request.certs_dir else None,
                docker_config=Path(request.docker_config) if request.docker_config else None))

    def Pull(self, request: pull_pb2.PullRequest, context: grpc.ServicerContext) -> Iterator[pull_pb2.PullEvent]:
        puller = self.puller
        if puller is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this lazysnap does not pull images")
            return
        order = self._order(request)
        log.info("Pull %s for %s in namespace %s", order.ref, order.snapshotter, order.namespace)
        events: queue.SimpleQueue[PullEvent] = queue.SimpleQueue()
        context.add_callback(puller.start(order, events.put))  # the call ending early cancels the pull
        while True:
            event = events.get()
            if isinstance(event, str):
                yield pull_pb2.PullEvent(progress=event)
            elif isinstance(event, SnapshotterError):
                log.info("Pull %s failed: %s", order.ref, event)
                context.abort(status_code(event), str(event))
            else:
                yield pull_pb2.PullEvent(report=to_pb_report(event))
                return

    def Prefetch(self, request: pull_pb2.PrefetchRequest,
                 context: grpc.ServicerContext) -> Iterator[pull_pb2.PrefetchEvent]:
        puller = self.puller
        if puller is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this lazysnap does not pull images")
            return
        order = self._order(request.pull)
        log.info("Prefetch %s for %s in namespace %s%s", order.ref, order.snapshotter, order.namespace,
                 ", waiting" if request.wait else "")
        events: queue.SimpleQueue[PrefetchEvent] = queue.SimpleQueue()
        # The call ending early cancels the pull, or stops following the warming (which runs on).
        context.add_callback(puller.start_prefetch(order, request.wait, events.put))
        while True:
            event = events.get()
            if isinstance(event, str):
                yield pull_pb2.PrefetchEvent(progress=event)
            elif isinstance(event, PullReport):
                yield pull_pb2.PrefetchEvent(pulled=to_pb_report(event))
            elif isinstance(event, SnapshotterError):
                log.info("Prefetch %s failed: %s", order.ref, event)
                context.abort(status_code(event), str(event))
            else:
                yield pull_pb2.PrefetchEvent(report=to_pb_warm_report(event))
                return


def to_pb_warm_report(report: WarmReport) -> pull_pb2.WarmReport:
    return pull_pb2.WarmReport(
        image=report.image, manifest_digest=report.manifest_digest, seconds=report.seconds,
        sources=list(report.sources), note=report.note, finished=report.finished,
        layers=[pull_pb2.WarmedLayer(digest=layer.digest, content_bytes=layer.content_bytes,
                                     complete_bytes=layer.complete_bytes, fetched_bytes=layer.fetched_bytes,
                                     state=layer.state.phase.value, detail=layer.state.detail)
                for layer in report.layers])


def to_pb_report(report: PullReport) -> pull_pb2.PullReport:
    return pull_pb2.PullReport(
        image=report.image, manifest_digest=report.manifest_digest, seconds=report.seconds,
        layers=[pull_pb2.PulledLayer(digest=layer.digest, size=layer.size, how=layer.how, mode=layer.mode or "",
                                     reason=layer.reason, seconds=layer.seconds) for layer in report.layers])


def to_pb_mounts(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in mounts]


def to_pb_info(snap: Snapshot) -> pb.Info:
    return pb.Info(
        name=snap.key,
        parent=snap.parent,
        kind=pb.Kind.Name(int(snap.kind)),
        created_at=_timestamp(snap.created_ns),
        updated_at=_timestamp(snap.updated_ns),
        labels=snap.labels,
    )


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def _brief(request: Any) -> str:
    fields = {f.name: v for f, v in request.ListFields() if f.name != "snapshotter"}
    return " ".join(f"{k}={v!r}" if not hasattr(v, "ListFields") else f"{k}={{{_brief(v)}}}" for k, v in fields.items())


def start_server(snapshotter: Snapshotter, address: Path, workers: int = 16,
                 status: StatusSource | None = None, puller: PullStarter | None = None,
                 registry: RegistryOptions | None = None,
                 renewed: Callable[[str], float] = lambda image: 0.0) -> grpc.Server:
    """Serve on a unix socket only root can reach (mode 0600), replacing a stale socket.

    `renewed(image reference)` says when the Status API's layers last had their registry credentials renewed.
    """
    server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"))
    pb_grpc.add_SnapshotsServicer_to_server(SnapshotsService(snapshotter), server)
    status_pb2_grpc.add_StatusServicer_to_server(StatusService(status, renewed), server)
    pull_pb2_grpc.add_ImagesServicer_to_server(ImagesService(puller, registry), server)
    start_on_socket(server, address)
    return server


def start_on_socket(server: grpc.Server, address: Path) -> None:
    """Start `server` on the unix socket `address`, mode 0600 from its creation (only root may call),
    replacing a stale socket."""
    address.parent.mkdir(parents=True, exist_ok=True)
    address.unlink(missing_ok=True)
    old_umask = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix:{address}")
        server.start()
    finally:
        os.umask(old_umask)
    os.chmod(address, 0o600)
