"""Frames and calls between the control plane and a data plane, over one unix stream socket.

A frame is an 8-byte prefix (header length, payload length; big-endian u32), a JSON
header and raw payload bytes, so a 4 MiB chunk crosses as itself, not as JSON. Either
side may call the other on the same connection: a request carries `op` and `id`; the
answer carries the same `id` and either its fields or `error`. A caller that stops
waiting (its reader timed out) sends `cancel` with the id, and the handler is cancelled:
a fetch nobody waits for must not hold the unit's single-flight slot until the
registry's own timeout, or the next reader would wait on it and fail too.

JSON rather than a schema library: a dozen small messages a second at most; the
bytes that matter travel as payload.

Compatibility: after an upgrade, a retired data plane of the old build keeps asking the
new control plane for its misses. So the calls only ever gain optional fields; a change
that an older peer cannot understand must raise PROTOCOL, and a data plane speaking
another protocol is retired at once (its misses may fail, its layers stay mounted).
"""

from __future__ import annotations

import itertools
import json
import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

log = logging.getLogger(__name__)

PREFIX = struct.Struct(">II")
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 256 << 20
"""Larger than any unit a layer caches (eStargz chunks and SOCI spans are a few MiB)."""
PROTOCOL = 1
"""The version of the calls below; `hello` answers it."""
SEND_TIMEOUT = 10.0
"""A frame the other side does not take in this long: it is stuck, and the channel is closed."""


class ChannelClosed(ConnectionError):
    """The other side went away (or sent garbage) before answering."""


class RemoteError(Exception):
    """The other side answered the call with an error; the message says why."""


@dataclass(frozen=True)
class Message:
    header: dict[str, Any]
    payload: bytes = b""


Handler = Callable[[Message], Awaitable[Message]]
"""Answers one request: a Message whose header holds the result fields."""


async def send(stream: trio.abc.Stream, message: Message) -> None:
    header = json.dumps(message.header, separators=(",", ":")).encode()
    await stream.send_all(PREFIX.pack(len(header), len(message.payload)) + header + message.payload)


async def receive(stream: trio.abc.ReceiveStream) -> Message | None:
    """The next frame, or None at a clean end of stream; ChannelClosed on a torn or oversized one."""
    prefix = await _exactly(stream, PREFIX.size, eof_ok=True)
    if prefix is None:
        return None
    header_size, payload_size = PREFIX.unpack(prefix)
    if header_size > MAX_HEADER or payload_size > MAX_PAYLOAD:
        raise ChannelClosed(f"frame of {header_size}+{payload_size} bytes is over the limit")
    raw = await _exactly(stream, header_size)
    payload = await _exactly(stream, payload_size) if payload_size else b""
    try:
        header = json.loads(raw or b"")
    except ValueError as e:
        raise ChannelClosed(f"unreadable frame header: {e}") from None
    if not isinstance(header, dict):
        raise ChannelClosed("frame header is not an object")
    return Message(header, payload or b"")


async def _exactly(stream: trio.abc.ReceiveStream, n: int, eof_ok: bool = False) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        try:
            part = await stream.receive_some(n - len(buf))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise ChannelClosed(str(e)) from None
        if not part:
            if eof_ok and not buf:
                return None
            raise ChannelClosed("connection closed in the middle of a frame")
        buf += part
    return bytes(buf)


class Channel:
    """Calls in both directions over one stream; `run` reads until the stream ends.

    Incoming requests are answered concurrently (a slow fetch does not hold up an
    attach), each by the handler registered for its `op`.
    """

    def __init__(self, stream: trio.abc.Stream, handlers: dict[str, Handler], name: str = "peer") -> None:
        self.stream = stream
        self.handlers = handlers
        self.name = name
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._handling: dict[object, trio.CancelScope] = {}
        self._send_lock = trio.Lock()
        self.closed = trio.Event()

    async def call(self, op: str, payload: bytes = b"", **fields: Any) -> Message:
        """Ask the other side; its answer, or RemoteError, or ChannelClosed if it goes away first."""
        if {"op", "id", "cancel"} & fields.keys():
            raise ValueError(f"{sorted(fields)}: op, id and cancel name the frame itself, not a call's fields")
        if self.closed.is_set():
            raise ChannelClosed(f"the channel to {self.name} is closed")
        call_id = next(self._ids)
        pending = self._pending[call_id] = _Pending()
        try:
            await self._send(Message({"op": op, "id": call_id, **fields}, payload))
            await pending.done.wait()
        except trio.Cancelled:
            if not pending.done.is_set() and not self.closed.is_set():
                try:
                    await self._send(Message({"cancel": call_id}))
                except ChannelClosed:
                    pass
            raise
        finally:
            del self._pending[call_id]
        if pending.answer is None:
            raise ChannelClosed(f"{self.name} went away before answering {op}")
        error = pending.answer.header.get("error")
        if error is not None:
            raise RemoteError(str(error))
        return pending.answer

    async def run(self) -> None:
        """Serve the channel until the stream ends; then every pending call fails with ChannelClosed."""
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        message = await receive(self.stream)
                    except ChannelClosed as e:
                        log.warning("channel to %s broke: %s", self.name, e)
                        break
                    if message is None:
                        break
                    if "op" in message.header:
                        scope = self._handling[message.header.get("id")] = trio.CancelScope()
                        nursery.start_soon(self._answer, message, scope)
                    elif "cancel" in message.header:
                        handling = self._handling.get(message.header["cancel"])
                        if handling is not None:
                            handling.cancel()
                    else:
                        pending = self._pending.get(message.header.get("id", -1))
                        if pending is not None:
                            pending.answer = message
                            pending.done.set()
                nursery.cancel_scope.cancel()
        finally:
            self.closed.set()
            for pending in self._pending.values():
                pending.done.set()
            await trio.aclose_forcefully(self.stream)

    async def _answer(self, request: Message, scope: trio.CancelScope) -> None:
        op, call_id = request.header.get("op"), request.header.get("id")
        handler = self.handlers.get(str(op))
        reply = Message({"id": call_id, "error": f"{op} was cancelled by its caller"})
        try:
            with scope:
                if handler is None:
                    raise RemoteError(f"unknown operation {op!r}")
                answer = await handler(request)
                reply = Message({"id": call_id, **answer.header}, answer.payload)
        except Exception as e:  # every failure is the caller's answer, never the channel's end
            if not isinstance(e, RemoteError):
                log.debug("%s from %s failed", op, self.name, exc_info=True)
            reply = Message({"id": call_id, "error": str(e) or type(e).__name__})
        finally:
            self._handling.pop(call_id, None)
        try:
            await self._send(reply)
        except (ChannelClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the caller is gone: nobody to tell

    async def _send(self, message: Message) -> None:
        """Send a whole frame, even when the caller is being cancelled: half a frame would
        break the stream for every other call. A peer that takes none for SEND_TIMEOUT is
        stuck, and the channel is closed."""
        with trio.CancelScope(shield=True):
            async with self._send_lock:
                try:
                    with trio.fail_after(SEND_TIMEOUT):
                        await send(self.stream, message)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                    raise ChannelClosed(f"cannot send to {self.name}: {e}") from None
                except trio.TooSlowError:
                    await trio.aclose_forcefully(self.stream)
                    raise ChannelClosed(f"{self.name} took no frame for {SEND_TIMEOUT:g} s") from None


class _Pending:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.answer: Message | None = None
