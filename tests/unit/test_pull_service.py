"""`lazysnap rpull` as a call to the daemon: the Images API's stream, its errors, its cancellation.

The whole pull against real containerd and a real registry is in tests/integration/test_lazy.py;
here the pieces in between are driven directly: a real gRPC server and client on a unix socket,
and the daemon's `Puller` on a real trio loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import trio

from snapshotter import cli
from snapshotter.api.lazysnap.v1 import pull_pb2, pull_pb2_grpc
from snapshotter.containerd.pull import Puller, PullError
from snapshotter.errors import NotFound
from snapshotter.layer_modes import LayerMode
from snapshotter.pull_records import (
    LayerOutcome,
    PrefetchEvent,
    PullEvent,
    PullOrder,
    PullReport,
    WarmedLayer,
    WarmPhase,
    WarmReport,
    WarmState,
)
from snapshotter.registry.options import RegistryOptions
from snapshotter.service import ImagesService
from snapshotter.status import StatusClient
from tests.harness.grpc_server import serving

REPORT = PullReport("reg.test/app:1", "sha256:" + "a" * 64,
                    [LayerOutcome("sha256:" + "b" * 64, 1 << 20, LayerMode.ESTARGZ, "", 0.25),
                     LayerOutcome("sha256:" + "c" * 64, 300, LayerMode.WHOLE, "not an eStargz layer", 0.5)], 1.5)


class ScriptedPuller:
    """Emits `events` from another thread, as the daemon's trio loop would; records orders and cancels."""

    def __init__(self, events: list[PullEvent], hold: threading.Event | None = None) -> None:
        self.events, self.hold = events, hold
        self.orders: list[PullOrder] = []
        self.waits: list[bool] = []
        self.cancelled = threading.Event()

    def start(self, order: PullOrder, emit: Callable[[PullEvent], None]) -> Callable[[], None]:
        self.orders.append(order)

        def run() -> None:
            for event in self.events:
                emit(event)
            if self.hold is not None:
                self.cancelled.wait(10)
                emit(PullError("cancelled"))

        threading.Thread(target=run, daemon=True).start()
        return self.cancelled.set

    def start_prefetch(self, order: PullOrder, wait: bool, emit: Callable[[PrefetchEvent], None]
                       ) -> Callable[[], None]:
        self.waits.append(wait)
        return self.start(order, emit)  # type: ignore[arg-type]


@contextmanager
def images_server(tmp_path: Path, puller: ScriptedPuller | None) -> Iterator[Path]:
    with serving(tmp_path, lambda server: pull_pb2_grpc.add_ImagesServicer_to_server(
            ImagesService(puller), server), workers=4) as address:
        yield address


def request(**fields: object) -> pull_pb2.PullRequest:
    return pull_pb2.PullRequest(ref="reg.test/app:1", containerd_address="/run/c.sock", **fields)  # type: ignore[arg-type]


def test_progress_then_report_cross_the_wire(tmp_path: Path) -> None:
    puller = ScriptedPuller(["reg.test/app:1: manifest sha256:aaa, 2 layers", "  layer 1/2 ...", REPORT])
    with images_server(tmp_path, puller) as address:
        client = StatusClient(address)
        try:
            events = list(client.pull(request(plain_http=True, certs_dir="/etc/hosts.d", docker_config="/c.json")))
        finally:
            client.close()
    assert events == ["reg.test/app:1: manifest sha256:aaa, 2 layers", "  layer 1/2 ...", REPORT]
    order = puller.orders[0]
    assert (order.ref, order.namespace, order.containerd, order.snapshotter) == \
        ("reg.test/app:1", "default", "/run/c.sock", "lazysnap")
    assert order.registry == RegistryOptions(plain_http=True, certs_dir=Path("/etc/hosts.d"),
                                             docker_config=Path("/c.json"))


def test_a_failed_pull_is_a_status_with_its_message(tmp_path: Path) -> None:
    puller = ScriptedPuller(["resolving", NotFound("reg.test/app:1: manifest unknown")])
    with images_server(tmp_path, puller) as address:
        client = StatusClient(address)
        try:
            with pytest.raises(grpc.RpcError) as failed:
                list(client.pull(request()))
        finally:
            client.close()
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert failed.value.details() == "reg.test/app:1: manifest unknown"


