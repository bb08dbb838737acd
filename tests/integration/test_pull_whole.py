"""Layers without a usable index, fetched whole by lazysnap itself.

containerd then never downloads them, and on the ctr-remote (and CRI) path the layers
above them stay lazy. The tree must be the one containerd's own overlayfs pull makes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import tarfile
import time
from pathlib import Path

import pytest

from tests.harness.containerd import Containerd
from tests.harness.images import Layer, OCILayout, push, sample_layers, sha256_digest
from tests.harness.lazysnap import Lazysnap
from tests.harness.procs import run
from tests.harness.registry import Registry
from tests.harness.tree import diff_trees

from .conftest import SociImage
from .test_lazy import (  # noqa: F401  (lazy_images: a fixture)
    HELLO_OUTPUT, LAZY, MIDDLE_TEXT, OVERLAY, LazyImages, content_digests, lazy_images, lazysnap_and_overlayfs_trees,
    lazysnap_cli, rpull, run_script, short, snapshot_keys, status,
)

WHOLE = "pulled whole by lazysnap"


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
    assert all(re.match(r"pulled in \d+\.\d\ds ", layers[short(d)]["rest"]) for d in pushed.layer_digests), layers
    # The first Prepare found every layer without an index: the ones above it were pulled before their Prepare.
    assert lazysnap.log_text().count("(started ahead)") >= 1, lazysnap.log_tail()
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


@pytest.mark.lazysnap_config("background_fetch = false")
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


def test_a_blob_that_does_not_match_its_digest_fails_rpull_and_commits_nothing(
        containerd: Containerd, lazysnap: Lazysnap, own_registry: Registry, request: pytest.FixtureRequest) -> None:
    images: LazyImages = request.getfixturevalue("lazy_images")
    ref = images.push_to(images.gzip, own_registry)
    top = images.gzip.layer_digests[-1]
    blob = own_registry.workdir / "storage/docker/registry/v2/blobs/sha256" / top[7:9] / top[7:] / "data"
    good = blob.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the digest tells
    blob.write_bytes(bytes(data))

    done = lazysnap_cli("rpull", ref, "--plain-http", "--containerd", str(containerd.address),
                        "--address", str(lazysnap.address))
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert top in output and "digest mismatch" in output, output
    assert "Traceback" not in output, output
    keys = snapshot_keys(containerd)  # the layers below it, until containerd collects them (no image holds them)
    assert len(keys) < len(images.gzip.layer_digests), f"the corrupt layer must not be committed: {keys}"
    assert not [p.name for p in (lazysnap.root / "snapshots").iterdir() if p.name.startswith("new-")]
    assert list((lazysnap.root / "whole").iterdir()) == [], "a failed pull leaves nothing behind"

    blob.write_bytes(good)  # the registry is mended: the same pull now works
    output, rows = rpull(containerd, lazysnap, ref)
    assert list(rows) == [short(d) for d in images.gzip.layer_digests], output
    assert all(row.how == WHOLE for row in rows.values()), output


def hostile_layer(canary: str) -> Layer:
    """A symlink out of the layer followed by a file through it, then a name that climbs out."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        link = tarfile.TarInfo("evil")
        link.type, link.linkname = tarfile.SYMTYPE, "/tmp"
        tar.addfile(link)
        for name in (f"evil/{canary}", f"../../../../../../../tmp/{canary}"):
            info = tarfile.TarInfo(name)
            info.size = 6
            tar.addfile(info, io.BytesIO(b"owned\n"))
    raw = buf.getvalue()
    return Layer(gzip.compress(raw), sha256_digest(raw))


def test_a_hostile_tar_is_refused_and_writes_nothing_outside(containerd: Containerd, lazysnap: Lazysnap,
                                                             registry: Registry, workdir: Path) -> None:
    canary = f"lzs-escape-{os.getpid()}-{time.monotonic_ns()}"
    layout = OCILayout(workdir / "layout")
    base = Layer.from_entries(sample_layers()[0])
    image = layout.add_image("hostile-tar", [base, hostile_layer(canary)], cmd=["/hello.sh"])
    ref = push(layout.root, image.tag, registry, "lazysnap/hostile-tar:latest", image=image)

    done = lazysnap_cli("rpull", ref, "--plain-http", "--containerd", str(containerd.address),
                        "--address", str(lazysnap.address))
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "climbs out of the layer" in output and image.layers[1].digest in output, output
    assert not Path("/tmp", canary).exists(), "a member was written outside the layer"
    snapshots = lazysnap.root / "snapshots"
    written = [Path(top, name) for top, dirs, files in os.walk(snapshots)  # containerd may be removing some
               for name in dirs + files if name == canary]
    assert all(snapshots in p.parents for p in written), written
    assert not [p.name for p in snapshots.iterdir() if p.name.startswith("new-")], "the half-applied layer is left"
