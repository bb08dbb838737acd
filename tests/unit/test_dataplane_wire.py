"""The control plane <-> data plane wire: frames, and calls in both directions over one stream."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from snapshotter.dataplane.client import DataPlanes, PlaneOptions, _Generation
from snapshotter.dataplane.server import DataPlane, Settings, _Served
from snapshotter.dataplane.wire import (
    MAX_HEADER,
    MAX_PAYLOAD,
    PREFIX,
    Channel,
    ChannelClosed,
    Message,
    RemoteError,
    receive,
    send,
)
from snapshotter.store import LayerRecord

# --------------------------------------------------------------------------- frames


async def test_frames_round_trip_header_and_binary_payload() -> None:
    left, right = trio.testing.memory_stream_pair()
    payload = bytes(range(256)) * 1000  # every byte value, not JSON-safe
    sent = [
        Message({"op": "fetch", "id": 1, "layer": "sha256:ab", "nested": {"a": [1, 2, None]}}, payload),
        Message({"id": 2, "ok": True}),  # empty payload
        Message({}, b"\x00"),
    ]
    with trio.fail_after(5):
        for message in sent:
            await send(left, message)
        got = [await receive(right) for _ in sent]
    assert got == sent
    assert got[1] is not None and got[1].payload == b""


async def test_clean_end_of_stream_is_none() -> None:
    left, right = trio.testing.memory_stream_pair()
    await send(left, Message({"n": 1}))
    await left.aclose()
    with trio.fail_after(5):
        assert await receive(right) == Message({"n": 1})
        assert await receive(right) is None


@pytest.mark.parametrize("header_size, payload_size", [(MAX_HEADER + 1, 0), (2, MAX_PAYLOAD + 1)],
                         ids=["header", "payload"])
async def test_oversized_frame_prefix_is_channel_closed(header_size: int, payload_size: int) -> None:
    left, right = trio.testing.memory_stream_pair()
    await left.send_all(PREFIX.pack(header_size, payload_size))  # nothing follows: must not wait for it
    with trio.fail_after(5), pytest.raises(ChannelClosed, match="over the limit"):
        await receive(right)


@pytest.mark.parametrize("raw", [b"[1,2,3]", b'"text"', b"42", b"null", b"{not json"],
                         ids=["list", "string", "number", "null", "garbage"])
async def test_header_that_is_not_a_json_object_is_channel_closed(raw: bytes) -> None:
    left, right = trio.testing.memory_stream_pair()
    await left.send_all(PREFIX.pack(len(raw), 0) + raw)
    with trio.fail_after(5), pytest.raises(ChannelClosed):
        await receive(right)


@pytest.mark.parametrize("cut", [3, PREFIX.size + 2, -1], ids=["in-prefix", "in-header", "in-payload"])
async def test_torn_frame_is_channel_closed(cut: int) -> None:
    header = json.dumps({"id": 1}).encode()
    frame = PREFIX.pack(len(header), 10) + header + b"0123456789"
    left, right = trio.testing.memory_stream_pair()
    await left.send_all(frame[:cut])
    await left.aclose()
    with trio.fail_after(5), pytest.raises(ChannelClosed, match="middle of a frame"):
        await receive(right)


# --------------------------------------------------------------------------- channels


class Peers:
    """Two channels over one in-memory stream pair, each running in the test's nursery."""

    def __init__(self, nursery: trio.Nursery, a_handlers: dict, b_handlers: dict) -> None:  # type: ignore[type-arg]
        left, right = trio.testing.memory_stream_pair()
        self.a = Channel(left, a_handlers, name="a")
        self.b = Channel(right, b_handlers, name="b")
        self.b_scope = trio.CancelScope()
        nursery.start_soon(self.a.run)
        nursery.start_soon(self._run_b)

    async def _run_b(self) -> None:
        with self.b_scope:
            await self.b.run()


async def _echo(request: Message) -> Message:
    return Message({"echo": request.header.get("value"), "op_seen": request.header["op"]}, request.payload[::-1])


async def test_calls_in_both_directions_over_one_stream() -> None:
    async def whoami_a(request: Message) -> Message:
        return Message({"me": "a"})

    async def whoami_b(request: Message) -> Message:
        return Message({"me": "b"})

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            peers = Peers(nursery, {"whoami": whoami_a, "echo": _echo}, {"whoami": whoami_b, "echo": _echo})
            assert (await peers.a.call("whoami")).header["me"] == "b"
            assert (await peers.b.call("whoami")).header["me"] == "a"
            answer = await peers.a.call("echo", b"\x00\x01payload\xff", value=[1, "x"])
            assert answer.header["echo"] == [1, "x"] and answer.payload == b"\xffdaolyap\x01\x00"
            answer = await peers.b.call("echo", value="from b")
            assert answer.header["echo"] == "from b" and answer.payload == b""
            nursery.cancel_scope.cancel()


