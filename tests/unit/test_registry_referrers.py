"""Referrers lists and the referrers tag schema: pure, bytes in and records out."""

from __future__ import annotations

import hashlib
import json

import pytest

from snapshotter.registry.errors import BadResponse
from snapshotter.registry.manifest import OCI_INDEX, OCI_MANIFEST, Descriptor
from snapshotter.registry.referrers import (
    EMPTY_JSON_DIGEST,
    empty_list,
    matching,
    parse_list,
    referrer_descriptor,
    referrers_tag,
    subject_of,
    with_entry,
)

SOCI_V1 = "application/vnd.amazon.soci.index.v1+json"
D1, D2, D3 = ("sha256:" + c * 64 for c in "123")


def test_empty_json_digest() -> None:
    assert EMPTY_JSON_DIGEST == "sha256:" + hashlib.sha256(b"{}").hexdigest()


def test_referrers_tag_schema() -> None:
    assert referrers_tag(D1) == "sha256-" + "1" * 64
    assert referrers_tag("sha512:" + "ab" * 64) == "sha512-" + "ab" * 32, "encoded part cut to 64"
    odd = "test+algorithm+using+algorithm+separators+and+more:alsoSome=InTheEncodedSection"
    assert referrers_tag(odd) == "test-algorithm-using-algorithm-s-alsoSome-InTheEncodedSection"


def soci_manifest(annotations: dict[str, str] | None = None, **extra: object) -> bytes:
    doc: dict[str, object] = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": SOCI_V1, "digest": EMPTY_JSON_DIGEST, "size": 2},
        "layers": [], "subject": {"mediaType": OCI_MANIFEST, "digest": D1, "size": 100}, **extra,
    }
    if annotations:
        doc["annotations"] = annotations
    return json.dumps(doc).encode()


def test_referrer_descriptor_takes_artifact_type_from_config_and_copies_annotations() -> None:
    raw = soci_manifest({"com.amazon.soci.build-tool-identifier": "lazysnap"})
    d = referrer_descriptor(raw, OCI_MANIFEST, D2)
    assert d == Descriptor(OCI_MANIFEST, D2, len(raw), {"com.amazon.soci.build-tool-identifier": "lazysnap"},
                           artifact_type=SOCI_V1)
    assert d.to_json() == {"mediaType": OCI_MANIFEST, "digest": D2, "size": len(raw), "artifactType": SOCI_V1,
                           "annotations": {"com.amazon.soci.build-tool-identifier": "lazysnap"}}
    explicit = soci_manifest(artifactType="application/x-own")
    assert referrer_descriptor(explicit, OCI_MANIFEST, D2).artifact_type == "application/x-own"
    assert subject_of(raw) == Descriptor(OCI_MANIFEST, D1, 100)
    assert subject_of(b'{"schemaVersion": 2}') is None
    with pytest.raises(ValueError, match="subject"):
        subject_of(json.dumps({"subject": {"digest": "nope"}}).encode())


def test_artifact_type_is_parsed_and_validated() -> None:
    d = Descriptor.parse({"mediaType": OCI_MANIFEST, "digest": D1, "size": 3, "artifactType": SOCI_V1}, "entry")
    assert d.artifact_type == SOCI_V1
    assert Descriptor.parse({"digest": D1, "size": 3}, "entry").artifact_type == ""
    with pytest.raises(BadResponse, match="artifactType"):
        Descriptor.parse({"digest": D1, "size": 3, "artifactType": 7}, "entry")


def test_adding_to_a_list_keeps_what_is_there_and_never_duplicates() -> None:
    first = Descriptor(OCI_MANIFEST, D2, 10, {"a": "b"}, artifact_type=SOCI_V1)
    body = with_entry(empty_list(), [], first)
    assert body is not None
    doc, listed = parse_list(body, "", "list")
    assert listed == [first] and doc["mediaType"] == OCI_INDEX
    doc["annotations"] = {"kept": "yes"}
    second = Descriptor(OCI_MANIFEST, D3, 11, artifact_type="application/x-sig")
    body2 = with_entry(doc, listed, second)
    assert body2 is not None
    doc2, listed2 = parse_list(body2, OCI_INDEX, "list")
    assert listed2 == [first, second] and doc2["annotations"] == {"kept": "yes"}
    assert with_entry(doc2, listed2, Descriptor(OCI_MANIFEST, D2, 10)) is None, "already listed"
    assert matching(listed2, SOCI_V1) == [first]
    assert matching(listed2, "application/vnd.amazon.soci.index.v2+json") == []
    assert matching([*listed2, first], None) == [first, second]


@pytest.mark.parametrize(("body", "why"), [
    (json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode(), "not an OCI image index"),
    (json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": {}}).encode(), "not a list"),
    (json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [{"digest": "x"}]}).encode(), "digest"),
    (b"<html>login</html>", "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
])
def test_bad_lists(body: bytes, why: str) -> None:
    with pytest.raises(BadResponse, match=why):
        parse_list(body, "", "list")
