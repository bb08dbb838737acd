"""lazysnap's errors and gRPC status codes: what the server answers is what its clients raise."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from snapshotter import errors
from snapshotter.api.lazysnap.v1 import status_pb2_grpc
from snapshotter.grpc_status import STATUS_CODES, error_from_status, status_code
from snapshotter.layers.served import StatusReport
from snapshotter.service import StatusService
from snapshotter.status import connect


@pytest.mark.parametrize("cls", [*STATUS_CODES, errors.SnapshotterError])
def test_every_class_in_the_table_round_trips(cls: type[errors.SnapshotterError]) -> None:
    back = error_from_status(status_code(cls("gone")), "gone")
    assert type(back) is cls and str(back) == "gone" and back.status == status_code(cls("")).name


def test_the_table_has_one_class_per_code() -> None:
    assert len(set(STATUS_CODES.values())) == len(STATUS_CODES)


@pytest.mark.parametrize("error,code", [
    (errors.ConfigError("x"), grpc.StatusCode.UNKNOWN),  # a class the table does not name: its nearest base's
    (errors.Unavailable("containerd is not answering"), grpc.StatusCode.UNKNOWN),  # the server never answers it
])
def test_a_class_without_its_own_code(error: errors.SnapshotterError, code: grpc.StatusCode) -> None:
    assert status_code(error) == code


@pytest.mark.parametrize("code,cls", [
    (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
    (grpc.StatusCode.UNIMPLEMENTED, errors.Unavailable),
    (grpc.StatusCode.INTERNAL, errors.SnapshotterError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, errors.SnapshotterError),
])
def test_a_client_gets_a_lazysnap_error_for_any_code(code: grpc.StatusCode, cls: type[errors.SnapshotterError]) -> None:
    error = error_from_status(code, "said")
    assert type(error) is cls and str(error) == "said" and error.status == code.name


class Failing:
    def __init__(self, error: errors.SnapshotterError) -> None:
        self.error = error

    def report(self, digests: list[str]) -> StatusReport:
        raise self.error


@pytest.mark.parametrize("raised", [errors.NotFound("no such layer"), errors.InvalidArgument("bad digest"),
                                    errors.SnapshotterError("broken")])
def test_through_a_real_server_and_client(raised: errors.SnapshotterError, tmp_path: Path) -> None:
    address = tmp_path / "ls.sock"
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    status_pb2_grpc.add_StatusServicer_to_server(StatusService(Failing(raised)), server)
    server.add_insecure_port(f"unix:{address}")
    server.start()
    try:
        with pytest.raises(errors.SnapshotterError) as got:
            with connect(address) as client:
                client.layers()
    finally:
        server.stop(grace=None).wait()
    assert type(got.value) is type(raised) and str(got.value) == str(raised)


def test_no_server_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(errors.Unavailable) as got:
        with connect(tmp_path / "absent.sock") as client:
            client.layers()
    assert got.value.status == "UNAVAILABLE"



class Answer(grpc.RpcError):
    """What a grpcio call raises: an RpcError that is also the call, with its code and details."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize("code,cls,message", [
    (grpc.StatusCode.NOT_FOUND, errors.NotFound, "containerd Info: content sha256:x: not found"),
    (grpc.StatusCode.ALREADY_EXISTS, errors.AlreadyExists, "containerd Info: content sha256:x: not found"),
    (grpc.StatusCode.UNKNOWN, errors.SnapshotterError, "containerd Info: content sha256:x: not found (UNKNOWN)"),
    (grpc.StatusCode.UNAVAILABLE, errors.Unavailable, "containerd Info: content sha256:x: not found (UNAVAILABLE)"),
])
def test_containerd_s_answers_name_the_codes_lazysnap_has_no_class_for(
        code: grpc.StatusCode, cls: type[errors.SnapshotterError], message: str) -> None:
    from snapshotter.containerd.client import _answered

    with pytest.raises(errors.SnapshotterError) as got:
        with _answered("containerd Info"):
            raise Answer(code, "content sha256:x: not found")
    assert type(got.value) is cls and str(got.value) == message and got.value.status == code.name
