"""What is found once per image and shared by its layers: its manifest's layer annotations,
its SOCI index, its start profile, its prefetch plan.

The image manifest is fetched once, by the digest containerd resolved (verified against
it): its layer descriptors carry annotations that never reach a Prepare's labels
(containerd passes only `containerd.io/snapshot/*` ones), such as zstd:chunked's TOC
checksum. The first layer of an image to be resolved starts the search (`Images.start`); the
image's other layers wait on the same `Image`. A profile (this node's, else one pushed
beside the image in the registry) says which parts of which layer the image read first
and when; an image without one is recorded during its first start, and the recording
saved as its profile. Until then it borrows, for the layers it shares with other images
(a rebuild keeps all but its top layer), what their profiles read of those layers
(`profiles.find_shared`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from ..config import FETCH_CONCURRENCY
from ..fetch.prefetch import FetchQueue
from ..fetch.units import Unit, first_reached
from ..formats import estargz, soci_index
from ..formats.descriptor import Descriptor
from ..formats.errors import FormatError
from ..formats.jsondoc import load_object
from ..formats.profile import Profile
from ..labels import LayerRequest
from ..profiles import Borrowed, ProfileStore, borrowed_profile, describe_borrowed, find_remote, find_shared
from ..recording import Recording
from ..registry.client import RegistryClient
from ..registry.errors import RegistryError
from ..soci.discovery import Discovery, find_index
from ..soci.local import LocalIndexes
from .estargz import EStargzLayer
from .soci import SociLayer

log = logging.getLogger(__name__)

IMAGE_TTL = 300.0
"""Seconds an image's search results are kept after it started (its layers' Prepares come within)."""


@dataclass(frozen=True)
class ImageOptions:
    prefetch: bool = True
    record_profiles: bool = True
    profile_seconds: float = 30.0
    fetch_concurrency: int = FETCH_CONCURRENCY


@dataclass(eq=False)
class Image:
    ref: str
    manifest_digest: str
    layers: tuple[str, ...]
    queue: FetchQueue
    """The prefetch GETs of all the image's layers, most urgent first."""
    started: float = field(default_factory=time.monotonic)
    manifest_done: trio.Event = field(default_factory=trio.Event)
    """The manifest fetch is over (`layer_annotations`, or `manifest_problem`)."""
    layer_annotations: dict[str, dict[str, str]] = field(default_factory=dict)
    """Layer digest -> its descriptor's annotations in the image manifest."""
    layer_sizes: dict[str, int] = field(default_factory=dict)
    """Layer digest -> its size in the image manifest, bottom layer first."""
    manifest_problem: str = ""
    """Why `layer_annotations` is empty when it is for want of a manifest."""
    done: trio.Event = field(default_factory=trio.Event)
    """The SOCI search is over (`result`)."""
    result: Discovery = field(default_factory=Discovery)
    ready: trio.Event = field(default_factory=trio.Event)
    """The profile search is over too (`profile`, `recording`, `soci_prefetch`)."""
    profile: Profile | None = None
    borrowed: tuple[Borrowed, ...] = ()
    """Set when `profile` is not the image's own but other images' ranges of the layers it
    shares with them (it is then recorded as well, to get one of its own)."""
    recording: Recording | None = None
    soci_prefetch: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    """Layer digest -> span id ranges (inclusive) from the SOCI index's prefetch artifacts."""


