"""Finding the SOCI index of an image, in the order the ecosystem expects.

1. an explicit digest in the label `containerd.io/snapshot/remote/soci.index.digest`;
2. SOCI v2: the `com.amazon.soci.index-digest` annotation on the image manifest;
3. SOCI v1: the referrers of the image manifest of type `…soci.index.v1+json` (the
   referrers API, else the `sha256-<hex>` fallback tag; the client handles both);
4. an index built on this node with `lazysnap index create`.

Every step says why it found nothing, so a layer that falls back can say why too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..formats import soci_index
from ..formats.errors import FormatError
from ..formats.jsondoc import load_object
from ..registry.client import RegistryClient
from ..registry.errors import NotFoundError, RegistryError
from .local import LocalIndexes

MAX_ZTOC_SIZE = 256 << 20


@dataclass
class Discovery:
    """The outcome for one image: the index, or the reasons there is none."""

    index: soci_index.SociIndex | None = None
    source: str = ""
    misses: list[str] = field(default_factory=list)

    @property
    def reason(self) -> str:
        return "no SOCI index (" + "; ".join(self.misses) + ")" if self.misses else "no SOCI index"


async def find_index(registry: RegistryClient, local: LocalIndexes | None, image_ref: str, manifest_digest: str,
                     explicit: str = "", manifest: bytes | None = None) -> Discovery:
    """`manifest`: the image manifest's bytes, verified against `manifest_digest`, if the caller has them."""
    found = Discovery()
    if explicit:
        index = await _load(registry, local, image_ref, explicit, found, "label")
        if index is not None:
            return _found(found, index, "label")
    raw = manifest if manifest is not None else await _image_manifest(registry, image_ref, manifest_digest, found)
    if raw is not None:
        v2 = _annotation(raw, soci_index.INDEX_DIGEST)
        if v2:
            index = await _load(registry, local, image_ref, v2, found, "v2 annotation")
            if index is not None:
                return _found(found, index, "v2")
        else:
            found.misses.append("the image manifest has no SOCI v2 annotation")
    try:
        referrers = await registry.referrers(image_ref, manifest_digest, soci_index.INDEX_V1)
    except RegistryError as e:
        found.misses.append(f"v1 referrers: {e}")
        referrers = []
    if referrers:
        index = await _load(registry, local, image_ref, referrers[-1].digest, found, "v1 referrers")
        if index is not None:
            return _found(found, index, "v1")
    else:
        found.misses.append("no SOCI v1 index refers to the image")
    if local is not None:
        digest = local.index_for(manifest_digest)
        if digest:
            index = await _load(registry, local, image_ref, digest, found, "local")
            if index is not None:
                return _found(found, index, "local")
        else:
            found.misses.append("none built on this node")
    return found


async def fetch_ztoc(registry: RegistryClient, local: LocalIndexes | None, image_ref: str, ref: soci_index.Descriptor) -> bytes:
    """A zTOC's bytes, from this node's store or the image's repository, digest-verified."""
    if ref.size > MAX_ZTOC_SIZE:
        raise FormatError(f"zTOC {ref.digest} claims {ref.size} bytes, more than the {MAX_ZTOC_SIZE} allowed")
    data = local.get_blob(ref.digest) if local is not None else None
    if data is None:
        data = await registry.fetch_blob(image_ref, ref.digest, max_size=ref.size or MAX_ZTOC_SIZE)
    return data


def _found(found: Discovery, index: soci_index.SociIndex, source: str) -> Discovery:
    found.index, found.source = index, source
    return found


async def _image_manifest(registry: RegistryClient, image_ref: str, digest: str, found: Discovery) -> bytes | None:
    try:
        _, raw, _ = await registry.fetch_manifest(image_ref, digest)
    except RegistryError as e:
        found.misses.append(f"image manifest {digest}: {e}")
        return None
    return raw


async def _load(registry: RegistryClient, local: LocalIndexes | None, image_ref: str, digest: str,
                found: Discovery, where: str) -> soci_index.SociIndex | None:
    raw = local.get_blob(digest) if local is not None else None
    try:
        if raw is None:
            _, raw, _ = await registry.fetch_manifest(image_ref, digest)
        return soci_index.parse_index(raw, digest)
    except NotFoundError:
        found.misses.append(f"{where}: index {digest} is not in the registry")
    except (RegistryError, FormatError) as e:
        found.misses.append(f"{where}: index {digest} is unusable: {e}")
    return None


def _annotation(raw: bytes, key: str) -> str:
    try:
        doc = load_object(raw, "manifest")
    except FormatError:
        return ""
    annotations = doc.get("annotations")
    value = annotations.get(key, "") if isinstance(annotations, dict) else ""
    return value if isinstance(value, str) else ""
