"""RegistryClient against a real docker-registry on loopback, with FaultProxy in front for faults."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import tracemalloc
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from snapshotter.registry.client import RegistryClient
from snapshotter.registry.errors import (
    BadResponse,
    NotFoundError,
    RegistryError,
    RegistryUnavailable,
    Unauthorized,
)
from snapshotter.registry.manifest import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
)
from snapshotter.registry.options import RegistryOptions, Timeouts
from tests.harness.faultproxy import FaultProxy
from tests.harness.images import File, Image, Layer, OCILayout, push
from tests.harness.procs import free_port
from tests.harness.registry import Registry

MiB = 1 << 20
LIMIT = 20  # seconds any one test may take before it is a hang


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def upload_blob(registry: Registry, repo: str, data: bytes) -> str:
    """Monolithic blob upload through the distribution API."""
    digest = sha256(data)
    start = urllib.request.Request(f"{registry.url}/v2/{repo}/blobs/uploads/", method="POST")
    with urllib.request.urlopen(start, timeout=30) as resp:
        location = resp.headers["Location"]
    sep = "&" if "?" in location else "?"
    put = urllib.request.Request(f"{location}{sep}digest={digest}", data=data, method="PUT",
                                 headers={"Content-Type": "application/octet-stream"})
    urllib.request.urlopen(put, timeout=60).close()
    return digest


def put_manifest(registry: Registry, repo: str, reference: str, doc: dict[str, Any], media_type: str) -> bytes:
    body = json.dumps(doc, indent=2).encode()
    req = urllib.request.Request(f"{registry.url}/v2/{repo}/manifests/{reference}", data=body, method="PUT",
                                 headers={"Content-Type": media_type})
    urllib.request.urlopen(req, timeout=30).close()
    return body


@dataclass
class Content:
    registry: Registry
    image: Image                      # oci/app:v1, an OCI manifest (pushed with skopeo)
    docker_manifest: bytes            # docker/app:v1, Docker schema 2
    index: bytes                      # oci/app:multi, OCI index: arm64, amd64 (= image), unknown
    manifest_list: bytes              # docker/app:list, Docker manifest list with the amd64 docker manifest
    data: bytes                       # blobs/data
    data_digest: str
    big: bytes                        # blobs/big, for streaming
    big_digest: str


@pytest.fixture(scope="module")
def content(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Content]:
    tmp = tmp_path_factory.mktemp("registry-content")
    with Registry() as registry:
        layout = OCILayout(tmp / "layout")
        image = layout.add_image("v1", [Layer.from_entries([File("hello.txt", "hello\n")]),
                                        Layer.from_entries([File("data.bin", os.urandom(4096))])])
        push(tmp / "layout", "v1", registry, "oci/app", image)

        config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}})
        config_digest = upload_blob(registry, "docker/app", config.encode())
        layer = gzip.compress(_tar({"docker.txt": b"from a docker manifest\n"}), mtime=0)
        layer_digest = upload_blob(registry, "docker/app", layer)
        docker_manifest = put_manifest(registry, "docker/app", "v1", {
            "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                       "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                        "digest": layer_digest, "size": len(layer)}],
        }, DOCKER_MANIFEST)

        arm_config = config.replace("amd64", "arm64").encode()
        arm_config_digest = upload_blob(registry, "oci/app", arm_config)
        arm = put_manifest(registry, "oci/app", "arm", {
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": arm_config_digest,
                       "size": len(arm_config)},
            "layers": [],
        }, OCI_MANIFEST)

        def entry(body: bytes, media_type: str, os_: str, arch: str, **extra: str) -> dict[str, Any]:
            return {"mediaType": media_type, "digest": sha256(body), "size": len(body),
                    "platform": {"os": os_, "architecture": arch, **extra}}

        index = put_manifest(registry, "oci/app", "multi", {
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [entry(arm, OCI_MANIFEST, "linux", "arm64", variant="v8"),
                          entry(arm, OCI_MANIFEST, "unknown", "unknown"),
                          entry(image.manifest, OCI_MANIFEST, "linux", "amd64")],
        }, OCI_INDEX)
        put_manifest(registry, "oci/app", "armonly", {
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [entry(arm, OCI_MANIFEST, "linux", "arm64")]}, OCI_INDEX)
        manifest_list = put_manifest(registry, "docker/app", "list", {
            "schemaVersion": 2, "mediaType": DOCKER_MANIFEST_LIST,
            "manifests": [entry(docker_manifest, DOCKER_MANIFEST, "linux", "amd64")]}, DOCKER_MANIFEST_LIST)

        data = os.urandom(300_000)
        big = os.urandom(24 * MiB)
        yield Content(registry, image, docker_manifest, index, manifest_list,
                      data, upload_blob(registry, "blobs/data", data), big, upload_blob(registry, "blobs/big", big))


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def fast(tmp_path: Path | None = None, **overrides: Any) -> RegistryOptions:
    """Options with short timeouts and backoff, and no host configuration or credentials of this machine."""
    values: dict[str, Any] = dict(
        timeouts=Timeouts(connect=1.0, read=2.0, request=4.0, operation=8.0),
        retries=3, backoff_base=0.01, backoff_max=0.05,
        certs_dir=(tmp_path / "certs.d") if tmp_path else None,
        docker_config=(tmp_path / "docker" / "config.json") if tmp_path else Path("/nonexistent/config.json"),
    )
    values.update(overrides)
    return RegistryOptions(**values)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[RegistryClient]:
    async with RegistryClient(fast(tmp_path)) as c:
        yield c


@pytest.fixture
def proxy(content: Content) -> Iterator[FaultProxy]:
    with FaultProxy(content.registry.host) as p:
        yield p


def blob_path(digest: str) -> str:
    return f"/v2/blobs/data/blobs/{digest}"


# --------------------------------------------------------------------------- resolve


async def test_resolve_oci_manifest_by_tag_and_digest(client: RegistryClient, content: Content) -> None:
    with trio.fail_after(LIMIT):
        image = content.image
        m = await client.resolve(f"{content.registry.host}/oci/app:v1")
        assert (m.digest, m.media_type, m.raw, m.index_digest) == (image.manifest_digest, OCI_MANIFEST,
                                                                   image.manifest, None)
        assert [layer.digest for layer in m.layers] == [layer.digest for layer in image.layers]
        assert m.config.digest == image.config_digest
        pinned = await client.resolve(f"{content.registry.host}/oci/app@{image.manifest_digest}")
        assert pinned.raw == image.manifest and pinned.ref.digest == image.manifest_digest


async def test_resolve_docker_schema2(client: RegistryClient, content: Content) -> None:
    with trio.fail_after(LIMIT):
        m = await client.resolve(f"{content.registry.host}/docker/app:v1")
        assert (m.media_type, m.digest, m.raw) == (DOCKER_MANIFEST, sha256(content.docker_manifest),
                                                   content.docker_manifest)
        assert m.layers[0].media_type == "application/vnd.docker.image.rootfs.diff.tar.gzip"


async def test_resolve_index_picks_linux_amd64(client: RegistryClient, content: Content) -> None:
    with trio.fail_after(LIMIT):
        m = await client.resolve(f"{content.registry.host}/oci/app:multi")
        assert m.digest == content.image.manifest_digest and m.raw == content.image.manifest
        assert m.index_digest == sha256(content.index)
        listed = await client.resolve(f"{content.registry.host}/docker/app:list")
        assert listed.digest == sha256(content.docker_manifest) and listed.media_type == DOCKER_MANIFEST
        assert listed.index_digest == sha256(content.manifest_list)
        with pytest.raises(NotFoundError, match="no manifest for linux/amd64.*linux/arm64"):
            await client.resolve(f"{content.registry.host}/oci/app:armonly")


async def test_unknown_manifest_is_not_found(client: RegistryClient, content: Content) -> None:
    with trio.fail_after(LIMIT):
        with pytest.raises(NotFoundError, match=r"oci/app:nope not found at http://.*MANIFEST_UNKNOWN"):
            await client.resolve(f"{content.registry.host}/oci/app:nope")
        with pytest.raises(NotFoundError):
            await client.resolve(f"{content.registry.host}/no/such/repo:v1")


async def test_flipped_manifest_bytes_are_a_digest_mismatch(client: RegistryClient, proxy: FaultProxy,
                                                            content: Content) -> None:
    with trio.fail_after(LIMIT):
        proxy.flip = {"manifests"}
        with pytest.raises(BadResponse, match="digest mismatch"):
            await client.resolve(f"{proxy.host}/oci/app:v1")
        with pytest.raises(BadResponse, match="digest mismatch"):
            await client.resolve(f"{proxy.host}/oci/app@{content.image.manifest_digest}")
        proxy.flip = set()
        assert (await client.resolve(f"{proxy.host}/oci/app:v1")).digest == content.image.manifest_digest


async def test_oversize_manifest_is_refused(tmp_path: Path, content: Content) -> None:
    with trio.fail_after(LIMIT):
        async with RegistryClient(fast(tmp_path, max_manifest_size=100)) as small:
            with pytest.raises(BadResponse, match="more than the 100 bytes"):
                await small.resolve(f"{content.registry.host}/oci/app:v1")


# --------------------------------------------------------------------------- small blobs


async def test_fetch_blob_verified_and_bounded(client: RegistryClient, proxy: FaultProxy, content: Content) -> None:
    with trio.fail_after(LIMIT):
        config = await client.fetch_blob(f"{content.registry.host}/oci/app", content.image.config_digest)
        assert sha256(config) == content.image.config_digest and json.loads(config)["os"] == "linux"
        with pytest.raises(BadResponse, match="more than the 1000 bytes"):
            await client.fetch_blob(f"{content.registry.host}/blobs/data", content.data_digest, max_size=1000)
        with pytest.raises(NotFoundError, match="BLOB_UNKNOWN"):
            await client.fetch_blob(f"{content.registry.host}/oci/app", sha256(b"never pushed"))
        proxy.flip = {"blobs"}
        with pytest.raises(BadResponse, match="digest mismatch"):
            await client.fetch_blob(f"{proxy.host}/oci/app", content.image.config_digest)


# --------------------------------------------------------------------------- blob size, ranges


async def test_open_blob_uses_head(client: RegistryClient, proxy: FaultProxy, content: Content) -> None:
    with trio.fail_after(LIMIT):
        blob = await client.open_blob(f"{proxy.host}/blobs/data", content.data_digest)
        assert blob.size == len(content.data) and not blob.redirected
        assert proxy.count("HEAD") == 1 and proxy.count("GET") == 0
        with pytest.raises(NotFoundError):
            await client.open_blob(f"{proxy.host}/blobs/data", sha256(b"missing"))


async def test_open_blob_falls_back_to_a_one_byte_get_when_head_is_refused(
        client: RegistryClient, proxy: FaultProxy, content: Content) -> None:
    with trio.fail_after(LIMIT):
        proxy.refuse_head = True
        blob = await client.open_blob(f"{proxy.host}/blobs/data", content.data_digest)
        assert blob.size == len(content.data)
        [head, get] = proxy.hits("/blobs/")
        assert (head.method, head.status) == ("HEAD", 405)
        assert (get.method, get.status, get.range) == ("GET", 206, "bytes=0-0")


async def test_single_range(client: RegistryClient, proxy: FaultProxy, content: Content) -> None:
    with trio.fail_after(LIMIT):
        blob = await client.open_blob(f"{proxy.host}/blobs/data", content.data_digest)
        assert await client.read_range(blob, 1000, 5000) == content.data[1000:5000]
        assert await client.read_range(blob, 299_999, 300_000) == content.data[-1:]
        assert await client.read_range(blob, 7, 7) == b""
        assert [h.range for h in proxy.hits("/blobs/") if h.method == "GET"] == ["bytes=1000-4999",
                                                                                 "bytes=299999-299999"]
        assert proxy.bytes_sent[blob_path(content.data_digest)] == 4001
        with pytest.raises(ValueError, match="outside"):
            await client.read_range(blob, 0, 300_001)


async def test_real_registry_answers_multi_range_in_one_request(client: RegistryClient, proxy: FaultProxy,
                                                               content: Content) -> None:
    """distribution serves blobs with Go's http.ServeContent, which speaks multipart/byteranges."""
    with trio.fail_after(LIMIT):
        blob = await client.open_blob(f"{proxy.host}/blobs/data", content.data_digest)
        wanted = [(200_000, 200_100), (0, 10), (5, 20), (150_000, 150_000), (299_990, 300_000)]
        got = await client.read_ranges(blob, wanted)
        assert got == [content.data[s:e] for s, e in wanted]
        [get] = [h for h in proxy.hits("/blobs/") if h.method == "GET"]
        assert (get.status, get.range) == (206, "bytes=0-19,200000-200099,299990-299999")
        assert client.single_range_only == {}


