"""HTTP for the registry client: pooled connections, timeouts, retries, redirects, auth.

One `httpx.AsyncClient` (HTTP/1.1, its own connection pool) per TLS setting, so
every request to a host reuses warm connections. A semaphore per origin bounds
the connections we hold open to it. Each call is bounded twice: every attempt by
`Timeouts.request` and the whole call, backoff included, by `Timeouts.operation`.
Connect errors, timeouts, dropped connections, 429 and 5xx are retried with
exponential backoff and jitter; everything else is the caller's to interpret.
"""

from __future__ import annotations

import datetime
import email.utils
import functools
import json
import logging
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

import httpx
import trio

from .auth import Authenticator
from .errors import BadResponse, HostsConfigError, RegistryUnavailable, Unauthorized
from .hosts import Endpoint, TLSSettings
from .keychain import Keychain
from .options import RegistryOptions

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_REDIRECTS = 5
ERROR_BODY_LIMIT = 64 * 1024
TOKEN_BODY_LIMIT = 1 << 20
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def is_retryable_status(status: int) -> bool:
    """429, 408 and server errors other than "not implemented" are worth another try."""
    return status in (408, 429) or (500 <= status <= 599 and status not in (501, 505))


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@dataclass
class Request:
    """One logical request; `what` names it in every error message."""

    method: str
    url: str
    endpoint: Endpoint
    what: str
    scope: str | None = None
    """Auth scope (`repository:<path>:pull`; several separated by spaces); None sends no credentials."""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    follow_redirects: bool = True


