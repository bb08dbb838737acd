"""zstd:chunked layers served lazily end to end: `lazysnap rpull`, a container, bytes fetched, a corrupt chunk.

The image is the sample image with its layers in zstd:chunked form (built by
`tests/harness/zstd_chunked.py`, as podman/buildah lay them out), except the middle one,
which is plain zstd and must be pulled whole by lazysnap, plus a data layer (small.txt,
secret.bin in one chunk, big.bin in 1 MiB chunks). The TOC checksum is only in the image
manifest's layer annotations: containerd never passes those in a Prepare's labels, so
lazysnap reads them from the manifest it fetches by digest.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapshotter.fuse.filesystem import DEFAULT_FAIL_FAST
from tests.harness.containerd import Containerd
from tests.harness.faultproxy import FaultProxy
from tests.harness.images import HELLO_OUTPUT, MIDDLE_TEXT, File, Image, Layer, OCILayout, layer_tar, push, \
    sample_layers, sha256_digest
from tests.harness.lazysnap import Lazysnap
from tests.harness.procs import run
from tests.harness.registry import Registry
from tests.harness.tree import diff_trees
from tests.harness.zstd_chunked import MEDIA_LAYER_ZSTD, build_zstd_chunked, frame

from .conftest import short_tmpdir
from .test_lazy import (
    LAZY, OVERLAY, READ_SECRET, assert_secret_fails, assert_secret_reads, content_digests,
    lazysnap_and_overlayfs_trees, rpull, run_script, settled_mark, short, status,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

LAZY_ZSTD = "lazy zstd:chunked"
WHOLE = "pulled whole by lazysnap"
SAMPLE_CHUNK = 256 << 10
BIG_CHUNK = 1 << 20
BIG_SIZE = 20 << 20
SECRET_SIZE = 512 << 10
SMALL_TEXT = "the only file the small workload reads\n"
UNVERIFIED_TEXT = "served from a layer whole, since nothing vouches for its TOC\n"


@dataclass
class ZstdImage:
    image: Image
    ref: str
    big_data: bytes
    secret: bytes
    unannotated: Image
    """The base layer, then a zstd:chunked layer whose descriptor lost its annotations."""
    unannotated_ref: str

    @property
    def digests(self) -> list[str]:
        return [layer.digest for layer in self.image.layers]


@pytest.fixture(scope="module")
def zstd_image(registry: Registry) -> Iterator[ZstdImage]:
    tmp = short_tmpdir("lzs-zstd-")
    try:
        layout = OCILayout(tmp / "layout")
        rng = random.Random(20260601)
        big_data, secret = rng.randbytes(BIG_SIZE), rng.randbytes(SECRET_SIZE)
        base, middle, top = sample_layers()
        plain_tar = layer_tar(middle)
        plain = Layer(frame(plain_tar), sha256_digest(plain_tar), MEDIA_LAYER_ZSTD)
        data = build_zstd_chunked([File("small.txt", SMALL_TEXT), File("secret.bin", secret),
                                   File("big.bin", big_data)], chunk_size=BIG_CHUNK)
        layers = [build_zstd_chunked(base, chunk_size=SAMPLE_CHUNK).layer(), plain,
                  build_zstd_chunked(top, chunk_size=SAMPLE_CHUNK).layer(), data.layer()]
        image = layout.add_image("zstd-chunked", layers, cmd=["/hello.sh"])
        ref = push(layout.root, image.tag, registry, "lazysnap/zstd-chunked:latest", image=image)
        bare = build_zstd_chunked([File("unverified.txt", UNVERIFIED_TEXT)]).layer(annotations={})
        unannotated = layout.add_image("zstd-unannotated", [layers[0], bare], cmd=["/hello.sh"])
        unannotated_ref = push(layout.root, unannotated.tag, registry, "lazysnap/zstd-unannotated:latest",
                               image=unannotated)
        yield ZstdImage(image, ref, big_data, secret, unannotated, unannotated_ref)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_rows(rows: dict, image: ZstdImage, output: str) -> None:
    assert list(rows) == [short(d) for d in image.digests], output
    hows = [rows[short(d)].how for d in image.digests]
    assert hows == [LAZY_ZSTD, WHOLE, LAZY_ZSTD, LAZY_ZSTD], output
    assert "zstd:chunked" in rows[short(image.digests[1])].why, output


def test_rpull_serves_zstd_chunked_lazily_with_the_overlayfs_tree(containerd: Containerd, lazysnap: Lazysnap,
                                                                  zstd_image: ZstdImage, workdir: Path,
                                                                  cid: str) -> None:
    output, rows = rpull(containerd, lazysnap, zstd_image.ref)
    _check_rows(rows, zstd_image, output)
    _, layers = status(lazysnap)
    assert [layers[short(d)]["mode"] for d in zstd_image.digests] == ["zstd:chunked", "whole", "zstd:chunked",
                                                                      "zstd:chunked"], layers

    done, _ = run_script(containerd, zstd_image.ref, "/hello.sh; cat /middle.txt; sha256sum /bin/busybox /big.bin",
                         cid)
    lines = done.stdout.splitlines()
    assert lines[:2] == [HELLO_OUTPUT, MIDDLE_TEXT.strip()], done.stdout
    assert lines[2].split()[0] == hashlib.sha256(Path("/bin/busybox").read_bytes()).hexdigest(), done.stdout
    assert lines[3].split()[0] == hashlib.sha256(zstd_image.big_data).hexdigest(), done.stdout
    downloaded = set(zstd_image.digests) & content_digests(containerd)
    assert not downloaded, f"layer blobs were downloaded into containerd: {sorted(downloaded)}"

    trees = lazysnap_and_overlayfs_trees(containerd, zstd_image.ref, workdir)
    overlay = trees[OVERLAY]
    assert overlay["bin/busybox"].hardlinks == ("bin/busybox", "bin/ls")  # the reference is the real sample
    assert "data/doomed.txt" not in overlay and "big.bin" in overlay
    assert sorted(p for p in overlay if p.startswith("opaque/")) == ["opaque/new.txt"]
    assert diff_trees(overlay, trees[LAZY], OVERLAY, LAZY) == []


def test_ctr_remote_rpull_finds_the_checksum_in_the_manifest_it_resolves(containerd: Containerd,
                                                                        lazysnap: Lazysnap, zstd_image: ZstdImage,
                                                                        cid: str) -> None:
    """ctr-remote's labels name no manifest digest: lazysnap resolves the reference to read the annotations."""
    run(["ctr-remote", "--address", str(containerd.address), "--namespace", "default", "image", "rpull",
         "--plain-http", "--snapshotter", LAZY, zstd_image.ref], timeout=120)
    done, _ = run_script(containerd, zstd_image.ref, "/hello.sh; cat /small.txt", cid)
    assert done.stdout.splitlines() == [HELLO_OUTPUT, SMALL_TEXT.strip()]
    output, layers = status(lazysnap)
    assert [layers[short(d)]["mode"] for d in zstd_image.digests] == ["zstd:chunked", "whole", "zstd:chunked",
                                                                      "zstd:chunked"], output
    downloaded = set(zstd_image.digests) & content_digests(containerd)
    assert not downloaded, f"ctr-remote downloaded layer blobs into containerd: {sorted(downloaded)}"


