"""Foundation acceptance: containerd uses lazysnap exactly like its own overlayfs snapshotter.

Every test runs a private containerd wired to a private lazysnap (see conftest.py)
and pulls the sample image (tests/harness/images.py `sample_layers`) from a
private registry.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from tests.harness.containerd import Containerd
from tests.harness.images import HELLO_OUTPUT, MIDDLE_TEXT, UNICODE_NAME, XATTR_NAME, XATTR_VALUE, Image
from tests.harness.lazysnap import Lazysnap
from tests.harness.procs import HarnessError
from tests.harness.tree import diff_trees, mount_snapshot, snapshot_tree

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

LAZY = "lazysnap"
OVERLAY = "overlayfs"
GC_ROOT = "containerd.io/gc.root"

# What the sample image must look like from inside a container. Each line is
# printed by one command of INSPECT_SCRIPT, in order.
INSPECT_SCRIPT = r"""
/hello.sh
cat /middle.txt
test -e /data/doomed.txt && echo doomed:present || echo doomed:absent
test -e /data/gone-dir && echo gone-dir:present || echo gone-dir:absent
echo "opaque:$(ls -A /opaque | tr '\n' ' ')"
cat /data/overwritten.txt
stat -c '%a %u:%g %n' /bin/busybox /modes/suid /modes/sgid-file /modes/private /modes/nothing /modes/sticky /modes/sgid-dir /tmp /home/user /home/user/owned.txt /home/nobody.txt
stat -c '%s %n' /modes/empty
echo "hardlink:$(stat -c %i /bin/ls)=$(stat -c %i /bin/busybox) $(stat -c %h /bin/busybox)"
echo "data-hardlink:$(stat -c %i /data/hl-1)=$(stat -c %i /data/hl-2)"
echo "symlinks:$(readlink /bin/sh) $(readlink /usr/bin/env) $(readlink /a/up)"
cat /a/up /a/b/c/d/deep.txt
for f in /data/*; do echo "${f#/data/}"; done
ls -ln /home/user/link-to-owned | cut -c1-10,15-30
echo written > /tmp/new-file && cat /tmp/new-file
id -u
"""

EXPECTED_LINES = [
    HELLO_OUTPUT,
    MIDDLE_TEXT.strip(),
    "doomed:absent",
    "gone-dir:absent",
    "opaque:new.txt ",
    "version from layer 2",
    "755 0:0 /bin/busybox",
    "4755 0:0 /modes/suid",
    "2755 0:0 /modes/sgid-file",
    "600 0:0 /modes/private",
    "0 0:0 /modes/nothing",
    "1777 0:0 /modes/sticky",
    "2755 0:0 /modes/sgid-dir",
    "1777 0:0 /tmp",
    "750 1000:2000 /home/user",
    "644 1000:2000 /home/user/owned.txt",
    "640 65534:65534 /home/nobody.txt",
    "0 /modes/empty",
]


def unique(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns() % 10**9}"


def snapshot_rows(containerd: Containerd, snapshotter: str) -> list[tuple[str, str, str]]:
    """`ctr snapshots ls` as sorted (key, parent, kind) rows."""
    out = containerd.ctr("snapshots", "--snapshotter", snapshotter, "ls").stdout.splitlines()
    assert out and out[0].split() == ["KEY", "PARENT", "KIND"], out
    rows = []
    for line in out[1:]:
        cols = line.split()
        if len(cols) == 2:  # no parent
            cols = [cols[0], "", cols[1]]
        rows.append(tuple(cols))
    return sorted(rows)


def snapshot_dirs(daemon: Lazysnap) -> list[str]:
    d = daemon.root / "snapshots"
    return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


# ---------------------------------------------------------------------------- pull and run

def test_pull_and_run(containerd: Containerd, lazysnap: Lazysnap, sample: tuple[Image, str], cid: str) -> None:
    image, ref = sample
    containerd.pull(ref, LAZY)
    rows = snapshot_rows(containerd, LAZY)
    chain = image.chain_ids
    assert rows == sorted([(chain[0], "", "Committed"), (chain[1], chain[0], "Committed"),
                           (chain[2], chain[1], "Committed")])

    done = containerd.run_container(ref, cid, "sh", "-c", INSPECT_SCRIPT, snapshotter=LAZY)
    lines = done.stdout.splitlines()
    assert lines[:len(EXPECTED_LINES)] == EXPECTED_LINES, done.stdout
    rest = lines[len(EXPECTED_LINES):]
    hardlink, data_hardlink, symlinks = rest[0], rest[1], rest[2]
    a, _, b_and_n = hardlink.removeprefix("hardlink:").partition("=")
    b, nlink = b_and_n.split()
    assert a == b and nlink == "2", f"/bin/ls must be a hard link of /bin/busybox: {hardlink}"
    x, _, y = data_hardlink.removeprefix("data-hardlink:").partition("=")
    assert x == y, data_hardlink
    assert symlinks == "symlinks:busybox /bin/busybox ../data/keep.txt"
    assert rest[3:5] == ["kept from layer 0", "nested four deep"]
    data_listing = rest[5:5 + 5]
    assert data_listing == sorted(["hl-1", "hl-2", "keep.txt", "overwritten.txt", UNICODE_NAME.split("/")[1]])
    assert rest[10].startswith("lrwxrwxrwx") and "1000" in rest[10] and "2000" in rest[10], rest[10]
    assert rest[11:] == ["written", "0"]


def test_restart_between_pull_and_run(containerd: Containerd, lazysnap: Lazysnap, sample: tuple[Image, str],
                                      cid: str) -> None:
    image, ref = sample
    containerd.pull(ref, LAZY)
    before = snapshot_rows(containerd, LAZY)
    lazysnap.restart()
    containerd.wait_for_snapshotter(LAZY)  # containerd redials the plugin by itself
    assert snapshot_rows(containerd, LAZY) == before
    done = containerd.run_container(ref, cid, "sh", "-c", "/hello.sh; cat /middle.txt", snapshotter=LAZY)
    assert done.stdout.splitlines() == [HELLO_OUTPUT, MIDDLE_TEXT.strip()]


# ---------------------------------------------------------------------------- same tree as overlayfs

def test_tree_matches_overlayfs(containerd: Containerd, lazysnap: Lazysnap, sample: tuple[Image, str],
                                workdir: Path) -> None:
    image, ref = sample
    trees = {}
    layer_trees: dict[str, list] = {}
    for snapshotter in (OVERLAY, LAZY):
        containerd.pull(ref, snapshotter)
        container = unique(f"tree-{snapshotter}")
        containerd.ctr("containers", "create", "--snapshotter", snapshotter, ref, container)
        with mount_snapshot(containerd, snapshotter, container, workdir / f"mnt-{snapshotter}") as root:
            trees[snapshotter] = snapshot_tree(root)
        # The image as seen through a read-only view at each layer depth (a bind
        # mount for the base layer, an overlay without upperdir above it).
        containerd.gc()
        layer_trees[snapshotter] = []
        for depth, chain_id in enumerate(image.chain_ids):
            view = unique(f"view{depth}-{snapshotter}")
            containerd.ctr("snapshots", "--snapshotter", snapshotter, "view", view, chain_id)
            containerd.ctr("snapshots", "--snapshotter", snapshotter, "label", view, f"{GC_ROOT}=pinned")
            with mount_snapshot(containerd, snapshotter, view, workdir / f"view-{snapshotter}") as root:
                layer_trees[snapshotter].append(snapshot_tree(root))

    overlay = trees[OVERLAY]
    # The reference tree really is the sample image (else an empty comparison could pass).
    assert overlay["bin/busybox"].hardlinks == ("bin/busybox", "bin/ls")
    assert overlay["bin/busybox"].mode == 0o100755
    assert "data/doomed.txt" not in overlay and "data/gone-dir" not in overlay
    assert sorted(p for p in overlay if p.startswith("opaque/")) == ["opaque/new.txt"]
    assert dict(overlay["xattr.txt"].xattrs)[XATTR_NAME] == XATTR_VALUE.encode()
    assert overlay["modes/suid"].mode == 0o104755
    assert overlay[UNICODE_NAME].type == "file"
    assert overlay["dev/null-ish"].rdev == (1, 3)
    assert overlay["usr/bin/env"].target == "/bin/busybox"

    assert diff_trees(overlay, trees[LAZY], OVERLAY, LAZY) == []
    assert "middle.txt" not in layer_trees[OVERLAY][0] and "middle.txt" in layer_trees[OVERLAY][1]
    assert "data/doomed.txt" in layer_trees[OVERLAY][1] and "data/doomed.txt" not in layer_trees[OVERLAY][2]
    for depth in range(len(image.chain_ids)):
        assert diff_trees(layer_trees[OVERLAY][depth], layer_trees[LAZY][depth], OVERLAY, LAZY) == [], (
            f"view of layer {depth}")


# ---------------------------------------------------------------------------- garbage collection

def test_image_rm_gc_removes_snapshots(containerd: Containerd, lazysnap: Lazysnap, sample: tuple[Image, str],
                                       cid: str) -> None:
    image, ref = sample
    containerd.pull(ref, LAZY)
    containerd.run_container(ref, cid, "/hello.sh", snapshotter=LAZY)
    # The container's rw snapshot is gone (GC after `run --rm`); the three layers stay.
    wait_for(lambda: len(snapshot_dirs(lazysnap)) == 3, 10, "only the 3 layer snapshots to remain")
    assert len(snapshot_rows(containerd, LAZY)) == 3

    containerd.ctr("images", "rm", "--sync", ref)
    wait_for(lambda: snapshot_rows(containerd, LAZY) == [], 10, "ctr snapshots ls to be empty")
    wait_for(lambda: snapshot_dirs(lazysnap) == [], 10,
             f"{lazysnap.root}/snapshots to be empty (has {snapshot_dirs(lazysnap)})")
    assert lazysnap.proc is not None and lazysnap.proc.running


# ---------------------------------------------------------------------------- ctr snapshots commands

USAGE_LINE = re.compile(r"^(?P<key>\S+)\s+(?P<size>[\d.]+\s*[KMGT]?i?B)\s+(?P<inodes>\d+)$")
SIZE_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "kB": 1000, "MB": 1000**2, "GB": 1000**3}


def parse_size(text: str) -> float:
    m = re.match(r"^([\d.]+)\s*(\S+)$", text)
    assert m, text
    return float(m[1]) * SIZE_UNITS[m[2]]


def snapshot_session(containerd: Containerd, snapshotter: str, image: Image, ref: str, root: Path) -> dict:
    """The same sequence of `ctr snapshots` commands; returns what they showed, normalised."""
    chain = image.chain_ids
    seen: dict = {}

    def ctr(*args: str, check: bool = True):
        return containerd.ctr("snapshots", "--snapshotter", snapshotter, *args, check=check)

    containerd.pull(ref, snapshotter)
    seen["ls after pull"] = snapshot_rows(containerd, snapshotter)

    usage = {}
    lines = ctr("usage").stdout.splitlines()
    assert lines[0].split() == ["KEY", "SIZE", "INODES"], lines
    for line in lines[1:]:
        m = USAGE_LINE.match(line.strip())
        assert m, f"unparsable usage line {line!r}"
        usage[m["key"]] = (parse_size(m["size"]), int(m["inodes"]))
    seen["usage keys"] = sorted(usage)
    seen["usage raw"] = usage

    # Snapshots made by `ctr snapshots prepare/view` are garbage: the next GC (any
    # deletion schedules one) removes them. Let the pull's GC finish, then pin them.
    containerd.gc()
    ctr("prepare", "act1", chain[-1])
    ctr("view", "view1", chain[-1])
    ctr("view", "view-base", chain[0])
    ctr("label", "act1", f"{GC_ROOT}=pinned")
    ctr("label", "view1", f"{GC_ROOT}=pinned")
    ctr("label", "view-base", f"{GC_ROOT}=pinned")
    seen["ls with active and views"] = snapshot_rows(containerd, snapshotter)
    for key in ("act1", "view1", "view-base"):
        seen[f"mounts {key}"] = normalise_mounts(ctr("mounts", "/target", key).stdout, root)

    # Labels: one that stays in containerd and one it passes on to the snapshotter.
    ctr("label", chain[-1], "test.lazysnap/plain=1", "containerd.io/snapshot/test=passed")
    info = json.loads(ctr("info", chain[-1]).stdout)
    seen["info labelled"] = {k: info.get(k) for k in ("Kind", "Name", "Parent", "Labels")}
    ctr("label", chain[-1], "test.lazysnap/plain=", "containerd.io/snapshot/test=")
    info = json.loads(ctr("info", chain[-1]).stdout)
    seen["info unlabelled"] = {k: info.get(k) for k in ("Kind", "Name", "Parent", "Labels")}
    info = json.loads(ctr("info", "act1").stdout)
    seen["info act1"] = {k: info.get(k) for k in ("Kind", "Name", "Parent", "Labels")}

    seen["rm leaf"] = ctr("rm", "act1", check=False).returncode
    parent_rm = ctr("rm", chain[1], check=False)
    seen["rm parent"] = (parent_rm.returncode, parent_rm.stderr.replace(snapshotter, "<snapshotter>").strip())
    seen["rm views"] = ctr("rm", "view1", "view-base", check=False).returncode
    seen["ls after rm"] = snapshot_rows(containerd, snapshotter)
    return seen


LAYER_MARKERS = {"bin/busybox": "layer0", "middle.txt": "layer1", "hello.sh": "layer2"}


def normalise_mounts(text: str, root: Path) -> str:
    """Replace each `<root>/<id>/{fs,work}` by what that directory holds (layer0..2, or empty).

    Snapshot ids are private to each snapshotter, but which layer sits where in
    `lowerdir=` (nearest first) is not, so the comparison keeps the order.
    """
    def label(m: re.Match) -> str:
        fs = root / m[1] / "fs"
        held = [name for marker, name in LAYER_MARKERS.items() if os.path.lexists(fs / marker)]
        what = "+".join(held) or ("empty" if fs.is_dir() else "missing")
        return f"<{what}>/{m[2]}"

    return re.sub(rf"{re.escape(str(root))}/(\d+)/(fs|work)", label, text)


def test_snapshot_commands_match_overlayfs(containerd: Containerd, lazysnap: Lazysnap,
                                           sample: tuple[Image, str]) -> None:
    image, ref = sample
    overlay = snapshot_session(containerd, OVERLAY, image, ref,
                               containerd.root / "io.containerd.snapshotter.v1.overlayfs" / "snapshots")
    lazy = snapshot_session(containerd, LAZY, image, ref, lazysnap.root / "snapshots")
    chain = image.chain_ids

    # overlayfs behaves as documented (guards against a vacuous comparison) ...
    assert [r[0] for r in overlay["ls with active and views"]] == sorted([*chain, "act1", "view1", "view-base"])
    assert overlay["info labelled"]["Labels"] == {"test.lazysnap/plain": "1", "containerd.io/snapshot/test": "passed"}
    assert not overlay["info unlabelled"]["Labels"]
    assert overlay["rm leaf"] == 0 and overlay["rm views"] == 0
    assert overlay["rm parent"][0] != 0 and "child" in overlay["rm parent"][1]

    # ... and lazysnap the same way.
    for key in ("ls after pull", "ls with active and views", "info labelled", "info unlabelled", "info act1",
                "rm leaf", "rm parent", "rm views", "ls after rm", "usage keys"):
        assert lazy[key] == overlay[key], f"{key}: {OVERLAY}={overlay[key]!r} {LAZY}={lazy[key]!r}"

    for key in chain:
        size, inodes = lazy["usage raw"][key]
        assert size > 0 and inodes > 0, f"usage of {key}: {lazy['usage raw'][key]}"
        assert inodes == overlay["usage raw"][key][1], (key, overlay["usage raw"][key], lazy["usage raw"][key])

    # (containerd adds index=off whenever the kernel has the overlay `index` parameter.)
    assert overlay["mounts act1"].split("-o ")[1].strip().removeprefix("index=off,") == (
        "workdir=<empty>/work,upperdir=<empty>/fs,lowerdir=<layer2>/fs:<layer1>/fs:<layer0>/fs")
    for key in ("mounts act1", "mounts view1", "mounts view-base"):
        assert lazy[key] == overlay[key], f"{key}:\n{OVERLAY}: {overlay[key]}\n{LAZY}: {lazy[key]}"


def test_harness_rejects_bad_ctr_call(containerd: Containerd) -> None:
    """The harness surfaces ctr failures with their output (tests rely on it)."""
    with pytest.raises(HarnessError, match="not found"):
        containerd.ctr("snapshots", "--snapshotter", LAZY, "info", "no-such-snapshot")
