"""Referrers (OCI distribution 1.1): the manifests whose `subject` points at a given manifest.

A registry with the referrers API lists them at `GET /v2/<name>/referrers/<digest>`
as an OCI image index. A registry without it (distribution 2.8 answers that path
with a plain 404) relies on clients: whoever pushes a manifest with a `subject`
keeps an OCI image index listing it under the tag `<alg>-<hex>` of the subject
(the "referrers tag schema"). SOCI v1 indexes are found this way.

Pure: bytes in, records out. The client fetches, verifies and pushes.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..formats.jsondoc import load_object
from .errors import BadResponse
from .manifest import OCI_INDEX, Descriptor, decode

EMPTY_JSON_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
"""The digest of `{}`, the OCI "empty" blob; a well-formed digest to probe the referrers API with."""

_NOT_IN_TAG = re.compile(r"[^a-zA-Z0-9_.-]")


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