async def test_multi_range_refused_falls_back_and_is_remembered(client: RegistryClient, proxy: FaultProxy,
                                                               content: Content) -> None:
    with trio.fail_after(LIMIT):
        proxy.refuse_multirange = True
        blob = await client.open_blob(f"{proxy.host}/blobs/data", content.data_digest)
        wanted = [(0, 100), (1000, 1100), (250_000, 250_500)]
        assert await client.read_ranges(blob, wanted) == [content.data[s:e] for s, e in wanted]
        gets = [h for h in proxy.hits("/blobs/") if h.method == "GET"]
        assert [h.status for h in gets] == [400, 206, 206, 206]
        assert "HTTP 400" in client.single_range_only[proxy.url]
        proxy.reset_counts()
        assert await client.read_ranges(blob, wanted) == [content.data[s:e] for s, e in wanted]
        ranges = [h.range or "" for h in proxy.hits("/blobs/")]
        assert len(ranges) == 3 and not any("," in r for r in ranges), "no second multi-range attempt"


async def test_multi_range_answered_with_one_plain_part_falls_back(client: RegistryClient, proxy: FaultProxy,
                                                                  content: Content) -> None:
    with trio.fail_after(LIMIT):
        proxy.first_range_only = True
        blob = await client.open_blob(f"{proxy.host}/blobs/data", content.data_digest)
        wanted = [(0, 100), (1000, 1100)]
        assert await client.read_ranges(blob, wanted) == [content.data[s:e] for s, e in wanted]
        assert proxy.url in client.single_range_only


