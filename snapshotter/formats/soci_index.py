"""The SOCI index manifest: which zTOC makes which layer of an image seekable.

An index is an OCI image manifest whose config media type names the artifact (v1 or
v2), whose `layers` are the zTOCs (each annotated with the image layer it indexes),
and, in v1, whose `subject` is the image manifest it belongs to. v2 images point at
their index with an annotation on the image manifest instead. Facts:
shared/research/soci.md §2. Pure: JSON bytes in, records out, and back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .descriptor import Descriptor
from .digest import content_digest
from .errors import FormatError
from .jsondoc import load_object

INDEX_V1 = "application/vnd.amazon.soci.index.v1+json"
INDEX_V2 = "application/vnd.amazon.soci.index.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ZTOC_MEDIA_TYPE = "application/octet-stream"
PREFETCH_MEDIA_TYPE = "application/vnd.amazon.soci.prefetch.v1+json"
PREFETCH_VERSION = "1.0"

LAYER_DIGEST = "com.amazon.soci.image-layer-digest"
LAYER_MEDIA_TYPE = "com.amazon.soci.image-layer-mediaType"
SPAN_SIZE = "com.amazon.soci.span-size"
BUILD_TOOL = "com.amazon.soci.build-tool-identifier"
INDEX_DIGEST = "com.amazon.soci.index-digest"
"""On a v2 image manifest: the digest of its SOCI index."""
IMAGE_MANIFEST_DIGEST = "com.amazon.soci.image-manifest-digest"
"""On a v2 index's descriptor inside an image index: the image manifest it indexes."""

EMPTY_CONFIG = b"{}"
EMPTY_CONFIG_DIGEST = content_digest(EMPTY_CONFIG)


@dataclass(frozen=True)
class SociIndex:
    digest: str
    raw: bytes
    artifact_type: str
    ztocs: dict[str, Descriptor]
    """Image layer digest -> the zTOC that indexes it. Layers not here are pulled whole."""
    subject: Descriptor | None = None
    prefetches: dict[str, Descriptor] = field(default_factory=dict)
    """Image layer digest -> its prefetch artifact (spans to fetch at mount), where the index has one."""


MAX_PREFETCH = 4 << 20
"""Largest prefetch artifact we read."""


def parse_prefetch(raw: bytes) -> list[tuple[int, int]]:
    """The span id ranges `[(first, last), ...]` (both inclusive) of a prefetch artifact, in its order."""
    doc = load_object(raw, "SOCI prefetch artifact", MAX_PREFETCH)
    if doc.get("version") != PREFETCH_VERSION:
        raise FormatError(f"SOCI prefetch artifact version must be {PREFETCH_VERSION!r}")
    spans = doc.get("prefetch_spans")
    if not isinstance(spans, list):
        raise FormatError("SOCI prefetch artifact has no prefetch_spans list")
    out = []
    for item in spans:
        first = item.get("start_span") if isinstance(item, dict) else None
        last = item.get("end_span") if isinstance(item, dict) else None
        if type(first) is not int or type(last) is not int or not 0 <= first <= last:
            raise FormatError(f"SOCI prefetch artifact has a bad span range {item!r}")
        out.append((first, last))
    return out


def parse_index(raw: bytes, digest: str | None = None) -> SociIndex:
    """Read an index manifest; a malformed one is a FormatError naming what is wrong."""
    actual = content_digest(raw)
    if digest is not None and digest != actual:
        raise FormatError(f"SOCI index digest mismatch: want {digest}, the bytes are {actual}")
    doc = load_object(raw, f"SOCI index {actual}")
    config = _ref(doc.get("config"), "config")
    if config.media_type not in (INDEX_V1, INDEX_V2):
        raise FormatError(f"{actual} is not a SOCI index (config media type {config.media_type!r})")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise FormatError(f"SOCI index {actual} has no layer list")
    ztocs: dict[str, Descriptor] = {}
    prefetches: dict[str, Descriptor] = {}
    for i, item in enumerate(layers):
        ref = _ref(item, f"layers[{i}]")
        if ref.media_type == PREFETCH_MEDIA_TYPE and ref.annotations.get(LAYER_DIGEST):
            prefetches[ref.annotations[LAYER_DIGEST]] = ref
            continue
        if ref.media_type != ZTOC_MEDIA_TYPE:
            continue  # future kinds
        layer = ref.annotations.get(LAYER_DIGEST)
        if not layer:
            raise FormatError(f"SOCI index {actual}: zTOC {ref.digest} does not say which layer it indexes")
        ztocs[layer] = ref
    subject = _ref(doc["subject"], "subject") if doc.get("subject") is not None else None
    return SociIndex(actual, raw, config.media_type, ztocs, subject, prefetches)


def build_index(ztocs: list[Descriptor], *, subject: Descriptor | None, artifact_type: str = INDEX_V1,
                build_tool: str = "lazysnap") -> bytes:
    """Serialise an index manifest; v1 carries `subject`, v2 must not (the image points at it)."""
    if artifact_type == INDEX_V2 and subject is not None:
        raise ValueError("a v2 SOCI index has no subject")
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": artifact_type, "digest": EMPTY_CONFIG_DIGEST, "size": len(EMPTY_CONFIG)},
        "layers": [z.to_json() for z in ztocs],
    }
    if subject is not None:
        doc["subject"] = subject.to_json()
    doc["annotations"] = {BUILD_TOOL: build_tool}
    return json.dumps(doc, separators=(",", ":"), sort_keys=False).encode()


def ztoc_ref(digest: str, size: int, layer_digest: str, layer_media_type: str, span_size: int) -> Descriptor:
    """The descriptor an index holds for one zTOC."""
    return Descriptor(ZTOC_MEDIA_TYPE, digest, size, {
        LAYER_DIGEST: layer_digest, LAYER_MEDIA_TYPE: layer_media_type, SPAN_SIZE: str(span_size),
    })


def _ref(item: Any, where: str) -> Descriptor:
    """One of the index's descriptors: SOCI's always name their media type and are sha256."""
    where = f"SOCI index {where}"
    if isinstance(item, dict) and not isinstance(item.get("mediaType"), str):
        raise FormatError(f"{where}: bad media type or digest")
    ref = Descriptor.parse(item, where)
    if not ref.digest.startswith("sha256:"):
        raise FormatError(f"{where}: bad media type or digest")
    return ref
