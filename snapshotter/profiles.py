"""Where start profiles live: on this node (`<root>/profiles`), and beside the image in its registry.

The daemon records a profile during an image's first start (`recording.py`) and saves it locally;
`lazysnap profile push` publishes it as a referrer of the image manifest, so the first
start on one node teaches every node. At mount, a local profile wins; otherwise the
registry's newest one is used.

Profiles survive a rebuild. A deploy that builds a new image per commit usually changes
only its top layer, and a profile's ranges are per layer blob, so an image with no
profile of its own borrows, for each of its layers, the ranges another image's profile
recorded for that same layer (`find_shared`), and is recorded as usual. To be found:
- on this node, the store keeps an index `<root>/profiles/layers/<layer hex>` naming the
  image whose profile last covered that layer;
- in the registry, `profile push` also tags the pushed profile manifest, in the image's
  repository, as `lazysnap-profile-<layer hex>` for each layer it covers (81 characters;
  the newest push wins). A new image looks up its layers' tags, largest layer first, a
  few at once, until each layer is covered. Only images of the same repository find
  each other this way, which is where a deploy pushes its builds.
Borrowing cannot make wrong bytes be served: ranges only choose which units of the
layer blob to prefetch, and every unit is verified against its own digest as for any
read. At worst it fetches bytes the new image never reads, at most the layer.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from .atomic import write_atomically
from .formats import profile as fmt
from .formats.errors import FormatError
from .registry.client import RegistryClient
from .registry.errors import NotFoundError, RegistryError
from .registry.reference import parse as parse_reference

log = logging.getLogger(__name__)

LAYER_TAG_PREFIX = "lazysnap-profile-"
"""Tag prefix under which `push` publishes a profile once per layer it covers."""
BORROW_LOOKUPS = 3
"""Layer tags looked up at once: one hit usually covers every layer a rebuild kept."""
BORROW_SECONDS = 10.0
"""Longest the registry search for other images' profiles may take (the image's prefetch
and its recording wait for it)."""
PUSH_TAGS = 4
"""Layer tags pushed at once."""


def layer_tag(layer_digest: str) -> str:
    """The tag a profile covering `layer_digest` is published under, in the image's repository."""
    return LAYER_TAG_PREFIX + _hex(layer_digest)