async def test_server_ignoring_ranges(tmp_path: Path, proxy: FaultProxy, content: Content) -> None:
    with trio.fail_after(LIMIT):
        proxy.ignore_ranges = True
        async with RegistryClient(fast(tmp_path)) as c:
            blob = await c.open_blob(f"{proxy.host}/blobs/data", content.data_digest)
            assert await c.read_range(blob, 10, 20) == content.data[10:20], "small blob: slice the whole body"
            assert await c.read_ranges(blob, [(0, 5), (100, 105)]) == [content.data[0:5], content.data[100:105]]
        async with RegistryClient(fast(tmp_path, whole_body_limit=1000)) as c:
            blob = await c.open_blob(f"{proxy.host}/blobs/data", content.data_digest)
            assert await c.read_range(blob, 10, 20) == content.data[10:20], "a prefix within the limit is read"
            assert await c.read_ranges(blob, [(0, 5), (100, 105)]) == [content.data[0:5], content.data[100:105]]
            with pytest.raises(BadResponse, match="ignores Range"):
                await c.read_range(blob, 2000, 2010)
            with pytest.raises(BadResponse, match="ignores Range"):
                await c.read_ranges(blob, [(0, 5), (2000, 2005)])
            assert "whole blob" in c.single_range_only[proxy.url]