async def test_concurrent_calls_answered_out_of_order_get_their_own_answers() -> None:
    release = trio.Event()
    started = 0

    async def held(request: Message) -> Message:
        nonlocal started
        started += 1
        n = int(request.header["n"])
        if n < 3:  # the first calls wait until the later ones have been answered
            await release.wait()
        return Message({"n": n, "square": n * n}, b"p%d" % n)

    finished: list[int] = []
    answers: dict[int, Message] = {}
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            peers = Peers(nursery, {}, {"held": held})

            async def call(n: int) -> None:
                answers[n] = await peers.a.call("held", n=n)
                finished.append(n)

            async with trio.open_nursery() as calls:
                for n in range(6):
                    calls.start_soon(call, n)
                while len(finished) < 3:
                    await trio.sleep(0.005)
                assert sorted(finished) == [3, 4, 5], "the unblocked calls must not wait for the held ones"
                assert started == 6, "requests are answered concurrently, not one at a time"
                release.set()
            nursery.cancel_scope.cancel()
    assert sorted(finished) == list(range(6))
    for n, answer in answers.items():
        assert (answer.header["n"], answer.header["square"], answer.payload) == (n, n * n, b"p%d" % n)


async def test_handler_exception_arrives_as_remote_error_and_the_channel_lives_on() -> None:
    async def broken(request: Message) -> Message:
        raise ValueError("the index on disk is torn")

    async def silent(request: Message) -> Message:
        raise KeyError()  # str() is "" : the type's name is sent instead

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            peers = Peers(nursery, {}, {"broken": broken, "silent": silent, "echo": _echo})
            with pytest.raises(RemoteError, match="the index on disk is torn"):
                await peers.a.call("broken")
            with pytest.raises(RemoteError, match="KeyError"):
                await peers.a.call("silent")
            with pytest.raises(RemoteError, match="unknown operation 'nope'"):
                await peers.a.call("nope")
            assert (await peers.a.call("echo", value=1)).header["echo"] == 1
            assert not peers.a.closed.is_set() and not peers.b.closed.is_set()
            nursery.cancel_scope.cancel()


async def test_pending_call_fails_when_the_other_side_goes_away() -> None:
    entered = trio.Event()

    async def forever(request: Message) -> Message:
        entered.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            peers = Peers(nursery, {}, {"forever": forever})
            errors: list[BaseException] = []

            async def pending() -> None:
                try:
                    await peers.a.call("forever")
                except ChannelClosed as e:
                    errors.append(e)

            async with trio.open_nursery() as calls:
                calls.start_soon(pending)
                await entered.wait()
                peers.b_scope.cancel()  # b stops and closes its end of the stream
            assert len(errors) == 1 and "went away" in str(errors[0])
            await peers.a.closed.wait()
            with pytest.raises(ChannelClosed):
                await peers.a.call("forever")  # a closed channel refuses at once
            nursery.cancel_scope.cancel()


async def test_garbage_from_the_other_side_ends_the_channel_and_its_pending_calls() -> None:
    left, right = trio.testing.memory_stream_pair()
    channel = Channel(left, {})
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.run)
            outcome: list[str] = []

            async def pending() -> None:
                try:
                    await channel.call("hello")
                except ChannelClosed:
                    outcome.append("closed")

            nursery.start_soon(pending)
            request = await receive(right)
            assert request is not None and request.header["op"] == "hello"
            await right.send_all(PREFIX.pack(3, 0) + b"[1]")  # a header that is not an object
            await channel.closed.wait()
    assert outcome == ["closed"]


async def test_a_field_named_id_cannot_steal_the_answer() -> None:
    """`call(op, **fields)` merges the fields into the header over its own `id`: a call with a
    field named `id` (as `DataPlanes.detach` makes) is answered under that id, never matches
    its pending entry, and hangs. Either refuse such a field up front, or answer the call."""
    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            peers = Peers(nursery, {}, {"echo": _echo})
            try:
                answer = await peers.a.call("echo", id=4242, value="mine")
            except (TypeError, ValueError):
                pass  # refused up front: fine too
            else:
                assert answer.header["echo"] == "mine"
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- both planes' real handlers


async def test_detach_through_the_real_handlers_completes_and_detaches_that_layer(tmp_path: Path) -> None:
    """`DataPlanes.detach` (control plane) against `DataPlane._detach` (data plane), over one stream.

    `served.release` (snapshot cleanup) and `served.restore` (a served layer no longer stored)
    await this; if it never returns, cleanup and start-up hang."""
    plane = DataPlane(Settings(tmp_path, generation=1, build="test"))
    for layer_id in (1, 7):
        record = LayerRecord(layer_id, f"sha256:{layer_id:064x}", "ref", "estargz", 10, "sha256:" + "0" * 64, 0)
        plane.layers[layer_id] = _Served(record, "fuse")
    planes = DataPlanes(PlaneOptions(tmp_path))
    left, right = trio.testing.memory_stream_pair()
    to_plane = Channel(left, {}, name="data plane 1")
    to_control = Channel(right, plane._handlers, name="control plane")
    planes._generations[1] = _Generation(1, tmp_path, to_plane, planes.build, os.getpid(), {1, 7})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(to_plane.run)
        nursery.start_soon(to_control.run)
        with trio.move_on_after(2) as waited:
            await planes.detach(7)
        nursery.cancel_scope.cancel()
    assert not waited.cancelled_caught, "DataPlanes.detach(7) got no answer in 2 s"
    assert sorted(plane.layers) == [1], "the data plane must detach layer 7, and only it"
    assert planes.served() == {1}