def test_a_layer_without_the_checksum_annotation_is_pulled_whole(containerd: Containerd, lazysnap: Lazysnap,
                                                                zstd_image: ZstdImage, cid: str) -> None:
    output, rows = rpull(containerd, lazysnap, zstd_image.unannotated_ref)
    base, bare = (rows[short(layer.digest)] for layer in zstd_image.unannotated.layers)
    assert base.how == LAZY_ZSTD, output
    assert bare.how == WHOLE and "manifest-checksum" in bare.why, output
    done, _ = run_script(containerd, zstd_image.unannotated_ref, "cat /unverified.txt", cid)
    assert done.stdout == UNVERIFIED_TEXT


def test_reads_fetch_only_the_chunks_they_need(containerd: Containerd, lazysnap: Lazysnap, zstd_image: ZstdImage,
                                               registry: Registry, cid: str) -> None:
    data_layer = zstd_image.image.layers[-1]
    blob_size = len(data_layer.blob)
    before_pull = settled_mark(registry)
    output, rows = rpull(containerd, lazysnap, zstd_image.ref)
    _check_rows(rows, zstd_image, output)

    done, _ = run_script(containerd, zstd_image.ref, "cat /small.txt", cid)
    assert done.stdout == SMALL_TEXT
    small_workload = registry.blob_bytes_served(data_layer.digest, since=before_pull, settle=0.3)
    print(f"zstd:chunked data layer: {blob_size} bytes; footer + TOC + small.txt fetched {small_workload} bytes")
    assert 0 < small_workload < blob_size // 10, (
        f"reading small.txt (and the index) cost {small_workload} bytes of the {blob_size}-byte layer")

    before_slice = settled_mark(registry)
    middle = 10 * BIG_CHUNK
    expected = hashlib.sha256(zstd_image.big_data[middle:middle + BIG_CHUNK]).hexdigest()
    done, _ = run_script(containerd, zstd_image.ref,
                         "dd if=/big.bin bs=1048576 skip=10 count=1 2>/dev/null | sha256sum", cid + "-2")
    assert done.stdout.split()[0] == expected, done.stdout
    slice_cost = registry.blob_bytes_served(data_layer.digest, since=before_slice, settle=0.3)
    print(f"reading 1 MiB in the middle of big.bin fetched {slice_cost} bytes")
    # As for eStargz: the chunk, and at most the next one or two (kernel readahead, blob readahead).
    assert BIG_CHUNK <= slice_cost <= 3 * BIG_CHUNK + (64 << 10), (
        f"reading 1 MiB in the middle of big.bin fetched {slice_cost} bytes")


