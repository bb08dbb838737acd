"""Credentials from CRI PullImage: the store (matching, lifetime), the keychain's order, and the
proxy in front of a fake containerd image service (forwarding, errors, what it keeps)."""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import trio

from snapshotter import config as lazysnap_config
from snapshotter import cri_proxy
from snapshotter.api.cri.runtime.v1 import api_pb2 as pb
from snapshotter.api.cri.runtime.v1 import api_pb2_grpc as pb_grpc
from snapshotter.errors import ConfigError
from snapshotter.registry.credentials import Credentials, Renewals
from snapshotter.registry.cri_credentials import CriAuth, CriCredentials
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.errors import Unauthorized
from snapshotter.registry.keychain import Keychain
from snapshotter.registry.options import RegistryOptions, Timeouts
from tests.harness.faultproxy import FaultProxy
from tests.harness.registry import Registry
from tests.unit.test_registry_client import upload_blob

SECRET = "cri-S3cret-never-logged-4b1d"
IMAGE_ID = "sha256:" + "ab" * 32
OTHER_ID = "sha256:" + "cd" * 32


def creds(store: CriCredentials, host: str, repo: str) -> tuple[str, str, str] | None:
    found = store.find(host, repo)
    return (found.username, found.password, found.identity_token) if found is not None else None


def pulled(store: CriCredentials, image: str, auth: CriAuth, image_id: str | None = IMAGE_ID) -> None:
    pull = store.begin(image, auth)
    assert pull is not None
    store.finish(pull, image_id)


# ------------------------------------------------------------------ what an AuthConfig gives

@pytest.mark.parametrize("auth,expected", [
    (CriAuth(username="u", password=SECRET), ("u", SECRET, "")),
    (CriAuth(auth=base64.b64encode(f"u:{SECRET}".encode()).decode()), ("u", SECRET, "")),
    (CriAuth(auth=base64.b64encode(f"u:{SECRET}\0\0".encode()).decode()), ("u", SECRET, "")),
    (CriAuth(identity_token=SECRET), ("", "", SECRET)),
    (CriAuth(username="u", password=SECRET, identity_token="ignored"), ("u", SECRET, "")),
    (CriAuth(username="u", password=SECRET, server_address="https://r.example:5000/v1/"), ("u", SECRET, "")),
    (CriAuth(username="u", password=SECRET, server_address="r.example:5000"), ("u", SECRET, "")),
])
def test_auth_config_read_as_containerd_reads_it(auth: CriAuth, expected: tuple[str, str, str]) -> None:
    store = CriCredentials()
    pulled(store, "r.example:5000/team/app:1", auth)
    assert creds(store, "r.example:5000", "team/app") == expected


@pytest.mark.parametrize("auth", [
    CriAuth(),
    CriAuth(registry_token=SECRET),                                      # containerd ignores it too
    CriAuth(username="u", password=SECRET, server_address="other.example"),  # another registry's
    CriAuth(auth="not base64!"),
    CriAuth(auth=base64.b64encode(b"no-colon").decode()),
])
def test_auth_config_that_gives_nothing(auth: CriAuth) -> None:
    store = CriCredentials()
    assert store.begin("r.example:5000/team/app:1", auth) is None
    assert len(store) == 0


def test_secrets_never_print() -> None:
    auth = CriAuth(username="u", password=SECRET, auth=SECRET, identity_token=SECRET, registry_token=SECRET)
    assert SECRET not in repr(auth)
    store = CriCredentials()
    pull = store.begin("r.example/app", auth)
    assert pull is not None and SECRET not in repr(pull) and SECRET not in pull.credentials.described()


# ------------------------------------------------------------------ matching

def test_matched_by_registry_and_repository() -> None:
    store = CriCredentials()
    pulled(store, "r.example:5000/team/app:1", CriAuth(username="u", password=SECRET))
    assert creds(store, "r.example:5000", "team/app") is not None
    assert creds(store, "R.Example:5000", "team/app") is not None, "hosts compare as registry keys"
    assert creds(store, "r.example:5000", "team/other") is None, "another repository of the registry"
    assert creds(store, "r.example", "team/app") is None, "another port is another registry"
    assert creds(store, "r.example:5000", "") is None


