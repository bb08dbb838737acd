"""Pushing blobs, manifests and referrers with RegistryClient, against a real docker-registry (2.8).

distribution 2.8 has no referrers API (`GET /v2/<name>/referrers/<digest>` is a
plain-text 404), so referrers are listed under the tag `sha256-<hex>` of their
subject; FaultProxy's `serve_referrers` stands in for a registry that has the API.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from snapshotter.registry.client import RegistryClient
from snapshotter.registry.errors import (
    BadResponse,
    NotFoundError,
    PushRejected,
    RegistryUnavailable,
)
from snapshotter.registry.manifest import OCI_INDEX, OCI_MANIFEST, Descriptor
from snapshotter.registry.options import Timeouts
from snapshotter.registry.referrers import EMPTY_JSON_DIGEST, referrers_tag
from tests.harness.faultproxy import FaultProxy
from tests.harness.registry import Registry
from tests.unit.test_registry_client import fast, sha256

LIMIT = 20  # seconds any one test may take before it is a hang
SOCI_V1 = "application/vnd.amazon.soci.index.v1+json"
SOCI_V2 = "application/vnd.amazon.soci.index.v2+json"
OCTET = "application/octet-stream"


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[RegistryClient]:
    async with RegistryClient(fast(tmp_path)) as c:
        yield c


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.host) as p:
        yield p


async def push_image(client: RegistryClient, repo: str, tag: str | None = "v1") -> tuple[bytes, Descriptor]:
    """A small OCI image (one random layer) pushed to `repo`; its manifest and descriptor."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "nonce": os.urandom(8).hex(),
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    config_desc = await client.push_blob(repo, config, "application/vnd.oci.image.config.v1+json")
    layer_desc = await client.push_blob(repo, os.urandom(1000), "application/vnd.oci.image.layer.v1.tar+gzip")
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc.to_json(),
                           "layers": [layer_desc.to_json()]}).encode()
    digest = await client.push_manifest(f"{repo}:{tag}" if tag else f"{repo}@{sha256(manifest)}", manifest,
                                        OCI_MANIFEST)
    return manifest, Descriptor(OCI_MANIFEST, digest, len(manifest))


async def soci_index(client: RegistryClient, repo: str, subject: Descriptor, artifact_type: str = SOCI_V1,
                     tool: str = "lazysnap-test") -> bytes:
    """A SOCI-like index manifest for `subject` (its zTOC and the empty config pushed first)."""
    await client.push_blob(repo, b"{}", artifact_type)
    ztoc = await client.push_blob(repo, os.urandom(300), OCTET)
    layer = {**ztoc.to_json(), "annotations": {"com.amazon.soci.image-layer-digest": sha256(b"layer"),
                                               "com.amazon.soci.image-layer-mediaType": "x"}}
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": artifact_type, "digest": EMPTY_JSON_DIGEST, "size": 2},
        "layers": [layer], "subject": subject.to_json(),
        "annotations": {"com.amazon.soci.build-tool-identifier": tool},
    }).encode()


# --------------------------------------------------------------------------- blobs


async def test_push_blob_uploads_once(client: RegistryClient, proxy: FaultProxy) -> None:
    with trio.fail_after(LIMIT):
        data = os.urandom(100_000)
        desc = await client.push_blob(f"{proxy.host}/push/blobs", data, OCTET)
        assert desc == Descriptor(OCTET, sha256(data), len(data))
        assert [(h.method, h.status) for h in proxy.hits("/v2/")] == [("HEAD", 404), ("POST", 202), ("PUT", 201)]
        assert await client.push_blob(f"{proxy.host}/push/blobs", data, OCTET) == desc
        assert [(h.method, h.status) for h in proxy.hits("/v2/")][3:] == [("HEAD", 200)], "second push skipped"
        assert await client.fetch_blob(f"{proxy.host}/push/blobs", desc.digest) == data


