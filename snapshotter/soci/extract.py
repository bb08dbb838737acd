"""`lazysnap ztoc get-file`: one file of a layer, through its zTOC, without the rest of the blob.

The image's index (found as the daemon finds it, this node's store last) names the
layer's zTOC; the zTOC gives the file's offset in the uncompressed tar and the spans
that hold it. Only those spans are fetched (range reads, several per request), each
checked against its digest in the zTOC before it is inflated. Output is written span
batch by span batch, so a large file never sits in memory whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import trio

from ..formats import gzip_index, ztoc
from ..formats.errors import FormatError
from ..formats.tar import clean_path
from ..registry.client import RegistryClient
from ..registry.manifest import Descriptor
from ..registry.ranges import merge
from .build import SociError
from .discovery import fetch_ztoc, find_index
from .local import LocalIndexes

BATCH_BYTES = 32 << 20
"""Compressed span bytes fetched in one go (one multi-range request when the server allows)."""
MAX_LINKS = 16


@dataclass
class Extracted:
    path: str
    size: int
    layer: str
    layer_size: int
    ztoc: str
    index: str
    index_source: str
    spans: int
    total_spans: int
    fetched: int
    """Compressed bytes fetched: the spans holding the file, not the blob."""


async def get_file(registry: RegistryClient, local: LocalIndexes | None, image: str, layer: str, path: str,
                   write: Callable[[bytes], object]) -> Extracted:
    """Write the bytes of `path` in `layer` of `image` to `write`, verified span by span."""
    manifest = await registry.resolve(image)
    image_ref = str(manifest.ref)
    layer_desc = _layer(manifest.layers, layer, image_ref)
    found = await find_index(registry, local, image_ref, manifest.digest)
    if found.index is None:
        raise SociError(f"{image_ref}: {found.reason}")
    ref = found.index.ztocs.get(layer_desc.digest)
    if ref is None:
        raise SociError(f"index {found.index.digest} ({found.source}) has no zTOC for layer {layer_desc.digest} "
                        "(too small, or of a kind that cannot be indexed)")
    try:
        z = ztoc.parse_ztoc(await fetch_ztoc(registry, local, image_ref, ref))
    except FormatError as e:
        raise SociError(f"zTOC {ref.digest} is unusable: {e}") from None
    if z.compressed_archive_size != layer_desc.size:
        raise SociError(f"zTOC {ref.digest} is for a {z.compressed_archive_size}-byte layer, "
                        f"{layer_desc.digest} has {layer_desc.size} bytes")
    entry = find_entry(z, path)
    extent = ztoc.FileExtent(entry.uncompressed_offset, entry.uncompressed_size)
    index = ztoc.span_index(z)
    spans = index.spans_for(extent.uncompressed_offset, extent.end)
    result = Extracted(clean_path(entry.name), extent.size, layer_desc.digest, layer_desc.size, ref.digest,
                       found.index.digest, found.source, len(spans), index.max_span_id + 1, 0)
    if not spans:
        return result
    blob = await registry.open_blob(manifest.ref, layer_desc.digest)
    if blob.size != z.compressed_archive_size:
        raise SociError(f"layer {layer_desc.digest} is {blob.size} bytes in the registry, the zTOC says "
                        f"{z.compressed_archive_size}")
    for batch in _batches(spans):
        ranges = [(s.compressed_start, s.compressed_end) for s in batch]
        pieces = await registry.read_ranges(blob, ranges)
        result.fetched += sum(end - start for start, end in merge(ranges))  # neighbours may share a byte
        for span, compressed in zip(batch, pieces, strict=True):
            try:
                data = await trio.to_thread.run_sync(_verified_span, compressed, span,
                                                     z.compression.span_digests[span.id])
            except FormatError as e:
                raise SociError(f"span {span.id} of layer {layer_desc.digest}: {e}") from None
            lo = max(extent.uncompressed_offset, span.uncompressed_start) - span.uncompressed_start
            hi = min(extent.end, span.uncompressed_end) - span.uncompressed_start
            write(data[lo:hi])
    return result


def _verified_span(compressed: bytes, span: gzip_index.Span, digest: str) -> bytes:
    gzip_index.verify_span(compressed, digest)
    return gzip_index.inflate_span(compressed, span)


def _batches(spans: list[gzip_index.Span]) -> list[list[gzip_index.Span]]:
    batches: list[list[gzip_index.Span]] = [[]]
    size = 0
    for span in spans:
        if batches[-1] and size + span.compressed_size > BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(span)
        size += span.compressed_size
    return batches


def _layer(layers: list[Descriptor], wanted: str, image: str) -> Descriptor:
    """The layer descriptor named by `wanted`: a digest, or a unique prefix of one (with or without sha256:)."""
    prefix = wanted if wanted.startswith("sha256:") else f"sha256:{wanted}"
    matches = [d for d in layers if d.digest.startswith(prefix)]
    if len({d.digest for d in matches}) == 1:
        return matches[0]
    listed = ", ".join(d.digest for d in layers)
    if not matches:
        raise SociError(f"{image} has no layer {wanted} (its layers: {listed})")
    raise SociError(f"{wanted} matches several layers of {image}: {listed}")


def find_entry(z: ztoc.Ztoc, path: str) -> ztoc.FileMetadata:
    """The regular file at `path` (the last member of that name, as extraction leaves it), hardlinks followed."""
    by_name: dict[str, ztoc.FileMetadata] = {}
    for e in sorted(z.entries, key=lambda e: e.uncompressed_offset):
        by_name[clean_path(e.name)] = e
    name = clean_path(path)
    for _ in range(MAX_LINKS):
        entry = by_name.get(name)
        if entry is None:
            raise SociError(f"no {path!r} in the layer")
        if entry.type == "hardlink":
            name = clean_path(entry.linkname)
            continue
        if entry.type == "symlink":
            raise SociError(f"{path!r} is a symbolic link to {entry.linkname!r}; ask for the target")
        if entry.type != "reg":
            raise SociError(f"{path!r} is not a regular file (a {entry.type})")
        return entry
    raise SociError(f"{path!r}: more than {MAX_LINKS} hard links in a row")
