"""Where start profiles live: on this node (`<root>/profiles`), and beside the image in its registry.

The daemon records a profile during an image's first start here and saves it locally;
`lazysnap profile push` publishes it as a referrer of the image manifest, so the first
start on one node teaches every node. At mount, a local profile wins; otherwise the
registry's newest one is used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_atomically
from .formats import profile as fmt
from .formats.errors import FormatError
from .registry.client import RegistryClient
from .registry.errors import RegistryError

log = logging.getLogger(__name__)


class ProfileError(Exception):
    """A profile cannot be pushed (none recorded, or it is for another image)."""


class ProfileStore:
    """Profiles on this node, one file per image manifest digest, written atomically."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def get(self, image_digest: str) -> fmt.Profile | None:
        path = self._path(image_digest)
        try:
            profile = fmt.parse(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, FormatError) as e:
            log.warning("ignoring unusable profile %s: %s", path, e)
            return None
        return profile if profile.image == image_digest else None

    def put(self, profile: fmt.Profile) -> Path:
        path = self._path(profile.image)
        write_atomically(path, fmt.encode(profile))
        return path

    def all(self) -> list[fmt.Profile]:
        if not self.dir.is_dir():
            return []
        found = (self.get("sha256:" + p.stem) for p in sorted(self.dir.glob("*.json")))
        return [p for p in found if p is not None]

    def _path(self, image_digest: str) -> Path:
        algorithm, _, hex_ = image_digest.partition(":")
        if algorithm != "sha256" or len(hex_) != 64:
            raise ValueError(f"not a sha256 digest: {image_digest!r}")
        return self.dir / f"{hex_}.json"


async def find_remote(registry: RegistryClient, image_ref: str, image_digest: str) -> fmt.Profile | None:
    """The newest profile pushed beside the image, or None (registry trouble is logged, not raised)."""
    try:
        referrers = await registry.referrers(image_ref, image_digest, fmt.ARTIFACT_TYPE)
        for descriptor in reversed(referrers):
            _, raw, _ = await registry.fetch_manifest(image_ref, descriptor.digest)
            digest, size = fmt.profile_blob(raw)
            profile = fmt.parse(await registry.fetch_blob(image_ref, digest, max_size=size))
            if profile.image == image_digest:
                return profile
            log.warning("profile %s in %s is for %s, not %s; ignored", digest, image_ref, profile.image, image_digest)
    except (RegistryError, FormatError) as e:
        log.info("no usable start profile for %s in its registry: %s", image_ref, e)
    return None


@dataclass
class PushResult:
    image: str
    image_digest: str
    manifest_digest: str
    ranges: int
    bytes: int


async def push(registry: RegistryClient, store: ProfileStore, image: str) -> PushResult:
    """Publish this node's profile of `image` as a referrer of its manifest."""
    manifest = await registry.resolve(image)
    profile = store.get(manifest.digest)
    if profile is None:
        raise ProfileError(f"no start profile of {manifest.ref} ({manifest.digest}) in {store.dir}: run a container "
                           "of it on this node with lazysnap first (the profile is saved when the recording ends)")
    raw = fmt.encode(profile)
    await registry.push_blob(manifest.ref, fmt.EMPTY_CONFIG, fmt.ARTIFACT_TYPE)
    await registry.push_blob(manifest.ref, raw, fmt.ARTIFACT_TYPE)
    body = fmt.build_manifest(raw, manifest.media_type, manifest.digest, len(manifest.raw))
    pushed = await registry.push_referrer(manifest.ref, body, fmt.OCI_MANIFEST)
    return PushResult(str(manifest.ref), manifest.digest, pushed.digest,
                      sum(len(layer.ranges) for layer in profile.layers), profile.bytes)
