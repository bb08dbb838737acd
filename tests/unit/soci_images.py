"""The image the SOCI build/push tests share, and how they push and count.

Two layers large enough to index (random and text files, several spans at the 64 KiB
span size) and one below the 64 KiB minimum, made with the harness (PAX tar,
deterministic gzip) and pushed with skopeo, one repository per test.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from snapshotter.registry.client import RegistryClient
from snapshotter.registry.manifest import OCI_MANIFEST
from snapshotter.registry.options import RegistryOptions, Timeouts
from tests.harness.images import (
    MEDIA_CONFIG,
    Dir,
    Entry,
    File,
    Hardlink,
    Layer,
    OCILayout,
    Symlink,
    gzip_bytes,
    layer_tar,
    push,
    sha256_digest,
)
from tests.harness.registry import Registry

SPAN = 64 << 10
MIN = 64 << 10
LIMIT = 60


@dataclass
class Sample:
    layout: Path
    layers: list[Layer]
    tars: list[bytes]
    files: list[dict[str, bytes]]
    manifest_digest: str

    @property
    def big(self) -> list[Layer]:
        return [layer for layer in self.layers if len(layer.blob) >= MIN]

    @property
    def small(self) -> list[Layer]:
        return [layer for layer in self.layers if len(layer.blob) < MIN]


def layer_entries() -> tuple[list[list[Entry]], list[dict[str, bytes]]]:
    rng = random.Random(20261123)
    random_bin = rng.randbytes(300_000)
    text = b"".join(f"line {i}: {'lorem ipsum ' * (i % 9)}\n".encode() for i in range(40_000))
    mixed = {"data/random.bin": random_bin, "data/text.log": text,
             **{f"data/small/{i:02d}.txt": f"small file {i}\n".encode() * (i + 1) for i in range(30)},
             "data/empty": b""}
    mixed_entries = [Dir("data"), Dir("data/small"), *[File(k, v) for k, v in mixed.items()],
                     Hardlink("data/hardlink", "data/small/07.txt"), Symlink("data/symlink", "text.log")]
    tiny = {"etc/tiny.conf": b"tiny = true\n"}
    tiny_entries = [Dir("etc"), File("etc/tiny.conf", tiny["etc/tiny.conf"])]
    words = [rng.choice(["alpha", "beta", "gamma", "delta", "epsilon"]) for _ in range(5000)]
    texts = {f"srv/doc{i:03d}.md": (" ".join(words[i:i + 2000]) + "\n").encode() * 3 for i in range(120)}
    texts["srv/blob.bin"] = rng.randbytes(200_000)
    text_entries = [Dir("srv"), *[File(k, v) for k, v in texts.items()]]
    return [mixed_entries, tiny_entries, text_entries], [mixed, tiny, texts]


def make_sample() -> Iterator[Sample]:
    tmp = Path(tempfile.mkdtemp(prefix="lzs-soci-", dir="/tmp"))
    try:
        layout = OCILayout(tmp / "layout")
        entries, files = layer_entries()
        tars = [layer_tar(e) for e in entries]
        layers = [Layer(gzip_bytes(t), sha256_digest(t)) for t in tars]
        pushed = layout.add_image("v1", layers, cmd=["/bin/sh"])
        yield Sample(layout.root, layers, tars, files, pushed.manifest_digest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pushed(registry: Registry, image: Sample, repo: str) -> str:
    """The test image in its own repository (each test sees only the referrers it makes)."""
    return push(image.layout, "v1", registry, repo)


def options(tmp_path: Path) -> RegistryOptions:
    return RegistryOptions(timeouts=Timeouts(connect=2.0, read=10.0, request=20.0, operation=40.0),
                           retries=1, backoff_base=0.01, plain_http=True, certs_dir=tmp_path / "certs.d",
                           docker_config=tmp_path / "docker" / "config.json")


def blob_gets(registry: Registry, digest: str, since: int) -> list[int]:
    """Body sizes of the GETs of blob `digest` logged since `since`."""
    return [r.bytes for r in registry.requests(settle=0.2)[since:]
            if r.method == "GET" and r.blob is not None and r.blob[1] == digest]


async def push_by_client(client: RegistryClient, ref: str, layers: list[tuple[bytes, str]],
                         manifest_type: str = OCI_MANIFEST, config_type: str = MEDIA_CONFIG) -> str:
    """An image made of arbitrary blobs and media types; its manifest digest."""
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [sha256_digest(b) for b, _ in layers]}}).encode()
    config_desc = await client.push_blob(ref, config, config_type)
    descs = [(await client.push_blob(ref, blob, media_type)).to_json() for blob, media_type in layers]
    manifest = json.dumps({"schemaVersion": 2, "mediaType": manifest_type, "config": config_desc.to_json(),
                           "layers": descs}).encode()
    return await client.push_manifest(ref, manifest, manifest_type)