async def test_cross_repository_mount(client: RegistryClient, proxy: FaultProxy) -> None:
    with trio.fail_after(LIMIT):
        data = os.urandom(5000)
        await client.push_blob(f"{proxy.host}/mount/src", data)
        proxy.reset_counts()
        await client.push_blob(f"{proxy.host}/mount/dst", data, mount_from=f"{proxy.host}/mount/src")
        assert [(h.method, h.status) for h in proxy.hits("/v2/")] == [("HEAD", 404), ("POST", 201)]
        [post] = proxy.hits("/blobs/uploads/")
        assert "mount=sha256%3A" in post.query and "from=mount%2Fsrc" in post.query
        assert await client.fetch_blob(f"{proxy.host}/mount/dst", sha256(data)) == data


async def test_upload_500_is_retried_and_4xx_is_not(client: RegistryClient, proxy: FaultProxy) -> None:
    with trio.fail_after(LIMIT):
        repo = f"{proxy.host}/push/faults"
        proxy.fail(500, times=1, match="/blobs/uploads/", method="POST")
        proxy.fail(503, times=1, match="/blobs/uploads/", method="PUT")
        data = os.urandom(2000)
        await client.push_blob(repo, data)
        assert [(h.method, h.status) for h in proxy.hits("/blobs/uploads/")] == \
            [("POST", 500), ("POST", 202), ("PUT", 503), ("PUT", 201)]
        assert await client.fetch_blob(repo, sha256(data)) == data

        proxy.reset_counts()
        proxy.fail(400, times=5, match="/blobs/uploads/", method="PUT")
        with pytest.raises(PushRejected, match=r"refused it \(HTTP 400: INJECTED"):
            await client.push_blob(repo, os.urandom(2000))
        assert [(h.method, h.status) for h in proxy.hits("/blobs/uploads/")] == \
            [("POST", 202), ("PUT", 400), ("DELETE", 204)], "not retried; the session is cancelled"


async def test_the_registry_digest_of_a_push_is_checked(client: RegistryClient, proxy: FaultProxy) -> None:
    with trio.fail_after(LIMIT):
        repo = f"{proxy.host}/push/digest"
        proxy.wrong_digest_header = True
        data = os.urandom(100)
        with pytest.raises(BadResponse, match="registry's Docker-Content-Digest: digest mismatch"):
            await client.push_blob(repo, data)
        assert proxy.count("PUT") == 1, "a registry that lies is not asked again"
        with pytest.raises(BadResponse, match="registry's Docker-Content-Digest: digest mismatch"):
            await client.push_manifest(f"{repo}:v1", json.dumps(
                {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode(), OCI_INDEX)
        with pytest.raises(BadResponse, match="server says it is"):
            await client.push_blob(repo, data)  # the registry took it: HEAD finds it, with the wrong digest


async def test_lost_upload_session_starts_a_new_one(client: RegistryClient, proxy: FaultProxy) -> None:
    with trio.fail_after(LIMIT):
        repo = f"{proxy.host}/push/lost"
        proxy.fail(404, times=1, match="/blobs/uploads/", method="PUT")
        data = os.urandom(3000)
        await client.push_blob(repo, data)
        assert [(h.method, h.status) for h in proxy.hits("/v2/")] == \
            [("HEAD", 404), ("POST", 202), ("PUT", 404), ("HEAD", 404), ("POST", 202), ("PUT", 201)]
        assert await client.fetch_blob(repo, sha256(data)) == data


async def test_push_is_bounded_in_time(tmp_path: Path, proxy: FaultProxy) -> None:
    with trio.fail_after(LIMIT):
        proxy.delay, proxy.delay_match = 30.0, "/blobs/uploads/"
        options = fast(tmp_path, timeouts=Timeouts(connect=1.0, read=0.5, request=0.5, operation=1.5))
        async with RegistryClient(options) as c:
            start = trio.current_time()
            with pytest.raises(RegistryUnavailable, match="upload of blob"):
                await c.push_blob(f"{proxy.host}/push/slow", os.urandom(100))
            assert trio.current_time() - start < 3.0


async def test_push_needs_an_endpoint_trusted_to_push(tmp_path: Path, registry: Registry) -> None:
    with trio.fail_after(LIMIT):
        directory = tmp_path / "certs.d" / "registry.test"
        directory.mkdir(parents=True)
        (directory / "hosts.toml").write_text(f'server = "{registry.url}"\ncapabilities = ["pull", "resolve"]\n')
        async with RegistryClient(fast(tmp_path)) as c:
            with pytest.raises(NotFoundError, match="no endpoint for registry.test may push"):
                await c.push_blob("registry.test/push/denied", b"data")


# --------------------------------------------------------------------------- manifests


async def test_push_manifest_by_tag_and_digest_and_fetch_it_raw(client: RegistryClient, registry: Registry) -> None:
    with trio.fail_after(LIMIT):
        repo = f"{registry.host}/push/manifests"
        manifest, desc = await push_image(client, repo, "v1")
        assert desc.digest == sha256(manifest)
        assert await client.fetch_manifest(repo, "v1") == (OCI_MANIFEST, manifest, desc.digest)
        assert await client.fetch_manifest(repo, desc.digest) == (OCI_MANIFEST, manifest, desc.digest)
        assert (await client.resolve(f"{repo}:v1")).digest == desc.digest

        pinned, pinned_desc = await push_image(client, repo, None)
        assert await client.fetch_manifest(repo, pinned_desc.digest) == (OCI_MANIFEST, pinned, pinned_desc.digest)
        with pytest.raises(NotFoundError):
            await client.fetch_manifest(repo, "nope")

        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {**desc.to_json(), "platform": {"os": "linux", "architecture": "amd64"}},
            {**pinned_desc.to_json(), "platform": {"os": "linux", "architecture": "arm64"}}]}).encode()
        index_digest = await client.push_manifest(f"{repo}:multi", index, OCI_INDEX)
        assert await client.fetch_manifest(repo, "multi") == (OCI_INDEX, index, index_digest), \
            "an index comes back as the index, no platform chosen"
        with pytest.raises(ValueError, match="digest is"):
            await client.push_manifest(f"{repo}@{desc.digest}", index, OCI_INDEX)


