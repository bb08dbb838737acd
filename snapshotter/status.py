"""lazysnap's Status API as a client: how each layer is served, for `rpull` and `lazysnap status`."""

from __future__ import annotations

from pathlib import Path

import grpc

from .api.lazysnap.v1 import status_pb2, status_pb2_grpc


class StatusClient:
    def __init__(self, address: Path, timeout: float = 10.0) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix:{address}")
        self._stub = status_pb2_grpc.StatusStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def layers(self, digests: list[str] | None = None) -> status_pb2.LayersResponse:
        return self._stub.Layers(status_pb2.LayersRequest(digests=digests or []), timeout=self.timeout)

    def explain(self, digest: str) -> tuple[str, str]:
        """(mode, reason) lazysnap gives for a layer; ("", why not) when it cannot be asked."""
        try:
            found = self.layers([digest]).layers
        except grpc.RpcError as e:
            return "", f"lazysnap status unavailable: {e.code().name}"
        if not found:
            return "", ""
        return found[0].mode, found[0].reason
