"""Fakes behind the control plane's protocols, shared by test_served.py and test_manager.py.

- `FakePlane`: a `DataPlane` (`layers/served.py`) that records attaches and detaches;
- `FakeRegistry`: what the layer resolver, `RestoredBlob`, image discovery
  (`soci.discovery.find_index`) and `profiles.find_remote` call on the registry client,
  answering "not found" the way the real client does (`NotFoundError`);
- `build`: an eStargz layer of a few files, with the facts tests check against.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import trio

from snapshotter.layers.served import PlaneStats

from snapshotter.registry.errors import NotFoundError
from snapshotter.store import LayerRecord
from tests.harness.estargz import build_estargz
from tests.harness.images import File

CHUNK = 64 << 10


@dataclass
class FakePlane:
    """A `DataPlane` that records what it is asked; `attach` raises `attach_error` if set."""

    base: Path
    serving: set[int] = field(default_factory=set)
    attach_error: Exception | None = None
    attached: list[tuple[LayerRecord, bool]] = field(default_factory=list)
    detached: list[int] = field(default_factory=list)

    @property
    def mnt_dir(self) -> Path:
        return self.base / "mnt"

    def layer_path(self, layer_id: int) -> Path:
        return self.mnt_dir / str(layer_id)

    def served(self) -> set[int]:
        return set(self.serving)

    async def attach(self, record: LayerRecord, kernel_metadata: bool) -> str:
        await trio.lowlevel.checkpoint()
        if self.attach_error is not None:
            raise self.attach_error
        self.attached.append((record, kernel_metadata))
        self.serving.add(record.id)
        return "erofs" if kernel_metadata else "fuse"

    async def detach(self, layer_id: int) -> None:
        await trio.lowlevel.checkpoint()
        self.detached.append(layer_id)
        self.serving.discard(layer_id)

    async def stats(self) -> PlaneStats:
        return PlaneStats({"read_bytes": 0, "read_errors": 0, "ops": []})

    def generations(self) -> list[dict[str, object]]:
        return []


@dataclass
class _Location:
    digest: str
    size: int


@dataclass
class _Manifest:
    digest: str
    raw: bytes


class FakeRegistry:
    """A registry holding `blobs` (digest -> bytes) of one image, whose manifest digest is `manifest_digest`.

    `open_blob` raises `open_error` if set, or never answers if `hang_open`. The image has
    no SOCI index and no start profile: those lookups end in `NotFoundError` or nothing.
    """

    def __init__(self, blobs: dict[str, bytes], manifest_digest: str = "sha256:" + "d" * 64) -> None:
        self.blobs = blobs
        self.manifest_digest = manifest_digest
        self.manifest = b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "layers": []}'
        """The image manifest's bytes (a test may give its layers annotations); served as `manifest_digest`."""
        self.open_error: Exception | None = None
        self.hang_open = False
        self.opened: list[tuple[str, str]] = []
        self.ranges: list[tuple[int, int]] = []
        self.reads: list[tuple[str, int, int]] = []
        """(digest, start, end) of every `read_range`."""
        self.calls: list[str] = []
        """Every method called, in order."""

    def opens_of(self, digest: str) -> int:
        return sum(1 for _, d in self.opened if d == digest)

    async def open_blob(self, ref: str, digest: str) -> _Location:
        self.calls.append("open_blob")
        self.opened.append((ref, digest))
        await trio.lowlevel.checkpoint()
        if self.hang_open:
            await trio.sleep_forever()
        if self.open_error is not None:
            raise self.open_error
        if digest not in self.blobs:
            raise NotFoundError(f"blob {digest} of {ref}: not found")
        return _Location(digest, len(self.blobs[digest]))

    async def read_range(self, location: _Location, start: int, end: int) -> bytes:
        self.calls.append("read_range")
        self.ranges.append((start, end))
        self.reads.append((location.digest, start, end))
        await trio.lowlevel.checkpoint()
        return self.blobs[location.digest][start:end]

    async def resolve(self, ref: str) -> _Manifest:
        self.calls.append("resolve")
        await trio.lowlevel.checkpoint()
        return _Manifest(self.manifest_digest, self.manifest)

    async def fetch_manifest(self, ref: str, digest_or_tag: str, accept: str = "") -> tuple[str, bytes, str]:
        self.calls.append("fetch_manifest")
        await trio.lowlevel.checkpoint()
        if digest_or_tag == self.manifest_digest:
            return "application/vnd.oci.image.manifest.v1+json", self.manifest, self.manifest_digest
        raise NotFoundError(f"manifest {digest_or_tag} of {ref}: not found")

    async def referrers(self, ref: str, subject_digest: str, artifact_type: str | None = None) -> list[object]:
        self.calls.append("referrers")
        await trio.lowlevel.checkpoint()
        return []

    async def fetch_blob(self, ref: str, digest: str, max_size: int | None = None) -> bytes:
        self.calls.append("fetch_blob")
        await trio.lowlevel.checkpoint()
        if digest not in self.blobs:
            raise NotFoundError(f"blob {digest} of {ref}: not found")
        return self.blobs[digest]


def layer_files(seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {"big.bin": rng.randbytes(3 * CHUNK + 123), "etc/conf": f"seed {seed}\n".encode(),
            f"lib/mod{seed}.py": b"x = 1\n" * 50}


@dataclass
class Built:
    files: dict[str, bytes]
    blob: bytes
    digest: str
    toc_digest: str


def build(seed: int) -> Built:
    files = layer_files(seed)
    built = build_estargz([File(name, data) for name, data in files.items()], chunk_size=CHUNK)
    assert built.digest == "sha256:" + hashlib.sha256(built.blob).hexdigest()
    return Built(files, built.blob, built.digest, built.toc_digest)
