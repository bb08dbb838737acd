"""OCI content descriptors: what a manifest, an index or a referrers list says about one
piece of content. One record for the registry layer and the formats (a SOCI index lists
its zTOCs as descriptors).

Pure: JSON objects in, records out, and back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .digest import check_syntax
from .errors import FormatError


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: a config, layer, child manifest, zTOC or referrer."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    urls: tuple[str, ...] = ()
    platform: dict[str, Any] | None = None
    artifact_type: str = ""
    """`artifactType`: set on the entries of a referrers list (and of SOCI v2 indexes), else ""."""

    @classmethod
    def parse(cls, obj: Any, where: str) -> Descriptor:
        """Read a descriptor; a malformed one is a FormatError that starts with `where`."""
        if not isinstance(obj, dict):
            raise FormatError(f"{where}: descriptor is not an object")
        media_type, digest, size = obj.get("mediaType", ""), obj.get("digest"), obj.get("size")
        if not isinstance(media_type, str) or not isinstance(digest, str):
            raise FormatError(f"{where}: descriptor without a digest")
        try:
            check_syntax(digest)
        except FormatError as e:
            raise FormatError(f"{where}: {e}") from None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise FormatError(f"{where}: descriptor {digest} has an invalid size {size!r}")
        annotations = obj.get("annotations") or {}
        urls = obj.get("urls") or []
        platform = obj.get("platform")
        if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
            raise FormatError(f"{where}: descriptor {digest} has invalid annotations")
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise FormatError(f"{where}: descriptor {digest} has invalid urls")
        if platform is not None and not isinstance(platform, dict):
            raise FormatError(f"{where}: descriptor {digest} has an invalid platform")
        artifact_type = obj.get("artifactType") or ""
        if not isinstance(artifact_type, str):
            raise FormatError(f"{where}: descriptor {digest} has an invalid artifactType")
        return cls(media_type, digest, size, dict(annotations), tuple(urls), platform, artifact_type)

    def to_json(self) -> dict[str, Any]:
        """The descriptor as OCI JSON; empty optional fields are left out."""
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.urls:
            out["urls"] = list(self.urls)
        if self.platform is not None:
            out["platform"] = dict(self.platform)
        return out