async def test_redirect_target_is_remembered_and_refreshed_once(client: RegistryClient, proxy: FaultProxy,
                                                               content: Content) -> None:
    with trio.fail_after(LIMIT):
        proxy.redirect_blobs = True
        blob = await client.open_blob(f"{proxy.host}/blobs/data", content.data_digest)
        assert blob.redirected and "/_redirected/1/" in blob.url
        for start in (0, 1000, 2000):
            assert await client.read_range(blob, start, start + 10) == content.data[start:start + 10]
        assert await client.read_ranges(blob, [(0, 1), (9, 10)]) == [content.data[0:1], content.data[9:10]]
        registry_path = blob_path(content.data_digest)
        assert proxy.count(contains=registry_path) == 6 and proxy.count(contains=f" {registry_path}") == 1, \
            "only open_blob's HEAD asked the registry path; reads went to the remembered target"
        proxy.expire_redirects()
        assert await client.read_range(blob, 50, 60) == content.data[50:60]
        assert "/_redirected/2/" in blob.url
        assert await client.read_range(blob, 70, 80) == content.data[70:80]
        assert [h.status for h in proxy.hits()][-4:] == [403, 307, 206, 206]
        assert proxy.count(contains=f" {registry_path}") == 2, "re-resolved exactly once"


# --------------------------------------------------------------------------- retries, timeouts


