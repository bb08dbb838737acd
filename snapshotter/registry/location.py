"""Where a blob is read from: finding it and its size, and failing over between hosts.

`open_blob` learns a blob's size and where its reads go (following redirects to
S3/CDN URLs). A read that fails on one host (a mirror that died, hangs or answers
5xx) is sent to the next host hosts.toml lists, and the blob's later reads stay
there until the failed host has had time to recover.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import httpx
import trio

from . import digest as digests
from . import ranges as byteranges
from .answers import FAILOVER_ERRORS, ClientPart, check_digest_header, each, fail, pull_scope, summary
from .errors import BadResponse, NotFoundError, RegistryError, RegistryUnavailable
from .hosts import Capability, Endpoint
from .reference import Reference, repository
from .transport import Request, Transport, content_length, origin

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class BlobLocation:
    """Where a blob's bytes can be read from, learned once by `open_blob` and updated as we go."""

    ref: Reference
    digest: str
    size: int
    endpoint: Endpoint
    registry_url: str
    """The blob's URL at the registry endpoint."""
    url: str
    """Where reads go: `registry_url`, or the redirect target the registry last sent us to."""
    candidates: tuple[Endpoint, ...] = ()
    """Every endpoint hosts.toml gives for pulling the blob, in its order: reads fail over along it."""
    avoid: dict[str, float] = field(default_factory=dict)
    """Endpoint key -> when (trio clock) it could not serve this blob's ranges; passed over for a while."""

    @property
    def redirected(self) -> bool:
        return self.url != self.registry_url

    @property
    def what(self) -> str:
        return f"blob {self.digest} of {self.ref.name}"


class RangeIgnored(Exception):
    """A 200 with the whole of a large blob to a range request: a pull-through cache that has not
    stored the blob yet, or a server that ignores Range. Another host may serve the range."""