class Images:
    def __init__(self, registry: RegistryClient, local: LocalIndexes, profiles: ProfileStore, nursery: trio.Nursery,
                 options: ImageOptions, stop_recording: Callable[[Recording], None]) -> None:
        """`stop_recording` detaches a recording from every layer it is attached to, when its window ends."""
        self.registry = registry
        self.local = local
        self.profiles = profiles
        self.nursery = nursery
        self.options = options
        self.stop_recording = stop_recording
        self._images: dict[str, Image] = {}

    def start(self, request: LayerRequest) -> Image:
        now = time.monotonic()
        for key, old in list(self._images.items()):
            if old.ready.is_set() and now - old.started > IMAGE_TTL:
                del self._images[key]
        key = request.manifest_digest or request.image_ref
        image = self._images.get(key)
        if image is None:
            image = self._images[key] = Image(request.image_ref, request.manifest_digest, request.image_layers,
                                              FetchQueue(trio.CapacityLimiter(self.options.fetch_concurrency)))
            self.nursery.start_soon(self._discover, request, image)
        return image

    async def _discover(self, request: LayerRequest, image: Image) -> None:
        try:
            try:
                try:
                    raw = await self._manifest(request, image)
                finally:
                    image.manifest_done.set()
                image.result = await find_index(self.registry, self.local, request.image_ref, image.manifest_digest,
                                                request.soci_index_digest, manifest=raw)
            except RegistryError as e:
                image.result = Discovery(misses=[f"cannot resolve the image: {e}"])
            finally:
                image.done.set()
            if image.result.index is not None:
                log.info("SOCI index %s (%s) found for %s", image.result.index.digest, image.result.source,
                         request.image_ref)
            if image.manifest_digest:
                await self._find_profile(image)
        finally:
            image.manifest_done.set()
            image.ready.set()
        if image.recording is not None:
            await self._record_profile(image.recording)

    async def _manifest(self, request: LayerRequest, image: Image) -> bytes | None:
        """The image manifest's bytes (by its digest if the labels name one), its layers' annotations noted."""
        try:
            if image.manifest_digest:
                _, raw, _ = await self.registry.fetch_manifest(request.image_ref, image.manifest_digest)
            else:
                resolved = await self.registry.resolve(request.image_ref)
                image.manifest_digest, raw = resolved.digest, resolved.raw
        except RegistryError as e:
            if not image.manifest_digest:
                raise
            image.manifest_problem = f"cannot fetch the image manifest {image.manifest_digest}: {e}"
            return None
        try:
            image.layer_annotations = layer_annotations(raw)
            image.layer_sizes = layer_sizes(raw)
        except FormatError as e:
            image.manifest_problem = f"unreadable image manifest {image.manifest_digest}: {e}"
        return raw

    async def _find_profile(self, image: Image) -> None:
        """What the image reads first: a profile (this node's, else its registry's, else other
        images' of the layers it shares with them), SOCI prefetch artifacts."""
        if self.options.prefetch:
            image.profile = self.profiles.get(image.manifest_digest)
            source = "this node"
            if image.profile is None:
                image.profile = await self._remote_or_borrowed(image)
                source = "the registry"
            if image.borrowed:
                log.info("no start profile of %s: prefetching the %s (%d bytes)", image.ref,
                         describe_borrowed(image.borrowed), image.profile.bytes if image.profile else 0)
            elif image.profile is not None:
                log.info("start profile of %s from %s: %d bytes in %d layers", image.ref, source,
                         image.profile.bytes, len(image.profile.layers))
            if image.result.index is not None:
                image.soci_prefetch = await self._soci_prefetch(image, image.result.index)
        if (image.profile is None or image.borrowed) and self.options.record_profiles:
            image.recording = Recording(image.manifest_digest, image.layers, self.options.profile_seconds)

    async def _remote_or_borrowed(self, image: Image) -> Profile | None:
        """The image's own profile in the registry, else what other images' profiles read of its
        layers (`image.borrowed`). Both are looked for at once; the borrowing stops once the
        image's own is found."""
        layers = list(image.layer_sizes.items()) or [(digest, 0) for digest in image.layers]
        shared: dict[str, Borrowed] = {}

        async def borrow() -> None:
            shared.update(await find_shared(self.registry, self.profiles, image.ref, layers))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(borrow)
            own = await find_remote(self.registry, image.ref, image.manifest_digest)
            if own is not None:
                nursery.cancel_scope.cancel()
        if own is not None or not shared:
            return own
        image.borrowed = tuple(shared[digest] for digest, _ in layers if digest in shared)
        return borrowed_profile(image.manifest_digest, image.borrowed)

    async def _soci_prefetch(self, image: Image, index: soci_index.SociIndex) -> dict[str, list[tuple[int, int]]]:
        out: dict[str, list[tuple[int, int]]] = {}
        for layer, ref in index.prefetches.items():
            try:
                raw = await self.registry.fetch_blob(image.ref, ref.digest, max_size=ref.size or soci_index.MAX_PREFETCH)
                out[layer] = soci_index.parse_prefetch(raw)
            except (RegistryError, FormatError) as e:
                log.warning("ignoring SOCI prefetch artifact %s of %s: %s", ref.digest, image.ref, e)
        return out

    async def _record_profile(self, recording: Recording) -> None:
        """Let the recording run for its window after the image's first read (if one comes), then save it."""
        try:
            with trio.move_on_after(IMAGE_TTL):
                await recording.first_read.wait()
            if recording.started is not None:
                await trio.sleep(max(0.0, recording.seconds - (time.monotonic() - recording.started)))
        finally:
            self.stop_recording(recording)
            if recording.touched:
                try:
                    path = self.profiles.put(recording.profile())
                except OSError as e:  # a full disk costs this profile, never the daemon
                    log.warning("could not save the start profile of %s: %s", recording.image, e)
                else:
                    log.info("saved the start profile of %s (%d units) to %s", recording.image,
                             len(recording.touched), path)


