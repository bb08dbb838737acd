"""lazysnap in front of containerd's CRI image service, so that a pod's pull secrets reach it.

The kubelet passes a pod's imagePullSecrets only to the image service, with each
`PullImage`. Pointed at this socket (`--image-service-endpoint`, the runtime endpoint
staying on containerd), it talks to lazysnap, which forwards every ImageService call
to containerd's own CRI socket unchanged, as bytes (so nothing a newer kubelet sends is
lost), with its metadata and deadline, and hands back containerd's answer or error as
is. It only looks: the `AuthConfig` of each `PullImage` goes to the credential store
(`registry/cri_credentials.py`), which the keychain asks first when lazysnap fetches
that image's layers; `RemoveImage` lets the store forget. stargz-snapshotter and
soci-snapshotter do the same.

Secrets never reach a log line: requests are never logged whole, only the image and
the user name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from .api.cri.runtime.v1 import api_pb2 as cri
from .registry.cri_credentials import CriAuth, CriCredentials, Pull
from .service import start_on_socket

log = logging.getLogger(__name__)

SERVICE = cri.DESCRIPTOR.services_by_name["ImageService"]
MAX_MESSAGE = 16 << 20
"""The kubelet's CRI message limit both ways (a ListImages of a busy node exceeds gRPC's 4 MiB default)."""
_NOT_FORWARDED = ("user-agent", "grpc-")


class _Forwarder(grpc.GenericRpcHandler):
    """Every method of `runtime.v1.ImageService`, passed to containerd as bytes."""

    def __init__(self, upstream: grpc.Channel, store: CriCredentials) -> None:
        self.upstream = upstream
        self.store = store

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        service, _, name = details.method.lstrip("/").partition("/")
        method = SERVICE.methods_by_name.get(name) if service == SERVICE.full_name else None
        if method is None or method.client_streaming:
            return None  # UNIMPLEMENTED, as containerd answers what it does not know
        path = f"/{SERVICE.full_name}/{name}"
        if method.server_streaming:
            return grpc.unary_stream_rpc_method_handler(self._stream(path))
        if name == "PullImage":
            return grpc.unary_unary_rpc_method_handler(self._pull(path))
        if name == "RemoveImage":
            return grpc.unary_unary_rpc_method_handler(self._remove(path))
        return grpc.unary_unary_rpc_method_handler(self._unary(path))

    def _unary(self, path: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
            return self._call(path, request, context)
        return forward

    def _stream(self, path: str) -> Callable[[bytes, grpc.ServicerContext], Iterator[bytes]]:
        def forward(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            call = self.upstream.unary_stream(path)(request, timeout=context.time_remaining(),
                                                    metadata=_metadata(context))
            context.add_callback(call.cancel)
            try:
                yield from call
            except grpc.RpcError as e:
                log.info("%s: containerd answered %s: %s", _name(path), e.code().name, e.details())
                context.abort(e.code(), e.details())
        return forward

    def _pull(self, path: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
            image, pull = self._offer(request)
            image_id = None
            try:
                reply = self._call(path, request, context, f"PullImage {image}")
                image_id = cri.PullImageResponse.FromString(reply).image_ref
            finally:
                if pull is not None:
                    self.store.finish(pull, image_id)
            log.info("PullImage %s: done (%s)%s", image, image_id,
                     f"; the credentials of {pull.credentials.who()} are kept for its layers" if pull else "")
            return reply
        return forward

    def _offer(self, request: bytes) -> tuple[str, Pull | None]:
        """The image a PullImage asks for, and its pull in the store (None: it brought no credentials)."""
        try:
            message = cri.PullImageRequest.FromString(request)
        except Exception:  # noqa: BLE001 - containerd answers a malformed request itself
            return "(unparsable request)", None
        image, auth = message.image.image, message.auth
        pull = self.store.begin(image, CriAuth(
            username=auth.username, password=auth.password, auth=auth.auth, server_address=auth.server_address,
            identity_token=auth.identity_token, registry_token=auth.registry_token))
        if pull is not None:
            log.info("PullImage %s: the credentials of %s go to lazysnap's reads of it while containerd pulls",
                     image, pull.credentials.who())
        elif message.HasField("auth"):
            log.info("PullImage %s: its AuthConfig gives lazysnap nothing to use (another registry's, "
                     "or a registry token only)", image)
        return image, pull

    def _remove(self, path: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
            image = cri.RemoveImageRequest.FromString(request).image.image
            reply = self._call(path, request, context, f"RemoveImage {image}")
            if self.store.remove(image):
                log.info("RemoveImage %s: the CRI pull credentials no image needs any more are forgotten", image)
            return reply
        return forward

    def _call(self, path: str, request: bytes, context: grpc.ServicerContext, what: str = "") -> bytes:
        """One unary call to containerd; its error becomes ours, code and message unchanged."""
        start = time.monotonic()
        call = self.upstream.unary_unary(path).future(request, timeout=context.time_remaining(),
                                                        metadata=_metadata(context))
        context.add_callback(call.cancel)  # the kubelet giving up cancels containerd's work too
        try:
            reply = call.result()
        except grpc.RpcError as e:
            log.info("%s: containerd answered %s: %s", what or _name(path), e.code().name, e.details())
            context.abort(e.code(), e.details())
            raise  # not reached: abort raises
        log.debug("%s forwarded to containerd in %.1f ms", what or _name(path), (time.monotonic() - start) * 1000)
        return reply


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _metadata(context: grpc.ServicerContext) -> list[tuple[str, Any]]:
    return [(m.key, m.value) for m in context.invocation_metadata()
            if not m.key.startswith(":") and not m.key.startswith(_NOT_FORWARDED)]


@dataclass(frozen=True)
class CriProxy:
    """The running proxy: its server and its channel to containerd."""

    server: grpc.Server
    upstream: grpc.Channel
    address: Path

    def stop(self, grace: float = 5.0) -> None:
        self.server.stop(grace).wait()
        self.upstream.close()
        self.address.unlink(missing_ok=True)


def start(address: Path, containerd: Path, store: CriCredentials, workers: int = 16) -> CriProxy:
    """Serve the proxy on `address` (mode 0600, a stale socket replaced), forwarding to `containerd`'s
    CRI socket; the channel connects lazily, so containerd may start later."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
    upstream = grpc.insecure_channel(f"unix:{containerd}", options=options)
    server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cri"),
                         handlers=[_Forwarder(upstream, store)], options=options)
    start_on_socket(server, address)
    log.info("serving the CRI image service on %s, forwarding to containerd's %s", address, containerd)
    return CriProxy(server, upstream, address)
