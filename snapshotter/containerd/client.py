"""A small client for containerd's own gRPC API: what `lazysnap rpull` needs of it.

containerd scopes every call by the `containerd-namespace` header, and protects what a
pull writes from its garbage collector with a lease named in the `containerd-lease`
header. Calls are blocking (grpcio); async callers run them in a worker thread.
"""

from __future__ import annotations

import datetime
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from google.protobuf import field_mask_pb2

from ..api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from ..api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from ..api.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from ..api.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from ..api.containerd.types import descriptor_pb2, mount_pb2
from ..errors import AlreadyExists, SnapshotterError, Unavailable
from ..grpc_status import CLASSES, error_from_status
from ..mounts import Mount
from ..registry.manifest import Descriptor

WRITE_CHUNK = 1 << 20
"""Bytes per content Write message (gRPC's default message limit is 4 MiB)."""


def to_pb(desc: Descriptor) -> descriptor_pb2.Descriptor:
    return descriptor_pb2.Descriptor(
        media_type=desc.media_type, digest=desc.digest, size=desc.size, annotations=desc.annotations
    )


class ContainerdClient:
    """One connection to containerd's socket, scoped to one namespace."""

    def __init__(self, address: str, namespace: str = "default", timeout: float = 60.0) -> None:
        self.address = address
        self.namespace = namespace
        self.timeout = timeout
        self.lease_id: str | None = None
        self._channel = grpc.insecure_channel(
            f"unix:{address}", options=[("grpc.max_receive_message_length", 16 << 20)]
        )
        self._content = content_pb2_grpc.ContentStub(self._channel)
        self._images = images_pb2_grpc.ImagesStub(self._channel)
        self._leases = leases_pb2_grpc.LeasesStub(self._channel)
        self._snapshots = snapshots_pb2_grpc.SnapshotsStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ContainerdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------

    def _metadata(self) -> list[tuple[str, str]]:
        md = [("containerd-namespace", self.namespace)]
        if self.lease_id:
            md.append(("containerd-lease", self.lease_id))
        return md

    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        with _answered(f"containerd {method._method.decode()}"):
            return method(request, metadata=self._metadata(), timeout=timeout or self.timeout)

    def wait_ready(self, timeout: float = 10.0) -> None:
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise Unavailable(f"containerd is not answering on {self.address}") from None

    # -- leases --------------------------------------------------------------------

    @contextmanager
    def lease(self, expire: datetime.timedelta = datetime.timedelta(hours=1)) -> Iterator[str]:
        """Hold a lease for the block; it expires by itself if we die mid-pull."""
        lease_id = f"lazysnap-rpull-{secrets.token_hex(8)}"
        until = (datetime.datetime.now(datetime.UTC) + expire).strftime("%Y-%m-%dT%H:%M:%SZ")
        self._call(self._leases.Create, leases_pb2.CreateRequest(id=lease_id, labels={"containerd.io/gc.expire": until}))
        self.lease_id = lease_id
        try:
            yield lease_id
        finally:
            self.lease_id = None
            try:
                self._call(self._leases.Delete, leases_pb2.DeleteRequest(id=lease_id))
            except SnapshotterError:
                pass  # it expires on its own

    # -- content -------------------------------------------------------------------

    def has_content(self, digest: str) -> bool:
        try:
            self._call(self._content.Info, content_pb2.InfoRequest(digest=digest))
        except SnapshotterError:
            return False
        return True

    def write_content(self, desc: Descriptor, chunks: Iterable[bytes], labels: dict[str, str] | None = None) -> None:
        """Stream a blob into the content store; containerd checks size and digest at commit."""
        if self.has_content(desc.digest):
            if labels:
                self.set_content_labels(desc.digest, labels)
            return
        ref = f"lazysnap-{desc.digest}"

        def requests() -> Iterator[content_pb2.WriteContentRequest]:
            offset = 0
            for chunk in chunks:
                for i in range(0, len(chunk), WRITE_CHUNK):
                    part = chunk[i:i + WRITE_CHUNK]
                    yield content_pb2.WriteContentRequest(
                        action=content_pb2.WRITE, ref=ref, offset=offset, data=part, total=desc.size,
                        expected=desc.digest,
                    )
                    offset += len(part)
            yield content_pb2.WriteContentRequest(
                action=content_pb2.COMMIT, ref=ref, offset=offset, total=desc.size, expected=desc.digest,
                labels=labels or {},
            )

        try:
            with _answered(f"writing {desc.digest} to containerd"):
                for _ in self._content.Write(requests(), metadata=self._metadata(), timeout=None):
                    pass
        except AlreadyExists:
            pass  # committed since `has_content` looked

    def set_content_labels(self, digest: str, labels: dict[str, str]) -> None:
        info = content_pb2.Info(digest=digest, labels=labels)
        mask = field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels])
        self._call(self._content.Update, content_pb2.UpdateRequest(info=info, update_mask=mask))

    # -- images --------------------------------------------------------------------

    def put_image(self, name: str, target: Descriptor, labels: dict[str, str] | None = None) -> None:
        image = images_pb2.Image(name=name, target=to_pb(target), labels=labels or {})
        try:
            self._call(self._images.Create, images_pb2.CreateImageRequest(image=image))
        except AlreadyExists:
            self._call(self._images.Update, images_pb2.UpdateImageRequest(image=image))

    # -- snapshots (through containerd, so its metadata knows them) ----------------

    def prepare(self, snapshotter: str, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        req = snapshots_pb2.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent, labels=labels)
        return _mounts(self._call(self._snapshots.Prepare, req, timeout=600).mounts)

    def commit(self, snapshotter: str, name: str, key: str, labels: dict[str, str]) -> None:
        req = snapshots_pb2.CommitSnapshotRequest(snapshotter=snapshotter, name=name, key=key, labels=labels)
        self._call(self._snapshots.Commit, req)

    def remove_snapshot(self, snapshotter: str, key: str) -> None:
        self._call(self._snapshots.Remove, snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key))

    def snapshot_exists(self, snapshotter: str, key: str) -> bool:
        try:
            self._call(self._snapshots.Stat, snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=key))
        except SnapshotterError:
            return False
        return True


@contextmanager
def _answered(what: str) -> Iterator[None]:
    """containerd's error statuses in the block, raised as lazysnap's errors (the one place in this client).

    A code without an errdefs class of lazysnap's is named in the message, which says what failed.
    """
    try:
        yield
    except grpc.RpcError as e:
        code = e.code()
        named = "" if code in CLASSES else f" ({code.name})"
        raise error_from_status(code, f"{what}: {e.details()}{named}") from None


def _mounts(pbs: Iterable[mount_pb2.Mount]) -> list[Mount]:
    return [Mount(m.type, m.source, list(m.options)) for m in pbs]