def layer_annotations(raw: bytes) -> dict[str, dict[str, str]]:
    """Layer digest -> annotations, from an image manifest's bytes (an index has no layers: {})."""
    layers = load_object(raw, "image manifest").get("layers") or []
    if not isinstance(layers, list):
        raise FormatError("image manifest: layers is not an array")
    descriptors = [Descriptor.parse(item, f"image manifest layer {i}") for i, item in enumerate(layers)]
    return {d.digest: d.annotations for d in descriptors}


def layer_sizes(raw: bytes) -> dict[str, int]:
    """Layer digest -> size, from an image manifest's bytes, bottom layer first."""
    layers = load_object(raw, "image manifest").get("layers") or []
    if not isinstance(layers, list):
        raise FormatError("image manifest: layers is not an array")
    descriptors = [Descriptor.parse(item, f"image manifest layer {i}") for i, item in enumerate(layers)]
    return {d.digest: d.size for d in descriptors}


def borrowed_note(image: Image, digest: str) -> str:
    """Whose profile the layer's prefetch comes from, when not the image's own ("" then)."""
    mine = [b for b in image.borrowed if b.layer.digest == digest]
    if not mine:
        return ""
    return describe_borrowed([b for b in image.borrowed if b.image == mine[0].image])


def prefetch_units(image: Image, digest: str,
                   layer: EStargzLayer | SociLayer) -> tuple[list[tuple[float, Unit]], list[str]]:
    """The units to prefetch with their priorities (lower is sooner), and where the list came from.

    A profile's units come when the image first read them (milliseconds into its start;
    their rank when the profile has no times). What the image declares itself (landmark,
    SOCI prefetch artifact) comes first.
    """
    units: list[tuple[float, Unit]] = []
    sources: list[str] = []
    recorded = image.profile.for_layer(digest) if image.profile is not None else None
    if recorded is not None:
        units += [(float(recorded.at[k] if recorded.at else k), u) for u, k in first_reached(layer.units, recorded.ranges)]
        sources.append(borrowed_note(image, digest) or "start profile")
    if isinstance(layer, EStargzLayer):
        end = estargz.prefetch_end(layer.index.toc)
        if end:
            units += [(0.0, u) for u, _ in first_reached(layer.units, [(0, end)])]
            sources.append("prefetch landmark")
    spans = image.soci_prefetch.get(digest, [])
    if spans and isinstance(layer, SociLayer):
        units += [(0.0, u) for first, last in spans for u in layer.units[first:last + 1]]
        sources.append("SOCI prefetch artifact")
    return units, sources
