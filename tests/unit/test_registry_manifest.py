"""Manifest decoding and platform choice: pure, over bytes the client already verified."""

from __future__ import annotations

import json
from typing import Any

import pytest

from snapshotter.registry.errors import BadResponse, NotFoundError
from snapshotter.registry.manifest import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
    choose,
    decode,
)
from snapshotter.registry.options import Platform
from snapshotter.registry.reference import parse

D1, D2, D3 = ("sha256:" + c * 64 for c in "123")


def entry(digest: str, os_: str, arch: str, **extra: str) -> dict[str, Any]:
    return {"mediaType": OCI_MANIFEST, "digest": digest, "size": 10,
            "platform": {"os": os_, "architecture": arch, **extra}}


def test_media_type_from_body_then_header_then_shape() -> None:
    body = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "layers": []}).encode()
    assert decode(body, "application/json", "m")[0] == DOCKER_MANIFEST, "the verified body wins"
    bare = json.dumps({"schemaVersion": 2, "layers": []}).encode()
    assert decode(bare, f"{DOCKER_MANIFEST}; charset=utf-8", "m")[0] == DOCKER_MANIFEST
    assert decode(bare, "application/octet-stream", "m")[0] == OCI_MANIFEST
    assert decode(json.dumps({"schemaVersion": 2, "manifests": []}).encode(), "", "m")[0] == OCI_INDEX


@pytest.mark.parametrize(("body", "why"), [
    (b"{not json", "not valid JSON"),
    (b"[]", "want an object"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),  # too deep for json: RecursionError
    (json.dumps({"schemaVersion": 1, "mediaType": OCI_MANIFEST}).encode(), "schemaVersion"),
    (json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v1+json"}).encode(),
     "unsupported manifest media type"),
])
def test_bad_manifests(body: bytes, why: str) -> None:
    with pytest.raises(BadResponse, match=why):
        decode(body, "", "manifest x")


def test_choose_linux_amd64_skipping_attestations() -> None:
    index = {"manifests": [entry(D1, "linux", "arm64", variant="v8"), entry(D2, "unknown", "unknown"),
                           entry(D3, "linux", "amd64")]}
    assert choose(index, Platform(), "index").digest == D3
    assert choose(index, Platform("linux", "arm64", "v8"), "index").digest == D1
    with pytest.raises(NotFoundError, match="no manifest for linux/s390x.*linux/arm64/v8, unknown/unknown"):
        choose(index, Platform("linux", "s390x"), "index")


def test_descriptors_are_validated() -> None:
    layers = [{"mediaType": "x", "digest": D1, "size": 5, "annotations": {"a": "b"}, "urls": ["https://u"]}]
    m = Manifest(parse("r.io/a:b"), D2, OCI_MANIFEST, b"", {"layers": layers, "config": layers[0]})
    assert m.layers == [Descriptor("x", D1, 5, {"a": "b"}, ("https://u",))]
    assert m.config.digest == D1
    for bad in ({"digest": "nope", "size": 1}, {"digest": D1, "size": -1}, {"digest": D1, "size": True},
                {"digest": D1, "size": 1, "annotations": {"a": 1}}, "string"):
        with pytest.raises(BadResponse):
            Descriptor.parse(bad, "layer 0")
    with pytest.raises(BadResponse, match="no layer list"):
        _ = Manifest(parse("r.io/a:b"), D2, OCI_MANIFEST, b"", {}).layers
