"""Property-based fuzzing of the JSON documents lazysnap reads from registries (issue 14): image
manifests and indexes, referrers lists, SOCI indexes and prefetch artifacts, start profiles.

Properties: each parser returns a result or raises its documented error (`FormatError`; the
registry layer's `BadResponse`, or `NotFoundError` when an index has no matching platform)
within the time bound, never anything else, whatever the bytes: deep nesting, huge numbers,
wrong types, non-UTF-8.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from snapshotter.formats import profile, soci_index
from snapshotter.formats.descriptor import Descriptor
from snapshotter.formats.errors import FormatError
from snapshotter.registry import manifest, referrers
from snapshotter.registry.errors import BadResponse, NotFoundError
from snapshotter.registry.options import Platform
from snapshotter.registry.reference import parse as parse_reference
from tests.unit.fuzzing import (examples, hostile_ints, json_values, mostly, mutated, parse_or_refuse,
                                weighted)

SHA = "sha256:" + "a" * 64
BAD_DIGESTS = st.sampled_from([SHA, "sha512:" + "b" * 128, "sha256:" + "A" * 64, "sha256:", "md5:abc", "",
                               "sha256:" + "a" * 63, "sha256:" + "a" * 64 + "\n", "sha256:../../etc"])
DIGESTS = weighted((4, st.binary(min_size=1, max_size=2).map(lambda b: "sha256:" + hashlib.sha256(b).hexdigest())),
                   (3, BAD_DIGESTS))
MEDIA = st.sampled_from([
    manifest.OCI_MANIFEST, manifest.OCI_MANIFEST, manifest.OCI_INDEX, manifest.DOCKER_MANIFEST,
    manifest.DOCKER_MANIFEST_LIST, soci_index.INDEX_V1, soci_index.INDEX_V2, soci_index.ZTOC_MEDIA_TYPE,
    soci_index.ZTOC_MEDIA_TYPE, soci_index.PREFETCH_MEDIA_TYPE, profile.ARTIFACT_TYPE, "", "x/y"])


_any = mostly


def descriptors() -> st.SearchStrategy[Any]:
    return _any(st.fixed_dictionaries(
        {"mediaType": _any(MEDIA), "digest": _any(DIGESTS), "size": _any(st.one_of(st.integers(0, 1 << 20),
                                                                                    hostile_ints()))},
        optional={
            "annotations": _any(st.dictionaries(st.sampled_from([soci_index.LAYER_DIGEST, soci_index.SPAN_SIZE,
                                                                 soci_index.INDEX_DIGEST, "x"]),
                                                _any(st.one_of(DIGESTS, st.text(max_size=5))), max_size=3)),
            "urls": _any(st.lists(st.text(max_size=5), max_size=2)),
            "platform": _any(st.fixed_dictionaries({"os": _any(st.sampled_from(["linux", "windows"])),
                                                    "architecture": _any(st.sampled_from(["amd64", "arm64"]))},
                                                   optional={"variant": _any(st.sampled_from(["v8", "v7", ""]))})),
            "artifactType": _any(MEDIA),
        }))


def documents() -> st.SearchStrategy[Any]:
    doc = st.fixed_dictionaries(
        {"schemaVersion": _any(st.just(2))},
        optional={"mediaType": _any(MEDIA), "config": descriptors(),
                  "layers": _any(st.lists(descriptors(), max_size=4)),
                  "manifests": _any(st.lists(descriptors(), max_size=4)), "subject": descriptors(),
                  "annotations": _any(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2)),
                  "artifactType": _any(MEDIA)})
    return weighted((6, doc), (1, json_values()))


def raw_documents() -> st.SearchStrategy[bytes]:
    """JSON of `documents()`, mutated JSON, nesting deeper than the recursion limit, not UTF-8."""
    encoded = documents().map(lambda d: json.dumps(d).encode())
    return weighted((12, encoded), (3, encoded.flatmap(mutated)), (1, st.binary(max_size=64)),
                    (1, st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n)),
                    (1, st.integers(1, 200_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n)),
                    (1, st.sampled_from([
                        b'{"schemaVersion": 2, "size": ' + b"9" * 5000 + b"}",
                        '{"schemaVersion": 2, "mediaType": "\udcff"}'.encode("utf-8", "surrogatepass"),
                        b'\xff\xfe{\x00}\x00', b'{"schemaVersion": NaN, "layers": [Infinity]}'])))


CONTENT_TYPES = st.sampled_from(["", manifest.OCI_MANIFEST, manifest.OCI_INDEX + "; charset=utf-8",
                                 manifest.DOCKER_MANIFEST_LIST, "application/json", "\x00"])
REGISTRY_ERRORS = (BadResponse, NotFoundError, FormatError)


@examples(1.0)
@given(raw=raw_documents(), content_type=CONTENT_TYPES,
       platform=st.builds(Platform, st.sampled_from(["linux", "windows"]), st.sampled_from(["amd64", "arm64"]),
                          st.sampled_from([None, "v8", ""])))
@example(raw=b"[" * 100_000 + b"]" * 100_000, content_type="", platform=Platform())
def test_manifest_and_index(raw: bytes, content_type: str, platform: Platform) -> None:
    decoded = parse_or_refuse(manifest.decode, raw, content_type, "fuzz", errors=REGISTRY_ERRORS)
    if decoded is None:
        return
    media_type, parsed = decoded
    assert media_type in manifest.MANIFEST_TYPES | manifest.INDEX_TYPES
    if media_type in manifest.INDEX_TYPES:
        parse_or_refuse(manifest.choose, parsed, platform, "fuzz", errors=REGISTRY_ERRORS)
    else:
        m = manifest.Manifest(parse_reference("registry.test/r:t"), SHA, media_type, raw, parsed)
        parse_or_refuse(lambda: m.config, errors=REGISTRY_ERRORS)
        parse_or_refuse(lambda: m.layers, errors=REGISTRY_ERRORS)
        assert isinstance(m.annotations, dict)


@examples(1.0)
@given(raw=raw_documents(), content_type=CONTENT_TYPES)
def test_referrers_list(raw: bytes, content_type: str) -> None:
    listed = parse_or_refuse(referrers.parse_list, raw, content_type, "fuzz", errors=REGISTRY_ERRORS)
    if listed is not None:
        doc, entries = listed
        referrers.matching(entries, None)
        out = referrers.with_entry(doc, entries, Descriptor("x/y", SHA, 1))
        if out is not None:
            json.loads(out)
    # What we push: documented to raise ValueError (FormatError is one) on a malformed manifest.
    parse_or_refuse(referrers.subject_of, raw, errors=(ValueError,))
    parse_or_refuse(referrers.referrer_descriptor, raw, manifest.OCI_MANIFEST, SHA, errors=(ValueError,))


@examples(1.0)
@given(obj=descriptors())
def test_descriptor(obj: Any) -> None:
    d = parse_or_refuse(Descriptor.parse, obj, "fuzz")
    if d is not None:
        assert Descriptor.parse(json.loads(json.dumps(d.to_json())), "again") == d


def soci_documents() -> st.SearchStrategy[bytes]:
    ztoc = st.fixed_dictionaries({
        "mediaType": _any(st.sampled_from([soci_index.ZTOC_MEDIA_TYPE, soci_index.PREFETCH_MEDIA_TYPE, "x/y"])),
        "digest": _any(DIGESTS), "size": _any(st.one_of(st.integers(0, 1 << 20), hostile_ints())),
        "annotations": _any(st.fixed_dictionaries({}, optional={
            soci_index.LAYER_DIGEST: _any(DIGESTS), soci_index.SPAN_SIZE: _any(st.text(max_size=5)),
            soci_index.LAYER_MEDIA_TYPE: _any(MEDIA)}))})
    config = st.fixed_dictionaries({"mediaType": _any(st.sampled_from([soci_index.INDEX_V1, soci_index.INDEX_V2])),
                                    "digest": _any(DIGESTS), "size": _any(st.integers(0, 10))})
    doc = st.fixed_dictionaries({"schemaVersion": _any(st.just(2)), "mediaType": _any(MEDIA), "config": config,
                                 "layers": _any(st.lists(ztoc, max_size=4))},
                                optional={"subject": descriptors()})
    encoded = doc.map(lambda d: json.dumps(d).encode())
    return weighted((6, encoded), (2, encoded.flatmap(mutated)), (1, raw_documents()))


@examples(1.0)
@given(raw=soci_documents())
def test_soci_index(raw: bytes) -> None:
    index = parse_or_refuse(soci_index.parse_index, raw)
    if index is not None:
        for layer, ztoc in index.ztocs.items():
            assert isinstance(layer, str) and layer and ztoc.digest.startswith("sha256:")
        parse_or_refuse(soci_index.parse_index, raw, index.digest)


def prefetch_documents() -> st.SearchStrategy[bytes]:
    span = _any(st.fixed_dictionaries({"start_span": _any(hostile_ints()), "end_span": _any(hostile_ints())}))
    doc = st.fixed_dictionaries({"version": _any(st.just("1.0")), "prefetch_spans": _any(st.lists(span, max_size=5))})
    encoded = doc.map(lambda d: json.dumps(d).encode())
    return weighted((6, encoded), (2, encoded.flatmap(mutated)), (1, raw_documents()))


@examples(1.0)
@given(raw=prefetch_documents())
def test_soci_prefetch(raw: bytes) -> None:
    spans = parse_or_refuse(soci_index.parse_prefetch, raw)
    for first, last in spans or []:
        assert 0 <= first <= last


def profile_documents() -> st.SearchStrategy[bytes]:
    rng = _any(st.lists(_any(st.one_of(st.integers(0, 1 << 20), hostile_ints())), min_size=2, max_size=2))
    layer = _any(st.fixed_dictionaries({"digest": _any(DIGESTS), "ranges": _any(st.lists(rng, max_size=4))},
                                       optional={"at": _any(st.lists(_any(hostile_ints()), max_size=4))}))
    doc = st.fixed_dictionaries({"mediaType": _any(st.just(profile.ARTIFACT_TYPE)), "version": _any(st.just(1)),
                                 "image": _any(DIGESTS), "layers": _any(st.lists(layer, max_size=3))},
                                optional={"seconds": _any(st.floats())})
    encoded = doc.map(lambda d: json.dumps(d).encode())
    return weighted((6, encoded), (2, encoded.flatmap(mutated)), (1, raw_documents()))


@examples(1.0)
@given(raw=profile_documents())
@example(raw=json.dumps({"mediaType": profile.ARTIFACT_TYPE, "version": 1, "image": SHA,
                         "seconds": float("nan"), "layers": []}).encode())
def test_profile(raw: bytes) -> None:
    p = parse_or_refuse(profile.parse, raw)
    if p is not None:
        assert p.seconds >= 0 and p.seconds == p.seconds  # not NaN
        for layer in p.layers:
            assert all(0 <= start < end for start, end in layer.ranges)
        again = profile.parse(profile.encode(p))
        assert (again.image, again.layers) == (p.image, p.layers)
    parse_or_refuse(profile.profile_blob, raw)