def test_every_tag_and_digest_of_the_repository() -> None:
    store = CriCredentials()
    pulled(store, "r.example/app:1", CriAuth(username="u", password=SECRET))
    assert creds(store, "r.example", "app") is not None
    pulled(store, f"r.example/app@{IMAGE_ID}", CriAuth(username="v", password=SECRET))
    assert creds(store, "r.example", "app") == ("v", SECRET, ""), "the newest successful pull wins"


def test_docker_hub_names() -> None:
    store = CriCredentials()
    pulled(store, "busybox", CriAuth(username="u", password=SECRET))
    assert creds(store, "registry-1.docker.io", "library/busybox") is not None
    assert creds(store, "docker.io", "library/busybox") is not None
    pulled(store, "index.docker.io/team/app", CriAuth(username="t", password=SECRET))
    assert creds(store, "registry-1.docker.io", "team/app") == ("t", SECRET, "")


# ------------------------------------------------------------------ lifetime

def test_a_running_pull_is_offered_first_and_a_failed_one_leaves_the_old() -> None:
    store = CriCredentials()
    pulled(store, "r.example/app:1", CriAuth(username="old", password=SECRET))
    pull = store.begin("r.example/app:2", CriAuth(username="new", password="wrong"))
    assert pull is not None
    assert creds(store, "r.example", "app") == ("new", "wrong", ""), "containerd pulls with these now"
    store.finish(pull, None)
    assert creds(store, "r.example", "app") == ("old", SECRET, ""), "a failed pull never replaces what worked"


def test_a_failed_first_pull_leaves_nothing() -> None:
    store = CriCredentials()
    pull = store.begin("r.example/app:1", CriAuth(username="u", password="wrong"))
    assert pull is not None
    store.finish(pull, None)
    assert len(store) == 0 and creds(store, "r.example", "app") is None


def test_kept_until_every_image_pulled_with_them_is_removed() -> None:
    store = CriCredentials()
    pulled(store, "r.example/app:1", CriAuth(username="u", password=SECRET), IMAGE_ID)
    pulled(store, "r.example/app:2", CriAuth(username="u", password=SECRET), OTHER_ID)
    assert store.remove(IMAGE_ID) is False       # the kubelet's image GC removes by image id
    assert creds(store, "r.example", "app") is not None, "app:2 still needs them"
    assert store.remove("r.example/app:2") is True   # or by reference (normalised)
    assert creds(store, "r.example", "app") is None
    assert store.remove("never-pulled") is False     # idempotent, like RemoveImage


def test_removing_by_reference_removes_the_image_with_all_its_tags() -> None:
    store = CriCredentials()
    pulled(store, "r.example/app:1", CriAuth(username="u", password=SECRET), IMAGE_ID)
    pulled(store, "r.example/app:latest", CriAuth(username="u", password=SECRET), IMAGE_ID)
    store.remove("r.example/app")                # :latest; containerd removes the image, so :1 goes too
    assert len(store) == 0


def test_a_removal_during_a_pull_keeps_the_running_pull() -> None:
    store = CriCredentials()
    pulled(store, "r.example/app:1", CriAuth(username="u", password=SECRET), IMAGE_ID)
    pull = store.begin("r.example/app:2", CriAuth(username="v", password=SECRET))
    assert pull is not None
    store.remove(IMAGE_ID)
    assert creds(store, "r.example", "app") == ("v", SECRET, "")
    store.finish(pull, OTHER_ID)
    assert creds(store, "r.example", "app") == ("v", SECRET, "")


def test_a_failed_pull_after_its_image_was_removed_leaves_nothing() -> None:
    store = CriCredentials()
    pulled(store, "r.example/app:1", CriAuth(username="u", password=SECRET), IMAGE_ID)
    pull = store.begin("r.example/app:1", CriAuth(username="v", password="wrong"))
    assert pull is not None
    assert store.remove(IMAGE_ID) is False, "the running pull still needs the entry"
    store.finish(pull, None)
    assert len(store) == 0, "no image is left that the old credentials were for"


