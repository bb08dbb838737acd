"""The registry client: resolve images, fetch small blobs, read ranges of large ones, push.

Everything lazysnap asks of a registry goes through `RegistryClient`. It tries
the endpoints hosts.toml gives for an operation in order, verifies every digest
it can, and remembers what it learns about servers. It is a façade; read on in
this order:

- `documents.py`: manifests and small blobs, read whole and digest-verified;
- `location.py`: opening a large blob (its size, its redirect) and failing over
  between the hosts that serve it;
- `blobs.py`: byte ranges (multi-range where allowed) and whole-blob streams;
- `referrers.py`: the referrers API and its tag fallback;
- `push.py`: uploads and manifest PUTs, for the SOCI and profile tooling;
- below them all `transport.py` (one request: retries, auth, redirects),
  `answers.py` (what a status means) and `ranges.py` (Range headers and bodies).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import replace

from . import digest as digests
from .answers import each, pull_scope
from .blobs import BlobReader
from .documents import get_blob, get_manifest, manifest_what, media_type
from .errors import BadResponse, NotFoundError
from .hosts import Capability, Endpoint, HostsConfig, for_capability
from .keychain import Keychain
from .location import BlobLocation, BlobLocator
from .manifest import ACCEPT, INDEX_TYPES, Descriptor, Manifest, choose, decode
from .options import RegistryOptions
from .push import Pusher
from .reference import Reference, parse, repository, validate_tag
from .referrers import ReferrersLookup
from .transport import Transport

__all__ = ["BlobLocation", "RegistryClient"]


class RegistryClient:
    """An async registry client on trio; one per process is enough (connections are pooled per host)."""

    def __init__(self, options: RegistryOptions | None = None, *, hosts: HostsConfig | None = None,
                 keychain: Keychain | None = None) -> None:
        self.options = options or RegistryOptions()
        self.hosts = hosts or HostsConfig(self.options.certs_dir, self.options.plain_http)
        self.transport = Transport(self.options, keychain or Keychain.for_options(self.options))
        self.locator = BlobLocator(self.transport, self.endpoints)
        self.blobs = BlobReader(self.locator)
        self.lookup = ReferrersLookup(self.transport, self.endpoints)
        self.pusher = Pusher(self.transport, self.endpoints, self.lookup.referrers_api)

    @property
    def single_range_only(self) -> dict[str, str]:
        """Origins that refused a multi-range request, with why; they get single ranges only."""
        return self.blobs.single_range_only

    @property
    def failed_hosts(self) -> dict[str, float]:
        """Endpoint key -> when (trio clock) a blob read or lookup on it last failed as unavailable."""
        return self.locator.failed_hosts

    @property
    def referrers_api(self) -> dict[str, bool]:
        """Endpoints (origin + API path) known to serve the referrers API (True) or not to (False)."""
        return self.lookup.referrers_api

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
        top, served_by = await each(self.endpoints(ref, *needed), f"manifest {ref}",
                                    lambda ep: self._manifest(ep, ref, ref.object, ref.digest))
        if top.media_type not in INDEX_TYPES:
            return top
        child = choose(top.parsed, self.options.platform, f"index {top.digest} of {ref}")
        pullers = self.endpoints(ref, Capability.PULL)
        pullers.sort(key=lambda ep: ep != served_by)
        manifest, _ = await each(pullers, f"manifest {child.digest} of {ref.name}",
                                 lambda ep: self._manifest(ep, ref, child.digest, child.digest))
        if manifest.media_type in INDEX_TYPES:
            raise BadResponse(f"index {top.digest} of {ref} points at another index {child.digest}")
        return replace(manifest, index_digest=top.digest)

    async def _manifest(self, ep: Endpoint, ref: Reference, obj: str,
                        expected: str | None) -> tuple[Manifest, Endpoint]:
        raw, content_type, digest = await get_manifest(self.transport, ep, ref, obj, expected, ACCEPT,
                                                       pull_scope(ref))
        media, parsed = decode(raw, content_type, f"{manifest_what(ref, obj)} from {ep}")
        return Manifest(ref, digest, media, raw, parsed), ep

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
        raw, content_type, digest = await each(
            self.endpoints(ref, *needed), manifest_what(ref, digest_or_tag),
            lambda ep: get_manifest(self.transport, ep, ref, digest_or_tag, expected, accept, pull_scope(ref)))
        return media_type(raw, content_type), raw, digest

    # ------------------------------------------------------------------ blobs

    async def fetch_blob(self, repo_ref: Reference | str, digest: str, max_size: int | None = None) -> bytes:
        """A whole small blob (a config, an index, a TOC), digest-verified; larger than `max_size` is an error."""
        ref = repository(repo_ref)
        digests.validate(digest)
        limit = self.options.small_blob_size if max_size is None else max_size
        return await each(self.endpoints(ref, Capability.PULL), f"blob {digest} of {ref.name}",
                          lambda ep: get_blob(self.transport, ep, ref, digest, limit))

    async def open_blob(self, repo_ref: Reference | str, digest: str) -> BlobLocation:
        """Find a large blob and its size, for the reads below (`location.BlobLocator.open_blob`)."""
        return await self.locator.open_blob(repo_ref, digest)

    async def read_range(self, blob: BlobLocation, start: int, end: int) -> bytes:
        """Bytes `[start, end)` of the blob, in one ranged GET."""
        return await self.blobs.read_range(blob, start, end)

    async def read_ranges(self, blob: BlobLocation, wanted: Sequence[tuple[int, int]]) -> list[bytes]:
        """Bytes of each `[start, end)` range, in the order given (`blobs.BlobReader.read_ranges`)."""
        return await self.blobs.read_ranges(blob, wanted)

    def stream_blob(self, blob: BlobLocation, chunk_size: int | None = None) -> AsyncGenerator[bytes, None]:
        """The whole blob in chunks, digest-checked at the end (`blobs.BlobReader.stream_blob`)."""
        return self.blobs.stream_blob(blob, chunk_size)

    # ------------------------------------------------------------------ referrers

    async def referrers(self, repo_ref: Reference | str, subject_digest: str,
                        artifact_type: str | None = None) -> list[Descriptor]:
        """The manifests whose `subject` is `subject_digest` (`referrers.ReferrersLookup.referrers`)."""
        return await self.lookup.referrers(repo_ref, subject_digest, artifact_type)

    async def supports_referrers_api(self, repo_ref: Reference | str) -> bool:
        """Whether `repo_ref`'s registry serves the referrers API (asked once, then remembered)."""
        return await self.lookup.supports_referrers_api(repo_ref)

    # ------------------------------------------------------------------ push

    async def push_blob(self, repo_ref: Reference | str, data: bytes, media_type: str = "application/octet-stream",
                        *, mount_from: Reference | str | None = None) -> Descriptor:
        """Upload `data` unless the registry has it (`push.Pusher.push_blob`)."""
        return await self.pusher.push_blob(repo_ref, data, media_type, mount_from=mount_from)

    async def push_manifest(self, ref: Reference | str, raw: bytes, media_type: str) -> str:
        """Push `raw` under `ref`'s tag, or by its digest; the manifest's digest."""
        return await self.pusher.push_manifest(ref, raw, media_type)

    async def push_referrer(self, repo_ref: Reference | str, raw: bytes, media_type: str) -> Descriptor:
        """Push a manifest with a `subject` and make it discoverable (`push.Pusher.push_referrer`)."""
        return await self.pusher.push_referrer(repo_ref, raw, media_type)

    async def update_referrers_tag(self, repo_ref: Reference | str, subject_digest: str, new: Descriptor) -> str:
        """Add `new` to the referrers tag of `subject_digest`; the tag's digest."""
        return await self.pusher.update_referrers_tag(repo_ref, subject_digest, new)