def test_a_client_going_away_cancels_the_pull(tmp_path: Path) -> None:
    puller = ScriptedPuller(["started"], hold=threading.Event())
    with images_server(tmp_path, puller) as address:
        client = StatusClient(address)
        stream = client.pull(request())
        assert next(stream) == "started"
        client.close()  # what Ctrl-C on `lazysnap rpull` does to its channel
        assert puller.cancelled.wait(5), "the daemon kept pulling for a client that left"


def test_rpull_says_when_the_daemon_is_not_there(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["rpull", "reg.test/app:1", "--address", str(tmp_path / "absent.sock")])
    assert f"cannot reach the lazysnap daemon at {tmp_path / 'absent.sock'}" in str(done.value.code)


def test_rpull_prints_progress_and_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with images_server(tmp_path, ScriptedPuller(["resolving", REPORT])) as address:
        with pytest.raises(SystemExit) as done:
            cli.main(["rpull", "reg.test/app:1", "--address", str(address)])
    out = capsys.readouterr().out.splitlines()
    assert done.value.code == 0
    assert out[0] == "resolving" and out[1].split() == ["LAYER", "SIZE", "HOW", "SECONDS", "WHY"]
    assert out[2].split() == ["sha256:bbbbbbbbbbbb", "1.0", "MiB", "lazy", "estargz", "0.25"]
    assert out[3].split()[-4:] == ["not", "an", "eStargz", "layer"]
    assert out[-1] == "reg.test/app:1: 1 of 2 layers lazy, pulled in 1.50 s"