def test_bounded_least_recently_used_first() -> None:
    store = CriCredentials(max_entries=2)
    pulled(store, "r.example/a", CriAuth(username="a", password=SECRET))
    pulled(store, "r.example/b", CriAuth(username="b", password=SECRET))
    assert store.find("r.example", "a") is not None           # a is now the most recently used
    pulled(store, "r.example/c", CriAuth(username="c", password=SECRET))
    assert [creds(store, "r.example", r) is not None for r in "abc"] == [True, False, True]


def test_safe_from_threads() -> None:
    store = CriCredentials()

    def work(n: int) -> None:
        for i in range(200):
            pulled(store, f"r.example/app{n}:{i}", CriAuth(username="u", password=SECRET), f"sha256:{i:064x}")
            store.find("r.example", f"app{(n + 1) % 4}")
            store.remove(f"sha256:{i:064x}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store) == 0


# ------------------------------------------------------------------ the keychain

def test_keychain_asks_cri_first_and_says_so(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"auths": {"r.example": {"username": "node", "password": "node-secret"}}}')
    store = CriCredentials()
    keychain = Keychain(config, cri=store)
    found = trio.run(keychain.find, "r.example", "app")
    assert found.credentials == Credentials("node", "node-secret")
    assert found.tried[0] == "CRI pull credentials: none for r.example/app", found.tried
    pulled(store, "r.example/app:1", CriAuth(username="pod", password=SECRET))
    found = trio.run(keychain.find, "r.example", "app")
    assert found.credentials is not None and found.credentials.username == "pod"
    assert found.tried == ("CRI pull credentials: the credentials of 'pod' from the CRI PullImage of "
                           "r.example/app:1",)
    assert SECRET not in found.explain()
    keychain.forget("r.example", "app")
    assert trio.run(keychain.find, "r.example", "app").credentials.username == "pod", \
        "a refusal does not drop them: only a newer pull can replace them"


def test_keychain_without_cri_says_nothing_of_it(tmp_path: Path) -> None:
    found = trio.run(Keychain(tmp_path / "absent.json").find, "r.example", "app")
    assert not any("CRI" in line for line in found.tried)


def test_renewals() -> None:
    renewals = Renewals()
    assert renewals.last("r.example", "app") == 0.0
    renewals.note("R.example", "app")
    assert renewals.last("r.example", "app") > 0
    assert renewals.last("r.example", "other") == 0.0
    renewals.note("registry-1.docker.io")
    assert renewals.last("docker.io", "library/busybox") > 0, "a host-wide renewal counts for its repositories"


# ------------------------------------------------------------------ settings

def test_settings(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('cri_image_service_address = "/run/lazysnap/cri.sock"\n')
    cfg = lazysnap_config.load(path)
    assert cfg.cri_image_service_address == Path("/run/lazysnap/cri.sock")
    assert cfg.cri_containerd_address == Path("/run/containerd/containerd.sock")
    path.write_text('cri_image_service_address = ""\n')
    assert lazysnap_config.load(path).cri_image_service_address is None
    for text, message in [('cri_image_service_address = "cri.sock"', "absolute"),
                          ('cri_image_service_address = "/run/lazysnap/lazysnap.sock"', "of its own"),
                          ('cri_image_service_address = "/run/containerd/containerd.sock"', "of its own"),
                          (f'cri_image_service_address = "/{"x" * 120}"', "longer")]:
        path.write_text(text + "\n")
        with pytest.raises(ConfigError, match=message):
            lazysnap_config.load(path)


# ------------------------------------------------------------------ the proxy

class FakeContainerd(pb_grpc.ImageServiceServicer):
    """containerd's CRI image service as far as the proxy can tell."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes, dict[str, str]]] = []
        self.release = threading.Event()
        self.release.set()

    def _seen(self, name: str, request: object, context: grpc.ServicerContext) -> None:
        meta = {m.key: m.value for m in context.invocation_metadata()}
        self.calls.append((name, request.SerializeToString(), meta))  # type: ignore[attr-defined]

    def PullImage(self, request: pb.PullImageRequest, context: grpc.ServicerContext) -> pb.PullImageResponse:
        self._seen("PullImage", request, context)
        self.release.wait(10)
        if "denied" in request.image.image:
            context.abort(grpc.StatusCode.UNKNOWN, f'failed to pull and unpack image "{request.image.image}": '
                                                   "pulling from host r.example failed: 401 Unauthorized")
        return pb.PullImageResponse(image_ref=IMAGE_ID)

    def RemoveImage(self, request: pb.RemoveImageRequest, context: grpc.ServicerContext) -> pb.RemoveImageResponse:
        self._seen("RemoveImage", request, context)
        return pb.RemoveImageResponse()

    def ListImages(self, request: pb.ListImagesRequest, context: grpc.ServicerContext) -> pb.ListImagesResponse:
        self._seen("ListImages", request, context)
        return pb.ListImagesResponse(images=[pb.Image(id=IMAGE_ID, repo_tags=["r.example/app:1"], size=7)])

    def ImageStatus(self, request: pb.ImageStatusRequest, context: grpc.ServicerContext) -> pb.ImageStatusResponse:
        self._seen("ImageStatus", request, context)
        context.abort(grpc.StatusCode.NOT_FOUND, "no such image")

    def ImageFsInfo(self, request: pb.ImageFsInfoRequest, context: grpc.ServicerContext) -> pb.ImageFsInfoResponse:
        self._seen("ImageFsInfo", request, context)
        return pb.ImageFsInfoResponse(image_filesystems=[pb.FilesystemUsage(timestamp=1)])


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[tuple[FakeContainerd, CriCredentials, pb_grpc.ImageServiceStub]]:
    fake = FakeContainerd()
    upstream = grpc.server(ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_ImageServiceServicer_to_server(fake, upstream)
    upstream.add_insecure_port(f"unix:{tmp_path}/ctd.sock")
    upstream.start()
    store = CriCredentials()
    proxy = cri_proxy.start(tmp_path / "cri" / "cri.sock", tmp_path / "ctd.sock", store, workers=4)
    channel = grpc.insecure_channel(f"unix:{tmp_path}/cri/cri.sock")
    try:
        yield fake, store, pb_grpc.ImageServiceStub(channel)
    finally:
        fake.release.set()
        channel.close()
        proxy.stop(grace=1)
        upstream.stop(None)


def test_proxy_forwards_every_call_unchanged(proxied: tuple[FakeContainerd, CriCredentials,
                                                            pb_grpc.ImageServiceStub], tmp_path: Path) -> None:
    fake, store, stub = proxied
    assert (tmp_path / "cri" / "cri.sock").stat().st_mode & 0o777 == 0o600
    listed = stub.ListImages(pb.ListImagesRequest(filter=pb.ImageFilter(image=pb.ImageSpec(image="x"))),
                             metadata=[("x-kubelet", "1")], timeout=10)
    assert listed.images[0].repo_tags == ["r.example/app:1"]
    assert fake.calls[-1][0] == "ListImages" and fake.calls[-1][2]["x-kubelet"] == "1"
    with pytest.raises(grpc.RpcError) as caught:
        stub.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image="x")), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and caught.value.details() == "no such image"
    assert stub.ImageFsInfo(pb.ImageFsInfoRequest(), timeout=10).image_filesystems[0].timestamp == 1

    request = pb.PullImageRequest(image=pb.ImageSpec(image="r.example/app:1", annotations={"a": "b"}),
                                  auth=pb.AuthConfig(username="u", password=SECRET),
                                  sandbox_config=pb.PodSandboxConfig(hostname="h"))
    assert stub.PullImage(request, timeout=10).image_ref == IMAGE_ID
    assert fake.calls[-1][:2] == ("PullImage", request.SerializeToString()), "containerd gets the very bytes"
    assert creds(store, "r.example", "app") == ("u", SECRET, "")

    stub.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=IMAGE_ID)), timeout=10)
    assert fake.calls[-1][0] == "RemoveImage" and creds(store, "r.example", "app") is None


def test_proxy_offers_credentials_during_the_pull(proxied: tuple[FakeContainerd, CriCredentials,
                                                                 pb_grpc.ImageServiceStub]) -> None:
    fake, store, stub = proxied
    fake.release.clear()
    future = stub.PullImage.future(pb.PullImageRequest(image=pb.ImageSpec(image="r.example/app:1"),
                                                       auth=pb.AuthConfig(username="u", password=SECRET)),
                                   timeout=10)
    for _ in range(200):
        if fake.calls:
            break
        threading.Event().wait(0.02)
    assert creds(store, "r.example", "app") == ("u", SECRET, ""), "lazysnap's Prepare comes inside the pull"
    fake.release.set()
    assert future.result().image_ref == IMAGE_ID


def test_proxy_passes_containerd_errors_and_logs_no_secret(
        proxied: tuple[FakeContainerd, CriCredentials, pb_grpc.ImageServiceStub],
        caplog: pytest.LogCaptureFixture) -> None:
    fake, store, stub = proxied
    caplog.set_level(logging.DEBUG)
    with pytest.raises(grpc.RpcError) as caught:
        stub.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image="r.example/denied:1"),
                                           auth=pb.AuthConfig(username="u", password=SECRET)), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNKNOWN
    assert "pulling from host r.example failed: 401 Unauthorized" in caught.value.details()
    assert creds(store, "r.example", "denied") is None, "a failed pull keeps nothing"
    encoded = base64.b64encode(f"u:{SECRET}".encode()).decode()
    stub.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image="r.example/app:1"),
                                       auth=pb.AuthConfig(auth=encoded)), timeout=10)
    assert "r.example/app:1" in caplog.text and "'u'" in caplog.text
    assert SECRET not in caplog.text and encoded not in caplog.text


def test_proxy_refuses_what_is_not_the_image_service(
        proxied: tuple[FakeContainerd, CriCredentials, pb_grpc.ImageServiceStub], tmp_path: Path) -> None:
    with grpc.insecure_channel(f"unix:{tmp_path}/cri/cri.sock") as channel:
        runtime = pb_grpc.RuntimeServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            runtime.Version(pb.VersionRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ------------------------------------------------------------------ through the registry client

@pytest.fixture(scope="module")
def two_repos() -> Iterator[tuple[Registry, str]]:
    """One blob in two repositories of one registry."""
    with Registry() as registry:
        data = b"private bytes\n" * 100
        upload_blob(registry, "team/a", data)
        yield registry, upload_blob(registry, "team/b", data)


async def test_each_repository_gets_its_own_pull_secret_and_renewals_are_noted(
        tmp_path: Path, two_repos: tuple[Registry, str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    registry, digest = two_repos
    store = CriCredentials()
    options = RegistryOptions(timeouts=Timeouts(connect=1.0, read=5.0, request=10.0, operation=15.0), retries=1,
                              backoff_base=0.01, backoff_max=0.05, certs_dir=None, plain_http=True,
                              docker_config=tmp_path / "absent.json")
    keychain = Keychain.for_options(options, store)
    with FaultProxy(registry.host) as proxy, trio.fail_after(20):
        proxy.require_basic({"a": SECRET, "b": SECRET + "-b"})
        pulled(store, f"{proxy.host}/team/a:1", CriAuth(username="a", password=SECRET))
        pulled(store, f"{proxy.host}/team/b:1", CriAuth(auth=base64.b64encode(f"b:{SECRET}-b".encode()).decode()))
        async with RegistryClient(options, keychain=keychain) as client:
            assert keychain.renewals.last(proxy.host, "team/a") == 0.0
            for repo in ("team/a", "team/b", "team/a"):
                assert (await client.fetch_blob(f"{proxy.host}/{repo}", digest)).startswith(b"private bytes")
            assert keychain.renewals.last(proxy.host, "team/a") > 0
            assert keychain.renewals.last(proxy.host, "team/b") > 0
            sent = {(h.path.split("/blobs/")[0], h.authorization) for h in proxy.hits("/blobs/") if h.authorization}
            assert {path for path, _ in sent} == {"/v2/team/a", "/v2/team/b"}
            assert len({auth for _, auth in sent}) == 2, "repository a's secret never went to b, nor b's to a"

            store.remove(IMAGE_ID)                                  # the kubelet removed both images
            with pytest.raises(Unauthorized) as refused:
                await client.fetch_blob(f"{proxy.host}/team/c", digest)
    message = str(refused.value)
    assert f"CRI pull credentials: none for {proxy.host}/team/c" in message
    assert SECRET not in message and SECRET not in caplog.text
