"""Uncompressed tar layers served lazily through their SOCI zTOC, end to end.

The image's layers are plain tar (`application/vnd.oci.image.layer.v1.tar`, and in a
Docker schema 2 manifest `application/vnd.docker.image.rootfs.diff.tar`). `lazysnap index
create` gives each one a zTOC with compression "Uncompressed": fixed spans, the span's
blob bytes are its tar bytes, no gzip checkpoints. `lazysnap rpull` (and `ctr-remote
image rpull`) then serves every layer lazily; a container reads small and large files,
reads that straddle spans, and its whole tree must equal containerd's overlayfs pull.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from snapshotter.formats import soci_index, ztoc
from snapshotter.fuse.filesystem import DEFAULT_FAIL_FAST
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.options import RegistryOptions
from snapshotter.soci.local import LocalIndexes
from tests.harness.containerd import Containerd
from tests.harness.faultproxy import FaultProxy
from tests.harness.images import (
    HELLO_OUTPUT,
    MIDDLE_TEXT,
    XATTR_NAME,
    XATTR_VALUE,
    File,
    Hardlink,
    Layer,
    OCILayout,
    layer_tar,
    push,
    sample_layers,
    sha256_digest,
)
from tests.harness.lazysnap import Lazysnap
from tests.harness.procs import run
from tests.harness.registry import Registry
from tests.harness.tree import diff_trees

from .conftest import lazysnap_cli, short_tmpdir
from .test_lazy import LAZY, OVERLAY, content_digests, lazysnap_and_overlayfs_trees, rpull, run_script, short, status

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
REPO = "lazysnap/soci-tar"
SPAN = 256 << 10
DATA_SIZE = 8 << 20 | 12345           # 33 spans of its own (the layer ~38), not a multiple of anything
BLOCK = 4096
# dd windows (in 4 KiB blocks) of /data/random.bin: one block, and 130 blocks (520 KiB)
# that straddle at least two span boundaries.
ONE_BLOCK = (244, 1)
STRADDLE = (60, 130)
TEXT_BLOCKS = (300, 2)                # of /data/text.log


@dataclass
class TarImage:
    ref: str
    manifest_digest: str
    layers: list[Layer]
    data: bytes
    """/data/random.bin (the top layer); /data/text.log holds `text`, /data/small.txt "small\\n"."""
    text: bytes

    @property
    def top(self) -> Layer:
        return self.layers[-1]


@dataclass
class TarImages:
    oci: TarImage
    docker: TarImage

    def get(self, kind: str) -> TarImage:
        return getattr(self, kind)


def tar_layer(entries: list, media_type: str) -> Layer:
    tar = layer_tar(entries)
    return Layer(tar, sha256_digest(tar), media_type)


def data_entries(seed: int) -> tuple[list, bytes, bytes]:
    data = random.Random(seed).randbytes(DATA_SIZE)
    text = b"".join(b"row %d of a text file in a plain tar\n" % i for i in range(40_000))
    entries = [File("data/random.bin", data), File("data/text.log", text), File("data/small.txt", "small\n"),
               Hardlink("data/random-link.bin", "data/random.bin")]
    return entries, data, text


def push_docker_image(registry: Registry, tag: str, layers: list[Layer]) -> tuple[str, str]:
    """A Docker schema 2 manifest (skopeo would not keep these types from an OCI layout); (ref, digest)."""
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/hello.sh"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
    }, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "digest": sha256_digest(config), "size": len(config)},
        "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": len(layer.blob)}
                   for layer in layers],
    }, sort_keys=True).encode()
    ref = f"{registry.host}/{REPO}:{tag}"

    async def main() -> str:
        async with RegistryClient(RegistryOptions(plain_http=True, certs_dir=None)) as client:
            for blob in [config, *(layer.blob for layer in layers)]:
                await client.push_blob(ref, blob)
            return await client.push_manifest(ref, manifest, DOCKER_MANIFEST)
    digest = trio.run(main)
    assert digest == sha256_digest(manifest)
    return ref, digest


def index_image(ref: str, store: Path) -> str:
    """`lazysnap index create` + `index push`, every layer indexed (the sample's upper layers are tiny)."""
    common = ["--store", str(store), "--plain-http"]
    out = lazysnap_cli("index", "create", ref, "--span-size", str(SPAN), "--min-layer-size", "1", *common)
    lazysnap_cli("index", "push", ref, *common)
    return out


@pytest.fixture(scope="module")
def tar_images(registry: Registry) -> Iterator[TarImages]:
    tmp = short_tmpdir("lzs-soci-tar-")
    try:
        store = tmp / "soci"
        images = {}
        for kind, media_type, seed in (("oci", OCI_TAR, 11), ("docker", DOCKER_TAR, 12)):
            entries, data, text = data_entries(seed)
            layers = [tar_layer(e, media_type) for e in [*sample_layers(), entries]]
            if kind == "oci":
                layout = OCILayout(tmp / "layout")
                image = layout.add_image(kind, layers, cmd=["/hello.sh"])
                ref, digest = push(layout.root, kind, registry, REPO, image=image), image.manifest_digest
            else:
                ref, digest = push_docker_image(registry, kind, layers)
            out = index_image(ref, store)
            local = LocalIndexes(store)
            index_digest = local.index_for(digest)
            assert index_digest is not None, out
            index = soci_index.parse_index(local.get_blob(index_digest) or b"", index_digest)
            assert set(index.ztocs) == {layer.digest for layer in layers}, f"every layer gets a zTOC:\n{out}"
            for layer in layers:
                z = ztoc.parse_ztoc(local.get_blob(index.ztocs[layer.digest].digest) or b"")
                assert z.compression.algorithm == ztoc.CompressionAlgorithm.UNCOMPRESSED, out
            images[kind] = TarImage(ref, digest, layers, data, text)
        yield TarImages(**images)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blocks(data: bytes, window: tuple[int, int]) -> bytes:
    skip, count = window
    return data[skip * BLOCK:(skip + count) * BLOCK]


READS = ("/hello.sh; cat /middle.txt /data/small.txt; "
         "dd if=/data/random.bin bs=4096 skip={0[0]} count={0[1]} 2>/dev/null | sha256sum; "
         "dd if=/data/random-link.bin bs=4096 skip={1[0]} count={1[1]} 2>/dev/null | sha256sum; "
         "dd if=/data/text.log bs=4096 skip={2[0]} count={2[1]} 2>/dev/null | sha256sum"
         ).format(ONE_BLOCK, STRADDLE, TEXT_BLOCKS)


@pytest.mark.lazysnap_config("background_fetch = false")
@pytest.mark.parametrize("kind", ["oci", "docker"])
def test_uncompressed_layers_run_lazily(containerd: Containerd, lazysnap: Lazysnap, tar_images: TarImages,
                                        registry: Registry, cid: str, kind: str) -> None:
    image = tar_images.get(kind)
    assert all(layer.media_type == (OCI_TAR if kind == "oci" else DOCKER_TAR) for layer in image.layers)
    mark = registry.mark()
    output, rows = rpull(containerd, lazysnap, image.ref)
    for layer in image.layers:
        assert rows[short(layer.digest)].how == "lazy soci", output
    _, layers = status(lazysnap)
    assert all(layers[short(layer.digest)]["mode"] == "soci" for layer in image.layers), layers
    downloaded = {layer.digest for layer in image.layers} & content_digests(containerd)
    assert not downloaded, f"containerd downloaded layer blobs: {sorted(downloaded)}"

    done, _ = run_script(containerd, image.ref, READS, cid)
    assert done.stdout.splitlines() == [
        HELLO_OUTPUT, MIDDLE_TEXT.strip(), "small",
        f"{sha(blocks(image.data, ONE_BLOCK))}  -", f"{sha(blocks(image.data, STRADDLE))}  -",
        f"{sha(blocks(image.text, TEXT_BLOCKS))}  -",
    ], done.stdout

    top = len(image.top.blob)
    served = registry.blob_bytes_served(image.top.digest, since=mark)
    total = sum(registry.blob_bytes_served(layer.digest, since=mark, settle=0) for layer in image.layers)
    size = sum(len(layer.blob) for layer in image.layers)
    print(f"\n{kind}: top layer {served} of {top} bytes fetched; all layers {total} of {size}")
    assert 0 < served < top // 2, f"{served} of {top} bytes of the top layer fetched"


def test_ctr_remote_rpull_serves_uncompressed_layers_lazily(containerd: Containerd, lazysnap: Lazysnap,
                                                            tar_images: TarImages, cid: str) -> None:
    """containerd's own unpacker path (ctr-remote adds the remote-snapshot labels)."""
    image = tar_images.oci
    run(["ctr-remote", "--address", str(containerd.address), "--namespace", "default", "image", "rpull",
         "--plain-http", "--snapshotter", LAZY, image.ref], timeout=120)
    output, layers = status(lazysnap)
    for layer in image.layers:
        assert layers[short(layer.digest)]["mode"] == "soci", output
    downloaded = {layer.digest for layer in image.layers} & content_digests(containerd)
    assert not downloaded, f"containerd downloaded layer blobs: {sorted(downloaded)}"
    done, _ = run_script(containerd, image.ref, "cat /data/small.txt; sha256sum /data/random.bin", cid)
    assert done.stdout.splitlines() == ["small", f"{sha(image.data)}  /data/random.bin"], done.stdout


@pytest.mark.parametrize("kind", [
    "oci", "docker",
    # Trees served through FUSE rather than EROFS images: the other way a file's bytes reach the span reads.
    pytest.param("oci-fuse", marks=pytest.mark.lazysnap_config("kernel_metadata = false")),
])
def test_uncompressed_tree_equals_overlayfs_pull(containerd: Containerd, lazysnap: Lazysnap, tar_images: TarImages,
                                                 workdir: Path, kind: str) -> None:
    image = tar_images.get(kind.split("-")[0])
    output, rows = rpull(containerd, lazysnap, image.ref)
    assert all(row.how == "lazy soci" for row in rows.values()), output
    trees = lazysnap_and_overlayfs_trees(containerd, image.ref, workdir)
    overlay, lazy = trees[OVERLAY], trees[LAZY]
    # The reference really is the sample plus the data layer (no vacuous comparison).
    assert overlay["bin/busybox"].hardlinks == ("bin/busybox", "bin/ls")
    assert "data/doomed.txt" not in overlay and sorted(p for p in overlay if p.startswith("opaque/")) == [
        "opaque/new.txt"]
    assert dict(overlay["xattr.txt"].xattrs)[XATTR_NAME] == XATTR_VALUE.encode()
    assert overlay["dev/null-ish"].rdev == (1, 3)
    assert overlay["data/random.bin"].hardlinks == ("data/random-link.bin", "data/random.bin")
    assert diff_trees(overlay, lazy, OVERLAY, LAZY) == []
    # Every file's content was read through the zTOC's spans and hashed: check the big ones by hand too.
    assert lazy["data/random.bin"].sha256 == sha(image.data)
    assert lazy["data/text.log"].sha256 == sha(image.text)


def test_a_corrupt_span_of_a_tar_layer_gives_eio_never_wrong_bytes(containerd: Containerd, lazysnap: Lazysnap,
                                                                   tar_images: TarImages, proxy: FaultProxy,
                                                                   cid: str) -> None:
    """No inflation can notice a flipped byte in a plain tar: only the span digest stands between
    the registry and the container."""
    image = tar_images.oci
    ref = image.ref.replace(image.ref.split("/")[0], proxy.host, 1)
    output, rows = rpull(containerd, lazysnap, ref)
    assert rows[short(image.top.digest)].how == "lazy soci", output
    proxy.flip = {image.top.digest}
    script = "dd if=/data/random.bin of=/tmp/out bs=4096 skip=300 count=1; echo rc=$?; sha256sum /tmp/out"
    bad, _ = run_script(containerd, ref, script, cid + "-bad", check=False)
    want = sha(image.data[300 * BLOCK:301 * BLOCK])
    assert want not in bad.stdout and "Input/output error" in bad.stdout and "rc=1" in bad.stdout, bad.stdout
    proxy.flip = set()
    time.sleep(2 * DEFAULT_FAIL_FAST)  # reads within DEFAULT_FAIL_FAST of a failure fail at once, by design
    good, _ = run_script(containerd, ref, script, cid + "-good")
    assert want in good.stdout, good.stdout


def test_uncompressed_layers_survive_restart(containerd: Containerd, lazysnap: Lazysnap, tar_images: TarImages,
                                            cid: str) -> None:
    """The saved zTOC (a TarZinfo, no checkpoints) rebuilds the layers after a restart."""
    image = tar_images.oci
    rpull(containerd, lazysnap, image.ref)
    lazysnap.restart()
    containerd.wait_for_snapshotter(LAZY)
    done, _ = run_script(containerd, image.ref, "cat /data/small.txt; sha256sum /data/text.log", cid)
    assert done.stdout.splitlines() == ["small", f"{sha(image.text)}  /data/text.log"], done.stdout