async def test_retries_500_then_succeeds(client: RegistryClient, proxy: FaultProxy, content: Content) -> None:
    with trio.fail_after(LIMIT):
        blob = await client.open_blob(f"{proxy.host}/blobs/data", content.data_digest)
        proxy.fail(500, times=2)
        assert await client.read_range(blob, 0, 10) == content.data[:10]
        assert [h.status for h in proxy.hits() if h.method == "GET"] == [500, 500, 206]


async def test_429_honours_retry_after(client: RegistryClient, proxy: FaultProxy, content: Content) -> None:
    with trio.fail_after(LIMIT):
        proxy.fail(429, times=1, retry_after="1")
        start = trio.current_time()
        assert (await client.resolve(f"{proxy.host}/oci/app:v1")).digest == content.image.manifest_digest
        assert trio.current_time() - start >= 1.0
        proxy.fail(429, times=1, retry_after="3600")
        with pytest.raises(RegistryUnavailable, match="retry after 3600 s"):
            await client.resolve(f"{proxy.host}/oci/app:v1")


async def test_persistent_5xx_is_unavailable_after_bounded_retries(client: RegistryClient, proxy: FaultProxy,
                                                                   content: Content) -> None:
    with trio.fail_after(LIMIT):
        proxy.fail(503, times=100)
        with pytest.raises(RegistryUnavailable, match=r"HTTP 503.*\(4 attempt\(s\)"):
            await client.fetch_blob(f"{proxy.host}/blobs/data", content.data_digest)
        assert proxy.count() == 4


async def test_client_errors_fail_fast(client: RegistryClient, proxy: FaultProxy, content: Content) -> None:
    with trio.fail_after(LIMIT):
        proxy.fail(400, times=5)
        with pytest.raises(BadResponse, match="unexpected HTTP 400"):
            await client.fetch_blob(f"{proxy.host}/blobs/data", content.data_digest)
        assert proxy.count() == 1


async def test_dead_registry_is_unavailable_within_the_timeout(client: RegistryClient) -> None:
    with trio.fail_after(LIMIT):
        start = trio.current_time()
        with pytest.raises(RegistryUnavailable, match=r"ConnectError.*4 attempt"):
            await client.resolve(f"127.0.0.1:{free_port()}/oci/app:v1")
        assert trio.current_time() - start < 2.0


async def test_silent_registry_times_out(tmp_path: Path, proxy: FaultProxy, content: Content) -> None:
    with trio.fail_after(LIMIT):
        proxy.delay = 30.0
        options = fast(tmp_path, timeouts=Timeouts(connect=1.0, read=0.5, request=1.0, operation=5.0), retries=1)
        async with RegistryClient(options) as c:
            start = trio.current_time()
            with pytest.raises(RegistryUnavailable, match="2 attempt"):
                await c.resolve(f"{proxy.host}/oci/app:v1")
            elapsed = trio.current_time() - start
        assert 0.9 <= elapsed < 3.0, elapsed


async def test_operation_deadline_bounds_all_retries(tmp_path: Path) -> None:
    with trio.fail_after(LIMIT):
        options = fast(tmp_path, retries=1000, backoff_base=0.1, backoff_max=0.2,
                       timeouts=Timeouts(connect=1.0, read=1.0, request=1.0, operation=1.5))
        async with RegistryClient(options) as c:
            start = trio.current_time()
            with pytest.raises(RegistryUnavailable):
                await c.resolve(f"127.0.0.1:{free_port()}/x:y")
            assert trio.current_time() - start < 2.0


async def test_dropped_connection_is_retried(client: RegistryClient, proxy: FaultProxy, content: Content) -> None:
    with trio.fail_after(LIMIT):
        blob = await client.open_blob(f"{proxy.host}/blobs/data", content.data_digest)
        proxy.drop(times=1)
        assert await client.read_range(blob, 0, 100_000) == content.data[:100_000]
        proxy.drop(times=10)
        with pytest.raises(RegistryUnavailable, match="attempt"):
            await client.read_range(blob, 0, 100_000)


async def test_connections_per_host_are_bounded(tmp_path: Path, proxy: FaultProxy, content: Content) -> None:
    with trio.fail_after(LIMIT):
        async with RegistryClient(fast(tmp_path, max_connections_per_host=2)) as c:
            blob = await c.open_blob(f"{proxy.host}/blobs/data", content.data_digest)
            proxy.delay, proxy.delay_match = 0.3, "/blobs/"
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(c.read_range, blob, i, i + 1)
            assert trio.current_time() - start >= 0.85, "6 requests, 2 at a time, 0.3 s each"


