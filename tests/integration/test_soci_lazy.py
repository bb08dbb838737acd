"""SOCI end to end: an ordinary gzip image, left untouched, is started lazily through zTOCs.

The index is made and published the way a user does it (`lazysnap index create` and
`index push`, in the session fixture `soci_image`, or `index convert` for SOCI v2);
`lazysnap rpull` then finds it and serves the indexed layers lazily.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from snapshotter.formats import soci_index, ztoc
from snapshotter.fuse.filesystem import DEFAULT_FAIL_FAST
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.options import RegistryOptions
from tests.harness.containerd import Containerd
from tests.harness.faultproxy import FaultProxy
from tests.harness.images import HELLO_OUTPUT, Layer, OCILayout, fetch_manifest, push
from tests.harness.lazysnap import Lazysnap
from tests.harness.registry import Registry
from tests.harness.tree import diff_trees, mount_snapshot, snapshot_tree

from .conftest import SociImage, lazysnap_cli, short_tmpdir


def _push_garbage_index(ref: str, manifest_digest: str, layers: list[Layer], span: int, garbage_for: str) -> None:
    """A v1 index for the image at `ref` whose zTOC for layer `garbage_for` is garbage."""
    async def main() -> None:
        async with RegistryClient(RegistryOptions(plain_http=True, certs_dir=None)) as client:
            refs = []
            for layer in layers:
                data = ztoc.build_ztoc([layer.blob], span, len(layer.blob))
                if layer.digest == garbage_for:
                    data = data[: len(data) // 3] + b"garbage" * 100
                desc = await client.push_blob(ref, data)
                refs.append(soci_index.ztoc_ref(desc.digest, len(data), layer.digest, layer.media_type, span))
            await client.push_blob(ref, soci_index.EMPTY_CONFIG)
            _, raw, _ = await client.fetch_manifest(ref, manifest_digest)
            subject = soci_index.Descriptor(soci_index.OCI_MANIFEST, manifest_digest, len(raw))
            await client.push_referrer(ref, soci_index.build_index(refs, subject=subject), soci_index.OCI_MANIFEST)
    trio.run(main)


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.host) as p:
        yield p


@pytest.fixture(scope="module")
def garbage_ref(registry: Registry, soci_image: SociImage) -> Iterator[str]:
    """The same layers under another manifest, whose index has a garbage zTOC for the data layer."""
    tmp = short_tmpdir("lzs-soci-bad-")
    try:
        layout = OCILayout(tmp / "layout")
        image = layout.add_image("garbage", soci_image.layers, cmd=["/bin/sh"])
        ref = push(layout.root, "garbage", registry, "lazysnap/soci-index", image=image)
        _push_garbage_index(ref, image.manifest_digest, soci_image.layers[-1:], soci_image.span_size,
                            garbage_for=soci_image.layers[-1].digest)
        yield ref
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
    assert soci_image.indexed and soci_image.skipped, "want both kinds of layer"
    host, _, rest = soci_image.ref.partition("/")
    repo, _, tag = rest.rpartition(":")
    assert fetch_manifest(host, repo, tag)[0] == soci_image.manifest_digest, "indexing must not touch the image"
    pulled = registry.mark()
    out = rpull(containerd, lazysnap, soci_image.ref)
    probes = [r for r in registry.requests(settle=0.3)[pulled:] if r.method == "GET" and r.status == 206]
    for layer in soci_image.layers:
        row = next(line for line in out.splitlines() if line.startswith(layer.digest[:19]))
        if layer.digest in soci_image.indexed:
            assert "lazy soci" in row, out
        else:
            assert "pulled whole" in row and "no zTOC for this layer" in row, out
            # Once as the first Prepare looks ahead, at most once more at its own Prepare;
            # not again at every other layer's Prepare.
            assert sum(1 for r in probes if r.blob and r.blob[1] == layer.digest) <= 2, probes

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
                                            garbage_ref: str, cid: str) -> None:
    out = rpull(containerd, lazysnap, garbage_ref)
    row = _row(out, soci_image.layers[-1].digest)
    assert "pulled whole" in row and "unusable soci index" in row, out
    done = containerd.run_container(garbage_ref, cid, "cat", "/data/small.txt", snapshotter="lazysnap")
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
    time.sleep(2 * DEFAULT_FAIL_FAST)  # reads within DEFAULT_FAIL_FAST of a failure fail at once, by design
    good = containerd.run_container(ref, cid + "-good", "sh", "-c", script, snapshotter="lazysnap")
    assert want in good.stdout


def test_soci_layers_survive_restart(containerd: Containerd, lazysnap: Lazysnap, soci_image: SociImage,
                                     cid: str) -> None:
    rpull(containerd, lazysnap, soci_image.ref)
    lazysnap.restart()
    containerd.wait_for_snapshotter("lazysnap")
    done = containerd.run_container(soci_image.ref, cid, "cat", "/data/small.txt", snapshotter="lazysnap")
    assert done.stdout == "small\n"


def test_soci_v2_convert_runs_lazily(containerd: Containerd, lazysnap: Lazysnap, soci_image: SociImage,
                                     cid: str) -> None:
    """`index convert` makes the v2 form (a new image index); rpull of it finds the index by annotation."""
    new_ref = soci_image.ref.rsplit(":", 1)[0] + ":v2-soci"
    lazysnap_cli("index", "convert", soci_image.ref, new_ref, "--store", str(soci_image.store), "--plain-http",
                 "--span-size", str(soci_image.span_size), "--min-layer-size", str(soci_image.min_layer_size))
    out = rpull(containerd, lazysnap, new_ref)
    for digest in soci_image.indexed:
        assert "lazy soci" in _row(out, digest), out
    for digest in soci_image.skipped:
        assert "pulled whole" in _row(out, digest), out
    done = containerd.run_container(new_ref, cid, "sh", "-c", "/hello.sh; sha256sum /data/random.bin",
                                    snapshotter="lazysnap")
    lines = done.stdout.splitlines()
    assert lines[0] == HELLO_OUTPUT and lines[1].split()[0] == hashlib.sha256(soci_image.data).hexdigest()
