"""Fetched once per node: a chunk cached for any layer of any image is not fetched again.

Three images carry the same file, `shared.bin`, in layers of their own (three different
blobs): one eStargz, one eStargz with other files around it, one zstd:chunked. Chunks are
cached by the digest of their uncompressed bytes (`chunkDigest` in both formats), so once
the first image's container has read the file, the others' containers read it with no
byte of their own layer fetched; reading a file only they hold still fetches.
"""

from __future__ import annotations

import hashlib
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.harness.containerd import Containerd
from tests.harness.estargz import build_estargz
from tests.harness.images import File, Image, OCILayout, push, sample_layers
from tests.harness.lazysnap import Lazysnap
from tests.harness.registry import Registry
from tests.harness.zstd_chunked import build_zstd_chunked

from .conftest import short_tmpdir
from .test_lazy import rpull, run_script, settled_mark

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CHUNK = 256 << 10
SHARED_SIZE = 3 << 20 | 4321       # 13 chunks, the last one short
OWN_SIZE = 1 << 20
QUIET = ("background_fetch = false", "prefetch = false", "readahead_max_mib = 0")
"""Only what a container reads is fetched: what is not fetched was found in the cache."""


@dataclass
class SharedImages:
    first: tuple[Image, str]        # eStargz: shared.bin
    second: tuple[Image, str]       # eStargz: own.bin, then shared.bin
    third: tuple[Image, str]        # zstd:chunked: shared.bin, own.bin (other bytes than the second's)
    shared: bytes
    own: tuple[bytes, bytes]        # the second's and the third's own.bin


@pytest.fixture(scope="module")
def shared_images(registry: Registry) -> Iterator[SharedImages]:
    tmp = short_tmpdir("lzs-shared-")
    try:
        layout = OCILayout(tmp / "layout")
        rng = random.Random(20261205)
        shared, own = rng.randbytes(SHARED_SIZE), (rng.randbytes(OWN_SIZE), rng.randbytes(OWN_SIZE))
        base = [build_estargz(entries, chunk_size=CHUNK).layer() for entries in sample_layers()]
        tops = {
            "shared-first": build_estargz([File("shared.bin", shared)], chunk_size=CHUNK).layer(),
            "shared-second": build_estargz([File("own.bin", own[0]), File("shared.bin", shared)],
                                           chunk_size=CHUNK).layer(),
            "shared-third": build_zstd_chunked([File("shared.bin", shared), File("own.bin", own[1])],
                                               chunk_size=CHUNK).layer(),
        }
        assert len({layer.digest for layer in tops.values()}) == 3, "three different blobs"
        pushed = []
        for tag, top in tops.items():
            image = layout.add_image(tag, [*base, top], cmd=["/hello.sh"])
            pushed.append((image, push(layout.root, tag, registry, f"lazysnap/{tag}:latest", image=image)))
        yield SharedImages(*pushed, shared=shared, own=own)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256sum(containerd: Containerd, ref: str, path: str, cid: str) -> str:
    done, _ = run_script(containerd, ref, f"sha256sum {path}", cid)
    return done.stdout.split()[0]


@pytest.mark.lazysnap_config(*QUIET)
def test_a_chunk_cached_for_one_layer_is_not_fetched_for_another(
        containerd: Containerd, lazysnap: Lazysnap, registry: Registry, shared_images: SharedImages,
        cid: str) -> None:
    images = shared_images
    want_shared = hashlib.sha256(images.shared).hexdigest()
    first, ref = images.first
    output, rows = rpull(containerd, lazysnap, ref)
    assert all(row.how.startswith("lazy") for row in rows.values()), output
    mark = settled_mark(registry)
    assert sha256sum(containerd, ref, "/shared.bin", cid + "-1") == want_shared
    fetched = registry.blob_bytes_served(first.layers[-1].digest, since=mark)
    assert fetched >= SHARED_SIZE // 2, f"the first read must fetch the file ({fetched} bytes)"

    for n, (image, other_ref), own in ((2, images.second, images.own[0]), (3, images.third, images.own[1])):
        output, rows = rpull(containerd, lazysnap, other_ref)
        assert all(row.how.startswith("lazy") for row in rows.values()), output
        top = image.layers[-1].digest
        mark = settled_mark(registry)
        assert sha256sum(containerd, other_ref, "/shared.bin", f"{cid}-{n}") == want_shared
        assert registry.blob_bytes_served(top, since=mark) == 0, (
            f"image {n}: shared.bin's chunks were cached by another layer, yet its layer was fetched")
        mark = settled_mark(registry)
        assert sha256sum(containerd, other_ref, "/own.bin", f"{cid}-{n}-own") == hashlib.sha256(own).hexdigest()
        assert registry.blob_bytes_served(top, since=mark) > 0, f"image {n}: own.bin is only in its layer"