class _Retry(Exception):
    """An answer that deserves another attempt (429, 5xx)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class Transport:
    """Sends `Request`s; shared by everything one `RegistryClient` does."""

    def __init__(self, options: RegistryOptions, keychain: Keychain) -> None:
        self.options = options
        self.auth = Authenticator(keychain)
        self._clients: dict[TLSSettings, httpx.AsyncClient] = {}
        self._slots: dict[str, trio.Semaphore] = {}
        self._base_headers = {"User-Agent": options.user_agent, "Accept-Encoding": "identity"}

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    # ------------------------------------------------------------------ calls

    async def call(self, req: Request, consume: Callable[[httpx.Response], Awaitable[T]],
                   within: float | None = None) -> T:
        """Send `req` and return `consume(response)`, retrying transient failures.

        `consume` reads the body; a connection lost while it reads is retried
        like any other transient failure, so it must be safe to run again.
        `within` (seconds, retries included) shortens `Timeouts.operation`, for a
        caller that has another host to go to.
        """
        start = trio.current_time()

        async def attempt() -> T:
            async with self._open(req) as response:
                result = await consume(response)
                log.debug("%s %s %s: %d in %.0f ms", req.method, req.what, req.headers.get("Range", ""),
                          response.status_code, 1000 * (trio.current_time() - start))
                return result

        return await self._retrying(req, attempt, "no complete answer", within)

    @asynccontextmanager
    async def stream(self, req: Request) -> AsyncIterator[httpx.Response]:
        """Open `req` with retries and yield the response with its body unread.

        Only the opening is bounded by `Timeouts.request`; reading the body is
        bounded by `Timeouts.read` between chunks, as a whole layer may take long.
        """
        async with AsyncExitStack() as stack:
            yield await self._retrying(req, lambda: stack.enter_async_context(self._open(req)), "no answer")

    def unavailable(self, req: Request, reason: str) -> RegistryUnavailable:
        return RegistryUnavailable(f"{req.what} from {req.url}: {reason}")

    async def _retrying(self, req: Request, attempt: Callable[[], Awaitable[T]], timed_out: str,
                        within: float | None = None) -> T:
        """`attempt()` until it succeeds, each try within `Timeouts.request`, all of them within the operation's
        deadline (`within`, else `Timeouts.operation`); transient failures are retried after a backoff."""
        start = trio.current_time()
        operation = self.options.timeouts.operation
        deadline = start + (operation if within is None else min(within, operation))
        failures: list[str] = []
        for n in range(self.options.retries + 1):
            budget = min(self.options.timeouts.request, deadline - trio.current_time())
            if budget <= 0:
                break
            retry_after: float | None = None
            with trio.move_on_after(budget) as scope:
                try:
                    return await attempt()
                except _Retry as e:
                    failures.append(e.reason)
                    retry_after = e.retry_after
                except httpx.HTTPError as e:
                    failures.append(self._transient(req, e))
            if scope.cancelled_caught:
                failures.append(f"{timed_out} within {budget:.1f} s")
            if n == self.options.retries:
                break
            if not await self._backoff(n, retry_after, deadline, req, failures):
                break
        raise self._unavailable(req, failures, start)

    # ------------------------------------------------------------------ one attempt

    @asynccontextmanager
    async def _open(self, req: Request) -> AsyncIterator[httpx.Response]:
        """One attempt: send, answer one auth challenge (401, or 403 to credentials we sent),
        follow redirects; yield the final response."""
        url = req.url
        hops = 0
        reauthenticated = False
        endpoint = req.endpoint
        while True:
            same_origin = origin(url) == endpoint.origin
            headers = dict(self._base_headers)
            if same_origin:
                headers.update(endpoint.headers)
            headers.update(req.headers)
            sent_auth: str | None = None
            if same_origin and req.scope is not None:
                sent_auth = await self.auth.authorization(endpoint.host, req.scope, self._token_sender(endpoint))
                if sent_auth is not None:
                    headers["Authorization"] = sent_auth
            client = self._client(endpoint.tls if same_origin else TLSSettings())
            request = client.build_request(req.method, url, headers=headers, content=req.body,
                                           timeout=self._timeout(endpoint if same_origin else None))
            challenge: list[str] | None = None
            forbidden = False
            location: str | None = None
            async with self._slot(url):
                response = await client.send(request, stream=True)
                status = response.status_code
                if status == 401 and same_origin and req.scope is not None and not reauthenticated:
                    challenge = response.headers.get_list("www-authenticate")
                    await response.aclose()
                elif status == 403 and same_origin and sent_auth is not None and not reauthenticated:
                    forbidden = True  # maybe expired or rotated credentials: one retry with fresh ones
                    await response.aclose()
                elif status in _REDIRECTS and req.follow_redirects and response.headers.get("location"):
                    location = urljoin(url, response.headers["location"])
                    await response.aclose()
                elif is_retryable_status(status):
                    detail = await error_detail(response)
                    await response.aclose()
                    raise _Retry(f"HTTP {status}{detail}", _retry_after(response.headers.get("retry-after")))
                elif status == 401 and req.scope is not None:
                    detail = await error_detail(response)
                    await response.aclose()
                    refused = self.auth.describe(endpoint.host, sent_auth) if same_origin else "the request"
                    raise Unauthorized(f"{req.what}: {url} refused {refused} (HTTP 401{detail})")
                else:
                    try:
                        yield response
                    finally:
                        await response.aclose()
                    return
            if challenge is not None:
                await self.auth.challenged(endpoint.host, req.scope or "", challenge, sent_auth,
                                           self._token_sender(endpoint))
                reauthenticated = True
            elif forbidden and sent_auth is not None:
                await self.auth.forbidden(endpoint.host, req.scope or "", sent_auth)
                reauthenticated = True
            elif location is not None:
                hops += 1
                if hops > MAX_REDIRECTS:
                    raise BadResponse(f"{req.what} from {req.url}: more than {MAX_REDIRECTS} redirects")
                if not location.startswith(("http://", "https://")):
                    raise BadResponse(f"{req.what} from {url}: redirect to unsupported URL {location!r}")
                url = location

    def _token_sender(self, endpoint: Endpoint) -> Callable[[str, str, dict[str, str], bytes | None],
                                                            Awaitable[tuple[int, bytes]]]:
        async def send(method: str, url: str, headers: dict[str, str], body: bytes | None) -> tuple[int, bytes]:
            req = Request(method, url, endpoint, f"token for {endpoint.host}", None, headers, body)
            return await self.call(req, _status_and_body)
        return send

    # ------------------------------------------------------------------ plumbing

    def _client(self, tls: TLSSettings) -> httpx.AsyncClient:
        client = self._clients.get(tls)
        if client is None:
            per_host = self.options.max_connections_per_host
            client = httpx.AsyncClient(
                http1=True, http2=False, verify=_ssl_context(tls),
                timeout=self._timeout(None),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=4 * per_host,
                                    keepalive_expiry=30.0),
                follow_redirects=False,
            )
            self._clients[tls] = client
        return client

    def _timeout(self, endpoint: Endpoint | None) -> httpx.Timeout:
        """Our timeouts, with the endpoint's own `dial_timeout` (hosts.toml) for connecting when it has one."""
        t = self.options.timeouts
        connect = endpoint.dial_timeout if endpoint is not None and endpoint.dial_timeout else t.connect
        return httpx.Timeout(connect=connect, read=t.read, write=t.read, pool=t.request)

    def _slot(self, url: str) -> trio.Semaphore:
        key = origin(url)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = trio.Semaphore(self.options.max_connections_per_host)
        return slot

    def _transient(self, req: Request, error: httpx.HTTPError) -> str:
        """Describe a transport failure, or raise at once if retrying cannot help."""
        if isinstance(error, (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.DecodingError,
                              httpx.InvalidURL)):
            raise BadResponse(f"{req.what} from {req.url}: {type(error).__name__}: {error}") from error
        cause: BaseException | None = error
        while cause is not None:
            if isinstance(cause, ssl.SSLCertVerificationError):
                raise RegistryUnavailable(
                    f"{req.what} from {req.url}: TLS certificate not trusted ({cause.verify_message}); "
                    f"set `ca` or `skip_verify` in hosts.toml") from error
            cause = cause.__cause__ or cause.__context__
        return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__

    async def _backoff(self, attempt: int, retry_after: float | None, deadline: float, req: Request,
                       failures: list[str]) -> bool:
        """Sleep before the next attempt; False when the deadline would pass first."""
        ceiling = min(self.options.backoff_max, self.options.backoff_base * (2 ** attempt))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        if retry_after is not None:
            if retry_after > self.options.retry_after_max:
                failures.append(f"asked to retry after {retry_after:.0f} s, longer than we wait")
                return False
            delay = max(delay, retry_after)
        if trio.current_time() + delay >= deadline:
            return False
        log.debug("%s from %s: %s; retrying in %.2f s", req.what, req.url, failures[-1], delay)
        await trio.sleep(delay)
        return True

    def _unavailable(self, req: Request, failures: list[str], start: float) -> RegistryUnavailable:
        elapsed = trio.current_time() - start
        last = failures[-1] if failures else "no time left for an attempt"
        return RegistryUnavailable(f"{req.what} from {req.url}: {last} "
                                   f"({len(failures)} attempt(s) in {elapsed:.1f} s)")


