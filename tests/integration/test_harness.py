"""The test harness itself: the integration tests are only as good as these helpers."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import urllib.request
from pathlib import Path

import pytest

from tests.harness.images import (
    CharDev, Dir, File, Hardlink, Image, Layer, Opaque, Symlink, Whiteout, chain_ids, layer_tar, sha256_digest,
)
from tests.harness.registry import Registry, parse_access_log
from tests.harness.tree import diff_trees, snapshot_tree

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


# ---------------------------------------------------------------------------- registry log

LOG = """\
time="2026-11-23T13:07:44.838018177Z" level=info msg="response completed" http.request.method=GET http.request.uri=/v2/ http.response.status=200 http.response.written=2
127.0.0.1 - - [23/Nov/2026:13:07:44 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
127.0.0.1 - - [23/Nov/2026:13:07:45 +0000] "GET /v2/r/x/blobs/sha256:abcd HTTP/1.1" 206 100 "" "lazysnap/0.1"
127.0.0.1 - - [23/Nov/2026:13:07:46 +0000] "HEAD /v2/r/manifests/latest HTTP/1.1" 200 0 "" "ctr/1.6"
127.0.0.1 - - [23/Nov/2026:13:07:47 +0000] "PUT /v2/r/blobs/uploads/u?_state=a%3D&digest=sha256%3A00 HTTP/1.1" 201 - "" "skopeo/1.9.3"
"""


def test_parse_access_log() -> None:
    reqs = parse_access_log(LOG)
    assert [(r.method, r.path, r.status, r.bytes) for r in reqs] == [
        ("GET", "/v2/", 200, 2),
        ("GET", "/v2/r/x/blobs/sha256:abcd", 206, 100),
        ("HEAD", "/v2/r/manifests/latest", 200, 0),
        ("PUT", "/v2/r/blobs/uploads/u?_state=a%3D&digest=sha256%3A00", 201, 0),
    ]
    assert reqs[1].blob == ("r/x", "sha256:abcd") and reqs[1].agent == "lazysnap/0.1"
    assert reqs[0].blob is None and reqs[2].blob is None


def test_registry_logs_bytes_per_blob(registry: Registry, sample: tuple[Image, str]) -> None:
    image, _ = sample
    blob = image.layers[0]
    mark = registry.mark()
    url = f"{registry.url}/v2/lazysnap/sample/blobs/{blob.digest}"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=100-1123"})) as resp:
        assert resp.status == 206 and resp.read() == blob.blob[100:1124]
    with urllib.request.urlopen(url) as resp:
        assert resp.read() == blob.blob
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as resp:
        assert resp.status == 200
    new = [(r.method, r.status, r.bytes) for r in registry.requests(settle=0.2)[mark:] if r.blob]
    assert new == [("GET", 206, 1024), ("GET", 200, len(blob.blob)), ("HEAD", 200, 0)]
    assert registry.blob_bytes_served(blob.digest, since=mark) == 1024 + len(blob.blob)


# ---------------------------------------------------------------------------- images

def members(layer: Layer) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer.blob))) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_layers_are_deterministic_and_complete() -> None:
    entries = [
        Dir("d", mode=0o2755, uid=1000, gid=2000),
        File("d/f", b"data", mode=0o4755, xattrs={"user.k": "v", "user.bin": b"\xff\x00"}),
        Hardlink("d/h", "d/f"),
        Symlink("d/s", "../d/f"),
        CharDev("d/c", 1, 3),
        Whiteout("old/file"), Opaque("dir"),
    ]
    a, b = Layer.from_entries(entries), Layer.from_entries(entries)
    assert a.blob == b.blob and a.digest == b.digest
    assert a.diff_id == sha256_digest(layer_tar(entries)) == sha256_digest(gzip.decompress(a.blob))
    m = members(a)
    assert list(m) == ["d", "d/f", "d/h", "d/s", "d/c", "old/.wh.file", "dir/.wh..wh..opq"]
    assert m["d"].mode == 0o2755 and (m["d"].uid, m["d"].gid) == (1000, 2000)
    assert m["d/f"].pax_headers["SCHILY.xattr.user.k"] == "v"
    assert m["d/f"].pax_headers["SCHILY.xattr.user.bin"].encode("utf-8", "surrogateescape") == b"\xff\x00"
    # A hard link header carries its target's mode: containerd chmods the inode to it.
    assert m["d/h"].islnk() and m["d/h"].linkname == "d/f" and m["d/h"].mode == 0o4755
    assert m["d/s"].issym() and m["d/s"].linkname == "../d/f"
    assert m["d/c"].ischr() and (m["d/c"].devmajor, m["d/c"].devminor) == (1, 3)
    with pytest.raises(ValueError, match="earlier"):
        layer_tar([Hardlink("x", "y")])


def test_chain_ids() -> None:
    d = ["sha256:" + "1" * 64, "sha256:" + "2" * 64]
    assert chain_ids(d) == [d[0], sha256_digest(f"{d[0]} {d[1]}".encode())]


def test_pushed_image_is_unchanged(registry: Registry, sample: tuple[Image, str]) -> None:
    image, ref = sample
    repo, _, tag = ref.split("/", 1)[1].partition(":")
    assert registry.manifest_digest(repo, tag) == image.manifest_digest
    assert len(image.layers) == 3 and len(image.chain_ids) == 3


# ---------------------------------------------------------------------------- trees

def make_tree(root: Path) -> None:
    (root / "d").mkdir()
    (root / "d" / "f").write_bytes(b"content")
    os.chmod(root / "d" / "f", 0o4755)
    os.link(root / "d" / "f", root / "d" / "h")
    (root / "d" / "g").write_bytes(b"other")
    os.symlink("f", root / "d" / "s")
    os.setxattr(root / "d" / "g", "user.k", b"v")
    os.mknod(root / "c", 0o600 | 0o020000, os.makedev(1, 3))


@pytest.fixture
def two_trees(workdir: Path) -> tuple[Path, Path]:
    a, b = workdir / "a", workdir / "b"
    a.mkdir()
    b.mkdir()
    make_tree(a)
    make_tree(b)
    return a, b


def test_equal_trees_have_no_diff(two_trees: tuple[Path, Path]) -> None:
    a, b = two_trees
    ta = snapshot_tree(a)
    assert diff_trees(ta, snapshot_tree(b)) == []
    assert ta["d/f"].hardlinks == ("d/f", "d/h") and ta["d/g"].hardlinks == ()
    assert ta["d/f"].mode == 0o104755 and ta["d/s"].target == "f" and ta["c"].rdev == (1, 3)
    assert dict(ta["d/g"].xattrs) == {"user.k": b"v"}


TREE_CHANGES = [
    (lambda b: os.chmod(b / "d" / "g", 0o600), "d/g: mode differs"),
    (lambda b: os.lchown(b / "d" / "g", 7, 8), "d/g: uid differs"),
    (lambda b: (b / "d" / "g").write_bytes(b"OTHER"), "d/g: sha256 differs"),
    (lambda b: (b / "d" / "g").write_bytes(b"longer"), "d/g: size differs"),
    (lambda b: os.removexattr(b / "d" / "g", "user.k"), "d/g: xattrs differs"),
    (lambda b: ((b / "d" / "s").unlink(), os.symlink("g", b / "d" / "s")), "d/s: target differs"),
    (lambda b: (b / "d" / "g").unlink(), "d/g: only in a"),
    (lambda b: (b / "new").mkdir(), "new: only in b"),
    (lambda b: ((b / "d" / "h").unlink(), (b / "d" / "h").write_bytes(b"content"), os.chmod(b / "d" / "h", 0o4755)),
     "d/f: hardlinks differs"),
]


@pytest.mark.parametrize("change, expected", TREE_CHANGES, ids=[e for _, e in TREE_CHANGES])
def test_tree_differences_are_reported(two_trees: tuple[Path, Path], change, expected: str) -> None:
    a, b = two_trees
    change(b)
    diff = diff_trees(snapshot_tree(a), snapshot_tree(b))
    assert any(line.startswith(expected) for line in diff), diff
