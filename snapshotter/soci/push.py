"""`lazysnap index push`: publish a locally built SOCI v1 index beside its image.

What goes to the image's own repository (where the runtime looks for it): each zTOC
blob, the `{}` config blob, and the index manifest by digest, with its `subject`
naming the image manifest. `push_referrer` makes it discoverable: a registry with
the referrers API lists it by itself; for one without (distribution 2.8) the fallback
tag `sha256-<hex of the image manifest digest>` is updated. The image is not touched,
so its digest and signatures stay as they were.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..formats import soci_index
from ..formats.errors import FormatError
from ..registry.client import RegistryClient
from ..registry.manifest import Descriptor
from ..registry.reference import Reference
from ..registry.referrers import referrers_tag
from .build import SociError
from .local import LocalIndexes


@dataclass
class PushResult:
    image: str
    manifest_digest: str
    index: Descriptor
    ztocs: int
    ztoc_bytes: int
    referrers_api: bool
    """True: the registry lists referrers itself; False: the fallback tag was updated."""

    @property
    def fallback_tag(self) -> str:
        return referrers_tag(self.manifest_digest)


async def push_index(registry: RegistryClient, local: LocalIndexes, image: str) -> PushResult:
    """Push the index `lazysnap index create` built for `image` (resolved again: the tag may have moved)."""
    manifest = await registry.resolve(image)
    digest = local.index_for(manifest.digest)
    if digest is None:
        raise SociError(f"no index was built on this node for {manifest.ref} ({manifest.digest}) in {local.dir}; "
                        f"run `lazysnap index create {image}` first")
    raw = local.get_blob(digest)
    if raw is None:
        raise SociError(f"index {digest} of {manifest.ref} is missing from {local.dir} (or corrupt); build it again")
    try:
        index = soci_index.parse_index(raw, digest)
    except FormatError as e:
        raise SociError(f"index {digest} in {local.dir} is unusable: {e}") from None
    if index.artifact_type != soci_index.INDEX_V1 or index.subject is None:
        raise SociError(f"index {digest} is a SOCI v2 index: `lazysnap index convert` pushed it with its image")
    if index.subject.digest != manifest.digest:
        raise SociError(f"index {digest} refers to {index.subject.digest}, not to {manifest.digest}")
    ztoc_bytes = await push_artifacts(registry, local, manifest.ref, index)
    pushed = await registry.push_referrer(manifest.ref, raw, soci_index.OCI_MANIFEST)
    api = await registry.supports_referrers_api(manifest.ref)
    return PushResult(str(manifest.ref), manifest.digest, pushed, len(index.ztocs), ztoc_bytes, api)


async def push_artifacts(registry: RegistryClient, local: LocalIndexes, repo: Reference | str,
                         index: soci_index.SociIndex) -> int:
    """Push an index's zTOCs and its `{}` config blob (not the manifest); the zTOC bytes, pushed or already there."""
    total = 0
    for ref in index.ztocs.values():
        data = local.get_blob(ref.digest)
        if data is None:
            raise SociError(f"zTOC {ref.digest} of index {index.digest} is missing from {local.dir}; "
                            "build the index again")
        await registry.push_blob(repo, data, soci_index.ZTOC_MEDIA_TYPE)
        total += len(data)
    await registry.push_blob(repo, soci_index.EMPTY_CONFIG, index.artifact_type)
    return total
