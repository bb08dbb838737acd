"""Resolution: for one layer, its verified index, or the reason it will be pulled whole.

An eStargz TOC is looked for in the blob itself (its footer); failing that, a zstd:chunked
TOC, located by the layer's annotations in the image manifest (or, unverifiable, by its
footer); failing that, a SOCI zTOC beside the image (`images.py` fetches the manifest and
searches for the image's SOCI index once, in parallel with the footer read). The first
Prepare of an image starts resolving all its layers, so later Prepares usually find
their index already fetched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import trio

from ..fetch.blob import RegistryBlob
from ..formats import estargz, zstd_chunked
from ..formats.errors import FormatError
from ..labels import LayerRequest
from ..layer_modes import FallbackCause, LayerMode
from ..registry.client import RegistryClient
from ..registry.errors import RegistryError
from ..soci.discovery import Discovery, fetch_ztoc
from ..soci.local import LocalIndexes
from .estargz import EStargzIndex, fetch_index, fetch_zstd_index, read_tail
from .images import Image, Images

log = logging.getLogger(__name__)

RESOLUTION_TTL = 300.0
"""Seconds a fetched index waits for its layer's Prepare before it is dropped from memory."""
SETTLED = frozenset({FallbackCause.NO_INDEX, FallbackCause.BROKEN_INDEX})
"""Failures that trying again at once would repeat (unlike a registry error or a timeout): the
layer's pull whole may start before its Prepare (`whole_pulls.py`)."""
SETTLED_RETRY_AFTER = 30.0
"""A settled failure is looked up again only after this long (an index may be pushed later)."""


class Fallback(Exception):
    """This layer will be pulled whole; the message says why."""

    def __init__(self, message: str, cause: FallbackCause) -> None:
        super().__init__(message)
        self.cause = cause


@dataclass(eq=False)
class Resolution:
    """One layer's index being fetched; Prepares for it wait on `done`.

    `saved` is the index as it is kept on disk (an eStargz TOC member or a zTOC), so
    that the layer can be rebuilt from it at restart without the registry.
    """

    done: trio.Event = field(default_factory=trio.Event)
    kind: LayerMode | None = None
    estargz: EStargzIndex | None = None
    """The TOC of an eStargz or zstd:chunked layer (`kind` says which), not yet verified."""
    expected_digest: str = ""
    """zstd:chunked: the manifest-checksum annotation the TOC must match ("" if the layer has none)."""
    note: str = ""
    """zstd:chunked without a checksum: why the manifest did not give one, if it was not there to read."""
    saved: bytes = b""
    offset: int = 0
    blob: RegistryBlob | None = None
    error: str = ""
    cause: FallbackCause = FallbackCause.INTERNAL
    """Why it failed, when `error` says it did."""
    seconds: float = 0.0
    finished: float = 0.0
    """`time.monotonic()` when it ended."""


