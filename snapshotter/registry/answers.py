"""What every part of the client shares: the error an unexpected status raises, the
checks a digest header must pass, and one verdict over several endpoints tried in turn.

Shared by every side of the client (pull, push, referrers), so a 404 or a 401
reads the same whichever operation met it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

import httpx

from . import digest as digests
from .errors import (
    BadResponse,
    InvalidReference,
    NotFoundError,
    PushRejected,
    RegistryError,
    RegistryUnavailable,
    Unauthorized,
)
from .hosts import Endpoint
from .reference import Reference
from .transport import Transport, error_detail

log = logging.getLogger(__name__)

T = TypeVar("T")

FAILOVER_ERRORS = (NotFoundError, RegistryUnavailable, Unauthorized, BadResponse)
"""Failures another endpoint may not share: worth trying the next one."""


class ClientPart:
    """A part of `RegistryClient` (blob reads, referrers, pushes): its transport, options and endpoint lookup."""

    def __init__(self, transport: Transport, endpoints: Callable[..., list[Endpoint]]) -> None:
        self.transport = transport
        self.options = transport.options
        self.endpoints = endpoints
        """`RegistryClient.endpoints`: the endpoints hosts.toml trusts with an operation, in order."""


def pull_scope(ref: Reference) -> str:
    return f"repository:{ref.path}:pull"


def push_scope(ref: Reference) -> str:
    return f"repository:{ref.path}:pull,push"


async def each(endpoints: list[Endpoint], what: str, attempt: Callable[[Endpoint], Awaitable[T]],
               failed: Callable[[Endpoint, RegistryError], None] | None = None) -> T:
    """`attempt` on each endpoint in order until one succeeds (`failed` hears of each failure);
    else the most telling error."""
    errors: list[tuple[Endpoint, RegistryError]] = []
    for i, ep in enumerate(endpoints):
        try:
            return await attempt(ep)
        except FAILOVER_ERRORS as e:
            errors.append((ep, e))
            if failed is not None:
                failed(ep, e)
            if i + 1 < len(endpoints):
                log.info("%s: %s failed (%s); trying %s", what, ep, e, endpoints[i + 1])
    raise summary(what, errors)


def summary(what: str, errors: list[tuple[Endpoint, RegistryError]]) -> RegistryError:
    """One error for failures on several endpoints: the only one, or the last telling one's class with them all."""
    if len(errors) == 1:
        return errors[0][1]
    telling = [e for _, e in errors if not isinstance(e, NotFoundError)]
    cls = type(telling[-1]) if telling else NotFoundError
    return cls(f"{what}: every endpoint failed: " + "; ".join(f"{ep}: {e}" for ep, e in errors))


def check_digest_header(response: httpx.Response, digest: str, what: str) -> None:
    announced = response.headers.get("docker-content-digest")
    if announced and announced != digest:
        raise BadResponse(f"{what} from {response.url}: server says it is {announced}")


def check_announced(response: httpx.Response, data: bytes, what: str) -> None:
    """The `Docker-Content-Digest` of a push answer, if sent, must be a digest of what we sent.

    It may use another algorithm than ours (the registry's canonical one), so the
    bytes are hashed with its algorithm rather than compared with our digest.
    """
    announced = response.headers.get("docker-content-digest")
    if not announced:
        return
    where = f"{what} to {response.url.copy_with(query=None)}"
    try:
        digests.validate(announced)
    except InvalidReference:
        raise BadResponse(f"{where}: invalid Docker-Content-Digest {announced!r}") from None
    digests.verify(data, announced, f"{where}: the registry's Docker-Content-Digest")


async def push_fail(response: httpx.Response, what: str) -> NoReturn:
    """Raise the error an unexpected answer to a push means: 4xx is a refusal, not worth repeating."""
    status = response.status_code
    if 400 <= status < 500 and status not in (401, 403, 404) or status in (501, 505):
        where = response.url.copy_with(query=None)
        raise PushRejected(f"{what}: {where} refused it (HTTP {status}{await error_detail(response)})")
    await fail(response, what)


async def fail(response: httpx.Response, what: str) -> NoReturn:
    """Raise the error an unexpected status means."""
    status = response.status_code
    detail = await error_detail(response)
    if status == 404:
        raise NotFoundError(f"{what} not found at {response.url} (HTTP 404{detail})")
    if status in (401, 403):
        raise Unauthorized(f"{what}: access denied by {response.url} (HTTP {status}{detail})")
    raise BadResponse(f"{what} from {response.url}: unexpected HTTP {status}{detail}")
