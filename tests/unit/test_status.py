"""`lazysnap status`: the layer manager's typed report, the Status API's answer, and what the command prints.

The records are the API's messages field for field; these tests keep them so, and run the
command against a real gRPC server on a unix socket.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from snapshotter import cli
from snapshotter.api.lazysnap.v1 import status_pb2, status_pb2_grpc
from snapshotter.layer_modes import LayerMode
from snapshotter.layers.served import (
    CacheReport,
    FuseOpReport,
    FuseReport,
    LayerReport,
    PlaneReport,
    StatusReport,
)
from snapshotter.service import StatusService, to_pb_status
from tests.harness.grpc_server import serving

LAZY = LayerReport(digest="sha256:" + "a" * 64, image_ref="reg.test/app:1", mode=LayerMode.ESTARGZ, reason="",
                   size=3 << 20, resolve_seconds=0.25, path="/var/lib/lazysnap/mnt/1", fetched_bytes=1 << 20,
                   fetch_state="background", prefetched_bytes=1 << 19, background_bytes=1 << 18, pull_seconds=0.0,
                   complete_bytes=1 << 20, content_bytes=2 << 20)
WHOLE = LayerReport(digest="sha256:" + "b" * 64, image_ref="reg.test/app:1", mode=LayerMode.WHOLE,
                    reason="not an eStargz layer", size=300, resolve_seconds=0.5, path="", fetched_bytes=0,
                    fetch_state="", prefetched_bytes=0, background_bytes=0, pull_seconds=1.5, complete_bytes=0,
                    content_bytes=0)
REPORT = StatusReport(
    layers=(LAZY, WHOLE),
    cache=CacheReport(bytes=1 << 20, max_bytes=1 << 30, hits=30, misses=10, evictions=2),
    fuse=FuseReport((FuseOpReport("read", 40, 0.5), FuseOpReport("lookup", 3, 0.003)), read_bytes=5 << 20,
                    read_errors=1),
    planes=(PlaneReport(generation=1, pid=1234, retiring=True, layers=1, build="0123456789abcdef"),
            PlaneReport(generation=2, pid=1240, retiring=False, layers=3, build="fedcba9876543210")))


def renewed(image: str) -> float:
    return 1_700_000_000.5 if image == "reg.test/app:1" else 0.0


def test_each_record_is_its_message_field_for_field() -> None:
    """Names and order, so that a field added to one is added to the other."""
    pairs: list[tuple[type, Any]] = [(LayerReport, status_pb2.Layer), (CacheReport, status_pb2.Cache), (FuseOpReport, status_pb2.FuseOp),
             (FuseReport, status_pb2.Fuse), (PlaneReport, status_pb2.DataPlane)]
    for record, message in pairs:
        fields = [f.name for f in dataclasses.fields(record)]
        expected = [f.name for f in message.DESCRIPTOR.fields if f.name != "credential_renewed"]
        assert sorted(fields) == sorted(expected), record
    assert [f.name for f in dataclasses.fields(StatusReport)] == ["layers", "cache", "fuse", "planes"]


def test_the_answer_carries_every_field() -> None:
    reply = to_pb_status(REPORT, renewed)
    expected = status_pb2.LayersResponse(
        layers=[status_pb2.Layer(**dataclasses.asdict(layer), credential_renewed=renewed(layer.image_ref))
                for layer in REPORT.layers],
        cache=status_pb2.Cache(**dataclasses.asdict(REPORT.cache)),
        fuse=status_pb2.Fuse(ops=[status_pb2.FuseOp(**dataclasses.asdict(op)) for op in REPORT.fuse.ops],
                             read_bytes=REPORT.fuse.read_bytes, read_errors=REPORT.fuse.read_errors),
        data_planes=[status_pb2.DataPlane(**dataclasses.asdict(plane)) for plane in REPORT.planes])
    assert reply == expected
    assert reply.layers[0].credential_renewed == 1_700_000_000.5 and reply.layers[1].pull_seconds == 1.5


def test_fuse_and_planes_are_read_from_what_the_data_planes_send() -> None:
    sent = {"ops": [{"name": "read", "count": 40, "seconds": 0.5}, {"name": "lookup", "count": 3, "seconds": 0.003}],
            "read_bytes": 5 << 20, "read_errors": 1}
    assert FuseReport.of(sent) == REPORT.fuse
    assert FuseReport.of({}) == FuseReport((), 0, 0)
    assert PlaneReport.of({"generation": 2, "pid": 1240, "retiring": False, "layers": 3,
                           "build": "fedcba9876543210"}) == REPORT.planes[1]


class Source:
    def __init__(self, report: StatusReport) -> None:
        self.report_ = report
        self.asked: list[list[str]] = []

    def report(self, digests: list[str]) -> StatusReport:
        self.asked.append(digests)
        return self.report_


@contextmanager
def status_server(tmp_path: Path, source: Source | None) -> Iterator[Path]:
    with serving(tmp_path, lambda server: status_pb2_grpc.add_StatusServicer_to_server(
            StatusService(source, renewed), server)) as address:
        yield address


def run(args: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        cli.main(args)
    return int(done.value.code or 0)


def test_status_json_is_every_field_of_the_answer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = Source(REPORT)
    with status_server(tmp_path, source) as address:
        assert run(["status", "--json", "--address", str(address)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert source.asked == [[]]
    assert list(got) == ["layers", "cache", "fuse", "data_planes"]
    assert got["layers"][0] == {**dataclasses.asdict(LAZY), "credential_renewed": 1_700_000_000.5}
    assert [layer["digest"] for layer in got["layers"]] == [LAZY.digest, WHOLE.digest]
    assert got["cache"] == dataclasses.asdict(REPORT.cache)
    assert got["fuse"] == {"ops": [{"name": "read", "count": 40, "seconds": 0.5},
                                   {"name": "lookup", "count": 3, "seconds": 0.003}],
                           "read_bytes": 5 << 20, "read_errors": 1}
    assert got["data_planes"][0] == {"generation": 1, "pid": 1234, "retiring": True, "layers": 1,
                                     "build": "0123456789abcdef"}


def test_status_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with status_server(tmp_path, Source(REPORT)) as address:
        assert run(["status", "--fuse", "--dataplanes", "--address", str(address)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["LAYER", "MODE", "SIZE", "FETCHED", "RESOLVE", "FETCH", "STATE", "CREDS", "RENEWED",
                              "IMAGE", "/", "WHY"]
    assert out[1].startswith("sha256:aaaaaaaaaaaa  estargz  3.0 MiB  1.0 MiB  0.25s    50 %, background  ")
    assert out[1].endswith("s ago  reg.test/app:1")
    assert out[2].startswith("sha256:bbbbbbbbbbbb  whole    300 B    0 B      0.50s    pulled in 1.50s   ")
    assert out[2].endswith("s ago  not an eStargz layer")
    assert out[3] == "cache: 1.0 MiB of 1.0 GiB, hit rate 75% (30 hits, 10 misses, 2 evictions)"
    assert out[4].split() == ["FUSE", "OP", "REQUESTS", "SECONDS", "US/REQ"]
    assert out[5].split() == ["read", "40", "0.500", "12500"]
    assert out[7] == "fuse: 5.0 MiB read, 1 read errors"
    assert out[8] == "data plane 1: pid 1234, 1 layers, build 0123456789ab (retiring: exits once its layers are released)"
    assert out[9] == "data plane 2: pid 1240, 3 layers, build fedcba987654"


def test_status_of_a_daemon_without_lazy_layers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with status_server(tmp_path, None) as address:
        assert run(["status", "--json", "--address", str(address)]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == []


def test_status_says_when_the_daemon_is_not_there(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["status", "--address", str(tmp_path / "absent.sock")]) == 1
    assert capsys.readouterr().err == f"lazysnap: cannot reach lazysnap at {tmp_path / 'absent.sock'}: UNAVAILABLE\n"
