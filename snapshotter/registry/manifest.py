"""Image manifests and indexes (OCI and Docker schema 2): media types, records, platform choice.

Pure: bytes in, records out. The client fetches and verifies; this module only
reads what was verified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..formats import descriptor
from ..formats.errors import FormatError
from ..formats.jsondoc import load_object
from .errors import BadResponse, NotFoundError
from .options import Platform
from .reference import Reference

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST])
"""The `Accept` header for manifest requests; schema 1 is deliberately absent."""


class Descriptor(descriptor.Descriptor):
    """A descriptor as the registry layer reads it: malformed is the registry's `BadResponse`."""

    @classmethod
    def parse(cls, obj: Any, where: str) -> Descriptor:
        try:
            parsed = super().parse(obj, where)
        except FormatError as e:
            raise BadResponse(str(e)) from None
        assert isinstance(parsed, Descriptor)
        return parsed


@dataclass(frozen=True)
class Manifest:
    """A verified image manifest; `index_digest` is set when it was chosen from an index."""

    ref: Reference
    digest: str
    media_type: str
    raw: bytes
    parsed: dict[str, Any]
    index_digest: str | None = None

    @property
    def config(self) -> Descriptor:
        return Descriptor.parse(self.parsed.get("config"), f"manifest {self.digest} config")

    @property
    def layers(self) -> list[Descriptor]:
        layers = self.parsed.get("layers")
        if not isinstance(layers, list):
            raise BadResponse(f"manifest {self.digest} of {self.ref.name} has no layer list")
        return [Descriptor.parse(d, f"manifest {self.digest} layer {i}") for i, d in enumerate(layers)]

    @property
    def annotations(self) -> dict[str, str]:
        value = self.parsed.get("annotations") or {}
        return dict(value) if isinstance(value, dict) else {}


def decode(raw: bytes, content_type: str, what: str) -> tuple[str, dict[str, Any]]:
    """(media type, parsed JSON) of a verified manifest body.

    The body's own `mediaType` wins over the response header: the body is
    covered by the digest, the header is not.
    """
    try:
        parsed = load_object(raw, what)
    except FormatError as e:
        raise BadResponse(str(e)) from None
    media_type = parsed.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        header = content_type.partition(";")[0].strip()
        if header in MANIFEST_TYPES | INDEX_TYPES:
            media_type = header
        elif isinstance(parsed.get("manifests"), list):
            media_type = OCI_INDEX
        elif isinstance(parsed.get("layers"), list):
            media_type = OCI_MANIFEST
        else:
            media_type = header
    if media_type not in MANIFEST_TYPES | INDEX_TYPES:
        raise BadResponse(f"{what}: unsupported manifest media type {media_type!r}")
    if parsed.get("schemaVersion") != 2:
        raise BadResponse(f"{what}: schemaVersion is {parsed.get('schemaVersion')!r}, want 2")
    return media_type, parsed


def choose(index: dict[str, Any], platform: Platform, what: str) -> Descriptor:
    """The child manifest of `index` for `platform` (the first exact match)."""
    children = index.get("manifests")
    if not isinstance(children, list):
        raise BadResponse(f"{what}: index without a manifests list")
    descriptors = [Descriptor.parse(c, f"{what} entry {i}") for i, c in enumerate(children)]
    seen = []
    for d in descriptors:
        p = d.platform or {}
        seen.append(f"{p.get('os')}/{p.get('architecture')}" + (f"/{p['variant']}" if p.get("variant") else ""))
        if p.get("os") != platform.os or p.get("architecture") != platform.architecture:
            continue
        if platform.variant is not None and p.get("variant") not in (None, platform.variant):
            continue
        return d
    wanted = f"{platform.os}/{platform.architecture}" + (f"/{platform.variant}" if platform.variant else "")
    raise NotFoundError(f"{what}: no manifest for {wanted} (index has {', '.join(seen) or 'nothing'})")