async def test_fetch_manifest_is_verified(client: RegistryClient, proxy: FaultProxy, registry: Registry) -> None:
    with trio.fail_after(LIMIT):
        _, desc = await push_image(client, f"{registry.host}/push/verified")
        proxy.flip = {"manifests"}
        with pytest.raises(BadResponse, match="digest mismatch"):
            await client.fetch_manifest(f"{proxy.host}/push/verified", desc.digest)
        with pytest.raises(BadResponse, match="digest mismatch"):
            await client.fetch_manifest(f"{proxy.host}/push/verified", "v1")


async def test_rejected_manifest_is_not_retried(client: RegistryClient, proxy: FaultProxy) -> None:
    with trio.fail_after(LIMIT):
        repo = f"{proxy.host}/push/rejected"
        missing = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [],
                              "config": {"mediaType": "x", "digest": sha256(b"never pushed"), "size": 12}}).encode()
        with pytest.raises(PushRejected, match="MANIFEST_BLOB_UNKNOWN"):
            await client.push_manifest(f"{repo}:v1", missing, OCI_MANIFEST)
        assert proxy.count("PUT", "/manifests/") == 1
        _, desc = await push_image(client, repo)
        proxy.reset_counts()
        proxy.fail(502, times=1, match="/manifests/", method="PUT")
        manifest = (await client.fetch_manifest(repo, desc.digest))[1]
        assert await client.push_manifest(f"{repo}:again", manifest, OCI_MANIFEST) == desc.digest
        assert [h.status for h in proxy.hits("/manifests/") if h.method == "PUT"] == [502, 201]


# --------------------------------------------------------------------------- referrers