# --------------------------------------------------------------------------- hostile answers


async def test_hostile_range_answers_are_bad_responses(client: RegistryClient, proxy: FaultProxy,
                                                       content: Content) -> None:
    with trio.fail_after(LIMIT):
        blob = await client.open_blob(f"{proxy.host}/blobs/data", content.data_digest)
        proxy.wrong_content_range = True
        with pytest.raises(BadResponse, match="wrong Content-Range"):
            await client.read_range(blob, 100, 200)
        proxy.wrong_content_range = False
        proxy.short_body = True
        with pytest.raises(BadResponse, match="body has 99 bytes, Content-Range promised 100"):
            await client.read_range(blob, 100, 200)


# --------------------------------------------------------------------------- streaming


async def test_stream_blob_in_bounded_memory(client: RegistryClient, content: Content) -> None:
    with trio.fail_after(LIMIT):
        blob = await client.open_blob(f"{content.registry.host}/blobs/big", content.big_digest)
        h = hashlib.sha256()
        largest = 0
        tracemalloc.start()
        try:
            async with aclosing(client.stream_blob(blob, chunk_size=256 * 1024)) as chunks:
                async for chunk in chunks:
                    largest = max(largest, len(chunk))
                    h.update(chunk)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert "sha256:" + h.hexdigest() == content.big_digest
        assert largest <= 256 * 1024
        assert peak < 4 * MiB, f"streaming a {len(content.big) // MiB} MiB blob peaked at {peak / MiB:.1f} MiB"


async def test_stream_resumes_after_drops_and_verifies(client: RegistryClient, proxy: FaultProxy,
                                                       content: Content) -> None:
    with trio.fail_after(LIMIT):
        blob = await client.open_blob(f"{proxy.host}/blobs/data", content.data_digest)
        proxy.drop(times=2)
        assert b"".join([c async for c in client.stream_blob(blob, chunk_size=16 * 1024)]) == content.data
        resumed = [h.range for h in proxy.hits("/blobs/") if h.method == "GET"]
        assert resumed[0] is None and all(r and r.startswith("bytes=") and r.endswith("-") for r in resumed[1:])
        assert len(resumed) == 3
        proxy.flip = {"blobs"}
        with pytest.raises(BadResponse, match="digest mismatch"):
            async for _ in client.stream_blob(blob):
                pass


async def test_a_trickled_stream_fails_within_the_request_timeout(tmp_path: Path, proxy: FaultProxy,
                                                                  content: Content) -> None:
    """A body sent a few bytes at a time never trips the read timeout: each chunk must come within `request`."""
    from tests.harness.faultproxy import SLOW_DRIP

    with trio.fail_after(LIMIT):
        options = fast(tmp_path, timeouts=Timeouts(connect=1.0, read=2.0, request=1.0, operation=5.0), retries=1)
        async with RegistryClient(options) as c:
            blob = await c.open_blob(f"{proxy.host}/blobs/data", content.data_digest)
            proxy.hostile(SLOW_DRIP, whole=True)
            start = trio.current_time()
            with pytest.raises(RegistryError):
                async for _ in c.stream_blob(blob, chunk_size=64 * 1024):
                    pass
            assert trio.current_time() - start < 4.0


# --------------------------------------------------------------------------- hosts.toml


def hosts_toml(tmp_path: Path, host: str, text: str) -> None:
    directory = tmp_path / "certs.d" / host
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hosts.toml").write_text(text)


async def test_plain_http_server_and_dead_mirror_fallback(tmp_path: Path, content: Content) -> None:
    with trio.fail_after(LIMIT):
        hosts_toml(tmp_path, "registry.test", f'server = "{content.registry.url}"\n'
                                              f'[host."http://127.0.0.1:{free_port()}"]\n')
        async with RegistryClient(fast(tmp_path)) as c:
            start = trio.current_time()
            m = await c.resolve("registry.test/oci/app:v1")
            assert m.digest == content.image.manifest_digest
            blob = await c.open_blob("registry.test/blobs/data", content.data_digest)
            assert blob.endpoint.host == content.registry.host
            assert await c.read_range(blob, 0, 5) == content.data[:5]
            assert trio.current_time() - start < 5.0


