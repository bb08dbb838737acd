"""`lazysnap index convert`: the SOCI v2 form, a new image that names its own index.

v1 keeps the image and hangs the index off it (referrers); v2 makes a new image
manifest carrying `com.amazon.soci.index-digest`, so finding the index costs one
manifest read and works on every registry. The new manifest has the original's
config and layers (nothing is uploaded but zTOCs and manifests); Docker media types
become their OCI equivalents, since an OCI manifest is what may carry annotations.
NEW-REF is an OCI image index holding the new image manifest and the index manifest
(`artifactType …index.v2+json`, `com.amazon.soci.image-manifest-digest`), both with the
platform. The original image and its tag are untouched. Facts: shared/research/soci.md §2.

Only the image for the client's platform (linux/amd64) is converted: when IMAGE is a
multi-platform index, NEW-REF holds that one platform (the report says so).

NEW-REF must be in the image's repository: zTOCs and layers are fetched from the
repository of the image that lists them, and lazysnap does not copy layers.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from ..formats import soci_index
from ..formats.errors import FormatError
from ..formats.jsondoc import load_object
from ..registry import digest as digests
from ..registry.client import RegistryClient
from ..registry.errors import BadResponse
from ..registry.manifest import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, Manifest
from ..registry.reference import Reference, parse
from .build import (
    BUILD_TOOL,
    DEFAULT_JOBS,
    DEFAULT_MIN_LAYER_SIZE,
    DEFAULT_SPAN_SIZE,
    LayerResult,
    Progress,
    SociError,
    build_ztocs,
    indexed_refs,
)
from .local import LocalIndexes
from .push import push_artifacts

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_TO_OCI = {
    DOCKER_MANIFEST: OCI_MANIFEST,
    "application/vnd.docker.container.image.v1+json": OCI_CONFIG,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip":
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "application/vnd.oci.image.layer.v1.tar",
}


@dataclass
class ConvertResult:
    image: str
    manifest_digest: str
    """The original image manifest, unchanged."""
    new_ref: str
    index_digest: str
    """The OCI image index now at `new_ref`."""
    image_manifest_digest: str
    """The new image manifest (the original plus the annotation)."""
    soci_index_digest: str
    soci_index: bytes
    platform: dict[str, Any]
    layers: list[LayerResult]
    ztoc_bytes: int
    seconds: float
    source_index: str = ""
    """The image index IMAGE named, when it was one: only the chosen platform is in NEW-REF."""


async def convert(registry: RegistryClient, local: LocalIndexes, image: str, new_ref: str, *,
                  span_size: int = DEFAULT_SPAN_SIZE, min_layer_size: int = DEFAULT_MIN_LAYER_SIZE,
                  force: bool = False, jobs: int = DEFAULT_JOBS, progress: Progress | None = None) -> ConvertResult:
    start = time.monotonic()
    source, target = parse(image), parse(new_ref)
    if (target.domain, target.path) != (source.domain, source.path):
        raise SociError(f"{new_ref} must be in the repository of {image} ({source.name}): the converted image "
                        "shares its layers, and lazysnap does not copy them")
    if target.digest is not None or target.tag is None:
        raise SociError(f"{new_ref} must name a tag (the converted image index is pushed under it)")
    manifest = await registry.resolve(source)
    if soci_index.INDEX_DIGEST in manifest.annotations:
        raise SociError(f"{manifest.ref} is already a SOCI v2 image (its manifest names index "
                        f"{manifest.annotations[soci_index.INDEX_DIGEST]})")
    layers = await build_ztocs(registry, local, manifest, span_size=span_size, min_layer_size=min_layer_size,
                               force=force, jobs=jobs, progress=progress)
    refs = [soci_index.Descriptor(r.media_type, r.digest, r.size, {
        **r.annotations, soci_index.LAYER_MEDIA_TYPE: DOCKER_TO_OCI.get(r.annotations[soci_index.LAYER_MEDIA_TYPE],
                                                                         r.annotations[soci_index.LAYER_MEDIA_TYPE]),
    }) for r in indexed_refs(image, layers)]
    index_raw = soci_index.build_index(refs, subject=None, artifact_type=soci_index.INDEX_V2, build_tool=BUILD_TOOL)
    index = soci_index.parse_index(index_raw)
    platform = await _platform(registry, manifest)
    new_manifest = _annotated(manifest, index.digest)
    repo = Reference(source.domain, source.path)

    ztoc_bytes = await push_artifacts(registry, local, repo, index)
    await registry.push_manifest(repo.with_digest(index.digest), index_raw, OCI_MANIFEST)
    new_digest = await registry.push_manifest(repo.with_digest(digests.of(new_manifest)), new_manifest, OCI_MANIFEST)
    image_index = _image_index(new_digest, len(new_manifest), index.digest, len(index_raw), platform)
    top = await registry.push_manifest(target, image_index, OCI_INDEX)

    local.put_blob(index_raw)
    local.set_index(new_digest, index.digest)
    local.set_name(new_digest, str(target))
    return ConvertResult(str(manifest.ref), manifest.digest, str(target), top, new_digest, index.digest, index_raw,
                         platform, layers, ztoc_bytes, time.monotonic() - start, manifest.index_digest or "")


def _annotated(manifest: Manifest, index_digest: str) -> bytes:
    """The image manifest as OCI, with the v2 annotation; config and layers are the same blobs."""
    doc = json.loads(manifest.raw)
    doc["mediaType"] = DOCKER_TO_OCI.get(manifest.media_type, manifest.media_type)
    for desc in [doc.get("config"), *(doc.get("layers") or [])]:
        if isinstance(desc, dict):
            desc["mediaType"] = DOCKER_TO_OCI.get(desc.get("mediaType", ""), desc.get("mediaType"))
    annotations = doc.get("annotations") if isinstance(doc.get("annotations"), dict) else {}
    doc["annotations"] = {**annotations, soci_index.INDEX_DIGEST: index_digest}
    return json.dumps(doc, separators=(",", ":")).encode()


async def _platform(registry: RegistryClient, manifest: Manifest) -> dict[str, Any]:
    """The image's platform as an index entry states it, from its config."""
    raw = await registry.fetch_blob(manifest.ref, manifest.config.digest)
    try:
        config = load_object(raw, "config")
        platform = {"architecture": str(config["architecture"]), "os": str(config["os"])}
    except (FormatError, KeyError, TypeError):
        raise BadResponse(f"config {manifest.config.digest} of {manifest.ref} does not name its os and "
                          "architecture") from None
    for key in ("variant", "os.version", "os.features"):
        if config.get(key):
            platform[key] = config[key]
    return platform


def _image_index(image_digest: str, image_size: int, index_digest: str, index_size: int,
                 platform: dict[str, Any]) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": image_digest, "size": image_size, "platform": platform},
            {"mediaType": OCI_MANIFEST, "digest": index_digest, "size": index_size,
             "artifactType": soci_index.INDEX_V2, "platform": platform,
             "annotations": {soci_index.IMAGE_MANIFEST_DIGEST: image_digest}},
        ],
    }
    return json.dumps(doc, separators=(",", ":")).encode()
