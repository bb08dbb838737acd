"""`lazysnap index list|info` and `lazysnap ztoc info`: what indexes exist and what they hold.

Records only; `report.py` turns them into text. Local indexes come from the node's
store; with an image, the registry is asked too, through the same discovery the
daemon uses (v2 annotation, then v1 referrers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..formats import soci_index, ztoc
from ..formats.errors import FormatError
from ..formats.gzip_index import CheckpointTable
from ..registry.client import RegistryClient
from ..registry.errors import RegistryError
from ..registry.manifest import Descriptor
from .build import SociError
from .discovery import Discovery, fetch_ztoc, find_index
from .local import LocalIndexes

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def is_digest(text: str) -> bool:
    return _DIGEST.fullmatch(text) is not None


@dataclass
class LocalEntry:
    """One index in the node's store and the image manifest it was built for."""

    image_digest: str
    index_digest: str
    image: str
    version: str = ""
    ztocs: int = 0
    ztoc_bytes: int = 0
    problem: str = ""


def local_indexes(local: LocalIndexes, image_digest: str | None = None) -> list[LocalEntry]:
    out = []
    for image, index_digest in local.images():
        if image_digest is not None and image != image_digest:
            continue
        entry = LocalEntry(image, index_digest, local.name_for(image))
        raw = local.get_blob(index_digest)
        try:
            if raw is None:
                raise FormatError("missing from the store")
            index = soci_index.parse_index(raw, index_digest)
        except FormatError as e:
            entry.problem = str(e)
        else:
            entry.version = version_of(index)
            entry.ztocs = len(index.ztocs)
            entry.ztoc_bytes = sum(ref.size for ref in index.ztocs.values())
        out.append(entry)
    return out


def version_of(index: soci_index.SociIndex) -> str:
    return "v2" if index.artifact_type == soci_index.INDEX_V2 else "v1"


@dataclass
class RegistryView:
    """What the registry says about an image's indexes."""

    image: str
    manifest_digest: str
    found: Discovery
    v1_referrers: list[Descriptor] = field(default_factory=list)
    referrers_problem: str = ""


async def registry_indexes(registry: RegistryClient, image: str) -> RegistryView:
    manifest = await registry.resolve(image)
    found = await find_index(registry, None, str(manifest.ref), manifest.digest)
    view = RegistryView(str(manifest.ref), manifest.digest, found)
    try:
        view.v1_referrers = await registry.referrers(manifest.ref, manifest.digest, soci_index.INDEX_V1)
    except RegistryError as e:
        view.referrers_problem = str(e)
    return view


@dataclass
class ZtocSummary:
    ref: soci_index.Descriptor
    layer: str
    ztoc: ztoc.Ztoc | None = None
    problem: str = ""

    @property
    def spans(self) -> int:
        return self.ztoc.compression.max_span_id + 1 if self.ztoc is not None else 0

    @property
    def files(self) -> int:
        return len(self.ztoc.entries) if self.ztoc is not None else 0

    @property
    def span_size(self) -> int:
        return span_size(self.ztoc) if self.ztoc is not None else 0


@dataclass
class IndexInfo:
    digest: str
    index: soci_index.SociIndex
    source: str
    """Where the index came from: local, or the discovery step that found it (v1, v2, label)."""
    image: str = ""
    ztocs: list[ZtocSummary] = field(default_factory=list)

    @property
    def version(self) -> str:
        return version_of(self.index)


async def index_info(registry: RegistryClient, local: LocalIndexes, what: str) -> IndexInfo:
    """The index named by digest (from the store), or the index of an image (the store, then the registry)."""
    image = ""
    if is_digest(what):
        raw = local.get_blob(what)
        if raw is None:
            raise SociError(f"index {what} is not in {local.dir} (give the image instead to look in the registry)")
        index, source = _parse_index(raw, what), "local"
    else:
        manifest = await registry.resolve(what)
        image = str(manifest.ref)
        digest = local.index_for(manifest.digest)
        raw = local.get_blob(digest) if digest else None
        if digest and raw is not None:
            index, source = _parse_index(raw, digest), "local"
        else:
            found = await find_index(registry, local, image, manifest.digest)
            if found.index is None:
                raise SociError(f"{image}: {found.reason}")
            index, source = found.index, found.source
    info = IndexInfo(index.digest, index, source, image)
    for layer, ref in index.ztocs.items():
        summary = ZtocSummary(ref, layer)
        try:
            data = await fetch_ztoc(registry, local, image, ref) if image else local.get_blob(ref.digest)
            if data is None:
                raise FormatError("not in the local store")
            summary.ztoc = ztoc.parse_ztoc(data)
        except (FormatError, RegistryError) as e:
            summary.problem = str(e)
        info.ztocs.append(summary)
    return info


def _parse_index(raw: bytes, digest: str) -> soci_index.SociIndex:
    try:
        return soci_index.parse_index(raw, digest)
    except FormatError as e:
        raise SociError(f"index {digest} is unusable: {e}") from None


@dataclass
class ZtocInfo:
    digest: str
    size: int
    ztoc: ztoc.Ztoc
    source: str

    @property
    def span_size(self) -> int:
        return span_size(self.ztoc)


async def ztoc_info(registry: RegistryClient, local: LocalIndexes, digest: str, image: str = "") -> ZtocInfo:
    """A zTOC by digest: from the store, else (given an image) from the image's repository."""
    if not is_digest(digest):
        raise SociError(f"{digest!r} is not a sha256 digest")
    data = local.get_blob(digest)
    source = "local"
    if data is None:
        if not image:
            raise SociError(f"zTOC {digest} is not in {local.dir} (give --image to fetch it from the registry)")
        data = await fetch_ztoc(registry, None, image, soci_index.Descriptor(soci_index.ZTOC_MEDIA_TYPE, digest, 0))
        source = image
    try:
        return ZtocInfo(digest, len(data), ztoc.parse_ztoc(data), source)
    except FormatError as e:
        raise SociError(f"zTOC {digest} is unusable: {e}") from None


def span_size(z: ztoc.Ztoc) -> int:
    """The span size the zTOC was built with (a minimum for gzip: spans end on deflate blocks)."""
    c = z.compression
    if c.algorithm == ztoc.CompressionAlgorithm.UNCOMPRESSED:
        return ztoc.parse_tar_zinfo(c.checkpoints).span_size
    return CheckpointTable(c.checkpoints).span_size
