"""Start profiles: which bytes of each layer an image's containers read while starting.

lazysnap records one during an image's first start on a node and replays it, in
parallel, on the next cold mount of that image, on any node that can find it (a
local file, or an OCI artifact beside the image whose `subject` is the image manifest).
A profile names compressed byte ranges of layer blobs, not files or chunk ids, so it
means the same to an eStargz and a SOCI layer, and needs nothing but the blob to
replay. Ranges are listed in the order they were first read, each with the time of
that first read (milliseconds into the recording), so that replay can follow the
image's order across all its layers, not just within each.

Pure: JSON bytes in, records out, and back. Hostile input is capped and checked.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from .digest import content_digest
from .errors import FormatError
from .jsondoc import load_object

ARTIFACT_TYPE = "application/vnd.lazysnap.profile.v1+json"
"""The artifact type of a pushed profile (its manifest's config media type) and of the JSON itself."""
VERSION = 1
MAX_SIZE = 16 << 20
"""Largest profile we read: hundreds of thousands of ranges."""
MAX_RANGES = 1 << 20

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
EMPTY_CONFIG = b"{}"
"""The config blob of a pushed profile: the artifact type rides on the config media type,
which distribution 2.8 (no `artifactType` support) also lists in the referrers tag."""

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class LayerProfile:
    digest: str
    ranges: tuple[tuple[int, int], ...]
    """[start, end) compressed blob ranges, first-read order."""
    at: tuple[int, ...] = ()
    """Milliseconds into the recording at which each range was first read; empty when the
    profile does not say (replay then keeps the order within the layer only)."""

    def __post_init__(self) -> None:
        if self.at and len(self.at) != len(self.ranges):
            raise ValueError(f"{len(self.at)} read times for {len(self.ranges)} ranges")

    @property
    def bytes(self) -> int:
        return sum(end - start for start, end in self.ranges)


@dataclass(frozen=True)
class Profile:
    image: str
    """The image manifest digest this profile was recorded for."""
    layers: tuple[LayerProfile, ...] = field(default_factory=tuple)
    seconds: float = 0.0
    """How long the recording window was."""

    @property
    def bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers)

    def for_layer(self, digest: str) -> LayerProfile | None:
        return next((layer for layer in self.layers if layer.digest == digest), None)


def encode(profile: Profile) -> bytes:
    doc = {
        "mediaType": ARTIFACT_TYPE,
        "version": VERSION,
        "image": profile.image,
        "seconds": round(profile.seconds, 3),
        "layers": [{"digest": layer.digest, "ranges": [list(r) for r in layer.ranges]}
                   | ({"at": list(layer.at)} if layer.at else {}) for layer in profile.layers],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def parse(raw: bytes) -> Profile:
    """Read a profile; anything malformed is a FormatError saying what."""
    doc = load_object(raw, "profile", MAX_SIZE)
    if doc.get("mediaType") != ARTIFACT_TYPE:
        raise FormatError(f"not a lazysnap profile (mediaType must be {ARTIFACT_TYPE})")
    if doc.get("version") != VERSION:
        raise FormatError(f"unsupported profile version {doc.get('version')!r} (this lazysnap reads {VERSION})")
    image = doc.get("image")
    if not isinstance(image, str) or not _DIGEST.match(image):
        raise FormatError(f"profile names no valid image digest: {image!r}")
    seconds = doc.get("seconds", 0.0)
    if not isinstance(seconds, (int, float)) or not 0 <= seconds < math.inf:  # Python's JSON reads NaN, Infinity
        raise FormatError(f"profile has a bad recording length {seconds!r}")
    layers_doc = doc.get("layers")
    if not isinstance(layers_doc, list):
        raise FormatError("profile has no layer list")
    layers: list[LayerProfile] = []
    count = 0
    for i, item in enumerate(layers_doc):
        if not isinstance(item, dict) or not isinstance(item.get("digest"), str) or not _DIGEST.match(item["digest"]):
            raise FormatError(f"profile layer {i} has no valid digest")
        ranges_doc = item.get("ranges")
        if not isinstance(ranges_doc, list):
            raise FormatError(f"profile layer {item['digest']} has no range list")
        count += len(ranges_doc)
        if count > MAX_RANGES:
            raise FormatError(f"profile lists more than {MAX_RANGES} ranges")
        ranges = []
        for r in ranges_doc:
            if (not isinstance(r, list) or len(r) != 2 or not all(type(x) is int for x in r)
                    or not 0 <= r[0] < r[1]):
                raise FormatError(f"profile layer {item['digest']} has a bad range {r!r}")
            ranges.append((r[0], r[1]))
        at = item.get("at", [])
        if (not isinstance(at, list) or (at and len(at) != len(ranges))
                or not all(type(t) is int and t >= 0 for t in at)):
            raise FormatError(f"profile layer {item['digest']} has bad read times (\"at\" must list one "
                              "non-negative integer per range)")
        layers.append(LayerProfile(item["digest"], tuple(ranges), tuple(at)))
    return Profile(image, tuple(layers), float(seconds))


def build_manifest(profile_json: bytes, subject_media_type: str, subject_digest: str, subject_size: int) -> bytes:
    """The OCI manifest that publishes `profile_json` as a referrer of the image manifest."""
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": ARTIFACT_TYPE, "digest": content_digest(EMPTY_CONFIG), "size": len(EMPTY_CONFIG)},
        "layers": [{"mediaType": ARTIFACT_TYPE, "digest": content_digest(profile_json), "size": len(profile_json)}],
        "subject": {"mediaType": subject_media_type, "digest": subject_digest, "size": subject_size},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def profile_blob(manifest: bytes) -> tuple[str, int]:
    """Digest and size of the profile a pushed profile manifest carries."""
    layers = load_object(manifest, "profile manifest").get("layers")
    for item in layers if isinstance(layers, list) else []:
        if isinstance(item, dict) and item.get("mediaType") == ARTIFACT_TYPE:
            digest, size = item.get("digest"), item.get("size")
            if isinstance(digest, str) and _DIGEST.match(digest) and type(size) is int and 0 < size <= MAX_SIZE:
                return digest, size
            raise FormatError(f"profile manifest has a bad profile descriptor: {item!r}")
    raise FormatError("profile manifest carries no profile")