async def test_soci_index_found_through_the_referrers_tag(client: RegistryClient, registry: Registry,
                                                          proxy: FaultProxy) -> None:
    with trio.fail_after(LIMIT):
        repo = f"{registry.host}/soci/app"
        _, image = await push_image(client, repo)
        index = await soci_index(client, repo, image)
        index_digest = await client.push_manifest(f"{repo}@{sha256(index)}", index, OCI_MANIFEST)
        assert await client.referrers(repo, image.digest, SOCI_V1) == [], "not listed anywhere yet"
        listed = Descriptor(OCI_MANIFEST, index_digest, len(index),
                            {"com.amazon.soci.build-tool-identifier": "lazysnap-test"}, artifact_type=SOCI_V1)
        tag_digest = await client.update_referrers_tag(repo, image.digest, listed)

        via = f"{proxy.host}/soci/app"
        assert await client.referrers(via, image.digest, SOCI_V1) == [listed]
        assert await client.referrers(via, image.digest, None) == [listed]
        assert await client.referrers(via, image.digest, SOCI_V2) == []
        assert client.referrers_api == {f"http://{registry.host}/v2": False, f"http://{proxy.host}/v2": False}
        assert not await client.supports_referrers_api(via)
        hits = [(h.method, h.path.rsplit("/", 2)[-2:], h.status) for h in proxy.hits("/v2/")]
        assert hits[0] == ("GET", ["referrers", image.digest], 404), "distribution 2.8: no referrers API"
        assert all(h[1] == ["manifests", referrers_tag(image.digest)] for h in hits[1:]), \
            "asked once; from then on only the tag"
        media_type, raw, digest = await client.fetch_manifest(repo, referrers_tag(image.digest))
        assert (media_type, digest) == (OCI_INDEX, tag_digest)
        assert json.loads(raw)["manifests"] == [listed.to_json()]
        assert (await client.fetch_manifest(repo, index_digest))[1] == index


async def test_push_referrer_keeps_every_entry_once(client: RegistryClient, proxy: FaultProxy) -> None:
    with trio.fail_after(LIMIT):
        repo = f"{proxy.host}/soci/two"
        _, image = await push_image(client, repo)
        first = await client.push_referrer(repo, await soci_index(client, repo, image, tool="a"), OCI_MANIFEST)
        second = await client.push_referrer(repo, await soci_index(client, repo, image, SOCI_V2, "b"), OCI_MANIFEST)
        assert (first.artifact_type, second.artifact_type) == (SOCI_V1, SOCI_V2)
        assert first.annotations == {"com.amazon.soci.build-tool-identifier": "a"}
        assert await client.referrers(repo, image.digest, None) == [first, second]
        assert await client.referrers(repo, image.digest, SOCI_V2) == [second]
        proxy.reset_counts()
        tag = referrers_tag(image.digest)
        unchanged = await client.update_referrers_tag(repo, image.digest, first)
        assert unchanged == (await client.fetch_manifest(repo, tag))[2]
        assert proxy.count("PUT") == 0, "already listed: nothing pushed"
        assert len(json.loads((await client.fetch_manifest(repo, tag))[1])["manifests"]) == 2


async def test_no_referrers(client: RegistryClient, registry: Registry) -> None:
    with trio.fail_after(LIMIT):
        repo = f"{registry.host}/soci/none"
        _, image = await push_image(client, repo)
        assert await client.referrers(repo, image.digest, SOCI_V1) == []
        assert await client.referrers(f"{registry.host}/no/such/repo", image.digest) == []


async def test_other_ways_of_saying_no_referrers_api(client: RegistryClient, proxy: FaultProxy) -> None:
    with trio.fail_after(LIMIT):
        repo = f"{proxy.host}/soci/no-api"
        _, image = await push_image(client, repo)
        pushed = await client.push_referrer(repo, await soci_index(client, repo, image), OCI_MANIFEST)
        for status in (501, 405):
            async with RegistryClient(client.options) as fresh:
                proxy.fail(status, times=1, match="/referrers/")
                assert await fresh.referrers(repo, image.digest, SOCI_V1) == [pushed]
                assert fresh.referrers_api == {f"http://{proxy.host}/v2": False}


