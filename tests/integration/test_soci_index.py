"""`lazysnap index create/push/convert` on an ordinary gzip image, checked as a runtime would see it.

v1 (`soci_image` fixture: create + push): the image is untouched; the registry (docker-
registry 2.8, no referrers API) lists the index under the fallback tag; discovery finds
it as v1. v2 (`index convert`): NEW-REF is an OCI index naming the new image manifest
and the index; discovery finds it as v2; containerd pulls and runs NEW-REF with its
own overlayfs snapshotter, so the converted image is a valid image. Lazy runs through
SOCI are in test_soci_lazy.py.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import pytest
import trio

from snapshotter.formats import soci_index, ztoc
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.manifest import OCI_INDEX, OCI_MANIFEST
from snapshotter.registry.options import RegistryOptions
from snapshotter.registry.referrers import referrers_tag
from snapshotter.soci.discovery import Discovery, fetch_ztoc, find_index
from tests.harness.containerd import Containerd
from tests.harness.images import HELLO_OUTPUT, fetch_manifest
from tests.harness.registry import Registry

from .conftest import SociImage, lazysnap_cli

REPO = "lazysnap/soci-index"


def discover(ref: str, manifest_digest: str) -> tuple[Discovery, dict[str, ztoc.Ztoc]]:
    """What the daemon's discovery finds for the image (no local store), and its zTOCs fetched and parsed."""
    async def main() -> tuple[Discovery, dict[str, ztoc.Ztoc]]:
        async with RegistryClient(RegistryOptions(plain_http=True, certs_dir=None)) as client:
            found = await find_index(client, None, ref, manifest_digest)
            ztocs = {}
            if found.index is not None:
                for layer, zref in found.index.ztocs.items():
                    ztocs[layer] = ztoc.parse_ztoc(await fetch_ztoc(client, None, ref, zref))
            return found, ztocs
    return trio.run(main)


def test_pushed_v1_index_is_discoverable_and_the_image_unchanged(soci_image: SociImage, registry: Registry) -> None:
    assert soci_image.indexed and soci_image.skipped, "want indexed layers and a layer below the minimum"
    assert registry.manifest_digest(REPO, "v1") == soci_image.manifest_digest, "the image was not rewritten"

    tag = referrers_tag(soci_image.manifest_digest)
    _, raw = fetch_manifest(registry.host, REPO, tag)
    tag_index = json.loads(raw)
    assert tag_index["mediaType"] == OCI_INDEX
    assert [(d["digest"], d["artifactType"]) for d in tag_index["manifests"]] == \
        [(soci_image.index_digest, soci_index.INDEX_V1)]

    async def referrers() -> list[str]:
        async with RegistryClient(RegistryOptions(plain_http=True, certs_dir=None)) as client:
            return [d.digest for d in await client.referrers(soci_image.ref, soci_image.manifest_digest,
                                                             soci_index.INDEX_V1)]
    assert trio.run(referrers) == [soci_image.index_digest]

    found, ztocs = discover(soci_image.ref, soci_image.manifest_digest)
    assert found.source == "v1" and found.index is not None, found.reason
    assert found.index.digest == soci_image.index_digest
    assert found.index.subject is not None and found.index.subject.digest == soci_image.manifest_digest
    assert {layer: ref.digest for layer, ref in found.index.ztocs.items()} == soci_image.indexed
    by_digest = {layer.digest: layer for layer in soci_image.layers}
    for digest, z in ztocs.items():
        assert z.compressed_archive_size == len(by_digest[digest].blob)
        assert soci_index.SPAN_SIZE in found.index.ztocs[digest].annotations
    for digest in soci_image.skipped:
        assert len(by_digest[digest].blob) < soci_image.min_layer_size


def test_index_list_shows_the_local_and_the_registry_view(soci_image: SociImage) -> None:
    out = lazysnap_cli("index", "list", soci_image.ref, "--store", str(soci_image.store), "--plain-http")
    assert f"{soci_image.index_digest[:19]}  v1" in out
    assert f"discovery finds {soci_image.index_digest} (source v1, {len(soci_image.indexed)} zTOCs)" in out


@pytest.fixture
def overlay_containerd() -> Iterator[Containerd]:
    """containerd with only its own snapshotters: the converted image must be an ordinary image to it."""
    ctd = Containerd()
    try:
        ctd.start()
        yield ctd
    finally:
        ctd.stop()


def test_convert_makes_a_v2_image_that_containerd_pulls_and_runs(soci_image: SociImage, registry: Registry,
                                                                  overlay_containerd: Containerd, cid: str) -> None:
    new_ref = soci_image.ref.replace(":v1", ":v1-soci")
    out = lazysnap_cli("index", "convert", soci_image.ref, new_ref, "--span-size", str(soci_image.span_size),
                       "--min-layer-size", str(soci_image.min_layer_size), "--store", str(soci_image.store),
                       "--plain-http")
    assert "reused from the store" in out, "the zTOCs index create built are reused"
    assert registry.manifest_digest(REPO, "v1") == soci_image.manifest_digest, "the original is untouched"

    top_digest, raw = fetch_manifest(registry.host, REPO, "v1-soci")
    top = json.loads(raw)
    assert top["mediaType"] == OCI_INDEX and top_digest in out
    image_entry, index_entry = top["manifests"]
    assert image_entry["mediaType"] == OCI_MANIFEST and image_entry["platform"]["architecture"] == "amd64"
    assert index_entry["artifactType"] == soci_index.INDEX_V2
    assert index_entry["annotations"][soci_index.IMAGE_MANIFEST_DIGEST] == image_entry["digest"]

    _, new_raw = fetch_manifest(registry.host, REPO, image_entry["digest"])
    new, old = json.loads(new_raw), json.loads(soci_image.image.manifest)
    v2_digest = new["annotations"][soci_index.INDEX_DIGEST]
    assert v2_digest == index_entry["digest"]
    assert new["config"] == old["config"] and new["layers"] == old["layers"]
    _, index_raw = fetch_manifest(registry.host, REPO, v2_digest)
    v2 = soci_index.parse_index(index_raw, v2_digest)
    assert v2.artifact_type == soci_index.INDEX_V2 and v2.subject is None
    assert {layer: ref.digest for layer, ref in v2.ztocs.items()} == soci_image.indexed

    found, ztocs = discover(new_ref, image_entry["digest"])
    assert found.source == "v2" and found.index is not None and found.index.digest == v2_digest, found.reason
    assert set(ztocs) == set(soci_image.indexed)

    overlay_containerd.pull(new_ref, snapshotter="overlayfs")
    images = overlay_containerd.ctr("images", "ls", "-q").stdout.split()
    assert new_ref in images
    done = overlay_containerd.run_container(
        new_ref, cid, "sh", "-c", "/hello.sh; sha256sum /data/random.bin; cat /data/small.txt",
        snapshotter="overlayfs")
    lines = done.stdout.splitlines()
    assert lines[0] == HELLO_OUTPUT
    assert lines[1].split()[0] == hashlib.sha256(soci_image.data).hexdigest()
    assert lines[2] == "small"
