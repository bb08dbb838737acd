"""The push side: blob uploads, manifest PUTs and referrers tags.

Used only by the SOCI and profile tooling (lazysnap pulls; it pushes what it
builds for images). Everything goes to the first endpoint hosts.toml trusts
with `push`: blobs, manifests and tags all to one place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from urllib.parse import urlencode, urljoin

import httpx
import trio

from . import digest as digests
from . import referrers as refs
from .answers import ClientPart, check_announced, check_digest_header, fail, pull_scope, push_fail, push_scope
from .documents import get_manifest, manifest_what
from .errors import BadResponse, NotFoundError, RegistryError, RegistryUnavailable
from .hosts import Capability, Endpoint
from .manifest import ACCEPT, OCI_INDEX, Descriptor
from .reference import Reference, parse, repository
from .transport import Request, Transport, content_length, error_detail, origin

log = logging.getLogger(__name__)

CANCEL_UPLOAD_TIMEOUT = 5.0
"""Seconds we give the courtesy DELETE of a failed upload session."""


class _UploadLost(Exception):
    """The registry no longer knows the upload session (HTTP 404 to the upload URL)."""


class Pusher(ClientPart):
    """Uploads blobs and pushes manifests; keeps referrers tags for registries without the referrers API."""

    def __init__(self, transport: Transport, endpoints: Callable[..., list[Endpoint]],
                 referrers_api: dict[str, bool]) -> None:
        super().__init__(transport, endpoints)
        self.referrers_api = referrers_api
        """Shared with `referrers.ReferrersLookup`: an `OCI-Subject` answer shows the endpoint has the API."""
        self._tag_locks: dict[tuple[str, str, str], trio.Lock] = {}

    # ------------------------------------------------------------------ blobs

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
        scope = push_scope(ref)
        source = repository(mount_from) if mount_from is not None else None
        if source is not None and (source.domain != ref.domain or source.path == ref.path):
            source = None
        if source is not None:
            scope += f" {pull_scope(source)}"
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
                check_digest_header(response, digest, what)
                length = content_length(response)
                if length is not None and length != size:
                    raise BadResponse(f"{what} at {response.url}: registry has {length} bytes, we have {size}")
                return True
            if origin(str(response.url)) != ep.origin:
                return status != 404  # redirected to storage, which may refuse HEAD: the registry has it
            if status in (401, 403):
                await fail(response, what)
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
                check_announced(response, data, what)
                return None
            if status != 202:
                await push_fail(response, what)
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
                await push_fail(response, what)
            check_announced(response, data, what)

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

    # ------------------------------------------------------------------ manifests

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
        what = f"push of {manifest_what(ref, obj)}"
        req = Request("PUT", ep.url(ref.path, "manifests", obj), ep, what, push_scope(ref),
                      {"Content-Type": media_type}, raw)

        async def consume(response: httpx.Response) -> str | None:
            if not 200 <= response.status_code < 300:
                await push_fail(response, what)
            check_announced(response, raw, what)
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
                raw, content_type, current = await get_manifest(self.transport, ep, ref, tag, None, ACCEPT,
                                                                 push_scope(ref))
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

