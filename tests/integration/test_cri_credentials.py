"""A pod's pull secret reaches lazysnap through its CRI image service proxy, as on a Kubernetes node.

lazysnap runs with `cri_image_service_address` and no other credentials at all (its
config.json does not exist). The test acts as the kubelet: `PullImage` with an
`AuthConfig` on lazysnap's socket (the kubelet's `--image-service-endpoint`), which
forwards it to containerd's CRI; then `RunPodSandbox`, `CreateContainer`, `StartContainer`
and `ExecSync` on containerd's own socket (the runtime endpoint), with a host-network pod
(no CNI) whose pause image is a busybox of the tests' own in the unauthenticated session
registry. The private image's layers are eStargz, served lazily with the pull's
credentials, for the pull and for the container's reads long after it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from snapshotter.api.cri.runtime.v1 import api_pb2 as pb
from snapshotter.api.cri.runtime.v1 import api_pb2_grpc as pb_grpc
from tests.harness.containerd import Containerd
from tests.harness.estargz import build_estargz
from tests.harness.faultproxy import FaultProxy
from tests.harness.images import (
    HELLO_OUTPUT, Dir, File, Layer, OCILayout, Symlink, busybox_bytes, push, sample_layers,
)
from tests.harness.lazysnap import Lazysnap
from tests.harness.registry import Registry

from .conftest import PRIVATE_SECRET as SECRET
from .conftest import PRIVATE_USER as USER
from .conftest import serving, short_tmpdir

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

NS = "k8s.io"
WRONG = "Wrong-Pull-Secret-77d0"
BUSYBOX_SHA256 = hashlib.sha256(busybox_bytes()).hexdigest()
BIG = random.Random(17).randbytes(3 << 20)


@pytest.fixture(scope="module")
def pause_image(registry: Registry) -> Iterator[str]:
    """A pod sandbox image of our own (busybox sleeping), in the unauthenticated session registry."""
    tmp = short_tmpdir("lzs-pause-")
    try:
        layout = OCILayout(tmp / "layout")
        layer = Layer.from_entries([Dir("bin"), File("bin/busybox", busybox_bytes(), mode=0o755),
                                    Symlink("bin/sleep", "busybox")])
        image = layout.add_image("pause", [layer], cmd=["/bin/sleep", "86400"])
        yield push(layout.root, "pause", registry, "lazysnap/pause:1", image=image)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ctd_workdir(workdir: Path) -> Path:
    return workdir / "ctd"


@pytest.fixture
def lazysnap(workdir: Path, request: pytest.FixtureRequest) -> Iterator[Lazysnap]:
    """The daemon with its CRI proxy on, no config.json, and reads that always reach the registry
    (no prefetch, no background fetch), so that they need the credentials long after the pull."""
    settings = [f'docker_config = "{workdir / "no-docker" / "config.json"}"',
                f'cri_image_service_address = "{workdir / "cri.sock"}"',
                f'cri_containerd_address = "{ctd_workdir(workdir) / "c.sock"}"',
                "prefetch = false", "background_fetch = false", "record_profiles = false"]
    yield from serving(workdir, request, settings)


@pytest.fixture
def cri_containerd(lazysnap: Lazysnap, workdir: Path, pause_image: str,
                   request: pytest.FixtureRequest) -> Iterator[Containerd]:
    ctd = Containerd(snapshotter_address=lazysnap.address, keep_cri=True, cri_snapshotter="lazysnap",
                     cri_sandbox_image=pause_image, workdir=ctd_workdir(workdir))
    try:
        ctd.start()
        yield ctd
    finally:
        try:
            if any(getattr(request.node, f"rep_{w}", None) is not None and getattr(request.node, f"rep_{w}").failed
                   for w in ("setup", "call")):
                print(ctd.log_tail(80))
        finally:
            ctd.stop()


def pull(lazysnap_cri: Path, ref: str, auth: pb.AuthConfig) -> str:
    """A kubelet's PullImage, on lazysnap's CRI socket: the image id."""
    with grpc.insecure_channel(f"unix:{lazysnap_cri}") as channel:
        reply = pb_grpc.ImageServiceStub(channel).PullImage(
            pb.PullImageRequest(image=pb.ImageSpec(image=ref), auth=auth), timeout=120)
    return reply.image_ref


def status(lazysnap: Lazysnap, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "snapshotter", "status", "--address", str(lazysnap.address), *args],
                          capture_output=True, text=True, timeout=60, check=True).stdout


def layer_status(lazysnap: Lazysnap, digests: list[str]) -> dict[str, dict[str, object]]:
    layers = json.loads(status(lazysnap, "--json"))["layers"]
    return {layer["digest"]: layer for layer in layers if layer["digest"] in digests}


class Pod:
    """A host-network pod with one container, through containerd's CRI runtime service."""

    def __init__(self, ctd: Containerd, workdir: Path) -> None:
        self.channel = grpc.insecure_channel(f"unix:{ctd.address}")
        self.runtime = pb_grpc.RuntimeServiceStub(self.channel)
        name = f"lzs-{uuid.uuid4().hex[:8]}"
        logs = workdir / "pod-logs"
        logs.mkdir(exist_ok=True)
        self.config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=uuid.uuid4().hex, namespace="default", attempt=0),
            log_directory=str(logs),  # no hostname: a host-network pod shares the host's UTS namespace
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=f"/{ctd.cgroup_parent}",
                security_context=pb.LinuxSandboxSecurityContext(
                    namespace_options=pb.NamespaceOption(network=pb.NODE, pid=pb.CONTAINER, ipc=pb.POD))))
        self.sandbox = ""
        self.container = ""

    def run(self, image: str, *command: str) -> None:
        self.sandbox = self.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=self.config), timeout=120).pod_sandbox_id
        config = pb.ContainerConfig(metadata=pb.ContainerMetadata(name="app", attempt=0),
                                    image=pb.ImageSpec(image=image), command=list(command), log_path="app.log")
        self.container = self.runtime.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=self.sandbox, config=config, sandbox_config=self.config), timeout=120).container_id
        self.runtime.StartContainer(pb.StartContainerRequest(container_id=self.container), timeout=60)

    def exec(self, *cmd: str) -> str:
        reply = self.runtime.ExecSync(pb.ExecSyncRequest(container_id=self.container, cmd=list(cmd), timeout=60),
                                      timeout=90)
        assert reply.exit_code == 0, f"{cmd} exited {reply.exit_code}: {reply.stdout!r} {reply.stderr!r}"
        return reply.stdout.decode()

    def close(self) -> None:
        try:
            if self.container:
                self.runtime.StopContainer(pb.StopContainerRequest(container_id=self.container, timeout=1),
                                           timeout=60)
                self.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=self.container), timeout=60)
            if self.sandbox:
                self.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=self.sandbox), timeout=60)
                self.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=self.sandbox), timeout=60)
        finally:
            self.channel.close()


