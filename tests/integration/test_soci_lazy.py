"""SOCI end to end: an ordinary gzip image, left untouched, is started lazily through zTOCs.

The index here is built with lazysnap's own format code and pushed as a v1 referrer
(through the fallback tag: the test registry has no referrers API); how `lazysnap
index create/push/convert` make and publish indexes is tested in test_soci_index.py.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from snapshotter.formats import soci_index, ztoc
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.options import RegistryOptions
from tests.harness.containerd import Containerd
from tests.harness.faultproxy import FaultProxy
from tests.harness.images import HELLO_OUTPUT, File, Layer, OCILayout, push, sample_layers
from tests.harness.lazysnap import Lazysnap
from tests.harness.registry import Registry
from tests.harness.tree import diff_trees, mount_snapshot, snapshot_tree

from .conftest import short_tmpdir

SPAN = 256 << 10
MIN_LAYER = 64 << 10


@dataclass
class SociImage:
    ref: str
    manifest_digest: str
    layers: list[Layer]
    indexed: dict[str, str]
    """Layer digest -> the digest of its zTOC."""
    data: bytes
    garbage_ref: str
    """The same layers, but the index's zTOC for the data layer is garbage."""


def _index_image(registry: Registry, ref: str, manifest_digest: str, layers: list[Layer],
                 garbage_for: str = "") -> dict[str, str]:
    """Build zTOCs for layers of at least MIN_LAYER bytes and push a v1 index referring to the image."""
    async def main() -> dict[str, str]:
        async with RegistryClient(RegistryOptions(plain_http=True, certs_dir=None)) as client:
            refs, indexed = [], {}
            for layer in layers:
                if len(layer.blob) < MIN_LAYER:
                    continue
                data = ztoc.build_ztoc([layer.blob], SPAN, len(layer.blob))
                if layer.digest == garbage_for:
                    data = data[: len(data) // 3] + b"garbage" * 100
                desc = await client.push_blob(ref, data)
                refs.append(soci_index.ztoc_ref(desc.digest, len(data), layer.digest, layer.media_type, SPAN))
                indexed[layer.digest] = desc.digest
            await client.push_blob(ref, soci_index.EMPTY_CONFIG)
            _, raw, _ = await client.fetch_manifest(ref, manifest_digest)
            subject = soci_index.Ref("application/vnd.oci.image.manifest.v1+json", manifest_digest, len(raw))
            index = soci_index.build_index(refs, subject=subject)
            await client.push_referrer(ref, index, soci_index.OCI_MANIFEST)
            return indexed
    return trio.run(main)


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.host) as p:
        yield p


