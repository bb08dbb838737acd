"""Layers lazysnap cannot serve are pulled whole, with the reason, and never fail the pull.

Two ways a resolved, verified layer can still not be served, each end to end (a real
containerd, registry and lazysnap):

1. a hostile eStargz index: the TOC (verified against the image's toc.digest annotation)
   has a hardlink whose target is not in the layer. Building the layer's tree fails
   (`TreeError`, a `FormatError`), so the layer is pulled whole and containerd applies
   the blob as the ordinary tar.gz it is; the image's other layers stay lazy. This used
   to fail the Prepare with gRPC INTERNAL.
2. a full disk under `<root>/layers` while saving the layers' indexes (`AttachError`):
   every layer is pulled whole, nothing is left mounted or saved, and once there is room
   again the same image is served lazily.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.containerd import Containerd
from tests.harness.estargz import build_estargz
from tests.harness.hostile import build_hostile_estargz, retarget_hardlink
from tests.harness.images import HELLO_OUTPUT, MIDDLE_TEXT, Image, OCILayout, push, sample_layers
from tests.harness.lazysnap import Lazysnap, mounts_below
from tests.harness.procs import wait_until
from tests.harness.registry import Registry

from .conftest import short_tmpdir
from .test_lazy import content_digests, listing, rpull, run_script, short, snapshot_keys, status

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SAMPLE_CHUNK = 256 << 10
HARDLINK = "data/hl-2"            # in the sample's middle layer: a hardlink to data/hl-1
MISSING = "data/no-such-file"
HARDLINK_TEXT = "two names, one inode"
LAYERS_TMPFS_SIZE = 4 << 20       # room for the sample's saved indexes once the filler is gone
FILLER = "filler"                 # not a layer id, so lazysnap's start leaves it alone (a file, not a dir)


@dataclass
class FallbackImages:
    estargz: Image                # the sample image, every layer eStargz with its TOC digest
    estargz_ref: str
    hostile: Image                # the same, but the middle layer's TOC retargets HARDLINK to MISSING
    hostile_ref: str


@pytest.fixture(scope="module")
def images(registry: Registry) -> Iterator[FallbackImages]:
    tmp = short_tmpdir("lzs-fb-")
    try:
        layout = OCILayout(tmp / "layout")
        bottom, middle, top = sample_layers()
        honest = [build_estargz(entries, chunk_size=SAMPLE_CHUNK).layer() for entries in (bottom, middle, top)]
        hostile_middle = build_hostile_estargz(middle, retarget_hardlink(HARDLINK, MISSING), chunk_size=SAMPLE_CHUNK)
        assert f'"linkName": "{MISSING}"' in hostile_middle.toc_json.decode()
        estargz = layout.add_image("fb-estargz", honest, cmd=["/hello.sh"])
        hostile = layout.add_image("fb-hostile", [honest[0], hostile_middle.layer(), honest[2]], cmd=["/hello.sh"])
        yield FallbackImages(
            estargz, push(layout.root, "fb-estargz", registry, "lazysnap/fb-estargz:latest", image=estargz),
            hostile, push(layout.root, "fb-hostile", registry, "lazysnap/fb-hostile:latest", image=hostile))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def assert_nothing_internal(output: str, containerd: Containerd, daemon: Lazysnap) -> None:
    """No call failed as an internal error, in lazysnap or as containerd saw it."""
    assert "INTERNAL" not in output and "internal error" not in output, output
    ctd_log = containerd.log_text()
    assert "code = Internal" not in ctd_log, containerd.log_tail(80)
    assert "internal error" not in daemon.log_text(), daemon.log_tail()


# ---------------------------------------------------------------------------- 1. hostile index

def test_hardlink_to_a_missing_target_is_pulled_whole(containerd: Containerd, lazysnap: Lazysnap,
                                                      images: FallbackImages, cid: str) -> None:
    image = images.hostile
    bottom, middle, top = image.layers
    output, rows = rpull(containerd, lazysnap, images.hostile_ref)
    assert list(rows) == [short(layer.digest) for layer in image.layers], output

    hostile = rows[short(middle.digest)]
    assert hostile.how == "pulled whole by lazysnap", output
    assert hostile.why.startswith("unusable estargz index: "), output
    assert re.search(rf"hardlink '{HARDLINK}' points to '{MISSING}', which is not a file in the layer", hostile.why), (
        f"the reason must name the hardlink and its missing target:\n{output}")
    assert rows[short(bottom.digest)].how == rows[short(top.digest)].how == "lazy estargz", output
    assert_nothing_internal(output, containerd, lazysnap)

    out, layers = status(lazysnap)
    assert layers[short(middle.digest)]["mode"] == "whole", out
    assert hostile.why in layers[short(middle.digest)]["rest"], out
    assert layers[short(bottom.digest)]["mode"] == layers[short(top.digest)]["mode"] == "estargz", out
    served = {path for path, _ in mounts_below(lazysnap.mnt_dir)}
    assert len(served) == 2, f"the two lazy layers, and only they, are mounted: {sorted(served)}"

    # lazysnap applied the blob as a tar.gz: the link is the tar's (to data/hl-1), not the TOC's.
    done, _ = run_script(containerd, images.hostile_ref,
                         f"cat /{HARDLINK}; stat -c %h /data/hl-1; /hello.sh; cat /middle.txt", cid)
    assert done.stdout.splitlines() == [HARDLINK_TEXT, "2", HELLO_OUTPUT, MIDDLE_TEXT.strip()], done.stdout
    downloaded = {layer.digest for layer in image.layers} & content_digests(containerd)
    assert not downloaded, f"containerd downloaded layer blobs lazysnap served or pulled: {sorted(downloaded)}"
    assert_nothing_internal(output, containerd, lazysnap)


# ---------------------------------------------------------------------------- 2. full disk

@dataclass
class FullDisk:
    path: Path                    # <root>/layers, a tmpfs
    filler: Path

    def free(self) -> None:
        self.filler.unlink()


def _mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


@pytest.fixture
def full_layers_dir(workdir: Path) -> Iterator[FullDisk]:
    """`<root>/layers` of the `lazysnap` fixture's root as a tmpfs with no room left, made before lazysnap starts.

    Request it before `lazysnap` (and `containerd`): then lazysnap starts on it and is
    stopped before this unmounts it (the lazysnap fixture's teardown unmounts it too).
    """
    layers = workdir / "root" / "layers"
    layers.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={LAYERS_TMPFS_SIZE},mode=0700", "tmpfs", str(layers)],
                   check=True, capture_output=True)
    try:
        filler = layers / FILLER
        chunk = b"\xa5" * (64 << 10)
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
        with pytest.raises(OSError) as full:
            with open(layers / "probe", "wb", buffering=0) as f:
                f.write(b"x")
        assert full.value.errno == errno.ENOSPC
        (layers / "probe").unlink(missing_ok=True)
        assert os.statvfs(layers).f_bavail == 0
        yield FullDisk(layers, filler)
    finally:
        if _mounted(layers):
            subprocess.run(["umount", "-l", str(layers)], capture_output=True)


def test_full_disk_while_saving_indexes_falls_back_then_recovers(full_layers_dir: FullDisk, containerd: Containerd,
                                                                 lazysnap: Lazysnap, images: FallbackImages,
                                                                 cid: str) -> None:
    image, ref = images.estargz, images.estargz_ref
    assert lazysnap.root / "layers" == full_layers_dir.path
    output, rows = rpull(containerd, lazysnap, ref)
    assert list(rows) == [short(layer.digest) for layer in image.layers], output
    for row in rows.values():
        assert row.how == "pulled whole by lazysnap", output
        assert row.why.startswith("cannot save the layer's index under "), output
        assert "No space left on device" in row.why, output
    assert_nothing_internal(output, containerd, lazysnap)

    out, layers = status(lazysnap)
    for layer in image.layers:
        row = layers[short(layer.digest)]
        assert row["mode"] == "whole" and "No space left on device" in row["rest"], out

    done, _ = run_script(containerd, ref, "/hello.sh; cat /middle.txt", cid)
    assert done.stdout.splitlines() == [HELLO_OUTPUT, MIDDLE_TEXT.strip()], done.stdout
    assert mounts_below(lazysnap.mnt_dir) == [], f"layer mounts left: {mounts_below(lazysnap.mnt_dir)}"
    assert listing(lazysnap.mnt_dir) == [], listing(lazysnap.mnt_dir)
    assert listing(full_layers_dir.path) == [FILLER], "a layer that fell back must leave no saved files"

    # Room again: the same image, pulled afresh, is served lazily and its indexes are saved.
    full_layers_dir.free()
    containerd.ctr("images", "rm", "--sync", ref)
    wait_until(lambda: snapshot_keys(containerd) == [], 15, "the whole-pulled snapshots to be removed")
    output, rows = rpull(containerd, lazysnap, ref)
    assert list(rows) == [short(layer.digest) for layer in image.layers], output
    assert all(row.how == "lazy estargz" and row.why == "" for row in rows.values()), output
    out, layers = status(lazysnap)
    assert all(layers[short(layer.digest)]["mode"] == "estargz" for layer in image.layers), out
    saved = listing(full_layers_dir.path)
    assert len(saved) == len(image.layers) and all(name.isdigit() for name in saved), saved
    done, _ = run_script(containerd, ref, "/hello.sh; cat /middle.txt", cid + "-lazy")
    assert done.stdout.splitlines() == [HELLO_OUTPUT, MIDDLE_TEXT.strip()], done.stdout
    assert not set(content_digests(containerd)) & {layer.digest for layer in image.layers}, (
        "the second pull must not download layer blobs")
    assert_nothing_internal(output, containerd, lazysnap)