async def test_a_tag_that_is_not_an_index(client: RegistryClient, registry: Registry) -> None:
    with trio.fail_after(LIMIT):
        repo = f"{registry.host}/soci/squatted"
        manifest, image = await push_image(client, repo)
        tag = referrers_tag(image.digest)
        await client.push_manifest(f"{repo}:{tag}", manifest, OCI_MANIFEST)
        assert await client.referrers(repo, image.digest) == [], "not an index: no referrers"
        with pytest.raises(BadResponse, match="not an OCI image index"):
            await client.update_referrers_tag(repo, image.digest, image)
        assert (await client.fetch_manifest(repo, tag))[1] == manifest, "left alone"


async def test_a_registry_with_the_referrers_api_is_used_directly(client: RegistryClient, proxy: FaultProxy,
                                                                  registry: Registry) -> None:
    with trio.fail_after(LIMIT):
        repo = f"{proxy.host}/soci/api"
        _, image = await push_image(client, repo)
        canned = {"mediaType": OCI_MANIFEST, "digest": sha256(b"canned"), "size": 6, "artifactType": SOCI_V1,
                  "annotations": {"from": "the referrers API"}}
        other = {"mediaType": OCI_MANIFEST, "digest": sha256(b"sig"), "size": 3, "artifactType": "application/x-sig"}
        proxy.serve_referrers({image.digest: [canned, other]})
        proxy.reset_counts()
        [found] = await client.referrers(repo, image.digest, SOCI_V1)
        assert found == Descriptor.parse(canned, "canned")
        [hit] = proxy.hits("/v2/")
        assert (hit.method, hit.path) == ("GET", f"/v2/soci/api/referrers/{image.digest}")
        assert hit.query == "artifactType=application%2Fvnd.amazon.soci.index.v1%2Bjson"
        assert await client.supports_referrers_api(repo)

        proxy.reset_counts()
        pushed = await client.push_referrer(repo, await soci_index(client, repo, image), OCI_MANIFEST)
        assert proxy.count(contains=referrers_tag(image.digest)) == 0, "OCI-Subject answered: no tag to keep"
        assert await client.referrers(repo, image.digest, SOCI_V1) == [found, pushed]
        with pytest.raises(NotFoundError):
            await client.fetch_manifest(f"{registry.host}/soci/api", referrers_tag(image.digest))


async def test_pushing_through_a_token_registry_asks_for_push_scope(tmp_path: Path, proxy: FaultProxy) -> None:
    with trio.fail_after(LIMIT):
        proxy.require_bearer(scoped=True)
        repo = f"{proxy.host}/push/auth"
        async with RegistryClient(fast(tmp_path)) as c:
            _, image = await push_image(c, repo)
            pushed = await c.push_referrer(repo, await soci_index(c, repo, image), OCI_MANIFEST)
            assert await c.referrers(repo, image.digest, SOCI_V1) == [pushed]
        scopes = {h.query for h in proxy.hits("/token")}
        assert any("scope=repository%3Apush%2Fauth%3Apull%2Cpush" in q for q in scopes), scopes
        assert proxy.tokens_issued == 2, "one push token for every push, one pull token for reading"
        assert all(h.status != 401 for h in proxy.hits("/v2/push/auth/") if h.method in ("POST", "PUT")), \
            "the push token was asked for up front"


async def test_a_pull_token_cannot_push(tmp_path: Path, proxy: FaultProxy) -> None:
    """The scoped token mode itself: what a client asking only for pull would run into."""
    with trio.fail_after(LIMIT):
        proxy.require_bearer(scoped=True)
        repo = f"{proxy.host}/push/scoped"
        async with RegistryClient(fast(tmp_path)) as c:
            desc = await c.push_blob(repo, b"scoped")
            assert await c.fetch_blob(repo, desc.digest) == b"scoped"
        [get] = [h for h in proxy.hits("/blobs/") if h.method == "GET"]
        assert get.status == 200 and get.authorization and get.authorization.startswith("Bearer ")
        assert await trio.to_thread.run_sync(_start_upload, proxy, get.authorization) == 401


def _start_upload(proxy: FaultProxy, authorization: str) -> int:
    req = urllib.request.Request(f"{proxy.url}/v2/push/scoped/blobs/uploads/", method="POST",
                                 headers={"Authorization": authorization})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return e.code
