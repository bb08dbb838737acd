"""Manifests and small blobs from one endpoint: read whole, bounded and digest-verified.

The client tries these on each endpoint in turn (`answers.each`); the referrers
lookups and the push side read referrers tags with `get_manifest` too.
"""

from __future__ import annotations

import httpx

from ..formats.errors import FormatError
from ..formats.jsondoc import load_object
from . import digest as digests
from .answers import fail, pull_scope
from .errors import BadResponse, RegistryError
from .hosts import Endpoint
from .reference import Reference
from .transport import Request, Transport, read_body


async def get_manifest(transport: Transport, ep: Endpoint, ref: Reference, obj: str, expected: str | None,
                       accept: str, scope: str) -> tuple[bytes, str, str]:
    """(raw, Content-Type, digest) of manifest `obj`, verified against `expected` or the announced digest."""
    what = manifest_what(ref, obj)
    req = Request("GET", ep.url(ref.path, "manifests", obj), ep, what, scope, {"Accept": accept})

    async def consume(response: httpx.Response) -> tuple[bytes, str, str | None]:
        if response.status_code != 200:
            await fail(response, req.what)
        body = await read_body(response, transport.options.max_manifest_size, f"{what} from {response.url}")
        return body, response.headers.get("content-type", ""), response.headers.get("docker-content-digest")

    raw, content_type, announced = await transport.call(req, consume)
    where = f"{what} from {ep}"
    digest = expected or announced or digests.of(raw)
    try:
        digests.validate(digest)
    except RegistryError:
        raise BadResponse(f"{where}: invalid Docker-Content-Digest {digest!r}") from None
    digests.verify(raw, digest, where)
    return raw, content_type, digest


async def get_blob(transport: Transport, ep: Endpoint, ref: Reference, digest: str, limit: int) -> bytes:
    """A whole small blob from `ep`, digest-verified; larger than `limit` is an error."""
    what = f"blob {digest} of {ref.name}"
    req = Request("GET", ep.url(ref.path, "blobs", digest), ep, what, pull_scope(ref))

    async def consume(response: httpx.Response) -> bytes:
        if response.status_code != 200:
            await fail(response, req.what)
        return await read_body(response, limit, f"{what} from {response.url}")

    data = await transport.call(req, consume)
    digests.verify(data, digest, f"{what} from {ep}")
    return data


def manifest_what(ref: Reference, obj: str) -> str:
    return f"manifest {ref.name}{'@' if ':' in obj else ':'}{obj}"


def media_type(raw: bytes, content_type: str) -> str:
    """The body's `mediaType` (covered by the digest), else the Content-Type without parameters."""
    try:
        found = load_object(raw, "manifest").get("mediaType")
    except FormatError:
        found = None
    if isinstance(found, str) and found:
        return found
    return content_type.partition(";")[0].strip()