async def test_mirrors_in_order_with_capabilities(tmp_path: Path, content: Content) -> None:
    with trio.fail_after(LIMIT), FaultProxy(content.registry.host) as first, \
            FaultProxy(content.registry.host) as second:
        hosts_toml(tmp_path, "registry.test", f'server = "http://127.0.0.1:{free_port()}"\n'
                                              f'[host."{first.url}"]\n  capabilities = ["pull"]\n'
                                              f'[host."{second.url}"]\n')
        async with RegistryClient(fast(tmp_path)) as c:
            m = await c.resolve("registry.test/oci/app:v1")
            assert m.digest == content.image.manifest_digest
            assert first.count() == 0, "a pull-only mirror is not trusted to resolve tags"
            assert [h.query for h in second.hits()] == ["ns=registry.test"]
            await c.resolve(f"registry.test/oci/app@{m.digest}")
            assert first.count() == 1 and second.count() == 1, "digests are pulled from the first mirror"
            first.fail(404, times=1)
            await c.fetch_blob("registry.test/oci/app", m.config.digest)
            assert (first.count(), second.count()) == (2, 2), "not found on a mirror: try the next one"
            with pytest.raises(RegistryUnavailable, match="every endpoint failed.*BLOB_UNKNOWN.*ConnectError"):
                await c.fetch_blob("registry.test/oci/app", sha256(b"nowhere"))


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                        "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    except FileNotFoundError:
        pytest.fail("openssl is not installed (apt-get install openssl; `make test` does)", pytrace=False)
    return cert, key


async def test_tls_ca_and_skip_verify(tmp_path: Path, content: Content, certificate: tuple[Path, Path]) -> None:
    with trio.fail_after(LIMIT), FaultProxy(content.registry.host, tls=certificate) as tls_proxy:
        ref = f"{tls_proxy.host}/oci/app:v1"
        hosts_toml(tmp_path, tls_proxy.host, f'server = "{tls_proxy.url}"\n')
        async with RegistryClient(fast(tmp_path)) as c:
            with pytest.raises(RegistryUnavailable, match="certificate not trusted.*ca.*skip_verify"):
                await c.resolve(ref)
        assert tls_proxy.count() == 0
        hosts_toml(tmp_path, tls_proxy.host, f'server = "{tls_proxy.url}"\nca = "{certificate[0]}"\n')
        async with RegistryClient(fast(tmp_path)) as c:
            assert (await c.resolve(ref)).digest == content.image.manifest_digest
        hosts_toml(tmp_path, tls_proxy.host, f'server = "{tls_proxy.url}"\nskip_verify = true\n')
        async with RegistryClient(fast(tmp_path)) as c:
            assert (await c.resolve(ref)).digest == content.image.manifest_digest
        assert tls_proxy.count() == 2


# --------------------------------------------------------------------------- authentication


def docker_config(tmp_path: Path, host: str, user: str, password: str) -> None:
    path = tmp_path / "docker" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {f"http://{host}": {"auth": token}}}))


async def test_anonymous_bearer_token_is_cached_and_renewed_on_401(client: RegistryClient, proxy: FaultProxy,
                                                                   content: Content) -> None:
    with trio.fail_after(LIMIT):
        proxy.require_bearer()
        m = await client.resolve(f"{proxy.host}/oci/app:v1")
        assert m.digest == content.image.manifest_digest
        blob = await client.open_blob(f"{proxy.host}/oci/app", m.config.digest)
        assert await client.read_range(blob, 0, 5) == (await client.fetch_blob(f"{proxy.host}/oci/app",
                                                                               m.config.digest))[:5]
        assert proxy.tokens_issued == 1, "one token per (host, scope)"
        [token_hit] = proxy.hits("/token")
        assert token_hit.authorization is None and "scope=repository%3Aoci%2Fapp%3Apull" in token_hit.query
        assert [h.status for h in proxy.hits("/v2/")].count(401) == 1
        await client.resolve(f"{proxy.host}/docker/app:v1")
        assert proxy.tokens_issued == 2, "a new repository is a new scope"
        assert [h.status for h in proxy.hits("/v2/")].count(401) == 1, \
            "the host is known to want tokens: fetched before asking"
        proxy.revoke_tokens()
        assert await client.read_range(blob, 0, 5) == (await client.fetch_blob(f"{proxy.host}/oci/app",
                                                                               m.config.digest))[:5]
        assert proxy.tokens_issued == 3, "a rejected token is replaced once"