async def read_body(response: httpx.Response, limit: int, what: str) -> bytes:
    """The whole body, refusing (as `BadResponse`) anything longer than `limit` bytes."""
    length = content_length(response)
    if length is not None and length > limit:
        raise BadResponse(f"{what}: {length}-byte answer, more than the {limit} bytes expected")
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.aiter_raw():
        total += len(chunk)
        if total > limit:
            raise BadResponse(f"{what}: answer longer than the {limit} bytes expected")
        chunks.append(chunk)
    return b"".join(chunks)


def content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()):  # int() would take "1_000", " 12" and other digits
        raise BadResponse(f"bad Content-Length {value!r} from {response.request.url}")
    return int(value)


async def error_detail(response: httpx.Response) -> str:
    """": CODE: message" from a distribution error body, best effort and bounded."""
    body = b""
    with trio.move_on_after(1.0):
        try:
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) >= ERROR_BODY_LIMIT:
                    break
        except httpx.HTTPError:
            pass
    try:
        errors = json.loads(body).get("errors")
        first = errors[0]
        return f": {first.get('code', '?')}: {first.get('message', '')}".rstrip()
    except (ValueError, RecursionError, AttributeError, IndexError, KeyError, TypeError):
        text = body[:200].decode("utf-8", "replace").strip()
        return f": {text}" if text and text.isprintable() else ""


async def _status_and_body(response: httpx.Response) -> tuple[int, bytes]:
    return response.status_code, await read_body(response, TOKEN_BODY_LIMIT, f"answer from {response.request.url}")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())


def _ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """A context for `tls`; built afresh when hosts.toml names certificate files (they are read at
    each pull, as containerd does), else the process's one context for the system's CAs."""
    if not tls.ca and not tls.client_certs:
        return _system_context(tls.skip_verify)
    context = _new_context(tls.skip_verify)
    for ca in tls.ca:
        try:
            context.load_verify_locations(cafile=str(ca))
        except (OSError, ssl.SSLError) as e:
            raise HostsConfigError(f"cannot load CA certificate {ca}: {e}") from None
    for cert, key in tls.client_certs:
        try:
            context.load_cert_chain(str(cert), str(key) if key is not None else None)
        except (OSError, ssl.SSLError) as e:
            raise HostsConfigError(f"cannot load client certificate {cert}: {e}") from None
    return context


@functools.cache
def _system_context(skip_verify: bool) -> ssl.SSLContext:
    """Loading the system's CAs took 26 ms (cProfile of a first `resolve`), on the trio thread,
    for every new client, so for every `lazysnap rpull` whose options differ from the daemon's.
    Shared: a context is never changed once built, and httpx only reads it."""
    return _new_context(skip_verify)


def _new_context(skip_verify: bool) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