def test_ctrl_c_in_rpull_is_one_line_and_exit_130(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from snapshotter import status

    def interrupted(self, request):  # type: ignore[no-untyped-def]
        yield "resolving"
        raise KeyboardInterrupt

    monkeypatch.setattr(status.StatusClient, "pull", interrupted)
    with pytest.raises(SystemExit) as done:
        cli.main(["rpull", "reg.test/app:1", "--address", str(tmp_path / "absent.sock")])
    captured = capsys.readouterr()
    assert done.value.code == 130
    assert captured.err == "lazysnap: interrupted; the daemon stops the pull\n"
    assert "Traceback" not in captured.out + captured.err

async def test_puller_cancel_ends_the_pull_with_an_error(tmp_path: Path) -> None:
    """Waiting for an absent containerd, the pull ends at once when cancelled, and says so."""
    events: list[PullEvent] = []
    order = PullOrder("reg.test/app:1", "default", str(tmp_path / "absent.sock"), "lazysnap", RegistryOptions())
    async with trio.open_nursery() as nursery:
        puller = Puller(nursery, None, None)
        cancel = await trio.to_thread.run_sync(puller.start, order, events.append)
        await trio.sleep(0.3)
        assert events == []
        cancel()
        with trio.fail_after(3):
            while not events:
                await trio.sleep(0.01)
    assert len(events) == 1 and isinstance(events[0], PullError)
    assert str(events[0]) == "the pull of reg.test/app:1 was cancelled"


# ---------------------------------------------------------------- `lazysnap prefetch`

WARMED = WarmReport("reg.test/app:1", "sha256:" + "a" * 64,
                    (WarmedLayer("sha256:" + "b" * 64, 1 << 20, 1 << 20, 3 << 18, WarmState(WarmPhase.COMPLETE)),
                     WarmedLayer("sha256:" + "c" * 64, 0, 0, 0, WarmState(WarmPhase.PULLED_WHOLE))), 2.5, ("start profile",), "", True)


def test_prefetch_streams_the_pull_then_the_warming(tmp_path: Path) -> None:
    events: list[PrefetchEvent] = ["resolving", REPORT, "warming reg.test/app:1: ...", WARMED]
    puller = ScriptedPuller(events)  # type: ignore[arg-type]
    with images_server(tmp_path, puller) as address:
        client = StatusClient(address)
        try:
            got = list(client.prefetch(pull_pb2.PrefetchRequest(pull=request(plain_http=True), wait=True)))
        finally:
            client.close()
    assert got == events
    assert puller.waits == [True] and puller.orders[0].registry.plain_http


def test_prefetch_prints_the_pull_and_the_warming_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    puller = ScriptedPuller([REPORT, "  layer 1/2 sha256:bbbbbbbbbbbb: 1.0 MiB of 1.0 MiB (100 %)", WARMED])
    with images_server(tmp_path, puller) as address:
        with pytest.raises(SystemExit) as done:
            cli.main(["prefetch", "reg.test/app:1", "--wait", "--address", str(address)])
    out = capsys.readouterr().out.splitlines()
    assert done.value.code == 0 and puller.waits == [True]
    table = out.index("LAYER                SIZE     CACHED  FETCHED    STATE")
    assert out[table + 1].split() == ["sha256:bbbbbbbbbbbb", "1.0", "MiB", "100", "%", "768.0", "KiB", "complete"]
    assert out[table + 2].split() == ["sha256:cccccccccccc", "-", "-", "-", "pulled", "whole"]
    assert out[-1] == ("reg.test/app:1: 1.0 MiB of 1.0 MiB in the cache (100 %), 768.0 KiB fetched, "
                       "start profile first, in 2.50 s")


def test_prefetch_without_wait_says_the_daemon_warms_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    started = WarmReport(WARMED.image, WARMED.manifest_digest,
                         (WarmedLayer("sha256:" + "b" * 64, 4 << 20, 1 << 20, 0, WarmState(WarmPhase.WARMING)),), 0.1)
    with images_server(tmp_path, ScriptedPuller([REPORT, started])) as address:
        with pytest.raises(SystemExit) as done:
            cli.main(["prefetch", "reg.test/app:1", "--address", str(address)])
    assert done.value.code == 0
    assert capsys.readouterr().out.splitlines()[-1] == \
        "reg.test/app:1: warming 3.0 MiB more in the daemon; `lazysnap status` shows how far"


def test_a_failed_layer_makes_prefetch_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    failed = WarmReport(WARMED.image, WARMED.manifest_digest,
                        (WarmedLayer("sha256:" + "b" * 64, 4 << 20, 1 << 20, 0, WarmState(WarmPhase.FAILED, "RegistryUnavailable: 503")),),
                        1.0, finished=True)
    with images_server(tmp_path, ScriptedPuller([REPORT, failed])) as address:
        with pytest.raises(SystemExit) as done:
            cli.main(["prefetch", "reg.test/app:1", "--wait", "--address", str(address)])
    assert done.value.code == 1
    assert "failed: RegistryUnavailable: 503" in capsys.readouterr().out


@pytest.mark.parametrize("after_pull,said", [
    (False, "lazysnap: interrupted; the daemon stops the pull\n"),
    (True, "lazysnap: interrupted; the daemon keeps warming reg.test/app:1 (`lazysnap status` shows how far)\n"),
])
def test_ctrl_c_in_prefetch_is_one_line_and_exit_130(after_pull: bool, said: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from snapshotter import status

    def interrupted(self, request):  # type: ignore[no-untyped-def]
        yield "resolving"
        if after_pull:
            yield REPORT
            yield "warming reg.test/app:1: ..."
        raise KeyboardInterrupt

    monkeypatch.setattr(status.StatusClient, "prefetch", interrupted)
    with pytest.raises(SystemExit) as done:
        cli.main(["prefetch", "reg.test/app:1", "--wait", "--address", str(tmp_path / "absent.sock")])
    captured = capsys.readouterr()
    assert done.value.code == 130
    assert captured.err == said
    assert "Traceback" not in captured.out + captured.err


async def test_prefetch_needs_lazy_layers(tmp_path: Path) -> None:
    events: list[PrefetchEvent] = []
    order = PullOrder("reg.test/app:1", "default", str(tmp_path / "absent.sock"), "lazysnap", RegistryOptions())
    async with trio.open_nursery() as nursery:
        puller = Puller(nursery, None, None)
        await trio.to_thread.run_sync(puller.start_prefetch, order, True, events.append)
        with trio.fail_after(3):
            while not events:
                await trio.sleep(0.01)
    assert len(events) == 1 and isinstance(events[0], PullError)
    assert "lazy = false" in str(events[0])