def test_a_corrupt_chunk_gives_eio_never_wrong_bytes(containerd: Containerd, lazysnap: Lazysnap,
                                                     zstd_image: ZstdImage, proxy: FaultProxy, cid: str) -> None:
    ref = zstd_image.ref.replace(zstd_image.ref.split("/", 1)[0], proxy.host, 1)
    data_digest = zstd_image.digests[-1]
    output, rows = rpull(containerd, lazysnap, ref)
    _check_rows(rows, zstd_image, output)
    done, _ = run_script(containerd, ref, "sha256sum /bin/busybox >/dev/null && cat /small.txt", cid)
    assert done.stdout == SMALL_TEXT

    proxy.reset_counts()
    proxy.flip = {"blobs"}
    done, _ = run_script(containerd, ref, READ_SECRET, cid + "-bad", check=False)
    assert proxy.count("GET", data_digest) > 0, "the corrupting proxy was never asked for the chunk"
    assert_secret_fails(done.stdout, zstd_image.secret)

    proxy.flip = set()
    time.sleep(2 * DEFAULT_FAIL_FAST)  # reads within DEFAULT_FAIL_FAST of a failure fail at once, by design
    done, _ = run_script(containerd, ref, READ_SECRET, cid + "-good")
    assert_secret_reads(done.stdout, zstd_image.secret)


def test_a_restart_with_new_data_planes_serves_zstd_chunked_layers_from_their_saved_index(
        containerd: Containerd, lazysnap: Lazysnap, zstd_image: ZstdImage, cid: str) -> None:
    """With serve and its data planes gone, every layer is rebuilt from `toc.zst` and its device map alone."""
    output, rows = rpull(containerd, lazysnap, zstd_image.ref)
    _check_rows(rows, zstd_image, output)
    lazysnap.stop()
    lazysnap.stop_dataplanes()
    lazysnap.start()
    containerd.wait_for_snapshotter(LAZY)
    assert "restore failed" not in lazysnap.log_text(), lazysnap.log_tail()
    assert "restored 3 lazily served layers (0 already served" in lazysnap.log_text(), lazysnap.log_tail()
    out, layers = status(lazysnap)
    assert [layers[short(d)]["mode"] for d in zstd_image.digests if d != zstd_image.digests[1]] == [
        "zstd:chunked"] * 3, out
    done, _ = run_script(containerd, zstd_image.ref, "/hello.sh; sha256sum /big.bin", cid)
    lines = done.stdout.splitlines()
    assert lines[0] == HELLO_OUTPUT, done.stdout
    assert lines[1].split()[0] == hashlib.sha256(zstd_image.big_data).hexdigest(), done.stdout