@pytest.fixture
def pod(cri_containerd: Containerd, workdir: Path) -> Iterator[Pod]:
    p = Pod(cri_containerd, workdir)
    try:
        yield p
    finally:
        p.close()


def basic_auth(user: str, password: str) -> pb.AuthConfig:
    """An AuthConfig as the kubelet fills it from a dockerconfigjson secret: the `auth` field."""
    return pb.AuthConfig(auth=base64.b64encode(f"{user}:{password}".encode()).decode())


def test_pull_secret_from_cri_serves_private_layers_lazily(
        cri_containerd: Containerd, lazysnap: Lazysnap, pod: Pod, private_registry: Registry,
        private_image: tuple[str, list[str]], workdir: Path) -> None:
    ref, layer_digests = private_image
    cri_socket = workdir / "cri.sock"
    assert not (workdir / "no-docker").exists(), "lazysnap has no credentials but the CRI pull's"

    # Wrong credentials: containerd's error comes back unchanged, naming the registry; no secret in it.
    with pytest.raises(grpc.RpcError) as refused:
        pull(cri_socket, ref, pb.AuthConfig(username=USER, password=WRONG))
    assert private_registry.host in refused.value.details(), refused.value.details()
    assert WRONG not in refused.value.details() and SECRET not in refused.value.details()

    mark = private_registry.mark()
    image_id = pull(cri_socket, ref, basic_auth(USER, SECRET))
    assert image_id.startswith("sha256:")

    table = status(lazysnap)
    rows = [line for line in table.splitlines() if line.startswith("sha256:")]
    layers = layer_status(lazysnap, layer_digests)
    assert sorted(layers) == sorted(layer_digests), table
    assert all(layer["mode"] == "estargz" for layer in layers.values()), table
    assert all(float(layer["credential_renewed"]) > time.time() - 300 for layer in layers.values()), layers
    assert len(rows) == len(layer_digests) and all(" ago " in row for row in rows), table  # CREDS RENEWED
    blobs = cri_containerd.ctr("content", "ls", "-q", namespace=NS).stdout.split()
    assert not set(layer_digests) & set(blobs), "containerd downloaded layers that lazysnap serves lazily"

    # The kubelet's next steps, on containerd's socket; the container's reads fetch ranges with the pull's credentials.
    pod.run(ref, "/bin/sleep", "3600")
    reads = private_registry.mark()
    out = pod.exec("sh", "-c", "/hello.sh; sha256sum /bin/busybox").splitlines()
    assert out[0] == HELLO_OUTPUT and out[1].split()[0] == BUSYBOX_SHA256, out
    served = [r for r in private_registry.requests(settle=0.3)[reads:] if r.blob is not None and r.method == "GET"]
    assert any(r.status == 206 and r.blob[1] in layer_digests for r in served), \
        "the container's reads fetched ranges of the private layers after the pull"
    assert any(r.status == 401 for r in private_registry.requests()[mark:]), "the registry did ask for credentials"

    # The secret is nowhere: lazysnap's log, its status (table and JSON), containerd's answer.
    encoded = basic_auth(USER, SECRET).auth
    said = lazysnap.log_path.read_text() + table + status(lazysnap, "--json") + refused.value.details()
    for secret in (SECRET, WRONG, encoded):
        assert secret not in said
    assert f"PullImage {ref}: done ({image_id}); the credentials of {USER!r} are kept" in lazysnap.log_text()