class Resolver:
    def __init__(self, registry: RegistryClient, local: LocalIndexes, images: Images, nursery: trio.Nursery,
                 timeout: float) -> None:
        self.registry = registry
        self.local = local
        self.images = images
        self.nursery = nursery
        self.timeout = timeout
        self._resolutions: dict[str, Resolution] = {}

    def start(self, request: LayerRequest, digest: str, *, retry_after: float) -> Resolution:
        """The layer's resolution, started if there is none, or if it failed over `retry_after` s ago."""
        self._expire()
        resolution = self._resolutions.get(digest)
        if resolution is not None and resolution.cause in SETTLED:
            retry_after = max(retry_after, SETTLED_RETRY_AFTER)
        if resolution is None or (resolution.done.is_set() and resolution.error
                                  and time.monotonic() - resolution.finished >= retry_after):
            resolution = self._resolutions[digest] = Resolution()
            self.nursery.start_soon(self._resolve, request, digest, resolution)
        return resolution

    def forget(self, digest: str) -> None:
        """The layer is served now and holds what it needs."""
        self._resolutions.pop(digest, None)

    def _expire(self) -> None:
        """Drop indexes whose Prepare never came (a pull given up), RESOLUTION_TTL after they ended."""
        now = time.monotonic()
        for digest, resolution in list(self._resolutions.items()):
            if resolution.done.is_set() and now - resolution.finished > RESOLUTION_TTL:
                del self._resolutions[digest]

    async def _resolve(self, request: LayerRequest, digest: str, resolution: Resolution) -> None:
        image_ref = request.image_ref
        start = time.monotonic()
        try:
            with trio.fail_after(self.timeout):
                location = await self.registry.open_blob(image_ref, digest)
                blob = RegistryBlob(self.registry, image_ref, digest, location.size, location)
                image = self.images.start(request)  # its SOCI search runs in parallel with the footer read
                tail = await read_tail(blob)
                try:
                    resolution.estargz, resolution.kind = await fetch_index(blob, tail), LayerMode.ESTARGZ
                except estargz.NotEStargz as e:
                    log.debug("layer %s of %s: %s", digest, image_ref, e)
                    chunked = await self._zstd_chunked(digest, image, blob, tail)
                    if chunked is not None:
                        resolution.estargz, resolution.expected_digest = chunked
                        resolution.kind, resolution.note = LayerMode.ZSTD_CHUNKED, image.manifest_problem
                    else:
                        await image.done.wait()
                        resolution.saved = await self._ztoc(request, digest, image.result)
                        resolution.kind = LayerMode.SOCI
                if resolution.estargz is not None:
                    resolution.saved = resolution.estargz.member
                    resolution.offset = resolution.estargz.footer.toc_offset
                payload_end = resolution.offset if resolution.estargz is not None else blob.size
                blob.keep(tail[0], tail[1][:max(0, payload_end - tail[0])])
                resolution.blob = blob
        except trio.TooSlowError:
            resolution.error = f"finding the layer's index took over {self.timeout:g} s"
            resolution.cause = FallbackCause.TIMEOUT
        except Fallback as e:
            resolution.error, resolution.cause = str(e), e.cause
        except FormatError as e:
            resolution.error, resolution.cause = f"broken index: {e}", FallbackCause.BROKEN_INDEX
        except RegistryError as e:
            resolution.error, resolution.cause = f"registry: {e}", FallbackCause.REGISTRY
        except Exception as e:
            log.exception("resolving layer %s of %s failed", digest, image_ref)
            resolution.error = f"internal error: {e!r}"
        finally:
            resolution.finished = time.monotonic()
            resolution.seconds = resolution.finished - start
            resolution.done.set()

    async def _zstd_chunked(self, digest: str, image: Image, blob: RegistryBlob, tail: tuple[int, bytes]
                            ) -> tuple[EStargzIndex, str] | None:
        """The zstd:chunked TOC and the checksum it must have, or None if the layer is not zstd:chunked.

        The manifest's annotations locate the TOC and vouch for it; a footer without them
        still finds it (to say why the layer is pulled whole, or to serve it unverified
        when that is allowed).
        """
        try:
            footer: zstd_chunked.Footer | None = zstd_chunked.parse_footer(
                tail[1][-zstd_chunked.FOOTER_READ_SIZE:], blob_size=blob.size)
        except zstd_chunked.NotZstdChunked:
            footer = None
        await image.manifest_done.wait()
        annotated = zstd_chunked.parse_annotations(image.layer_annotations.get(digest, {}))
        if annotated is None and footer is None:
            return None
        position = annotated.position if annotated is not None and annotated.position is not None else None
        if position is None:
            if footer is None:
                raise FormatError("zstd:chunked annotations give no TOC position, and the blob has no footer")
            position = footer.toc
        if annotated is None or not annotated.checksum:
            log.info("zstd:chunked layer %s has no checksum annotation%s", digest,
                     f" ({image.manifest_problem})" if image.manifest_problem else "")
        index = await fetch_zstd_index(blob, tail, position)
        return index, annotated.checksum if annotated is not None else ""

    async def _ztoc(self, request: LayerRequest, digest: str, discovery: Discovery) -> bytes:
        index = discovery.index
        if index is None:
            raise Fallback(f"not an eStargz layer nor a zstd:chunked one, and {discovery.reason}",
                           FallbackCause.NO_INDEX)
        ref = index.ztocs.get(digest)
        if ref is None:
            raise Fallback(f"the image's SOCI index ({discovery.source}) has no zTOC for this layer "
                           "(smaller than the index's minimum layer size?)", FallbackCause.NO_INDEX)
        return await fetch_ztoc(self.registry, self.local, request.image_ref, ref)
