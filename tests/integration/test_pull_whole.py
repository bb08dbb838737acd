"""Layers without a usable index, fetched whole by lazysnap itself (`pull_whole = true`).

containerd then never downloads them, and on the ctr-remote (and CRI) path the layers
above them stay lazy. The tree must be the one containerd's own overlayfs pull makes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.harness.containerd import Containerd
from tests.harness.lazysnap import Lazysnap
from tests.harness.procs import run
from tests.harness.tree import diff_trees

from .conftest import SociImage
from .test_lazy import (  # noqa: F401  (lazy_images: a fixture)
    HELLO_OUTPUT, LAZY, MIDDLE_TEXT, OVERLAY, LazyImages, content_digests, lazy_images, lazysnap_and_overlayfs_trees,
    rpull, run_script, short, status,
)

WHOLE = "pulled whole by lazysnap"


@pytest.mark.lazysnap_config("pull_whole = true")
def test_plain_gzip_layers_are_pulled_whole_by_lazysnap_with_overlayfs_trees(
        containerd: Containerd, lazysnap: Lazysnap, workdir: Path, cid: str, request: pytest.FixtureRequest) -> None:
    images: LazyImages = request.getfixturevalue("lazy_images")
    pushed = images.gzip
    output, rows = rpull(containerd, lazysnap, pushed.ref)
    assert list(rows) == [short(d) for d in pushed.layer_digests], output
    for row in rows.values():
        assert row.how == WHOLE and "not an eStargz layer" in row.why, output
    _, layers = status(lazysnap)
    assert all(layers[short(d)]["mode"] == "whole" for d in pushed.layer_digests), layers
    downloaded = set(pushed.layer_digests) & content_digests(containerd)
    assert not downloaded, f"containerd downloaded layers lazysnap pulled: {sorted(downloaded)}"
    done, _ = run_script(containerd, pushed.ref, "/hello.sh; cat /middle.txt", cid)
    assert done.stdout.splitlines() == [HELLO_OUTPUT, MIDDLE_TEXT.strip()]

    trees = lazysnap_and_overlayfs_trees(containerd, pushed.ref, workdir)
    overlay = trees[OVERLAY]
    assert overlay["bin/busybox"].hardlinks == ("bin/busybox", "bin/ls")  # the reference is the real sample
    assert "data/doomed.txt" not in overlay and sorted(p for p in overlay if p.startswith("opaque/")) == [
        "opaque/new.txt"]
    assert diff_trees(overlay, trees[LAZY], OVERLAY, LAZY) == []


@pytest.mark.lazysnap_config("pull_whole = true", "background_fetch = false")
def test_ctr_remote_keeps_the_layers_above_an_unindexed_one_lazy(containerd: Containerd, lazysnap: Lazysnap,
                                                                 soci_image: SociImage, cid: str) -> None:
    """containerd's unpacker gives up on every layer above the first one that falls back; with
    lazysnap pulling that layer itself, none falls back and none is downloaded."""
    run(["ctr-remote", "--address", str(containerd.address), "--namespace", "default", "image", "rpull",
         "--plain-http", "--snapshotter", LAZY, soci_image.ref], timeout=120)
    output, layers = status(lazysnap)
    for digest in soci_image.skipped:
        assert layers[short(digest)]["mode"] == "whole", output
    for digest in soci_image.indexed:
        assert layers[short(digest)]["mode"] == "soci", output
    downloaded = {layer.digest for layer in soci_image.layers} & content_digests(containerd)
    assert not downloaded, f"containerd downloaded layer blobs: {sorted(downloaded)}"
    done, _ = run_script(containerd, soci_image.ref, "cat /data/small.txt; sha256sum /data/random.bin", cid)
    lines = done.stdout.splitlines()
    assert lines[0] == "small"
    assert lines[1].split()[0] == hashlib.sha256(soci_image.data).hexdigest()