@pytest.fixture(scope="module")
def soci_image(registry: Registry) -> Iterator[SociImage]:
    tmp = short_tmpdir("lzs-soci-")
    try:
        layout = OCILayout(tmp / "layout")
        rng = random.Random(4)
        data = rng.randbytes(3 << 20)
        text = b"".join(b"row %d of a text file\n" % i for i in range(60_000))
        layers = [Layer.from_entries(entries) for entries in sample_layers()]
        layers.append(Layer.from_entries([File("data/random.bin", data), File("data/text.log", text),
                                          File("data/small.txt", "small\n")]))
        image = layout.add_image("soci", layers, cmd=["/hello.sh"])
        ref = push(layout.root, "soci", registry, "lazysnap/soci-sample", image=image)
        indexed = _index_image(registry, ref, image.manifest_digest, layers)
        other = layout.add_image("soci-garbage", layers, cmd=["/bin/sh"])  # another manifest, same layers
        garbage_ref = push(layout.root, "soci-garbage", registry, "lazysnap/soci-sample", image=other)
        _index_image(registry, garbage_ref, other.manifest_digest, layers, garbage_for=layers[-1].digest)
        yield SociImage(ref, image.manifest_digest, layers, indexed, data, garbage_ref)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rpull(containerd: Containerd, lazysnap: Lazysnap, ref: str) -> str:
    done = subprocess.run([sys.executable, "-m", "snapshotter", "rpull", ref, "--plain-http", "--containerd",
                           str(containerd.address), "--address", str(lazysnap.address)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_soci_image_runs_lazily_and_small_layers_are_pulled_whole(
        containerd: Containerd, lazysnap: Lazysnap, soci_image: SociImage, registry: Registry, cid: str) -> None:
    assert soci_image.indexed and len(soci_image.indexed) < len(soci_image.layers), "want both kinds of layer"
    out = rpull(containerd, lazysnap, soci_image.ref)
    for layer in soci_image.layers:
        row = next(line for line in out.splitlines() if line.startswith(layer.digest[:19]))
        if layer.digest in soci_image.indexed:
            assert "lazy soci" in row, out
        else:
            assert "pulled whole" in row and "no zTOC for this layer" in row, out

    mark = registry.mark()
    done = containerd.run_container(
        soci_image.ref, cid, "sh", "-c",
        "/hello.sh; dd if=/data/random.bin bs=4096 skip=244 count=1 2>/dev/null | sha256sum; cat /data/small.txt",
        snapshotter="lazysnap")
    lines = done.stdout.splitlines()
    assert lines[0] == HELLO_OUTPUT
    assert lines[2] == "small"
    assert lines[1].split()[0] == hashlib.sha256(soci_image.data[244 * 4096:245 * 4096]).hexdigest()
    big = soci_image.layers[-1]
    assert big.digest in soci_image.indexed
    served = registry.blob_bytes_served(big.digest, since=mark)
    assert 0 < served < len(big.blob) // 2, f"{served} of {len(big.blob)} bytes fetched"


def test_soci_tree_equals_overlayfs_pull(containerd: Containerd, lazysnap: Lazysnap, soci_image: SociImage,
                                         workdir: Path, cid: str) -> None:
    rpull(containerd, lazysnap, soci_image.ref)
    containerd.pull(soci_image.ref, snapshotter="overlayfs")
    trees = {}
    for snapshotter in ("lazysnap", "overlayfs"):
        name = f"{cid}-{snapshotter[:4]}"
        containerd.ctr("containers", "create", "--snapshotter", snapshotter, soci_image.ref, name)
        with mount_snapshot(containerd, snapshotter, name, workdir / snapshotter) as root:
            trees[snapshotter] = snapshot_tree(root)
    assert diff_trees(trees["overlayfs"], trees["lazysnap"]) == []
    assert "data/random.bin" in trees["lazysnap"]


def _row(out: str, digest: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(digest[:19]))


def test_a_ztoc_that_does_not_match_its_digest_is_not_used(containerd: Containerd, lazysnap: Lazysnap,
                                                           soci_image: SociImage, proxy: FaultProxy,
                                                           cid: str) -> None:
    data_layer = soci_image.layers[-1]
    proxy.flip = {soci_image.indexed[data_layer.digest]}
    ref = soci_image.ref.replace(soci_image.ref.split("/")[0], proxy.host, 1)
    out = rpull(containerd, lazysnap, ref)
    row = _row(out, data_layer.digest)
    assert "pulled whole" in row and "digest" in row, out
    assert "lazy soci" in _row(out, soci_image.layers[0].digest), out
    done = containerd.run_container(ref, cid, "cat", "/data/small.txt", snapshotter="lazysnap")
    assert done.stdout == "small\n"


def test_a_garbage_ztoc_is_a_clear_fallback(containerd: Containerd, lazysnap: Lazysnap, soci_image: SociImage,
                                            cid: str) -> None:
    out = rpull(containerd, lazysnap, soci_image.garbage_ref)
    row = _row(out, soci_image.layers[-1].digest)
    assert "pulled whole" in row and "unusable soci index" in row, out
    done = containerd.run_container(soci_image.garbage_ref, cid, "cat", "/data/small.txt", snapshotter="lazysnap")
    assert done.stdout == "small\n"


def test_a_corrupt_span_gives_eio_never_wrong_bytes(containerd: Containerd, lazysnap: Lazysnap,
                                                    soci_image: SociImage, proxy: FaultProxy, cid: str) -> None:
    ref = soci_image.ref.replace(soci_image.ref.split("/")[0], proxy.host, 1)
    out = rpull(containerd, lazysnap, ref)
    assert "lazy soci" in _row(out, soci_image.layers[-1].digest), out
    proxy.flip = {soci_image.layers[-1].digest}
    script = "dd if=/data/random.bin of=/tmp/out bs=4096 skip=300 count=1; echo rc=$?; sha256sum /tmp/out"
    bad = containerd.run_container(ref, cid + "-bad", "sh", "-c", f"exec 2>&1; {script}", snapshotter="lazysnap",
                                   check=False)
    want = hashlib.sha256(soci_image.data[300 * 4096:301 * 4096]).hexdigest()
    assert want not in bad.stdout and "Input/output error" in bad.stdout and "rc=1" in bad.stdout, bad.stdout
    proxy.flip = set()
    good = containerd.run_container(ref, cid + "-good", "sh", "-c", script, snapshotter="lazysnap")
    assert want in good.stdout


def test_soci_layers_survive_restart(containerd: Containerd, lazysnap: Lazysnap, soci_image: SociImage,
                                     cid: str) -> None:
    rpull(containerd, lazysnap, soci_image.ref)
    lazysnap.restart()
    containerd.wait_for_snapshotter("lazysnap")
    done = containerd.run_container(soci_image.ref, cid, "cat", "/data/small.txt", snapshotter="lazysnap")
    assert done.stdout == "small\n"
