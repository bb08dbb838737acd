"""Referrers (OCI distribution 1.1): the manifests whose `subject` points at a given manifest.

A registry with the referrers API lists them at `GET /v2/<name>/referrers/<digest>`
as an OCI image index. A registry without it (distribution 2.8 answers that path
with a plain 404) relies on clients: whoever pushes a manifest with a `subject`
keeps an OCI image index listing it under the tag `<alg>-<hex>` of the subject
(the "referrers tag schema"). SOCI v1 indexes are found this way.

First the pure part (bytes in, records out: the tag, the list, the descriptor of
a referrer), then `ReferrersLookup`, which asks a registry for the list. Pushing
a referrer is the push side's (`push.Pusher.push_referrer`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode, urljoin

import httpx

from ..formats.jsondoc import load_object
from . import digest as digests
from .answers import ClientPart, each, fail, pull_scope
from .documents import get_manifest
from .errors import BadResponse, NotFoundError
from .hosts import Capability, Endpoint
from .manifest import ACCEPT, OCI_INDEX, Descriptor, decode
from .reference import Reference, repository
from .transport import Request, Transport, error_detail, read_body

log = logging.getLogger(__name__)

EMPTY_JSON_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
"""The digest of `{}`, the OCI "empty" blob; a well-formed digest to probe the referrers API with."""

_NOT_IN_TAG = re.compile(r"[^a-zA-Z0-9_.-]")
_NO_REFERRERS_API = frozenset({404, 405, 501})
"""Answers to the referrers API that mean "not here": 404 is the spec's; 405 and 501 are what other
servers say of a route they lack. A 404 naming NAME_UNKNOWN is about the repository instead."""
MAX_REFERRER_PAGES = 64
"""Pages of a referrers API answer (`Link: <...>; rel="next"`) we follow before calling it a loop."""


def referrers_tag(digest: str) -> str:
    """The tag listing the referrers of `digest` on registries without the API: `sha256-<hex>`.

    The algorithm is cut to 32 characters and the encoded part to 64, and any
    character a tag may not hold becomes `-`.
    """
    algorithm, _, encoded = digest.partition(":")
    return _NOT_IN_TAG.sub("-", f"{algorithm[:32]}-{encoded[:64]}")


def subject_of(raw: bytes, what: str = "manifest") -> Descriptor | None:
    """The `subject` of a manifest we are about to push, if it has one (ValueError if it is malformed)."""
    subject = load_object(raw, what).get("subject")
    if subject is None:
        return None
    try:
        return Descriptor.parse(subject, f"{what} subject")
    except BadResponse as e:
        raise ValueError(str(e)) from None


def referrer_descriptor(raw: bytes, media_type: str, digest: str) -> Descriptor:
    """How a referrers list describes the manifest `raw` (pushed as `media_type`, digest `digest`).

    `artifactType` is the manifest's own, else its config's media type (image
    manifests only); the manifest's annotations are copied, as the spec asks.
    """
    doc = load_object(raw, f"manifest {digest}")
    artifact_type = doc.get("artifactType")
    if not isinstance(artifact_type, str) or not artifact_type:
        config = doc.get("config")
        artifact_type = ""
        if isinstance(config, dict) and isinstance(config.get("mediaType"), str):
            artifact_type = config["mediaType"]
    annotations = doc.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
        raise ValueError(f"manifest {digest}: invalid annotations")
    body_type = doc.get("mediaType")
    return Descriptor(body_type if isinstance(body_type, str) and body_type else media_type, digest, len(raw),
                      dict(annotations), artifact_type=artifact_type)


def parse_list(raw: bytes, content_type: str, what: str) -> tuple[dict[str, Any], list[Descriptor]]:
    """(the index as JSON, its entries) of a referrers list; `BadResponse` unless it is an OCI image index."""
    media_type, doc = decode(raw, content_type, what)
    if media_type != OCI_INDEX:
        raise BadResponse(f"{what}: a {media_type}, not an OCI image index")
    entries = doc.get("manifests")
    if entries is None:
        entries = doc["manifests"] = []
    if not isinstance(entries, list):
        raise BadResponse(f"{what}: `manifests` is not a list")
    return doc, [Descriptor.parse(e, f"{what} entry {i}") for i, e in enumerate(entries)]


def empty_list() -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}


def with_entry(doc: dict[str, Any], listed: list[Descriptor], new: Descriptor) -> bytes | None:
    """The serialised index `doc` with `new` appended, or None when its digest is already listed.

    Everything else in `doc` (annotations, unknown fields, entry order) is kept.
    """
    if any(d.digest == new.digest for d in listed):
        return None
    updated = dict(doc)
    updated["manifests"] = [*doc.get("manifests", []), new.to_json()]
    updated.setdefault("schemaVersion", 2)
    updated.setdefault("mediaType", OCI_INDEX)
    return json.dumps(updated, separators=(",", ":")).encode()


def matching(listed: list[Descriptor], artifact_type: str | None) -> list[Descriptor]:
    """The entries of `artifact_type` (all when None), in list order, without repeated digests."""
    seen: set[str] = set()
    out = []
    for d in listed:
        if (artifact_type is None or d.artifact_type == artifact_type) and d.digest not in seen:
            seen.add(d.digest)
            out.append(d)
    return out


class ReferrersLookup(ClientPart):
    """Lists referrers through the referrers API, or the referrers tag where a registry lacks the API."""

    def __init__(self, transport: Transport, endpoints: Callable[..., list[Endpoint]]) -> None:
        super().__init__(transport, endpoints)
        self.referrers_api: dict[str, bool] = {}
        """Endpoints (origin + API path) known to serve the referrers API (True) or not to (False)."""

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
        return await each(self.endpoints(ref, Capability.PULL, Capability.RESOLVE),
                          f"referrers of {subject_digest} in {ref.name}",
                          lambda ep: self._referrers(ep, ref, subject_digest, artifact_type))

    async def _referrers(self, ep: Endpoint, ref: Reference, subject: str,
                         artifact_type: str | None) -> list[Descriptor]:
        listed = None
        if self.referrers_api.get(ep.key) is not False:
            listed = await self._from_api(ep, ref, subject, artifact_type)
        if listed is None:
            listed = await self._from_tag(ep, ref, subject)
        return matching(listed, artifact_type)

    async def _from_api(self, ep: Endpoint, ref: Reference, subject: str,
                        artifact_type: str | None) -> list[Descriptor] | None:
        """The referrers API's list (every page of it), or None when the endpoint has no referrers API."""
        what = f"referrers of {subject} in {ref.name}"
        url = ep.url(ref.path, "referrers", subject)
        if artifact_type is not None:
            url += ("&" if "?" in url else "?") + urlencode({"artifactType": artifact_type})
        key = ep.key
        listed: list[Descriptor] = []
        for page in range(MAX_REFERRER_PAGES):
            req = Request("GET", url, ep, what, pull_scope(ref), {"Accept": OCI_INDEX})

            async def consume(response: httpx.Response) -> tuple[list[Descriptor], str | None] | None:
                status = response.status_code
                if status in _NO_REFERRERS_API:
                    detail = await error_detail(response)
                    if "NAME_UNKNOWN" not in detail:
                        self._no_api(key, f"answers the referrers API with HTTP {status}{detail}")
                    return None
                if status != 200:
                    await fail(response, what)
                content_type = response.headers.get("content-type", "").partition(";")[0].strip()
                where = f"{what} from {response.url}"
                body = await read_body(response, self.options.max_manifest_size, where)
                try:
                    _, entries = parse_list(body, content_type, where)
                except BadResponse:
                    if content_type in (OCI_INDEX, "application/json"):
                        raise
                    self._no_api(key, f"answers the referrers API with {content_type or 'no'} content")
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

    def _no_api(self, key: str, why: str) -> None:
        if self.referrers_api.get(key) is not False:
            log.info("%s %s; using the referrers tag schema for it from now on", key, why)
        self.referrers_api[key] = False

    async def _from_tag(self, ep: Endpoint, ref: Reference, subject: str) -> list[Descriptor]:
        tag = referrers_tag(subject)
        try:
            raw, content_type, _ = await get_manifest(self.transport, ep, ref, tag, None, ACCEPT, pull_scope(ref))
        except NotFoundError:
            return []
        try:
            return parse_list(raw, content_type, f"referrers tag {ref.name}:{tag}")[1]
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
            await self._from_api(ep, ref, EMPTY_JSON_DIGEST, None)
        return self.referrers_api.get(key, False)