def _hex(digest: str) -> str:
    if not _is_sha256(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return digest[7:]


def _is_sha256(digest: str) -> bool:
    algorithm, _, hex_ = digest.partition(":")
    return algorithm == "sha256" and len(hex_) == 64 and all(c in "0123456789abcdef" for c in hex_)


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
        self._index(profile)
        return path

    def for_layer(self, layer_digest: str) -> fmt.Profile | None:
        """The profile that last covered `layer_digest` on this node, whatever its image."""
        index = self.dir / "layers"
        try:
            if not index.is_dir() and self.dir.is_dir():  # profiles saved before the index existed
                for earlier in self.all():
                    self._index(earlier)
                index.mkdir(exist_ok=True)
            image = (index / _hex(layer_digest)).read_text().strip()
            profile = self.get(image)
        except (OSError, ValueError):
            return None
        return profile if profile is not None and profile.for_layer(layer_digest) is not None else None

    def _index(self, profile: fmt.Profile) -> None:
        for layer in profile.layers:
            if layer.ranges and _is_sha256(layer.digest):
                write_atomically(self.dir / "layers" / _hex(layer.digest), profile.image.encode())

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


@dataclass(frozen=True)
class Borrowed:
    """What an image without a profile of its own prefetches of one of its layers: the
    ranges another image's profile recorded for that same layer blob."""

    layer: fmt.LayerProfile
    image: str
    """The manifest digest of the image whose profile it is."""
    where: str
    """"this node", or the repository whose registry holds it."""

    @property
    def source(self) -> str:
        """The profile it comes from, in a few words: `repo@sha256:0123456789ab (registry)`, `sha256:… (this node)`."""
        short = self.image[:19]
        return f"{short} (this node)" if self.where == "this node" else f"{self.where}@{short} (registry)"


def fits(layer: fmt.LayerProfile, size: int) -> bool:
    """Whether a profile's ranges can be of a blob of `size` bytes (0: size unknown)."""
    return not size or (max(end for _, end in layer.ranges) <= size if layer.ranges else True)


async def find_shared(registry: RegistryClient, store: ProfileStore, image_ref: str,
                      layers: Sequence[tuple[str, int]], lookups: int = BORROW_LOOKUPS) -> dict[str, Borrowed]:
    """Layer digest -> ranges to borrow, for the layers of an image (digest, size) that another
    image's profile covers: this node's first, then the registry's layer tags, largest layer
    first, `lookups` at once; each hit covers every layer its profile knows. A profile's
    ranges of a layer that do not fit the layer's size are ignored; registry trouble is logged."""
    sizes = {digest: size for digest, size in layers if _is_sha256(digest)}  # a profile names sha256 layers only
    found: dict[str, Borrowed] = {}

    def take(profile: fmt.Profile, where: str) -> None:
        for layer in profile.layers:
            if layer.digest not in sizes or layer.digest in found or not layer.ranges:
                continue  # never a layer the image does not have
            if fits(layer, sizes[layer.digest]):
                found[layer.digest] = Borrowed(layer, profile.image, where)
            else:
                log.warning("ignoring the start profile of %s for layer %s: its ranges end past the layer's %d bytes",
                            profile.image, layer.digest, sizes[layer.digest])

    order = sorted(sizes, key=lambda digest: -sizes[digest])  # stable: bottom-up among equals
    for digest in order:
        if digest not in found:
            local = store.for_layer(digest)
            if local is not None:
                take(local, "this node")
    todo = deque(digest for digest in order if digest not in found)
    seen: set[str] = set()
    repo = parse_reference(image_ref).name

    async def look_up() -> None:
        while todo:
            digest = todo.popleft()
            if digest not in found:
                profile = await _tagged(registry, image_ref, digest, seen)
                if profile is not None:
                    take(profile, repo)

    with trio.move_on_after(BORROW_SECONDS) as scope:
        async with trio.open_nursery() as nursery:
            for _ in range(min(lookups, len(todo))):
                nursery.start_soon(look_up)
    if scope.cancelled_caught:
        log.info("gave up looking for other images' start profiles of %s's layers after %g s", image_ref,
                 BORROW_SECONDS)
    return found


async def _tagged(registry: RegistryClient, image_ref: str, layer: str, seen: set[str]) -> fmt.Profile | None:
    """The profile tagged for `layer` in the image's repository; None if there is none, or it
    is a profile manifest already fetched (`seen`: its layers are taken already, or being)."""
    tag = layer_tag(layer)
    try:
        _, raw, digest = await registry.fetch_manifest(image_ref, tag, accept=fmt.OCI_MANIFEST)
        if digest in seen:
            return None
        seen.add(digest)
        blob, size = fmt.profile_blob(raw)
        profile = fmt.parse(await registry.fetch_blob(image_ref, blob, max_size=size))
    except NotFoundError:
        return None
    except (RegistryError, FormatError) as e:
        log.info("no usable start profile under %s in %s's repository: %s", tag, image_ref, e)
        return None
    return profile


def borrowed_profile(image_digest: str, borrowed: Sequence[Borrowed]) -> fmt.Profile:
    """The profile an image replays when it borrows: the borrowed layers' ranges, nothing else."""
    return fmt.Profile(image_digest, tuple(b.layer for b in borrowed))


def describe_borrowed(borrowed: Sequence[Borrowed]) -> str:
    """`start profile of repo@sha256:… (registry) for 2 shared layers`, per profile borrowed from."""
    counts: dict[str, int] = {}
    for b in borrowed:
        counts[b.source] = counts.get(b.source, 0) + 1
    return "; ".join(f"start profile of {source} for {n} shared layer{'s' if n != 1 else ''}"
                     for source, n in counts.items())


@dataclass
class PushResult:
    image: str
    image_digest: str
    manifest_digest: str
    ranges: int
    bytes: int
    layer_tags: tuple[str, ...] = ()
    """The `lazysnap-profile-<layer>` tags the profile is also published under."""


async def push(registry: RegistryClient, store: ProfileStore, image: str) -> PushResult:
    """Publish this node's profile of `image` as a referrer of its manifest, and under a tag
    per layer it covers, for the images that share those layers (`find_shared`)."""
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
    tags = tuple(layer_tag(layer.digest) for layer in profile.layers if layer.ranges and _is_sha256(layer.digest))
    limit = trio.CapacityLimiter(PUSH_TAGS)

    async def tag(name: str) -> None:
        async with limit:
            await registry.push_manifest(f"{manifest.ref.name}:{name}", body, fmt.OCI_MANIFEST)

    async with trio.open_nursery() as nursery:
        for name in tags:
            nursery.start_soon(tag, name)
    return PushResult(str(manifest.ref), manifest.digest, pushed.digest,
                      sum(len(layer.ranges) for layer in profile.layers), profile.bytes, tags)
