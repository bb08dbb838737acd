"""`lazysnap index push` (v1, beside the image) and `index convert` (v2, a new image naming its index).

Against a real docker-registry 2.8, which has no referrers API (so the fallback tag
`sha256-<hex>` is what lists the index), and through FaultProxy's referrers API for
a registry that has one. Discovery is checked with the daemon's own `find_index`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from snapshotter.formats import soci_index
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.manifest import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from snapshotter.registry.referrers import referrers_tag
from snapshotter.soci import build, convert, describe, push, report
from snapshotter.soci.build import SociError
from snapshotter.soci.discovery import find_index
from snapshotter.soci.local import LocalIndexes
from tests.harness.faultproxy import FaultProxy
from tests.harness.images import fetch_manifest, gzip_bytes, layer_tar
from tests.harness.registry import Registry
from tests.unit.soci_images import (
    MIN,
    SPAN,
    Sample,
    layer_entries,
    options,
    push_by_client,
    pushed,
)

LIMIT = 60
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[RegistryClient]:
    async with RegistryClient(options(tmp_path)) as c:
        yield c


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.host) as p:
        yield p


async def test_push_makes_the_index_discoverable_and_leaves_the_image_alone(
        registry: Registry, image: Sample, client: RegistryClient, store: LocalIndexes) -> None:
    ref = pushed(registry, image, "soci/push")
    with trio.fail_after(LIMIT):
        built = await build.create_index(client, store, ref, span_size=SPAN, min_layer_size=MIN)
        result = await push.push_index(client, store, ref)
    assert result.index.digest == built.index_digest and result.manifest_digest == image.manifest_digest
    assert result.ztocs == 2 and not result.referrers_api
    assert result.fallback_tag == referrers_tag(image.manifest_digest)

    assert registry.manifest_digest("soci/push", "v1") == image.manifest_digest, "the image is untouched"
    _, tag_body = fetch_manifest(registry.host, "soci/push", result.fallback_tag)
    [entry] = json.loads(tag_body)["manifests"]
    assert entry["digest"] == built.index_digest and entry["artifactType"] == soci_index.INDEX_V1
    with trio.fail_after(LIMIT):
        referrers = await client.referrers(ref, image.manifest_digest, soci_index.INDEX_V1)
        found = await find_index(client, None, ref, image.manifest_digest)
        blobs = {d: await client.fetch_blob(ref, r.digest) for d, r in (found.index.ztocs.items()
                                                                          if found.index else [])}
        assert [d.digest for d in referrers] == [built.index_digest]
        assert found.source == "v1" and found.index is not None and found.index.digest == built.index_digest
        assert {d: len(b) for d, b in blobs.items()} == {d: r.size for d, r in found.index.ztocs.items()}
        assert await client.fetch_blob(ref, soci_index.EMPTY_CONFIG_DIGEST) == b"{}"

        again = await push.push_index(client, store, ref)
        assert again.index.digest == built.index_digest
        assert len(await client.referrers(ref, image.manifest_digest, soci_index.INDEX_V1)) == 1

        view = await describe.registry_indexes(client, ref)
    assert view.found.source == "v1" and [d.digest for d in view.v1_referrers] == [built.index_digest]


async def test_push_to_a_registry_with_the_referrers_api(registry: Registry, image: Sample,
                                                         client: RegistryClient, store: LocalIndexes,
                                                         proxy: FaultProxy) -> None:
    pushed(registry, image, "soci/push-api")
    proxy.serve_referrers()
    ref = f"{proxy.host}/soci/push-api:v1"
    with trio.fail_after(LIMIT):
        built = await build.create_index(client, store, ref, span_size=SPAN, min_layer_size=MIN)
        result = await push.push_index(client, store, ref)
        found = await find_index(client, None, ref, image.manifest_digest)
    assert result.referrers_api and found.source == "v1" and found.index is not None
    assert found.index.digest == built.index_digest
    assert proxy.count("GET", referrers_tag(image.manifest_digest)) == 0, "no fallback tag with the API"


async def test_push_without_a_local_index_says_what_to_do(registry: Registry, image: Sample,
                                                          client: RegistryClient, store: LocalIndexes) -> None:
    ref = pushed(registry, image, "soci/push-none")
    with trio.fail_after(LIMIT), pytest.raises(SociError, match="run `lazysnap index create"):
        await push.push_index(client, store, ref)


# --------------------------------------------------------------------------- convert


async def test_convert_makes_a_v2_image_and_leaves_the_original_alone(
        registry: Registry, image: Sample, client: RegistryClient, store: LocalIndexes) -> None:
    ref = pushed(registry, image, "soci/convert")
    new_ref = f"{registry.host}/soci/convert:v1-soci"
    with trio.fail_after(LIMIT):
        result = await convert.convert(client, store, ref, new_ref, span_size=SPAN, min_layer_size=MIN)
    assert registry.manifest_digest("soci/convert", "v1") == image.manifest_digest
    assert result.manifest_digest == image.manifest_digest

    top_digest, top_raw = fetch_manifest(registry.host, "soci/convert", "v1-soci")
    top = json.loads(top_raw)
    assert top_digest == result.index_digest and top["mediaType"] == OCI_INDEX
    image_entry, index_entry = top["manifests"]
    assert image_entry["mediaType"] == OCI_MANIFEST and image_entry["digest"] == result.image_manifest_digest
    assert image_entry["platform"] == {"architecture": "amd64", "os": "linux"}
    assert index_entry["artifactType"] == soci_index.INDEX_V2 and index_entry["platform"] == image_entry["platform"]
    assert index_entry["digest"] == result.soci_index_digest
    assert index_entry["annotations"] == {soci_index.IMAGE_MANIFEST_DIGEST: result.image_manifest_digest}

    _, new_raw = fetch_manifest(registry.host, "soci/convert", result.image_manifest_digest)
    new, old = json.loads(new_raw), json.loads(image_layout_manifest(image))
    assert new["annotations"][soci_index.INDEX_DIGEST] == result.soci_index_digest
    assert new["config"] == old["config"] and new["layers"] == old["layers"], "same config and layers"

    _, index_raw = fetch_manifest(registry.host, "soci/convert", result.soci_index_digest)
    index = soci_index.parse_index(index_raw, result.soci_index_digest)
    assert index.artifact_type == soci_index.INDEX_V2 and index.subject is None
    assert set(index.ztocs) == {layer.digest for layer in image.big}
    assert "subject" not in json.loads(index_raw)

    with trio.fail_after(LIMIT):
        found = await find_index(client, None, new_ref, result.image_manifest_digest)
        resolved = await client.resolve(new_ref)
        for zref in index.ztocs.values():
            await client.fetch_blob(new_ref, zref.digest)
    assert found.source == "v2" and found.index is not None and found.index.digest == result.soci_index_digest
    assert resolved.digest == result.image_manifest_digest, "the platform resolves to the image, not the index"
    assert store.index_for(result.image_manifest_digest) == result.soci_index_digest

    with trio.fail_after(LIMIT), pytest.raises(SociError, match="already a SOCI v2 image"):
        await convert.convert(client, store, new_ref, f"{registry.host}/soci/convert:again", min_layer_size=MIN)
    with trio.fail_after(LIMIT), pytest.raises(SociError, match="must be in the repository"):
        await convert.convert(client, store, ref, f"{registry.host}/soci/elsewhere:v1", min_layer_size=MIN)
    with trio.fail_after(LIMIT), pytest.raises(SociError, match="SOCI v2 index"):
        await push.push_index(client, store, new_ref)


async def test_convert_turns_docker_media_types_into_oci(registry: Registry, client: RegistryClient,
                                                         store: LocalIndexes) -> None:
    entries, _ = layer_entries()
    blob = gzip_bytes(layer_tar(entries[0]))
    ref = f"{registry.host}/soci/docker:v1"
    docker_layer = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    with trio.fail_after(LIMIT):
        await push_by_client(client, ref, [(blob, docker_layer)], DOCKER_MANIFEST,
                             "application/vnd.docker.container.image.v1+json")
        result = await convert.convert(client, store, ref, f"{registry.host}/soci/docker:soci",
                                       span_size=SPAN, min_layer_size=MIN)
    _, raw = fetch_manifest(registry.host, "soci/docker", result.image_manifest_digest)
    new = json.loads(raw)
    assert new["mediaType"] == OCI_MANIFEST
    assert new["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert [d["mediaType"] for d in new["layers"]] == [GZIP]
    index = soci_index.parse_index(result.soci_index)
    [zref] = index.ztocs.values()
    assert zref.annotations[soci_index.LAYER_MEDIA_TYPE] == GZIP


def image_layout_manifest(image: Sample) -> bytes:
    return (image.layout / "blobs" / "sha256" / image.manifest_digest.split(":")[1]).read_bytes()


async def test_convert_of_a_multi_platform_index_keeps_the_client_platform(
        registry: Registry, image: Sample, client: RegistryClient, store: LocalIndexes) -> None:
    pushed(registry, image, "soci/multi")
    manifest = image_layout_manifest(image)
    entries = [{"mediaType": OCI_MANIFEST, "digest": image.manifest_digest, "size": len(manifest),
                "platform": {"architecture": arch, "os": "linux"}} for arch in ("arm64", "amd64")]
    multi = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    with trio.fail_after(LIMIT):
        index_digest = await client.push_manifest(f"{registry.host}/soci/multi:multi", multi, OCI_INDEX)
        result = await convert.convert(client, store, f"{registry.host}/soci/multi:multi",
                                       f"{registry.host}/soci/multi:multi-soci", span_size=SPAN, min_layer_size=MIN)
    assert result.source_index == index_digest and result.manifest_digest == image.manifest_digest
    _, raw = fetch_manifest(registry.host, "soci/multi", "multi-soci")
    assert [m["platform"]["architecture"] for m in json.loads(raw)["manifests"]] == ["amd64", "amd64"]
    assert "holds only linux/amd64" in report.convert_report(result)
