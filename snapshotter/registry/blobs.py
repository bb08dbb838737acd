"""Reading large blobs: byte ranges (one multi-range GET where the server allows) and whole streams.

Reads go where `location.BlobLocator` says, and fail over with it. What we learn
about servers is remembered: a redirect target (S3/CDN URL) is reused until it
fails, then the registry is asked for a fresh one once; a server that refuses
multi-range requests gets single ranges from then on.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import TypeVar

import httpx
import trio

from . import digest as digests
from . import ranges as byteranges
from .answers import FAILOVER_ERRORS, ClientPart, fail, pull_scope
from .errors import BadResponse, RegistryError, RegistryUnavailable
from .location import BlobLocation, BlobLocator, RangeIgnored
from .transport import Request, content_length, error_detail, origin, read_body

log = logging.getLogger(__name__)

T = TypeVar("T")

_STALE_REDIRECT = frozenset({400, 401, 403, 404, 410})
"""Answers from a remembered redirect target that mean "ask the registry for a fresh URL"."""
MULTIPART_OVERHEAD = 1024
"""Bytes of boundary and headers we allow per part of a multipart/byteranges answer."""


class _StaleRedirect(Exception):
    """A remembered redirect target no longer serves the blob."""


class BlobReader(ClientPart):
    """Ranges and streams of blobs `BlobLocator.open_blob` found."""

    def __init__(self, locator: BlobLocator) -> None:
        super().__init__(locator.transport, locator.endpoints)
        self.locator = locator
        self.single_range_only: dict[str, str] = {}
        """Origins that refused a multi-range request, with why; they get single ranges only."""

    async def read_range(self, blob: BlobLocation, start: int, end: int) -> bytes:
        """Bytes `[start, end)` of the blob, in one ranged GET."""
        _check_bounds(blob, [(start, end)])
        if start == end:
            return b""
        result = await self._ranged(blob, [(start, end)], [(start, end)])
        assert result is not None
        return result[0]

    async def read_ranges(self, blob: BlobLocation, wanted: Sequence[tuple[int, int]]) -> list[bytes]:
        """Bytes of each `[start, end)` range, in the order given, with one multi-range GET if the server allows.

        A server that refuses (400/416), ignores (a 200 with the whole of a large
        blob) or mangles multi-range requests gets single ranges, now and from then on.
        """
        _check_bounds(blob, wanted)
        merged = byteranges.merge(wanted)
        if not merged:
            return [b"" for _ in wanted]
        if len(merged) > 1 and origin(blob.url) not in self.single_range_only:
            result = await self._ranged(blob, wanted, merged)
            if result is not None:
                return result
        pieces = await self._singles(blob, merged)
        parts = [byteranges.Part(start, data) for (start, _), data in zip(merged, pieces, strict=True)]
        out = byteranges.assemble(parts, wanted)
        assert out is not None
        return out

    async def _singles(self, blob: BlobLocation, merged: list[tuple[int, int]]) -> list[bytes]:
        """Each range in its own request, concurrently; the first failure cancels the rest."""
        results: list[bytes] = [b""] * len(merged)
        errors: list[RegistryError] = []

        async def one(i: int, start: int, end: int, cancel: trio.CancelScope) -> None:
            try:
                results[i] = await self.read_range(blob, start, end)
            except RegistryError as e:
                errors.append(e)
                cancel.cancel()

        async with trio.open_nursery() as nursery:
            for i, (start, end) in enumerate(merged):
                nursery.start_soon(one, i, start, end, nursery.cancel_scope)
        if errors:
            raise errors[0]
        return results

    async def _ranged(self, blob: BlobLocation, wanted: Sequence[tuple[int, int]],
                      requested: list[tuple[int, int]]) -> list[bytes] | None:
        """One GET for `requested`; `wanted` cut from the answer, or None if a multi-range was not honoured."""
        multi = len(requested) > 1
        what = f"{blob.what} bytes {byteranges.header(requested)[6:]}"

        async def consume(response: httpx.Response) -> list[bytes] | None:
            where = f"{what} from {response.url}"
            status = response.status_code
            if status == 206:
                mark = byteranges.boundary(response.headers.get("content-type", ""))
                if mark is None:
                    start, end = byteranges.content_range(response.headers.get("content-range"), blob.size, where)
                    body = await read_body(response, end - start, where)
                    if len(body) != end - start:
                        raise BadResponse(f"{where}: body has {len(body)} bytes, Content-Range promised {end - start}")
                    parts = [byteranges.Part(start, body)]
                else:
                    limit = sum(e - s for s, e in requested) + MULTIPART_OVERHEAD * (len(requested) + 4)
                    try:
                        parts = byteranges.parse_multipart(await read_body(response, limit, where), mark,
                                                           blob.size, where)
                    except BadResponse as e:
                        if not multi:
                            raise
                        self._single_ranges_from_now(blob, f"answered a multi-range request with a broken body ({e})")
                        return None
                out = byteranges.assemble(parts, wanted)
                if out is not None:
                    return out
                got = ", ".join(f"{p.start}-{p.end - 1}" for p in parts)
                if multi:
                    self._single_ranges_from_now(blob, f"answered a multi-range request with bytes {got}")
                    return None
                raise BadResponse(f"{where}: server sent bytes {got} (wrong Content-Range)")
            if status == 200:
                return await self._whole_answer(blob, response, wanted, where)
            if status in (400, 416) and multi:
                self._single_ranges_from_now(blob, f"answered a multi-range request with HTTP {status}")
                return None
            if status == 416:
                raise BadResponse(f"{where}: HTTP 416 for a range inside the {blob.size}-byte blob")
            await fail(response, what)

        headers = {"Range": byteranges.header(requested)}
        try:
            return await self.locator.failover(blob, what, lambda budget: self._blob_get(blob, headers, what, consume,
                                                                                         budget))
        except RangeIgnored as e:  # and no other host to ask
            if multi:
                self._single_ranges_from_now(blob, "answered a multi-range request with the whole blob")
                return None
            raise BadResponse(str(e)) from None

    async def _whole_answer(self, blob: BlobLocation, response: httpx.Response, wanted: Sequence[tuple[int, int]],
                            where: str) -> list[bytes]:
        """A 200 to a ranged GET: the server ignores Range, or (a pull-through cache) does not have the blob yet.

        Small blobs are read whole and verified, then sliced. Of a larger blob only
        the prefix up to the last wanted byte is read, when that is within
        `whole_body_limit` (its bytes are checked above, like a 206's); otherwise
        `RangeIgnored`, and the connection is closed without reading on.
        """
        length = content_length(response)
        if length is not None and length != blob.size:
            raise BadResponse(f"{where}: 200 with {length} bytes for a {blob.size}-byte blob")
        limit = self.options.whole_body_limit
        if blob.size <= limit:
            body = await read_body(response, blob.size, where)
            if len(body) != blob.size:
                raise BadResponse(f"{where}: whole-blob answer has {len(body)} of {blob.size} bytes")
            digests.verify(body, blob.digest, where)
            return [body[s:e] for s, e in wanted]
        reach = max(e for _, e in wanted)
        if reach > limit:
            raise RangeIgnored(f"{where}: the server ignores Range and the blob is {blob.size} bytes, "
                               f"more than the {limit} we download for a read")
        prefix = await _read_prefix(response, reach, where)
        log.debug("%s: whole blob sent; read its first %d bytes and closed the connection", where, reach)
        return [prefix[s:e] for s, e in wanted]

    def _single_ranges_from_now(self, blob: BlobLocation, why: str) -> None:
        key = origin(blob.url)
        if key not in self.single_range_only:
            log.info("%s %s; using single-range requests for it from now on", key, why)
            self.single_range_only[key] = why

    async def _blob_get(self, blob: BlobLocation, headers: dict[str, str], what: str,
                        consume: Callable[[httpx.Response], Awaitable[T]], budget: float | None = None) -> T:
        """GET from the blob's current URL; if a remembered redirect target fails, ask the registry once more."""
        scope = pull_scope(blob.ref)
        ep, registry_url, target = blob.endpoint, blob.registry_url, blob.url

        async def tracking(response: httpx.Response) -> T:
            final = str(response.url)
            if blob.endpoint == ep and final != blob.url:  # unless another read moved the blob to another host
                blob.url = final
            return await consume(response)

        if target == registry_url:
            return await self.transport.call(Request("GET", target, ep, what, scope, headers), tracking, budget)

        async def stale_aware(response: httpx.Response) -> T:
            if response.status_code in _STALE_REDIRECT:
                raise _StaleRedirect(f"HTTP {response.status_code}{await error_detail(response)}")
            return await consume(response)

        try:
            return await self.transport.call(Request("GET", target, ep, what, scope, headers), stale_aware, budget)
        except (_StaleRedirect, RegistryUnavailable) as e:
            log.info("%s: redirect target %s failed (%s); asking %s again", what, origin(target), e, ep)
        return await self.transport.call(Request("GET", registry_url, ep, what, scope, headers), tracking, budget)

    # ------------------------------------------------------------------ whole blobs

    async def stream_blob(self, blob: BlobLocation, chunk_size: int | None = None) -> AsyncGenerator[bytes, None]:
        """The whole blob as chunks of at most `chunk_size` bytes, in bounded memory.

        A dropped connection resumes where it stopped (`Range: bytes=N-`); a host
        that keeps failing (or cannot resume) hands over to the next host
        hosts.toml lists, from the same byte. The digest is checked at the end,
        over every byte whichever host sent it: the last step may raise
        `BadResponse`, so consumers must not trust what they stored until the
        iteration finished. Use it under `contextlib.aclosing` when you may stop early.
        """
        size = chunk_size or self.options.stream_chunk_size
        hasher = digests.hasher(blob.digest)
        offset = 0
        failures = 0
        retried_registry = False
        candidates = list(blob.candidates) or [blob.endpoint]
        tried = [blob.endpoint]
        while offset < blob.size:
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            url = blob.url
            req = Request("GET", url, blob.endpoint, blob.what, pull_scope(blob.ref), headers)
            consuming = False
            error: RegistryError
            try:
                async with self.transport.stream(req) as response:
                    status = response.status_code
                    if blob.redirected and status in _STALE_REDIRECT and not retried_registry:
                        retried_registry = True
                        blob.url = blob.registry_url
                        continue
                    blob.url = str(response.url)
                    await _check_stream_start(blob, response, offset, req)
                    chunks = response.aiter_raw(size)
                    while True:  # a trickled body is as good as a hung one: each chunk within Timeouts.request
                        with trio.move_on_after(self.options.timeouts.request) as slow:
                            try:
                                chunk = await chunks.__anext__()
                            except StopAsyncIteration:
                                break
                        if slow.cancelled_caught:
                            raise httpx.ReadTimeout(f"under {size} bytes in {self.options.timeouts.request:g} s")
                        if offset + len(chunk) > blob.size:
                            raise BadResponse(f"{blob.what} from {response.url}: more than {blob.size} bytes")
                        hasher.update(chunk)
                        offset += len(chunk)
                        consuming = True
                        yield chunk
                        consuming = False
                    if offset < blob.size:
                        raise httpx.ReadError("body ended early")
                continue
            except httpx.TransportError as e:
                if consuming:
                    raise
                failures += 1
                if failures <= self.options.retries:
                    log.info("%s: connection lost after %d bytes (%s); resuming", blob.what, offset, e)
                    await trio.sleep(min(self.options.backoff_max, self.options.backoff_base * 2 ** (failures - 1)))
                    continue
                error = RegistryUnavailable(f"{blob.what} from {url}: {type(e).__name__}: {e} after {offset} "
                                            f"of {blob.size} bytes ({failures} attempts)")
            except FAILOVER_ERRORS as e:
                if consuming:
                    raise
                error = e
            self.locator.note_failure(blob.endpoint, error, blob.avoid)
            ep = self.locator.next_host(blob, candidates, tried)
            if ep is None:
                raise error
            log.warning("%s: %s failed after %d of %d bytes (%s); going on from the next host",
                        blob.what, blob.endpoint, offset, blob.size, error)
            tried.append(ep)
            self.locator.move(blob, ep, blob.what)
            failures, retried_registry = 0, False
        digests.check(hasher, blob.digest, f"{blob.what} from {blob.url}")


async def _check_stream_start(blob: BlobLocation, response: httpx.Response, offset: int, req: Request) -> None:
    where = f"{blob.what} from {response.url}"
    status = response.status_code
    if status == 200 and offset == 0:
        length = content_length(response)
        if length is not None and length != blob.size:
            raise BadResponse(f"{where}: {length} bytes for a {blob.size}-byte blob")
        return
    if status == 206:
        start, _ = byteranges.content_range(response.headers.get("content-range"), blob.size, where)
        if start != offset:
            raise BadResponse(f"{where}: asked to resume at {offset}, got bytes from {start}")
        return
    if status == 200:
        raise BadResponse(f"{where}: server ignored Range when resuming at byte {offset}")
    await fail(response, req.what)


async def _read_prefix(response: httpx.Response, reach: int, where: str) -> bytes:
    """The first `reach` bytes of a body; the rest is left unread (closing the response drops the connection)."""
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.aiter_raw():
        chunks.append(chunk)
        total += len(chunk)
        if total >= reach:
            break
    if total < reach:
        raise BadResponse(f"{where}: whole-blob answer ended after {total} bytes")
    return b"".join(chunks)[:reach]


def _check_bounds(blob: BlobLocation, wanted: Sequence[tuple[int, int]]) -> None:
    for start, end in wanted:
        if not 0 <= start <= end <= blob.size:
            raise ValueError(f"range [{start}, {end}) is outside {blob.what} ({blob.size} bytes)")
