"""The registry client: resolve images, fetch small blobs, read ranges of large ones.

Everything lazysnap asks of a registry goes through `RegistryClient`. It tries
the endpoints hosts.toml gives for an operation in order, verifies every digest
it can, and remembers what it learns about servers: where a blob was redirected
to (S3/CDN URLs are reused until they fail, then asked for again once), which
servers refuse multi-range requests (they get single ranges from then on), and
which hosts failed a read lately. A range read that fails on one host (a mirror
that died, hangs or answers 5xx) is sent to the next host hosts.toml lists, and
the blob's later reads stay there until the failed host has had time to recover.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import NoReturn, TypeVar
from urllib.parse import urlencode, urljoin

import httpx
import trio

from ..formats.errors import FormatError
from ..formats.jsondoc import load_object
from . import digest as digests
from . import ranges as byteranges
from . import referrers as refs
from .errors import (
    BadResponse,
    InvalidReference,
    NotFoundError,
    PushRejected,
    RegistryError,
    RegistryUnavailable,
    Unauthorized,
)
from .hosts import Capability, Endpoint, HostsConfig, for_capability
from .keychain import Keychain
from .manifest import ACCEPT, INDEX_TYPES, OCI_INDEX, Descriptor, Manifest, choose, decode
from .options import RegistryOptions
from .reference import Reference, parse, repository, validate_tag
from .transport import Request, Transport, content_length, error_detail, origin, read_body

log = logging.getLogger(__name__)

T = TypeVar("T")

_STALE_REDIRECT = frozenset({400, 401, 403, 404, 410})
"""Answers from a remembered redirect target that mean "ask the registry for a fresh URL"."""
MULTIPART_OVERHEAD = 1024
"""Bytes of boundary and headers we allow per part of a multipart/byteranges answer."""
_NO_REFERRERS_API = frozenset({404, 405, 501})
"""Answers to the referrers API that mean "not here": 404 is the spec's; 405 and 501 are what other
servers say of a route they lack. A 404 naming NAME_UNKNOWN is about the repository instead."""
MAX_REFERRER_PAGES = 64
"""Pages of a referrers API answer (`Link: <...>; rel="next"`) we follow before calling it a loop."""
CANCEL_UPLOAD_TIMEOUT = 5.0
"""Seconds we give the courtesy DELETE of a failed upload session."""


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


class RegistryClient:
    """An async registry client on trio; one per process is enough (connections are pooled per host)."""

    def __init__(self, options: RegistryOptions | None = None, *, hosts: HostsConfig | None = None,
                 keychain: Keychain | None = None) -> None:
        self.options = options or RegistryOptions()
        self.hosts = hosts or HostsConfig(self.options.certs_dir, self.options.plain_http)
        self.transport = Transport(self.options, keychain or Keychain.for_options(self.options))
        self.single_range_only: dict[str, str] = {}
        """Origins that refused a multi-range request, with why; they get single ranges only."""
        self.failed_hosts: dict[str, float] = {}
        """Endpoint key -> when (trio clock) a blob read or lookup on it last failed as unavailable."""
        self.referrers_api: dict[str, bool] = {}
        """Endpoints (origin + API path) known to serve the referrers API (True) or not to (False)."""
        self._tag_locks: dict[tuple[str, str, str], trio.Lock] = {}

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def endpoints(self, ref: Reference, *needed: Capability) -> list[Endpoint]:
        """The endpoints to try for `ref`'s registry, trusted with all of `needed`."""
        found = for_capability(self.hosts.endpoints(ref.domain), *needed)
        if not found:
            raise NotFoundError(f"no endpoint for {ref.domain} may {'+'.join(c.value for c in needed)} "
                                f"(see {self.hosts.host_dir(ref.domain)}/hosts.toml)")
        return found

    # ------------------------------------------------------------------ manifests

    async def resolve(self, ref: Reference | str) -> Manifest:
        """The image manifest `ref` names; from an index, the one for the configured platform."""
        ref = ref if isinstance(ref, Reference) else parse(ref)
        needed = (Capability.PULL,) if ref.digest else (Capability.PULL, Capability.RESOLVE)
        top, served_by = await self._each(self.endpoints(ref, *needed), f"manifest {ref}",
                                          lambda ep: self._manifest(ep, ref, ref.object, ref.digest))
        if top.media_type not in INDEX_TYPES:
            return top
        child = choose(top.parsed, self.options.platform, f"index {top.digest} of {ref}")
        pullers = self.endpoints(ref, Capability.PULL)
        pullers.sort(key=lambda ep: ep != served_by)
        manifest, _ = await self._each(pullers, f"manifest {child.digest} of {ref.name}",
                                       lambda ep: self._manifest(ep, ref, child.digest, child.digest))
        if manifest.media_type in INDEX_TYPES:
            raise BadResponse(f"index {top.digest} of {ref} points at another index {child.digest}")
        return replace(manifest, index_digest=top.digest)

    async def _manifest(self, ep: Endpoint, ref: Reference, obj: str,
                        expected: str | None) -> tuple[Manifest, Endpoint]:
        raw, content_type, digest = await self._get_manifest(ep, ref, obj, expected, ACCEPT, _scope(ref))
        media_type, parsed = decode(raw, content_type, f"{_manifest_what(ref, obj)} from {ep}")
        return Manifest(ref, digest, media_type, raw, parsed), ep

    async def _get_manifest(self, ep: Endpoint, ref: Reference, obj: str, expected: str | None, accept: str,
                            scope: str) -> tuple[bytes, str, str]:
        """(raw, Content-Type, digest) of manifest `obj`, verified against `expected` or the announced digest."""
        what = _manifest_what(ref, obj)
        req = Request("GET", ep.url(ref.path, "manifests", obj), ep, what, scope, {"Accept": accept})

        async def consume(response: httpx.Response) -> tuple[bytes, str, str | None]:
            if response.status_code != 200:
                await _fail(response, req.what)
            body = await read_body(response, self.options.max_manifest_size, f"{what} from {response.url}")
            return body, response.headers.get("content-type", ""), response.headers.get("docker-content-digest")

        raw, content_type, announced = await self.transport.call(req, consume)
        where = f"{what} from {ep}"
        digest = expected or announced or digests.of(raw)
        try:
            digests.validate(digest)
        except RegistryError:
            raise BadResponse(f"{where}: invalid Docker-Content-Digest {digest!r}") from None
        digests.verify(raw, digest, where)
        return raw, content_type, digest

    async def fetch_manifest(self, repo_ref: Reference | str, digest_or_tag: str,
                             accept: str = ACCEPT) -> tuple[str, bytes, str]:
        """(media type, raw bytes, digest) of a manifest, index or artifact manifest, exactly as stored.

        Unlike `resolve`, nothing is chosen or decoded: an image index comes back
        as the index, a SOCI index manifest as itself. By digest the bytes are
        verified against it; by tag against the `Docker-Content-Digest` the
        registry announces (endpoints trusted to resolve only). The media type is
        the body's `mediaType`, else the Content-Type.
        """
        ref = repository(repo_ref)
        by_digest = ":" in digest_or_tag
        if by_digest:
            digests.validate(digest_or_tag)
        else:
            validate_tag(digest_or_tag)
        needed = (Capability.PULL,) if by_digest else (Capability.PULL, Capability.RESOLVE)
        expected = digest_or_tag if by_digest else None
        raw, content_type, digest = await self._each(
            self.endpoints(ref, *needed), _manifest_what(ref, digest_or_tag),
            lambda ep: self._get_manifest(ep, ref, digest_or_tag, expected, accept, _scope(ref)))
        return _media_type(raw, content_type), raw, digest

    # ------------------------------------------------------------------ small blobs

    async def fetch_blob(self, repo_ref: Reference | str, digest: str, max_size: int | None = None) -> bytes:
        """A whole small blob (a config, an index, a TOC), digest-verified; larger than `max_size` is an error."""
        ref = repository(repo_ref)
        digests.validate(digest)
        limit = self.options.small_blob_size if max_size is None else max_size
        what = f"blob {digest} of {ref.name}"

        async def attempt(ep: Endpoint) -> bytes:
            req = Request("GET", ep.url(ref.path, "blobs", digest), ep, what, _scope(ref))

            async def consume(response: httpx.Response) -> bytes:
                if response.status_code != 200:
                    await _fail(response, req.what)
                return await read_body(response, limit, f"{what} from {response.url}")

            data = await self.transport.call(req, consume)
            digests.verify(data, digest, f"{what} from {ep}")
            return data

        return await self._each(self.endpoints(ref, Capability.PULL), what, attempt)

    # ------------------------------------------------------------------ large blobs

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
        blob = await self._each(self._live_first(candidates), f"blob {digest} of {ref.name}",
                                lambda ep: self._locate(ep, ref, digest),
                                lambda ep, e: self._note_failure(ep, e, avoid))
        blob.candidates = tuple(candidates)
        blob.avoid.update(avoid)
        return blob

    async def _locate(self, ep: Endpoint, ref: Reference, digest: str) -> BlobLocation:
        url = ep.url(ref.path, "blobs", digest)
        what = f"blob {digest} of {ref.name}"
        if ep.mirror:
            return await self._locate_by_get(ep, ref, digest, url, what)
        head = Request("HEAD", url, ep, what, _scope(ref))

        async def on_head(response: httpx.Response) -> tuple[int, str] | None:
            status = response.status_code
            if status == 200:
                _check_digest_header(response, digest, what)
                size = content_length(response)
                return None if size is None else (size, str(response.url))
            if status == 404 and origin(str(response.url)) == ep.origin:
                raise NotFoundError(f"{what} not found at {response.url} (HTTP 404)")
            if status in (401, 403) and origin(str(response.url)) == ep.origin:
                await _fail(response, head.what)
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
        get = Request("GET", url, ep, what, _scope(ref), {"Range": "bytes=0-0"})
        whole = False

        async def on_get(response: httpx.Response) -> tuple[int, str]:
            nonlocal whole
            status = response.status_code
            whole = status == 200
            if status == 206 or status == 416:
                size = byteranges.total_size(response.headers.get("content-range"), f"{what} from {response.url}")
            elif status == 200:
                _check_digest_header(response, digest, what)
                length = content_length(response)
                if length is None:
                    raise BadResponse(f"{what} from {response.url}: neither Content-Range nor Content-Length")
                size = length
            else:
                await _fail(response, get.what)
            return size, str(response.url)

        blob = _located(ep, ref, digest, url, *await self.transport.call(get, on_get))
        if whole and ep.mirror and blob.size > self.options.whole_body_limit:
            log.info("%s: mirror %s does not have it yet (HTTP 200 to a range); reading it elsewhere for %g s",
                     what, ep, self.options.blob_avoid_seconds)
            blob.avoid[ep.key] = trio.current_time()
        return blob

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
            await _fail(response, what)

        headers = {"Range": byteranges.header(requested)}
        try:
            return await self._failover(blob, what, lambda budget: self._blob_get(blob, headers, what, consume,
                                                                                  budget))
        except _RangeIgnored as e:  # and no other host to ask
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
        `_RangeIgnored`, and the connection is closed without reading on.
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
            raise _RangeIgnored(f"{where}: the server ignores Range and the blob is {blob.size} bytes, "
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
        scope = _scope(blob.ref)
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

    # ------------------------------------------------------------------ failover within a blob

    async def _failover(self, blob: BlobLocation, what: str, read: Callable[[float | None], Awaitable[T]]) -> T:
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
        while (ep := self._next_host(blob, candidates, tried)) is not None:
            tried.append(ep)
            last = len(tried) == len(candidates)
            if ep != blob.endpoint:
                self._move(blob, ep, what)
            error: RegistryError
            try:
                return await read(None if last else self.options.failover_budget)
            except _RangeIgnored as e:
                if last:
                    raise
                blob.avoid[ep.key] = trio.current_time()
                error = BadResponse(str(e))
            except (NotFoundError, RegistryUnavailable, Unauthorized, BadResponse) as e:
                self._note_failure(ep, e, blob.avoid)
                error = e
            errors.append((ep, error))
            if not last:
                log.warning("%s: %s failed (%s); trying the next host", what, ep, error)
        raise _summary(what, errors)

    def _next_host(self, blob: BlobLocation, candidates: list[Endpoint], tried: list[Endpoint]) -> Endpoint | None:
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

    def _note_failure(self, ep: Endpoint, error: RegistryError, avoid: dict[str, float]) -> None:
        """Remember that `ep` failed: for every blob if it was unavailable, in `avoid` (one blob's) otherwise."""
        if isinstance(error, RegistryUnavailable):
            self.failed_hosts[ep.key] = trio.current_time()
        else:
            avoid[ep.key] = trio.current_time()

    def _move(self, blob: BlobLocation, ep: Endpoint, what: str) -> None:
        """Make `ep` the blob's host: reads go to its registry URL (redirects are learned afresh)."""
        log.info("%s: reading from %s from now on (was %s)", what, ep, blob.endpoint)
        blob.endpoint = ep
        blob.registry_url = blob.url = ep.url(blob.ref.path, "blobs", blob.digest)

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
            req = Request("GET", url, blob.endpoint, blob.what, _scope(blob.ref), headers)
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
                    await self._check_stream_start(blob, response, offset, req)
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
            except (NotFoundError, RegistryUnavailable, Unauthorized, BadResponse) as e:
                if consuming:
                    raise
                error = e
            self._note_failure(blob.endpoint, error, blob.avoid)
            ep = self._next_host(blob, candidates, tried)
            if ep is None:
                raise error
            log.warning("%s: %s failed after %d of %d bytes (%s); going on from the next host",
                        blob.what, blob.endpoint, offset, blob.size, error)
            tried.append(ep)
            self._move(blob, ep, blob.what)
            failures, retried_registry = 0, False
        digests.check(hasher, blob.digest, f"{blob.what} from {blob.url}")

    async def _check_stream_start(self, blob: BlobLocation, response: httpx.Response, offset: int,
                                  req: Request) -> None:
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
        await _fail(response, req.what)

    # ------------------------------------------------------------------ referrers

    async def referrers(self, repo_ref: Reference | str, subject_digest: str,
                        artifact_type: str | None = None) -> list[Descriptor]:
        """The manifests in `repo_ref`'s repository whose `subject` is `subject_digest`, of `artifact_type`.

        Asks the referrers API; a registry without it (HTTP 404, remembered per
        endpoint; distribution 2.8 is one) is read through the referrers tag
        `sha256-<hex>` instead, and a missing or unusable tag means no referrers. Only endpoints trusted to
        resolve are asked: the list decides which index describes an image.
        """
        ref = repository(repo_ref)
        digests.validate(subject_digest)
        return await self._each(self.endpoints(ref, Capability.PULL, Capability.RESOLVE),
                                f"referrers of {subject_digest} in {ref.name}",
                                lambda ep: self._referrers(ep, ref, subject_digest, artifact_type))

    async def _referrers(self, ep: Endpoint, ref: Reference, subject: str,
                         artifact_type: str | None) -> list[Descriptor]:
        listed = None
        if self.referrers_api.get(ep.key) is not False:
            listed = await self._referrers_from_api(ep, ref, subject, artifact_type)
        if listed is None:
            listed = await self._referrers_from_tag(ep, ref, subject)
        return refs.matching(listed, artifact_type)

    async def _referrers_from_api(self, ep: Endpoint, ref: Reference, subject: str,
                                  artifact_type: str | None) -> list[Descriptor] | None:
        """The referrers API's list (every page of it), or None when the endpoint has no referrers API."""
        what = f"referrers of {subject} in {ref.name}"
        url = ep.url(ref.path, "referrers", subject)
        if artifact_type is not None:
            url += ("&" if "?" in url else "?") + urlencode({"artifactType": artifact_type})
        key = ep.key
        listed: list[Descriptor] = []
        for page in range(MAX_REFERRER_PAGES):
            req = Request("GET", url, ep, what, _scope(ref), {"Accept": OCI_INDEX})

            async def consume(response: httpx.Response) -> tuple[list[Descriptor], str | None] | None:
                status = response.status_code
                if status in _NO_REFERRERS_API:
                    detail = await error_detail(response)
                    if "NAME_UNKNOWN" not in detail:
                        self._no_referrers_api(key, f"answers the referrers API with HTTP {status}{detail}")
                    return None
                if status != 200:
                    await _fail(response, what)
                content_type = response.headers.get("content-type", "").partition(";")[0].strip()
                where = f"{what} from {response.url}"
                body = await read_body(response, self.options.max_manifest_size, where)
                try:
                    _, entries = refs.parse_list(body, content_type, where)
                except BadResponse:
                    if content_type in (OCI_INDEX, "application/json"):
                        raise
                    self._no_referrers_api(key, f"answers the referrers API with {content_type or 'no'} content")
                    return None
                following = response.links.get("next", {}).get("url")
                return entries, urljoin(str(response.url), following) if following else None

            answer = await self.transport.call(req, consume)
            if answer is None:
                if page:
                    raise BadResponse(f"{what}: page {page + 1} of the referrers list is gone from {url}")
                return None
            if key not in self.referrers_api:
                log.debug("%s serves the referrers API", key)
            self.referrers_api[key] = True
            entries, next_url = answer
            listed += entries
            if next_url is None:
                return listed
            url = next_url
        raise BadResponse(f"{what}: more than {MAX_REFERRER_PAGES} pages from {ep}")

    def _no_referrers_api(self, key: str, why: str) -> None:
        if self.referrers_api.get(key) is not False:
            log.info("%s %s; using the referrers tag schema for it from now on", key, why)
        self.referrers_api[key] = False

    async def _referrers_from_tag(self, ep: Endpoint, ref: Reference, subject: str) -> list[Descriptor]:
        tag = refs.referrers_tag(subject)
        try:
            raw, content_type, _ = await self._get_manifest(ep, ref, tag, None, ACCEPT, _scope(ref))
        except NotFoundError:
            return []
        try:
            return refs.parse_list(raw, content_type, f"referrers tag {ref.name}:{tag}")[1]
        except BadResponse as e:
            log.warning("%s from %s; taking it as no referrers", e, ep)
            return []

    async def supports_referrers_api(self, repo_ref: Reference | str) -> bool:
        """Whether the registry `referrers` would ask serves the referrers API (asked once, then remembered).

        A repository the registry does not know cannot tell; that answers False
        and is not remembered.
        """
        ref = repository(repo_ref)
        ep = self.endpoints(ref, Capability.PULL, Capability.RESOLVE)[0]
        key = ep.key
        if key not in self.referrers_api:
            await self._referrers_from_api(ep, ref, refs.EMPTY_JSON_DIGEST, None)
        return self.referrers_api.get(key, False)

    # ------------------------------------------------------------------ push

    async def push_blob(self, repo_ref: Reference | str, data: bytes, media_type: str = "application/octet-stream",
                        *, mount_from: Reference | str | None = None) -> Descriptor:
        """Upload `data` (monolithic POST + PUT) unless `HEAD` finds it; its descriptor.

        `mount_from` names another repository of the same registry that may hold
        the blob: the registry is asked to mount it from there first, and uploads
        it when it cannot. Pushes go to the first endpoint hosts.toml allows to push.
        """
        ref = repository(repo_ref)
        digest = digests.of(data)
        ep = self._pusher(ref)
        what = f"blob {digest} of {ref.name}"
        scope = _push_scope(ref)
        source = repository(mount_from) if mount_from is not None else None
        if source is not None and (source.domain != ref.domain or source.path == ref.path):
            source = None
        if source is not None:
            scope += f" {_scope(source)}"
        if await self._blob_exists(ep, ref, digest, len(data), scope):
            log.debug("%s is already at %s; not uploading it", what, ep)
        else:
            await self._upload(ep, ref, data, digest, scope, source)
        return Descriptor(media_type, digest, len(data))

    async def _blob_exists(self, ep: Endpoint, ref: Reference, digest: str, size: int, scope: str) -> bool:
        what = f"blob {digest} of {ref.name}"
        req = Request("HEAD", ep.url(ref.path, "blobs", digest), ep, what, scope)

        async def consume(response: httpx.Response) -> bool:
            status = response.status_code
            if status == 200:
                _check_digest_header(response, digest, what)
                length = content_length(response)
                if length is not None and length != size:
                    raise BadResponse(f"{what} at {response.url}: registry has {length} bytes, we have {size}")
                return True
            if origin(str(response.url)) != ep.origin:
                return status != 404  # redirected to storage, which may refuse HEAD: the registry has it
            if status in (401, 403):
                await _fail(response, what)
            return False

        return await self.transport.call(req, consume)

    async def _upload(self, ep: Endpoint, ref: Reference, data: bytes, digest: str, scope: str,
                      source: Reference | None) -> None:
        what = f"upload of blob {digest} to {ref.name}"
        for session in range(2):
            location = await self._start_upload(ep, ref, data, digest, scope, source, what)
            if location is None:
                log.debug("%s: mounted from %s", what, source.name if source else "?")
                return
            try:
                await self._finish_upload(ep, location, data, digest, scope, what)
                return
            except _UploadLost as e:
                if await self._blob_exists(ep, ref, digest, len(data), scope):
                    return
                if session:
                    raise RegistryUnavailable(f"{what}: the registry lost the upload session twice ({e})") from None
                log.info("%s: upload session lost (%s); starting a new one", what, e)
            except RegistryError:
                await self._cancel_upload(ep, location, scope, what)
                raise

    async def _start_upload(self, ep: Endpoint, ref: Reference, data: bytes, digest: str, scope: str,
                            source: Reference | None, what: str) -> str | None:
        """The upload URL of a new session, or None when the blob was mounted from `source`."""
        url = ep.url(ref.path, "blobs", "uploads/")
        if source is not None:
            url += ("&" if "?" in url else "?") + urlencode({"mount": digest, "from": source.path})
        req = Request("POST", url, ep, what, scope, body=b"")

        async def consume(response: httpx.Response) -> str | None:
            status = response.status_code
            if status == 201 and source is not None:
                _check_announced(response, data, what)
                return None
            if status != 202:
                await _push_fail(response, what)
            location = response.headers.get("location")
            if not location:
                raise BadResponse(f"{what}: {response.url} answered 202 without a Location")
            return urljoin(str(response.url), location)

        return await self.transport.call(req, consume)

    async def _finish_upload(self, ep: Endpoint, location: str, data: bytes, digest: str, scope: str,
                             what: str) -> None:
        url = location + ("&" if "?" in location else "?") + urlencode({"digest": digest})
        req = Request("PUT", url, ep, what, scope, {"Content-Type": "application/octet-stream"}, data)

        async def consume(response: httpx.Response) -> None:
            status = response.status_code
            if status == 404:
                raise _UploadLost(f"HTTP 404{await error_detail(response)}")
            if status not in (201, 204):
                await _push_fail(response, what)
            _check_announced(response, data, what)

        await self.transport.call(req, consume)

    async def _cancel_upload(self, ep: Endpoint, location: str, scope: str, what: str) -> None:
        """Best effort, briefly: tell the registry it may drop the session."""
        async def consume(response: httpx.Response) -> int:
            return response.status_code

        with trio.move_on_after(min(self.options.timeouts.request, CANCEL_UPLOAD_TIMEOUT)):
            try:
                await self.transport.call(Request("DELETE", location, ep, f"cancel {what}", scope), consume)
            except RegistryError as e:
                log.debug("%s: cancelling the upload failed: %s", what, e)

    async def push_manifest(self, ref: Reference | str, raw: bytes, media_type: str) -> str:
        """Push `raw` as `media_type` under `ref`'s tag, or by its digest; the manifest's digest.

        A digest in `ref` must be that of `raw`. The registry's Docker-Content-Digest,
        when sent, must match too.
        """
        digest, _ = await self._push_manifest(ref if isinstance(ref, Reference) else parse(ref), raw, media_type)
        return digest

    async def _push_manifest(self, ref: Reference, raw: bytes, media_type: str) -> tuple[str, str | None]:
        """(digest, the `OCI-Subject` header the registry answered with)."""
        digest = digests.of(raw, ref.digest.partition(":")[0] if ref.digest else "sha256")
        if ref.digest is not None and ref.digest != digest:
            raise ValueError(f"cannot push {ref}: the manifest's digest is {digest}")
        obj = ref.tag or digest
        ep = self._pusher(ref)
        what = f"push of {_manifest_what(ref, obj)}"
        req = Request("PUT", ep.url(ref.path, "manifests", obj), ep, what, _push_scope(ref),
                      {"Content-Type": media_type}, raw)

        async def consume(response: httpx.Response) -> str | None:
            if not 200 <= response.status_code < 300:
                await _push_fail(response, what)
            _check_announced(response, raw, what)
            return response.headers.get("oci-subject")

        subject = await self.transport.call(req, consume)
        if subject:
            self.referrers_api[ep.key] = True
        return digest, subject

    async def push_referrer(self, repo_ref: Reference | str, raw: bytes, media_type: str) -> Descriptor:
        """Push a manifest with a `subject` (a SOCI index, a signature) by digest, and make it discoverable.

        A registry that answers `OCI-Subject` lists it by itself; for any other,
        the referrers tag of the subject is updated. Returns the descriptor the
        referrers list holds for it.
        """
        ref = repository(repo_ref)
        subject = refs.subject_of(raw)
        if subject is None:
            raise ValueError(f"cannot push a referrer to {ref.name}: the manifest has no subject")
        digest, acknowledged = await self._push_manifest(Reference(ref.domain, ref.path), raw, media_type)
        descriptor = refs.referrer_descriptor(raw, media_type, digest)
        if acknowledged != subject.digest:
            await self.update_referrers_tag(ref, subject.digest, descriptor)
        return descriptor

    async def update_referrers_tag(self, repo_ref: Reference | str, subject_digest: str, new: Descriptor) -> str:
        """Add `new` to the referrers tag of `subject_digest` (read, append, push back); the tag's digest.

        For registries without the referrers API. A missing tag starts an empty
        OCI index; an entry with `new`'s digest already listed is left as it is,
        and nothing is pushed. A tag holding anything but an OCI image index is
        not overwritten (`BadResponse`). Calls in this process are serialised per
        tag; other writers of the same tag can still race with us.
        """
        ref = repository(repo_ref)
        digests.validate(subject_digest)
        digests.validate(new.digest)
        ep = self._pusher(ref)
        tag = refs.referrers_tag(subject_digest)
        lock = self._tag_locks.setdefault((ep.key, ref.path, tag), trio.Lock())
        async with lock:
            where = f"referrers tag {ref.name}:{tag}"
            try:
                raw, content_type, current = await self._get_manifest(ep, ref, tag, None, ACCEPT, _push_scope(ref))
            except NotFoundError:
                doc, listed, current = refs.empty_list(), list[Descriptor](), ""
            else:
                doc, listed = refs.parse_list(raw, content_type, f"{where} at {ep}")
            body = refs.with_entry(doc, listed, new)
            if body is None:
                log.debug("%s already lists %s", where, new.digest)
                return current
            digest, _ = await self._push_manifest(Reference(ref.domain, ref.path, tag), body, OCI_INDEX)
            log.debug("%s now lists %d referrer(s)", where, len(listed) + 1)
            return digest

    def _pusher(self, ref: Reference) -> Endpoint:
        """Where pushes go: the first endpoint trusted to push (blobs, manifests and tags all to one place)."""
        return self.endpoints(ref, Capability.PUSH)[0]

    # ------------------------------------------------------------------ endpoints

    async def _each(self, endpoints: list[Endpoint], what: str, attempt: Callable[[Endpoint], Awaitable[T]],
                    failed: Callable[[Endpoint, RegistryError], None] | None = None) -> T:
        """`attempt` on each endpoint in order until one succeeds (`failed` hears of each failure);
        else the most telling error."""
        errors: list[tuple[Endpoint, RegistryError]] = []
        for i, ep in enumerate(endpoints):
            try:
                return await attempt(ep)
            except (NotFoundError, RegistryUnavailable, Unauthorized, BadResponse) as e:
                errors.append((ep, e))
                if failed is not None:
                    failed(ep, e)
                if i + 1 < len(endpoints):
                    log.info("%s: %s failed (%s); trying %s", what, ep, e, endpoints[i + 1])
        raise _summary(what, errors)


def _summary(what: str, errors: list[tuple[Endpoint, RegistryError]]) -> RegistryError:
    """One error for failures on several endpoints: the only one, or the last telling one's class with them all."""
    if len(errors) == 1:
        return errors[0][1]
    telling = [e for _, e in errors if not isinstance(e, NotFoundError)]
    cls = type(telling[-1]) if telling else NotFoundError
    return cls(f"{what}: every endpoint failed: " + "; ".join(f"{ep}: {e}" for ep, e in errors))


def _located(ep: Endpoint, ref: Reference, digest: str, url: str, size: int, final: str) -> BlobLocation:
    if final != url:
        log.debug("blob %s of %s: registry %s redirects to %s", digest, ref.name, ep, origin(final))
    return BlobLocation(ref, digest, size, ep, url, final)


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


class _RangeIgnored(Exception):
    """A 200 with the whole of a large blob to a range request: a pull-through cache that has not
    stored the blob yet, or a server that ignores Range. Another host may serve the range."""


class _StaleRedirect(Exception):
    """A remembered redirect target no longer serves the blob."""


class _UploadLost(Exception):
    """The registry no longer knows the upload session (HTTP 404 to the upload URL)."""


def _scope(ref: Reference) -> str:
    return f"repository:{ref.path}:pull"


def _push_scope(ref: Reference) -> str:
    return f"repository:{ref.path}:pull,push"


def _manifest_what(ref: Reference, obj: str) -> str:
    return f"manifest {ref.name}{'@' if ':' in obj else ':'}{obj}"


def _media_type(raw: bytes, content_type: str) -> str:
    """The body's `mediaType` (covered by the digest), else the Content-Type without parameters."""
    try:
        media_type = load_object(raw, "manifest").get("mediaType")
    except FormatError:
        media_type = None
    if isinstance(media_type, str) and media_type:
        return media_type
    return content_type.partition(";")[0].strip()


def _check_bounds(blob: BlobLocation, wanted: Sequence[tuple[int, int]]) -> None:
    for start, end in wanted:
        if not 0 <= start <= end <= blob.size:
            raise ValueError(f"range [{start}, {end}) is outside {blob.what} ({blob.size} bytes)")


def _check_digest_header(response: httpx.Response, digest: str, what: str) -> None:
    announced = response.headers.get("docker-content-digest")
    if announced and announced != digest:
        raise BadResponse(f"{what} from {response.url}: server says it is {announced}")


def _check_announced(response: httpx.Response, data: bytes, what: str) -> None:
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


async def _push_fail(response: httpx.Response, what: str) -> NoReturn:
    """Raise the error an unexpected answer to a push means: 4xx is a refusal, not worth repeating."""
    status = response.status_code
    if 400 <= status < 500 and status not in (401, 403, 404) or status in (501, 505):
        where = response.url.copy_with(query=None)
        raise PushRejected(f"{what}: {where} refused it (HTTP {status}{await error_detail(response)})")
    await _fail(response, what)


async def _fail(response: httpx.Response, what: str) -> NoReturn:
    """Raise the error an unexpected status means."""
    status = response.status_code
    detail = await error_detail(response)
    if status == 404:
        raise NotFoundError(f"{what} not found at {response.url} (HTTP 404{detail})")
    if status in (401, 403):
        raise Unauthorized(f"{what}: access denied by {response.url} (HTTP {status}{detail})")
    raise BadResponse(f"{what} from {response.url}: unexpected HTTP {status}{detail}")
