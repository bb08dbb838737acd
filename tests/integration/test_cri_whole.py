"""Kubernetes' path with layers that cannot be lazy: containerd's CRI unpacker, and an image
whose bottom layer is plain zstd and whose middle layer is an uncompressed tar, neither
with an index, under an eStargz top layer.

containerd's unpacker gives up on every layer above the first one a snapshotter does not
provide (containerd-api.md §2.2). lazysnap pulls the two unindexed layers whole itself and
answers ALREADY_EXISTS, so containerd downloads no layer and the top one stays lazy.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from snapshotter.api.cri.runtime.v1 import api_pb2 as pb
from snapshotter.api.cri.runtime.v1 import api_pb2_grpc as pb_grpc
from tests.harness.containerd import Containerd
from tests.harness.estargz import build_estargz
from tests.harness.images import HELLO_OUTPUT, MIDDLE_TEXT, File, Layer, OCILayout, layer_tar, push, sample_layers, \
    sha256_digest
from tests.harness.lazysnap import Lazysnap
from tests.harness.registry import Registry
from tests.harness.tree import diff_trees
from tests.harness.zstd_chunked import MEDIA_LAYER_ZSTD, frame

from .conftest import short_tmpdir
from .test_cri import NS, cri_containerd  # noqa: F401  (cri_containerd: a fixture)
from .test_lazy import LAZY, OVERLAY, lazysnap_and_overlayfs_trees, settled_mark, short, status

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MEDIA_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
BIG_SIZE = 2 << 20
"""In the lazy top layer, and read by nothing before the tree comparison."""


@dataclass
class MixedImage:
    ref: str
    layers: list[Layer]           # plain zstd, plain tar, eStargz


@pytest.fixture(scope="module")
def mixed_image(registry: Registry) -> Iterator[MixedImage]:
    tmp = short_tmpdir("lzs-cri-mixed-")
    try:
        layout = OCILayout(tmp / "layout")
        base, middle, top = sample_layers()
        base_tar, middle_tar = layer_tar(base), layer_tar(middle)
        layers = [Layer(frame(base_tar), sha256_digest(base_tar), MEDIA_LAYER_ZSTD),
                  Layer(middle_tar, sha256_digest(middle_tar), MEDIA_LAYER_TAR),
                  build_estargz([*top, File("data/big.bin", random.Random(13).randbytes(BIG_SIZE))]).layer()]
        image = layout.add_image("mixed", layers, cmd=["/hello.sh"])
        yield MixedImage(push(layout.root, "mixed", registry, "lazysnap/cri-mixed", image=image), layers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.lazysnap_config("background_fetch = false", "prefetch = false")
def test_cri_pull_keeps_the_layer_above_unindexed_ones_lazy(lazysnap: Lazysnap, registry: Registry,
                                                            mixed_image: MixedImage, workdir: Path,
                                                            request: pytest.FixtureRequest) -> None:
    ctd: Containerd = request.getfixturevalue("cri_containerd")
    bottom, middle, top = mixed_image.layers
    mark = settled_mark(registry)
    with grpc.insecure_channel(f"unix:{ctd.address}") as channel:
        images = pb_grpc.ImageServiceStub(channel)
        reply = images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=mixed_image.ref)), timeout=120)
    assert reply.image_ref.startswith("sha256:")

    out, layers = status(lazysnap)
    assert layers[short(bottom.digest)]["mode"] == layers[short(middle.digest)]["mode"] == "whole", out
    assert "zstd:chunked" in layers[short(bottom.digest)]["rest"], out  # why: not eStargz, not zstd:chunked, no SOCI
    assert layers[short(top.digest)]["mode"] == "estargz", out
    blobs = set(ctd.ctr("content", "ls", "-q", namespace=NS).stdout.split())
    assert not {layer.digest for layer in mixed_image.layers} & blobs, "containerd downloaded layer blobs"

    run = ctd.run_container(mixed_image.ref, "cri-mixed", "sh", "-c", "/hello.sh; cat /middle.txt",
                            snapshotter=LAZY, namespace=NS)
    assert run.stdout.splitlines() == [HELLO_OUTPUT, MIDDLE_TEXT.strip()]
    top_bytes = registry.blob_bytes_served(top.digest, since=mark)
    assert top_bytes < len(top.blob) // 2, f"the lazy layer was fetched whole ({top_bytes} of {len(top.blob)} bytes)"

    trees = lazysnap_and_overlayfs_trees(ctd, mixed_image.ref, workdir, namespace=NS)
    overlay = trees[OVERLAY]
    assert overlay["bin/busybox"].hardlinks == ("bin/busybox", "bin/ls")  # the reference is the real sample
    assert diff_trees(overlay, trees[LAZY], OVERLAY, LAZY) == []