@pytest.fixture(scope="module")
def token_image(registry: Registry) -> Iterator[tuple[str, list[str]]]:
    """The eStargz sample plus a layer of random data (not read until the test says so), in the
    unauthenticated session registry, for a FaultProxy with token auth in front."""
    tmp = short_tmpdir("lzs-crit-")
    try:
        layout = OCILayout(tmp / "layout")
        entries = [*sample_layers(), [Dir("data"), File("data/big.bin", BIG)]]
        layers = [build_estargz(e, chunk_size=256 << 10).layer() for e in entries]
        image = layout.add_image("token", layers, cmd=["/hello.sh"])
        push(layout.root, "token", registry, "lazysnap/cri-token:latest", image=image)
        yield "lazysnap/cri-token:latest", [layer.digest for layer in image.layers]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_token_expiring_under_a_running_pod_is_renewed_with_the_pull_secret(
        cri_containerd: Containerd, lazysnap: Lazysnap, pod: Pod, registry: Registry,
        token_image: tuple[str, list[str]], workdir: Path) -> None:
    """A token flow with 5-second tokens given only for the pull secret: lazysnap's reads after the
    token expired get a new one with the CRI credentials, and `status` shows when."""
    path, layer_digests = token_image
    with FaultProxy(registry.host) as proxy:
        proxy.require_bearer(users={USER: SECRET}, anonymous=False, expires_in=5)
        ref = f"{proxy.host}/{path}"
        pull(workdir / "cri.sock", ref, pb.AuthConfig(username=USER, password=SECRET))
        first = layer_status(lazysnap, layer_digests)
        assert sorted(first) == sorted(layer_digests) and all(layer["mode"] == "estargz" for layer in first.values()), \
            first
        renewed = max(float(layer["credential_renewed"]) for layer in first.values())
        assert renewed > 0

        pod.run(ref, "/bin/sleep", "3600")
        assert pod.exec("/hello.sh").strip() == HELLO_OUTPUT
        issued, seen = proxy.tokens_issued, len(proxy.hits("/blobs/"))
        time.sleep(6)                                                # every token handed out so far has expired
        assert pod.exec("sha256sum", "/data/big.bin").split()[0] == hashlib.sha256(BIG).hexdigest()
        assert proxy.tokens_issued > issued, "lazysnap fetched a new token for the reads"
        reads = proxy.hits("/blobs/")[seen:]
        assert any(h.status == 206 for h in reads), "the reads after expiry went to the registry"
        assert not [h for h in reads if h.status == 401], "the expired token was renewed before it was sent"
        later = layer_status(lazysnap, layer_digests)
        assert max(float(layer["credential_renewed"]) for layer in later.values()) > renewed, later
        assert SECRET not in lazysnap.log_path.read_text()
