"""Kubernetes' path: a kubelet-style CRI PullImage makes containerd's CRI plugin send lazysnap
the `cri.*` labels, and the image's eStargz layers are mounted lazily, not downloaded."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from snapshotter.api.cri.runtime.v1 import api_pb2 as pb
from snapshotter.api.cri.runtime.v1 import api_pb2_grpc as pb_grpc
from tests.harness.containerd import Containerd
from tests.harness.estargz import build_estargz
from tests.harness.images import HELLO_OUTPUT, OCILayout, push, sample_layers
from tests.harness.lazysnap import Lazysnap
from tests.harness.registry import Registry

from .conftest import short_tmpdir

NS = "k8s.io"


@pytest.fixture(scope="module")
def esgz_image(registry: Registry) -> Iterator[tuple[str, set[str]]]:
    """An eStargz sample image in the registry: (reference, layer digests)."""
    tmp = short_tmpdir("lzs-cri-img-")
    try:
        layout = OCILayout(tmp / "layout")
        layers = [build_estargz(entries).layer() for entries in sample_layers()]
        image = layout.add_image("esgz", layers, cmd=["/hello.sh"])
        yield push(layout.root, "esgz", registry, "lazysnap/cri-sample", image=image), {l.digest for l in layers}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def cri_containerd(lazysnap: Lazysnap, workdir: Path) -> Iterator[Containerd]:
    ctd = Containerd(snapshotter_address=lazysnap.address, keep_cri=True, cri_snapshotter="lazysnap",
                     workdir=workdir / "ctd")
    try:
        ctd.start()
        yield ctd
    finally:
        ctd.stop()


def test_cri_pull_is_lazy_and_the_image_runs(cri_containerd: Containerd, lazysnap: Lazysnap,
                                             esgz_image: tuple[str, set[str]]) -> None:
    esgz_ref, layer_digests = esgz_image
    with grpc.insecure_channel(f"unix:{cri_containerd.address}") as channel:
        images = pb_grpc.ImageServiceStub(channel)
        reply = images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=esgz_ref)), timeout=120)
    assert reply.image_ref.startswith("sha256:")

    status = subprocess.run([sys.executable, "-m", "snapshotter", "status", "--address", str(lazysnap.address)],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    rows = [line for line in status.splitlines() if line.startswith("sha256:")]
    assert len(rows) == len(sample_layers()) and all(" estargz " in row for row in rows), status

    blobs = cri_containerd.ctr("content", "ls", "-q", namespace=NS).stdout.split()
    assert not layer_digests & set(blobs), "CRI downloaded layer blobs that lazysnap serves lazily"

    run = cri_containerd.run_container(esgz_ref, "cri-lazy", "/hello.sh", snapshotter="lazysnap", namespace=NS)
    assert run.stdout.strip() == HELLO_OUTPUT

