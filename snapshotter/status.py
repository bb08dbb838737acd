"""lazysnap's own API as a client, for the command line: how each layer is served
(`lazysnap status`), and pulls run by the daemon (`lazysnap rpull`, `lazysnap prefetch`).

Light on imports on purpose: the command line starts a fresh process for every call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from .api.lazysnap.v1 import pull_pb2, pull_pb2_grpc, status_pb2, status_pb2_grpc
from .grpc_status import error_from_status
from .layer_modes import mode_named
from .pull_records import LayerOutcome, PullReport, WarmedLayer, WarmPhase, WarmReport, WarmState


@contextmanager
def connect(address: Path) -> Iterator[StatusClient]:
    """A client of the daemon at `address` for the block, closed after it; what the daemon answers
    with an error status (or that no daemon answers: `Unavailable`) raised as lazysnap's error."""
    client = StatusClient(address)
    try:
        yield client
    except grpc.RpcError as e:
        raise error_from_status(e.code(), e.details()) from None
    finally:
        client.close()


class StatusClient:
    """The calls themselves; they raise grpc.RpcError (`connect` turns it into lazysnap's errors)."""

    def __init__(self, address: Path, timeout: float = 10.0) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix:{address}")
        self._stub = status_pb2_grpc.StatusStub(self._channel)
        self._images = pull_pb2_grpc.ImagesStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def layers(self, digests: list[str] | None = None) -> status_pb2.LayersResponse:
        return self._stub.Layers(status_pb2.LayersRequest(digests=digests or []), timeout=self.timeout)

    def pull(self, request: pull_pb2.PullRequest) -> Iterator[str | PullReport]:
        """The daemon's progress lines, then its report; grpc.RpcError if the pull fails.

        No deadline: a whole pull of a large image may take as long as it takes; closing
        the iterator (or the process) cancels it in the daemon.
        """
        for event in self._images.Pull(request):
            if event.HasField("report"):
                yield from_pb_report(event.report)
            else:
                yield event.progress

    def prefetch(self, request: pull_pb2.PrefetchRequest) -> Iterator[str | PullReport | WarmReport]:
        """The pull's lines and report, then warming progress (with `wait`) and the warming's report.

        No deadline, like `pull`; closing the iterator cancels the pull, or stops following
        the warming, which the daemon carries on.
        """
        for event in self._images.Prefetch(request):
            kind = event.WhichOneof("event")
            if kind == "pulled":
                yield from_pb_report(event.pulled)
            elif kind == "report":
                yield from_pb_warm_report(event.report)
            else:
                yield event.progress


def from_pb_warm_report(report: pull_pb2.WarmReport) -> WarmReport:
    return WarmReport(report.image, report.manifest_digest,
                      tuple(WarmedLayer(layer.digest, layer.content_bytes, layer.complete_bytes, layer.fetched_bytes,
                                        _warm_state(layer)) for layer in report.layers),
                      report.seconds, tuple(report.sources), report.note, report.finished)


def _warm_state(layer: pull_pb2.WarmedLayer) -> WarmState:
    try:
        return WarmState(WarmPhase(layer.state), layer.detail)
    except ValueError:  # a phase of a newer daemon: shown in its words
        return WarmState(WarmPhase.STOPPED, f"{layer.state}: {layer.detail}" if layer.detail else layer.state)


def from_pb_report(report: pull_pb2.PullReport) -> PullReport:
    return PullReport(report.image, report.manifest_digest,
                      [LayerOutcome(layer.digest, layer.size, mode_named(layer.mode), layer.reason, layer.seconds)
                       for layer in report.layers], report.seconds)
