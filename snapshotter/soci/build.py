"""`lazysnap index create`: zTOCs for an image's layers and the SOCI v1 index that lists them.

Each gzip (or uncompressed tar) layer is streamed once from the registry into a
`ZtocBuilder`, in bounded memory and without a temporary file: the download runs in
trio, the inflating and tar scanning in a worker thread, with a few chunks queued
between them. Layers below the minimum size (compressed, as soci counts it) get no
zTOC: lazily loading a small layer saves less than it costs. zstd and unknown media
types are skipped with the reason. If nothing is left, there is no index (soci's
ErrEmptyIndex).

zTOCs and the index manifest go to the node's `LocalIndexes` store, which the daemon
reads too, so an index serves lazy pulls on this node before (or without) a push.
A zTOC already in the store for the same layer and span size is reused unless asked
not to (`force`). Facts: shared/research/soci.md §1-§2.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import trio

from ..errors import SnapshotterError
from ..formats import soci_index, ztoc
from ..formats.errors import FormatError
from ..registry.client import RegistryClient
from ..registry.manifest import Descriptor, Manifest
from ..sizes import human_size
from . import DEFAULT_JOBS, DEFAULT_MIN_LAYER_SIZE, DEFAULT_SPAN_SIZE
from .local import LocalIndexes

BUILD_TOOL = "lazysnap"
QUEUED_CHUNKS = 4
"""Chunks (of the client's stream chunk size, 1 MiB) waiting between download and builder, per layer."""

GZIP_TYPES = frozenset({
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
})
TAR_TYPES = frozenset({
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.docker.image.rootfs.diff.tar",
})
ZSTD_TYPES = frozenset({
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
})


class SociError(SnapshotterError):
    """An index cannot be built, pushed or read (the message says why)."""


class EmptyIndex(SociError):
    """Every layer was skipped, so there is nothing to index (soci's ErrEmptyIndex)."""

    def __init__(self, message: str, layers: list[LayerResult]) -> None:
        super().__init__(message)
        self.layers = layers


# --------------------------------------------------------------------------- results

@dataclass
class LayerResult:
    """What became of one layer: a zTOC (built or reused), or why none."""

    position: int
    digest: str
    media_type: str
    size: int
    ztoc: soci_index.Descriptor | None = None
    ztoc_size: int = 0
    spans: int = 0
    files: int = 0
    seconds: float = 0.0
    reused: bool = False
    skipped: str = ""

    @property
    def indexed(self) -> bool:
        return self.ztoc is not None


@dataclass
class BuildResult:
    image: str
    manifest: Manifest
    layers: list[LayerResult]
    index_digest: str
    index: bytes
    span_size: int
    min_layer_size: int
    seconds: float
    store: str = ""

    @property
    def built_bytes(self) -> int:
        """Compressed bytes streamed and indexed in this run (reused zTOCs not counted)."""
        return sum(r.size for r in self.layers if r.indexed and not r.reused)


class Progress(Protocol):
    """Told about the work as it goes (`report.ProgressBar` draws it)."""

    def begin(self, layers: int, total_bytes: int) -> None: ...
    def layer_started(self, layer: LayerResult) -> None: ...
    def advanced(self, nbytes: int) -> None: ...
    def layer_done(self, layer: LayerResult) -> None: ...
    def end(self) -> None: ...


class _Quiet:
    def begin(self, layers: int, total_bytes: int) -> None:
        pass

    def layer_started(self, layer: LayerResult) -> None:
        pass

    def advanced(self, nbytes: int) -> None:
        pass

    def layer_done(self, layer: LayerResult) -> None:
        pass

    def end(self) -> None:
        pass


# --------------------------------------------------------------------------- layers

def layer_compression(media_type: str) -> tuple[ztoc.CompressionAlgorithm | None, str]:
    """How a layer of `media_type` is indexed, or (None, why it cannot be)."""
    if media_type in GZIP_TYPES:
        return ztoc.CompressionAlgorithm.GZIP, ""
    if media_type in TAR_TYPES:
        return ztoc.CompressionAlgorithm.UNCOMPRESSED, ""
    if media_type in ZSTD_TYPES or media_type.endswith("+zstd"):
        return None, "zstd layers cannot be indexed (SOCI has no zstd zTOC)"
    return None, f"unknown layer media type {media_type!r}"


def _why_not(layer: Descriptor, min_layer_size: int) -> str:
    algorithm, why = layer_compression(layer.media_type)
    if algorithm is None:
        return why
    if layer.urls:
        return "foreign layer (served from its own URLs)"
    if layer.size < min_layer_size:
        return f"{human_size(layer.size)} is below the minimum layer size {human_size(min_layer_size)}"
    return ""


def known_ztocs(local: LocalIndexes, span_size: int) -> dict[str, soci_index.Descriptor]:
    """Layer digest -> a zTOC of that span size already in the store (from any local index)."""
    found: dict[str, soci_index.Descriptor] = {}
    for _, index_digest in local.images():
        raw = local.get_blob(index_digest)
        if raw is None:
            continue
        try:
            index = soci_index.parse_index(raw, index_digest)
        except FormatError:
            continue
        for layer, ref in index.ztocs.items():
            if ref.annotations.get(soci_index.SPAN_SIZE) == str(span_size):
                found.setdefault(layer, ref)
    return found


async def build_ztocs(registry: RegistryClient, local: LocalIndexes, manifest: Manifest, *,
                      span_size: int = DEFAULT_SPAN_SIZE, min_layer_size: int = DEFAULT_MIN_LAYER_SIZE,
                      force: bool = False, jobs: int = DEFAULT_JOBS,
                      progress: Progress | None = None) -> list[LayerResult]:
    """A zTOC in `local` for every layer of `manifest` that can have one; a result per layer, in order."""
    if span_size <= 0:
        raise SociError(f"span size must be positive, not {span_size}")
    progress = progress or _Quiet()
    results = []
    todo = []
    reusable = {} if force else known_ztocs(local, span_size)
    for i, layer in enumerate(manifest.layers):
        result = LayerResult(i, layer.digest, layer.media_type, layer.size)
        results.append(result)
        result.skipped = _why_not(layer, min_layer_size)
        if result.skipped:
            continue
        ref = reusable.get(layer.digest)
        data = local.get_blob(ref.digest) if ref is not None else None
        if ref is not None and data is not None and _reuse(result, ref, data):
            continue
        todo.append(result)
    progress.begin(len(todo), sum(r.size for r in todo))
    limit = trio.Semaphore(max(1, jobs))

    async def one(result: LayerResult) -> None:
        async with limit:
            progress.layer_started(result)
            await _build_one(registry, local, manifest, result, span_size, progress.advanced)
            progress.layer_done(result)

    try:
        await _all(one(result) for result in todo)
    finally:
        progress.end()
    return results


async def _all(calls: Iterable[Awaitable[None]]) -> None:
    """Run `calls` concurrently; the first failure cancels the rest and is raised as itself (not a group)."""
    errors: list[Exception] = []

    async def run(call: Awaitable[None], cancel: trio.CancelScope) -> None:
        try:
            await call
        except Exception as e:
            errors.append(e)
            cancel.cancel()

    async with trio.open_nursery() as nursery:
        for call in calls:
            nursery.start_soon(run, call, nursery.cancel_scope)
    if errors:
        raise errors[0]


def _reuse(result: LayerResult, ref: soci_index.Descriptor, data: bytes) -> bool:
    try:
        z = ztoc.parse_ztoc(data)
    except FormatError:
        return False
    span_size = ref.annotations.get(soci_index.SPAN_SIZE, "")
    if z.compressed_archive_size != result.size or not (span_size.isascii() and span_size.isdigit()):
        return False  # not this layer's, or an index from elsewhere without a usable span size: build anew
    result.ztoc = soci_index.ztoc_ref(ref.digest, len(data), result.digest, result.media_type, int(span_size))
    result.ztoc_size, result.spans, result.files = len(data), z.compression.max_span_id + 1, len(z.entries)
    result.reused = True
    return True


async def _build_one(registry: RegistryClient, local: LocalIndexes, manifest: Manifest, result: LayerResult,
                     span_size: int, advanced: Callable[[int], None]) -> None:
    """Stream the layer once through a ZtocBuilder; the zTOC goes to the store, the outcome to `result`."""
    algorithm, _ = layer_compression(result.media_type)
    assert algorithm is not None
    start = time.monotonic()
    builder = ztoc.ZtocBuilder(span_size, compression=algorithm, build_tool_identifier=BUILD_TOOL)
    blob = await registry.open_blob(manifest.ref, result.digest)
    if blob.size != result.size:
        raise SociError(f"layer {result.digest}: the registry has {blob.size} bytes, the manifest says {result.size}")
    send, receive = trio.open_memory_channel[bytes](QUEUED_CHUNKS)

    errors: list[Exception] = []

    async def download() -> None:
        try:
            async with send, contextlib.aclosing(registry.stream_blob(blob)) as chunks:
                async for chunk in chunks:
                    await send.send(chunk)
        except Exception as e:  # the channel is closed: the builder stops, and this is raised below
            errors.append(e)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(download)
            try:
                async with receive:
                    async for chunk in receive:
                        await trio.to_thread.run_sync(builder.feed, chunk)
                        advanced(len(chunk))
            except Exception as e:
                errors.append(e)
                nursery.cancel_scope.cancel()
        if errors:
            raise errors[0]
        z = await trio.to_thread.run_sync(builder.finish)
        data = await trio.to_thread.run_sync(ztoc.serialize_ztoc, z)
    except FormatError as e:
        result.skipped = f"cannot be indexed: {e}"
        result.seconds = time.monotonic() - start
        return
    if z.compressed_archive_size != result.size:
        raise SociError(f"layer {result.digest}: streamed {z.compressed_archive_size} of {result.size} bytes")
    digest = local.put_blob(data)
    result.ztoc = soci_index.ztoc_ref(digest, len(data), result.digest, result.media_type, span_size)
    result.ztoc_size, result.spans, result.files = len(data), z.compression.max_span_id + 1, len(z.entries)
    result.seconds = time.monotonic() - start


# --------------------------------------------------------------------------- the index

async def create_index(registry: RegistryClient, local: LocalIndexes, image: str, *,
                       span_size: int = DEFAULT_SPAN_SIZE, min_layer_size: int = DEFAULT_MIN_LAYER_SIZE,
                       force: bool = False, jobs: int = DEFAULT_JOBS,
                       progress: Progress | None = None) -> BuildResult:
    """Build the SOCI v1 index of `image` (linux/amd64 unless the client says otherwise) into `local`."""
    start = time.monotonic()
    manifest = await registry.resolve(image)
    layers = await build_ztocs(registry, local, manifest, span_size=span_size, min_layer_size=min_layer_size,
                               force=force, jobs=jobs, progress=progress)
    refs = indexed_refs(image, layers)
    subject = soci_index.Descriptor(manifest.media_type, manifest.digest, len(manifest.raw))
    raw = soci_index.build_index(refs, subject=subject, artifact_type=soci_index.INDEX_V1, build_tool=BUILD_TOOL)
    local.put_blob(soci_index.EMPTY_CONFIG)
    digest = local.put_blob(raw)
    local.set_index(manifest.digest, digest)
    local.set_name(manifest.digest, str(manifest.ref))
    return BuildResult(str(manifest.ref), manifest, layers, digest, raw, span_size, min_layer_size,
                       time.monotonic() - start, str(local.dir))


def indexed_refs(image: str, layers: list[LayerResult]) -> list[soci_index.Descriptor]:
    """The zTOC descriptors of the indexed layers, in layer order; none at all is `EmptyIndex`."""
    refs = [r.ztoc for r in layers if r.ztoc is not None]
    if not refs:
        raise EmptyIndex(f"no layer of {image} can be indexed, so there is no index (all {len(layers)} "
                         "layers were skipped)", layers)
    return refs


__all__ = [
    "BUILD_TOOL", "DEFAULT_JOBS", "DEFAULT_MIN_LAYER_SIZE", "DEFAULT_SPAN_SIZE", "BuildResult", "EmptyIndex",
    "LayerResult", "Progress", "SociError", "build_ztocs", "create_index", "indexed_refs",
    "known_ztocs", "layer_compression",
]