async def test_token_with_basic_credentials(tmp_path: Path, proxy: FaultProxy, content: Content) -> None:
    with trio.fail_after(LIMIT):
        proxy.require_bearer(users={"alice": "wonder"}, anonymous=False, token_field="access_token")
        async with RegistryClient(fast(tmp_path)) as c:
            with pytest.raises(Unauthorized, match="refused a token.*anonymously"):
                await c.resolve(f"{proxy.host}/oci/app:v1")
        docker_config(tmp_path, proxy.host, "alice", "wonder")
        async with RegistryClient(fast(tmp_path)) as c:
            assert (await c.resolve(f"{proxy.host}/oci/app:v1")).digest == content.image.manifest_digest
        token_hits = [h for h in proxy.hits("/token") if h.status == 200]
        assert token_hits[-1].authorization == "Basic " + base64.b64encode(b"alice:wonder").decode()
        docker_config(tmp_path, proxy.host, "alice", "wrong")
        async with RegistryClient(fast(tmp_path)) as c:
            with pytest.raises(Unauthorized, match="as 'alice'"):
                await c.resolve(f"{proxy.host}/oci/app:v1")


async def test_expiring_token_is_renewed_before_the_registry_complains(client: RegistryClient, proxy: FaultProxy,
                                                                       content: Content) -> None:
    with trio.fail_after(LIMIT):
        proxy.require_bearer(expires_in=1)
        await client.resolve(f"{proxy.host}/oci/app:v1")
        await trio.sleep(1.0)
        await client.resolve(f"{proxy.host}/oci/app:v1")
        assert proxy.tokens_issued == 2
        assert [h.status for h in proxy.hits("/v2/")].count(401) == 1


async def test_basic_auth_registry(tmp_path: Path, proxy: FaultProxy, content: Content) -> None:
    with trio.fail_after(LIMIT):
        proxy.require_basic({"bob": "builder"})
        async with RegistryClient(fast(tmp_path)) as c:
            with pytest.raises(Unauthorized, match="wants basic authentication"):
                await c.resolve(f"{proxy.host}/oci/app:v1")
        docker_config(tmp_path, proxy.host, "bob", "builder")
        async with RegistryClient(fast(tmp_path)) as c:
            assert (await c.resolve(f"{proxy.host}/oci/app:v1")).digest == content.image.manifest_digest
        docker_config(tmp_path, proxy.host, "bob", "nope")
        async with RegistryClient(fast(tmp_path)) as c:
            with pytest.raises(Unauthorized, match="refused the credentials of 'bob'"):
                await c.resolve(f"{proxy.host}/oci/app:v1")


async def test_identity_token_is_an_oauth2_refresh_token(tmp_path: Path, proxy: FaultProxy,
                                                         content: Content) -> None:
    with trio.fail_after(LIMIT):
        proxy.require_bearer(anonymous=False, refresh_tokens={"long-lived"}, token_field="access_token")
        path = tmp_path / "docker" / "config.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"auths": {proxy.host: {"identitytoken": "long-lived"}}}))
        async with RegistryClient(fast(tmp_path)) as c:
            assert (await c.resolve(f"{proxy.host}/oci/app:v1")).digest == content.image.manifest_digest
        [post] = [h for h in proxy.hits("/token")]
        assert (post.method, post.status) == ("POST", 200)
        path.write_text(json.dumps({"auths": {proxy.host: {"identitytoken": "revoked"}}}))
        async with RegistryClient(fast(tmp_path)) as c:
            with pytest.raises(Unauthorized, match="identity token"):
                await c.resolve(f"{proxy.host}/oci/app:v1")


@pytest.mark.parametrize("value", ["1_000", " 12", "+5", "-1", "12.0", ""])
def test_a_content_length_that_is_not_plain_digits_is_refused(value: str) -> None:
    import httpx

    from snapshotter.registry.transport import content_length

    response = httpx.Response(200, headers={"content-length": value}, request=httpx.Request("GET", "http://r/x"))
    with pytest.raises(BadResponse, match="bad Content-Length"):
        content_length(response)
    assert content_length(httpx.Response(200, headers={"content-length": "12"},
                                         request=httpx.Request("GET", "http://r/x"))) == 12
