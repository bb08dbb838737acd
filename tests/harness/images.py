"""Build OCI images in Python and push them to a test registry with skopeo.

A layer is a list of declarative entries (`Dir`, `File`, `Symlink`, `Hardlink`,
`CharDev`, `Whiteout`, `Opaque`) written as a PAX tar and gzip-compressed
deterministically, so the same entries always give the same digests.
`OCILayout` writes an OCI image layout directory (blobs, index.json,
oci-layout) that `push` copies to a registry without recompressing.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import tarfile
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .procs import HarnessError, require_tool, run

if TYPE_CHECKING:
    from .registry import Registry

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

DEFAULT_MTIME = 1_700_000_000  # 2023-11-14, any fixed time keeps layers reproducible


# --------------------------------------------------------------------------- entries

@dataclass(frozen=True)
class Entry:
    """One tar member. Use the helper constructors below rather than this directly."""

    path: str                     # inside the image, "/" or relative; normalised to "a/b"
    kind: bytes                   # a tarfile type: DIRTYPE, REGTYPE, SYMTYPE, LNKTYPE, CHRTYPE, BLKTYPE, FIFOTYPE
    mode: int = 0o644             # permission bits incl. setuid/setgid/sticky
    uid: int = 0
    gid: int = 0
    data: bytes = b""             # regular files
    linkname: str = ""            # symlink target (verbatim) or hardlink target (image path)
    devmajor: int = 0
    devminor: int = 0
    mtime: int = DEFAULT_MTIME
    xattrs: dict[str, str | bytes] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return normpath(self.path)


def normpath(path: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts:
        raise ValueError(f"empty path {path!r}")
    return "/".join(parts)


def Dir(path: str, mode: int = 0o755, uid: int = 0, gid: int = 0, **kw) -> Entry:
    return Entry(path, tarfile.DIRTYPE, mode, uid, gid, **kw)


def File(path: str, data: bytes | str = b"", mode: int = 0o644, uid: int = 0, gid: int = 0, **kw) -> Entry:
    if isinstance(data, str):
        data = data.encode()
    return Entry(path, tarfile.REGTYPE, mode, uid, gid, data=data, **kw)


def Symlink(path: str, target: str, uid: int = 0, gid: int = 0, **kw) -> Entry:
    return Entry(path, tarfile.SYMTYPE, 0o777, uid, gid, linkname=target, **kw)


def Hardlink(path: str, target: str) -> Entry:
    """A hard link to `target`, an earlier entry of the same layer (its header copies the target's metadata)."""
    return Entry(path, tarfile.LNKTYPE, linkname=normpath(target))


def CharDev(path: str, major: int, minor: int, mode: int = 0o666, uid: int = 0, gid: int = 0, **kw) -> Entry:
    return Entry(path, tarfile.CHRTYPE, mode, uid, gid, devmajor=major, devminor=minor, **kw)


def Whiteout(path: str) -> Entry:
    """OCI whiteout: deletes `path` of the layers below (written as `dir/.wh.name`)."""
    parent, _, base = normpath(path).rpartition("/")
    return File(f"{parent}/.wh.{base}" if parent else f".wh.{base}", b"", mode=0o644)


def Opaque(dirpath: str) -> Entry:
    """OCI opaque marker: hides everything the layers below have in `dirpath`."""
    return File(f"{normpath(dirpath)}/.wh..wh..opq", b"", mode=0o644)


# --------------------------------------------------------------------------- layers

def _xattr_value(value: str | bytes) -> str:
    # tarfile writes pax values as UTF-8 with surrogateescape, so arbitrary bytes survive.
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def layer_tar(entries: Iterable[Entry]) -> bytes:
    """Uncompressed PAX tar of `entries`, in the given order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        seen: dict[str, Entry] = {}
        for e in entries:
            name = e.name
            if e.kind == tarfile.LNKTYPE:
                target = seen.get(e.linkname)
                if target is None:
                    raise ValueError(f"hardlink {name} -> {e.linkname}: target must come earlier in the same layer")
                # Like GNU tar: a link header repeats its target's metadata. containerd's
                # applier chmods the inode to the link header's mode, so anything else
                # would silently change the target.
                e = replace(e, mode=target.mode, uid=target.uid, gid=target.gid, mtime=target.mtime)
            seen[name] = e
            ti = tarfile.TarInfo(name)
            ti.type = e.kind
            ti.mode = e.mode
            ti.uid, ti.gid = e.uid, e.gid
            ti.uname = ti.gname = ""
            ti.mtime = e.mtime
            ti.linkname = e.linkname
            ti.devmajor, ti.devminor = e.devmajor, e.devminor
            if e.xattrs:
                ti.pax_headers = {f"SCHILY.xattr.{k}": _xattr_value(v) for k, v in e.xattrs.items()}
            if e.kind == tarfile.REGTYPE:
                ti.size = len(e.data)
                tar.addfile(ti, io.BytesIO(e.data))
            else:
                ti.size = 0
                tar.addfile(ti)
    return buf.getvalue()


def gzip_bytes(data: bytes, level: int = 6) -> bytes:
    """Deterministic gzip: no file name, mtime 0."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=level) as gz:
        gz.write(data)
    return buf.getvalue()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Layer:
    """A layer blob: the compressed bytes plus what a manifest and config need."""

    blob: bytes                   # as stored in the registry
    diff_id: str                  # sha256 of the uncompressed tar
    media_type: str = MEDIA_LAYER_GZIP
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return sha256_digest(self.blob)

    @classmethod
    def from_entries(cls, entries: Iterable[Entry], annotations: dict[str, str] | None = None) -> Layer:
        tar = layer_tar(entries)
        return cls(gzip_bytes(tar), sha256_digest(tar), annotations=dict(annotations or {}))


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """containerd/OCI chain IDs: the snapshot names the layers get when unpacked."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else sha256_digest(f"{out[-1]} {d}".encode()))
    return out


# --------------------------------------------------------------------------- OCI layout

def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class Image:
    """What `OCILayout.add_image` wrote: digests to check pulls against."""

    tag: str
    manifest_digest: str
    manifest: bytes
    config_digest: str
    layers: list[Layer]

    @property
    def diff_ids(self) -> list[str]:
        return [layer.diff_id for layer in self.layers]

    @property
    def chain_ids(self) -> list[str]:
        return chain_ids(self.diff_ids)


class OCILayout:
    """An OCI image layout directory holding one or more tagged images."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        (self.root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        self._index: list[dict] = []
        self._write_index()

    def write_blob(self, data: bytes) -> str:
        digest = sha256_digest(data)
        path = self.blobs / digest.split(":", 1)[1]
        if not path.exists():
            path.write_bytes(data)
        return digest

    def add_image(self, tag: str, layers: Sequence[Layer], cmd: Sequence[str] | None = None,
                  env: Sequence[str] = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",),
                  manifest_annotations: dict[str, str] | None = None) -> Image:
        config: dict = {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": list(env)},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            "history": [{"created_by": f"lazysnap test layer {i}"} for i in range(len(layers))],
        }
        if cmd is not None:
            config["config"]["Cmd"] = list(cmd)
        config_bytes = _canonical(config)
        config_digest = self.write_blob(config_bytes)
        layer_descs = []
        for layer in layers:
            self.write_blob(layer.blob)
            desc = {"mediaType": layer.media_type, "digest": layer.digest, "size": len(layer.blob)}
            if layer.annotations:
                desc["annotations"] = dict(layer.annotations)
            layer_descs.append(desc)
        manifest: dict = {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": len(config_bytes)},
            "layers": layer_descs,
        }
        if manifest_annotations:
            manifest["annotations"] = dict(manifest_annotations)
        manifest_bytes = _canonical(manifest)
        manifest_digest = self.write_blob(manifest_bytes)
        self._index = [d for d in self._index if d["annotations"]["org.opencontainers.image.ref.name"] != tag]
        self._index.append({
            "mediaType": MEDIA_MANIFEST, "digest": manifest_digest, "size": len(manifest_bytes),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        })
        self._write_index()
        return Image(tag, manifest_digest, manifest_bytes, config_digest, list(layers))

    def _write_index(self) -> None:
        index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": self._index}
        (self.root / "index.json").write_bytes(_canonical(index))


# --------------------------------------------------------------------------- push

def push(layout_dir: Path, tag: str, registry: Registry, repo_ref: str, image: Image | None = None) -> str:
    """Copy `oci:<layout_dir>:<tag>` to `<registry>/<repo_ref>` unchanged; return the image ref.

    `repo_ref` is "repo" (pushed as repo:<tag>) or "repo:othertag". The pushed
    manifest digest is checked against the local one, so a recompressing copy
    cannot slip through.
    """
    skopeo = require_tool("skopeo", "skopeo")
    repo, _, dest_tag = repo_ref.partition(":")
    dest_tag = dest_tag or tag
    ref = f"{registry.host}/{repo}:{dest_tag}"
    digestfile = Path(layout_dir) / f".pushed-{repo.replace('/', '_')}-{dest_tag}"
    creds = ["--dest-creds", ":".join(registry.credentials)] if registry.credentials else []
    run([skopeo, "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false", *creds,
         "--digestfile", str(digestfile), f"oci:{layout_dir}:{tag}", f"docker://{ref}"], timeout=120)
    pushed = digestfile.read_text().strip()
    digestfile.unlink()
    local = image.manifest_digest if image is not None else _local_manifest_digest(Path(layout_dir), tag)
    remote = registry.manifest_digest(repo, dest_tag)
    if not (pushed == local == remote):
        raise HarnessError(f"push of {tag} changed the manifest: local {local}, skopeo {pushed}, registry {remote}")
    return ref


def _local_manifest_digest(layout_dir: Path, tag: str) -> str:
    index = json.loads((layout_dir / "index.json").read_text())
    for desc in index["manifests"]:
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return desc["digest"]
    raise HarnessError(f"no tag {tag!r} in {layout_dir}/index.json")


def fetch_manifest(host: str, repo: str, reference: str,
                   credentials: tuple[str, str] | None = None) -> tuple[str, bytes]:
    """(Docker-Content-Digest, body) of a manifest from a plain-HTTP registry (basic auth if given)."""
    headers = {"Accept": f"{MEDIA_MANIFEST}, {MEDIA_INDEX}"}
    if credentials is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
    req = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/{reference}", headers=headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        body = resp.read()
        return resp.headers.get("Docker-Content-Digest", ""), body


# --------------------------------------------------------------------------- the sample image

HELLO_OUTPUT = "hello from lazysnap"
MIDDLE_TEXT = "written by the middle layer\n"
XATTR_NAME, XATTR_VALUE = "user.lazysnap.test", "xattr-value-42"
UNICODE_NAME = "data/ünïcødé-文件.txt"
BUSYBOX_SYMLINKS = ("sh", "echo", "cat", "id", "stat", "test", "[", "grep", "wc", "readlink", "head", "mount", "find",
                    "sleep", "true", "false", "touch", "rm", "mkdir", "cut", "tr", "od", "dd", "sha256sum")
BUSYBOX_HARDLINKS = ("ls",)


def busybox_bytes(path: str = "/bin/busybox") -> bytes:
    p = Path(path)
    if not p.exists():
        raise HarnessError(f"{path} is missing (apt-get install busybox-static)")
    data = p.read_bytes()
    if not data.startswith(b"\x7fELF"):
        raise HarnessError(f"{path} is not an ELF binary")
    return data


def sample_layers() -> list[list[Entry]]:
    """The entries of the foundation test image, bottom layer first.

    Layer 0: busybox (symlinked and hardlinked applets), /etc, files that upper layers delete.
    Layer 1: odd modes, ownership, xattrs, unicode, nested dirs, hardlinks, a device.
    Layer 2: whiteouts, an opaque directory, /hello.sh, an overwritten file.
    """
    bb = busybox_bytes()
    base = [
        Dir("bin"), Dir("etc"), Dir("tmp", mode=0o1777), Dir("root", mode=0o700), Dir("dev"),
        Dir("proc", mode=0o555), Dir("sys", mode=0o555), Dir("usr"), Dir("usr/bin"),
        File("bin/busybox", bb, mode=0o755),
        *[Symlink(f"bin/{a}", "busybox") for a in BUSYBOX_SYMLINKS],
        *[Hardlink(f"bin/{a}", "bin/busybox") for a in BUSYBOX_HARDLINKS],
        Symlink("usr/bin/env", "/bin/busybox"),                       # absolute symlink
        File("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:2000:user:/home/user:/bin/sh\n"
                           "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"),
        File("etc/group", "root:x:0:\nusers:x:2000:\nnogroup:x:65534:\n"),
        File("etc/os-release", "NAME=lazysnap-test\n"),
        Dir("data"),
        File("data/doomed.txt", "deleted by a whiteout in layer 2\n"),
        File("data/keep.txt", "kept from layer 0\n"),
        File("data/overwritten.txt", "version from layer 0\n"),
        Dir("data/gone-dir"), File("data/gone-dir/inner.txt", "a whole directory whited out\n"),
        Dir("opaque"), File("opaque/old.txt", "hidden by the opaque marker\n"),
        Dir("opaque/oldsub"), File("opaque/oldsub/deep.txt", "also hidden\n"),
    ]
    middle = [
        File("middle.txt", MIDDLE_TEXT),
        Dir("modes"),
        File("modes/suid", "#!/bin/sh\necho suid\n", mode=0o4755),
        File("modes/sgid-file", "sgid\n", mode=0o2755),
        File("modes/private", "only root\n", mode=0o600),
        File("modes/nothing", "no permissions\n", mode=0o000),
        Dir("modes/sticky", mode=0o1777),
        Dir("modes/sgid-dir", mode=0o2755),
        File("modes/empty", b""),
        Dir("home"), Dir("home/user", mode=0o750, uid=1000, gid=2000),
        File("home/user/owned.txt", "owned by 1000:2000\n", uid=1000, gid=2000),
        File("home/nobody.txt", "owned by nobody\n", mode=0o640, uid=65534, gid=65534),
        Symlink("home/user/link-to-owned", "owned.txt", uid=1000, gid=2000),   # relative, lchown'd
        File("xattr.txt", "has a user xattr\n", xattrs={XATTR_NAME: XATTR_VALUE}),
        File(UNICODE_NAME, "unicode name\n"),
        Dir("a"), Dir("a/b"), Dir("a/b/c"), Dir("a/b/c/d"),
        File("a/b/c/d/deep.txt", "nested four deep\n"),
        Symlink("a/up", "../data/keep.txt"),                                   # relative, climbing
        File("data/hl-1", "two names, one inode\n"),
        Hardlink("data/hl-2", "data/hl-1"),
        CharDev("dev/null-ish", 1, 3, mode=0o666),
    ]
    top = [
        Whiteout("data/doomed.txt"),
        Whiteout("data/gone-dir"),
        Opaque("opaque"),
        File("opaque/new.txt", "the only file left in /opaque\n"),
        File("data/overwritten.txt", "version from layer 2\n", mode=0o640),
        File("hello.sh", f"#!/bin/sh\necho {HELLO_OUTPUT}\n", mode=0o755),
    ]
    return [base, middle, top]


def sample_image(layout: OCILayout, tag: str = "sample") -> Image:
    """Write the foundation test image into `layout` under `tag`."""
    layers = [Layer.from_entries(entries) for entries in sample_layers()]
    return layout.add_image(tag, layers, cmd=["/hello.sh"])