class BlobLocator(ClientPart):
    """Opens blobs and picks the host each read goes to; remembers which hosts failed lately."""

    def __init__(self, transport: Transport, endpoints: Callable[..., list[Endpoint]]) -> None:
        super().__init__(transport, endpoints)
        self.failed_hosts: dict[str, float] = {}
        """Endpoint key -> when (trio clock) a blob read or lookup on it last failed as unavailable."""

    async def open_blob(self, repo_ref: Reference | str, digest: str) -> BlobLocation:
        """Find a blob and its size (HEAD; `GET bytes=0-0` on mirrors and where HEAD is refused), following redirects.

        Hosts that failed lately are asked last. Mirrors get `GET bytes=0-0` rather
        than HEAD: distribution's pull-through cache answers a HEAD of a blob it
        lacks only after streaming all of it from upstream (and fetches it twice).
        """
        ref = repository(repo_ref)
        digests.validate(digest)
        candidates = self.endpoints(ref, Capability.PULL)
        avoid: dict[str, float] = {}
        blob = await each(self._live_first(candidates), f"blob {digest} of {ref.name}",
                          lambda ep: self._locate(ep, ref, digest),
                          lambda ep, e: self.note_failure(ep, e, avoid))
        blob.candidates = tuple(candidates)
        blob.avoid.update(avoid)
        return blob

    async def _locate(self, ep: Endpoint, ref: Reference, digest: str) -> BlobLocation:
        url = ep.url(ref.path, "blobs", digest)
        what = f"blob {digest} of {ref.name}"
        if ep.mirror:
            return await self._locate_by_get(ep, ref, digest, url, what)
        head = Request("HEAD", url, ep, what, pull_scope(ref))

        async def on_head(response: httpx.Response) -> tuple[int, str] | None:
            status = response.status_code
            if status == 200:
                check_digest_header(response, digest, what)
                size = content_length(response)
                return None if size is None else (size, str(response.url))
            if status == 404 and origin(str(response.url)) == ep.origin:
                raise NotFoundError(f"{what} not found at {response.url} (HTTP 404)")
            if status in (401, 403) and origin(str(response.url)) == ep.origin:
                await fail(response, head.what)
            return None

        found = await self.transport.call(head, on_head)
        if found is None:
            log.info("%s: HEAD refused by %s; asking for its size with GET bytes=0-0", what, ep)
            return await self._locate_by_get(ep, ref, digest, url, what)
        return _located(ep, ref, digest, url, *found)

    async def _locate_by_get(self, ep: Endpoint, ref: Reference, digest: str, url: str, what: str) -> BlobLocation:
        """The blob's size from `GET bytes=0-0`; a 200 (the whole blob) is not read, only its length taken.

        A mirror that answers a large blob with 200 is a pull-through cache that
        has not stored it yet (it is fetching it now): the blob's reads pass it
        over for `blob_avoid_seconds`, rather than each costing a whole-blob
        answer cut short (measured with distribution v2.8: about 4 MiB written per
        cut answer, and as much again pulled from upstream for nothing).
        """
        get = Request("GET", url, ep, what, pull_scope(ref), {"Range": "bytes=0-0"})
        whole = False

        async def on_get(response: httpx.Response) -> tuple[int, str]:
            nonlocal whole
            status = response.status_code
            whole = status == 200
            if status == 206 or status == 416:
                size = byteranges.total_size(response.headers.get("content-range"), f"{what} from {response.url}")
            elif status == 200:
                check_digest_header(response, digest, what)
                length = content_length(response)
                if length is None:
                    raise BadResponse(f"{what} from {response.url}: neither Content-Range nor Content-Length")
                size = length
            else:
                await fail(response, get.what)
            return size, str(response.url)

        blob = _located(ep, ref, digest, url, *await self.transport.call(get, on_get))
        if whole and ep.mirror and blob.size > self.options.whole_body_limit:
            log.info("%s: mirror %s does not have it yet (HTTP 200 to a range); reading it elsewhere for %g s",
                     what, ep, self.options.blob_avoid_seconds)
            blob.avoid[ep.key] = trio.current_time()
        return blob

    # ------------------------------------------------------------------ failover within a blob

    async def failover(self, blob: BlobLocation, what: str, read: Callable[[float | None], Awaitable[T]]) -> T:
        """`read` on the blob's host; if it fails there, on the next host hosts.toml lists, and so on.

        The host that answers becomes the blob's host for later reads. A host
        that failed is passed over for a while (`failed_host_seconds` for every
        blob when it was unavailable, `blob_avoid_seconds` for this blob when it
        could not serve it), then preferred again in hosts.toml order, so reads
        go back to a mirror that recovered. Every host but the last gets
        `failover_budget` seconds. Bytes are not checked here, whichever host
        sent them: that happens above, against chunk and span digests.
        """
        candidates = list(blob.candidates) or [blob.endpoint]
        tried: list[Endpoint] = []
        errors: list[tuple[Endpoint, RegistryError]] = []
        while (ep := self.next_host(blob, candidates, tried)) is not None:
            tried.append(ep)
            last = len(tried) == len(candidates)
            if ep != blob.endpoint:
                self.move(blob, ep, what)
            error: RegistryError
            try:
                return await read(None if last else self.options.failover_budget)
            except RangeIgnored as e:
                if last:
                    raise
                blob.avoid[ep.key] = trio.current_time()
                error = BadResponse(str(e))
            except FAILOVER_ERRORS as e:
                self.note_failure(ep, e, blob.avoid)
                error = e
            errors.append((ep, error))
            if not last:
                log.warning("%s: %s failed (%s); trying the next host", what, ep, error)
        raise summary(what, errors)

    def next_host(self, blob: BlobLocation, candidates: list[Endpoint], tried: list[Endpoint]) -> Endpoint | None:
        """The first candidate not tried yet that is not passed over for now; else the first not tried.

        Asked afresh before each attempt, so concurrent reads of a blob see each other's failures.
        """
        untried = [ep for ep in candidates if ep not in tried]
        now = trio.current_time()

        def passed_over(ep: Endpoint) -> bool:
            failed, avoided = self.failed_hosts.get(ep.key), blob.avoid.get(ep.key)
            return (failed is not None and now - failed < self.options.failed_host_seconds
                    or avoided is not None and now - avoided < self.options.blob_avoid_seconds)

        return next((ep for ep in untried if not passed_over(ep)), untried[0] if untried else None)

    def _live_first(self, endpoints: list[Endpoint]) -> list[Endpoint]:
        """`endpoints` with those that failed within `failed_host_seconds` moved to the end."""
        now = trio.current_time()
        recent = {k for k, when in self.failed_hosts.items() if now - when < self.options.failed_host_seconds}
        return sorted(endpoints, key=lambda ep: ep.key in recent)

    def note_failure(self, ep: Endpoint, error: RegistryError, avoid: dict[str, float]) -> None:
        """Remember that `ep` failed: for every blob if it was unavailable, in `avoid` (one blob's) otherwise."""
        if isinstance(error, RegistryUnavailable):
            self.failed_hosts[ep.key] = trio.current_time()
        else:
            avoid[ep.key] = trio.current_time()

    def move(self, blob: BlobLocation, ep: Endpoint, what: str) -> None:
        """Make `ep` the blob's host: reads go to its registry URL (redirects are learned afresh)."""
        log.info("%s: reading from %s from now on (was %s)", what, ep, blob.endpoint)
        blob.endpoint = ep
        blob.registry_url = blob.url = ep.url(blob.ref.path, "blobs", blob.digest)


def _located(ep: Endpoint, ref: Reference, digest: str, url: str, size: int, final: str) -> BlobLocation:
    if final != url:
        log.debug("blob %s of %s: registry %s redirects to %s", digest, ref.name, ep, origin(final))
    return BlobLocation(ref, digest, size, ep, url, final)
