"""Start profiles that survive a rebuild (`profiles.find_shared`): an image with no profile of
its own borrows, for the layers it shares with other images, the ranges their profiles
recorded for those layers; from this node's store (indexed by layer) or from the registry
(`lazysnap-profile-<layer hex>` tags pushed by `profile push`), and never for a layer it
does not have.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from snapshotter import profiles
from snapshotter.formats import profile as fmt
from snapshotter.formats.descriptor import Descriptor
from snapshotter.formats.digest import content_digest
from snapshotter.layers.images import Image, ImageOptions, Images, borrowed_note, prefetch_units
from snapshotter.fetch.prefetch import FetchQueue
from snapshotter.profiles import Borrowed, ProfileStore, find_shared, layer_tag
from snapshotter.registry.errors import NotFoundError, RegistryUnavailable
from snapshotter.registry.reference import parse
from snapshotter.soci.local import LocalIndexes
from tests.unit.fakes import FakeRegistry, build
from tests.unit.test_manager import REF, opened, request_for

REPO = "registry.test/app"
V1 = "sha256:" + "1" * 64
V2 = "sha256:" + "2" * 64
BASE, LIBS, TOP1, TOP2 = ("sha256:" + c * 64 for c in "abce")
SIZES = {BASE: 50_000, LIBS: 20_000, TOP1: 700, TOP2: 800}
V2_LAYERS = [(BASE, SIZES[BASE]), (LIBS, SIZES[LIBS]), (TOP2, SIZES[TOP2])]


def v1_profile(image: str = V1) -> fmt.Profile:
    """v1's start read its base, its libraries and its own top layer."""
    return fmt.Profile(image, (fmt.LayerProfile(BASE, ((0, 1000), (4000, 9000)), (0, 30)),
                               fmt.LayerProfile(LIBS, ((100, 600),), (12,)),
                               fmt.LayerProfile(TOP1, ((0, 700),), (1,))), 30.0)


class TagRegistry:
    """One repository: manifests by tag and by digest, blobs, referrers; every lookup noted."""

    def __init__(self) -> None:
        self.manifests: dict[str, bytes] = {}
        self.blobs: dict[str, bytes] = {}
        self.referrer_list: dict[str, list[Descriptor]] = {}
        self.images: dict[str, str] = {}
        """Tag -> the image manifest digest it resolves to."""
        self.calls: list[tuple[str, str]] = []
        self.hang = False

    async def resolve(self, ref: str) -> SimpleNamespace:
        reference = parse(ref)
        assert reference.tag is not None
        return SimpleNamespace(ref=reference, digest=self.images[reference.tag], media_type=fmt.OCI_MANIFEST,
                               raw=b"{}")

    async def push_blob(self, ref: object, data: bytes, media_type: str = "") -> str:
        self.blobs[content_digest(data)] = data
        return content_digest(data)

    async def push_referrer(self, ref: object, raw: bytes, media_type: str) -> Descriptor:
        digest = content_digest(raw)
        self.manifests[digest] = raw
        subject = json.loads(raw)["subject"]["digest"]
        descriptor = Descriptor(media_type, digest, len(raw), artifact_type=fmt.ARTIFACT_TYPE)
        self.referrer_list.setdefault(subject, []).append(descriptor)
        return descriptor

    async def push_manifest(self, ref: str, raw: bytes, media_type: str) -> str:
        reference = parse(ref)
        assert reference.name == REPO and reference.tag is not None
        self.calls.append(("push", reference.tag))
        self.manifests[reference.tag] = raw
        return content_digest(raw)

    async def referrers(self, ref: str, subject: str, artifact_type: str | None = None) -> list[Descriptor]:
        self.calls.append(("referrers", subject))
        await trio.lowlevel.checkpoint()
        return list(self.referrer_list.get(subject, []))

    async def fetch_manifest(self, ref: str, digest_or_tag: str, accept: str = "") -> tuple[str, bytes, str]:
        self.calls.append(("manifest", digest_or_tag))
        if self.hang:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()
        if digest_or_tag not in self.manifests:
            raise NotFoundError(f"manifest {digest_or_tag}: not found")
        raw = self.manifests[digest_or_tag]
        return fmt.OCI_MANIFEST, raw, content_digest(raw)

    async def fetch_blob(self, ref: str, digest: str, max_size: int | None = None) -> bytes:
        self.calls.append(("blob", digest))
        await trio.lowlevel.checkpoint()
        return self.blobs[digest]

    def lookups(self) -> list[str]:
        """The layer tags looked up, in order (their hex shortened to the digest's first letter)."""
        return ["sha256:" + tag.removeprefix(profiles.LAYER_TAG_PREFIX)[:1] * 64 for kind, tag in self.calls
                if kind == "manifest" and tag.startswith(profiles.LAYER_TAG_PREFIX)]


async def pushed_v1(tmp_path: Path) -> TagRegistry:
    """v1's profile recorded on a node of its own and pushed with `profile push`."""
    registry = TagRegistry()
    registry.images["v1"] = V1
    store = ProfileStore(tmp_path / "teacher")
    store.put(v1_profile())
    result = await profiles.push(registry, store, f"{REPO}:v1")  # type: ignore[arg-type]
    assert sorted(result.layer_tags) == sorted(layer_tag(d) for d in (BASE, LIBS, TOP1))
    registry.calls.clear()
    return registry


# --------------------------------------------------------------------------- this node's store

def test_the_store_finds_the_newest_profile_of_each_layer_whatever_its_image(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path / "profiles")
    store.put(v1_profile())
    assert store.for_layer(BASE) == v1_profile()
    assert store.for_layer(TOP2) is None
    newer = fmt.Profile("sha256:" + "3" * 64, (fmt.LayerProfile(BASE, ((0, 10),)),))
    store.put(newer)
    assert store.for_layer(BASE) == newer and store.for_layer(LIBS) == v1_profile()


def test_profiles_saved_before_the_layer_index_are_indexed_on_first_use(tmp_path: Path) -> None:
    directory = tmp_path / "profiles"
    directory.mkdir()
    (directory / f"{V1[7:]}.json").write_bytes(fmt.encode(v1_profile()))
    assert ProfileStore(directory).for_layer(LIBS) == v1_profile()


def test_the_index_never_hands_out_a_profile_that_does_not_cover_the_layer(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path / "profiles")
    store.put(v1_profile())
    (store.dir / "layers" / LIBS[7:]).write_text("sha256:" + "9" * 64)  # a profile since removed
    assert store.for_layer(LIBS) is None
    (store.dir / "layers" / LIBS[7:]).write_text("garbage")
    assert store.for_layer(LIBS) is None


async def test_a_rebuilt_image_borrows_only_the_layers_it_shares(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path / "profiles")
    store.put(v1_profile())
    found = await find_shared(FakeRegistry({}), store, f"{REPO}:v2", V2_LAYERS)  # type: ignore[arg-type]
    assert found == {BASE: Borrowed(v1_profile().layers[0], V1, "this node"),
                     LIBS: Borrowed(v1_profile().layers[1], V1, "this node")}
    assert TOP1 not in found, "never the ranges of a layer the new image does not have"
    profile = profiles.borrowed_profile(V2, list(found.values()))
    assert profile.image == V2 and profile.for_layer(TOP2) is None and profile.bytes == 1000 + 5000 + 500
    assert profiles.describe_borrowed(list(found.values())) == \
        f"start profile of {V1[:19]} (this node) for 2 shared layers"


async def test_ranges_that_end_past_the_layer_are_not_borrowed(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path / "profiles")
    store.put(v1_profile())
    small = [(BASE, 8999), (LIBS, SIZES[LIBS])]
    found = await find_shared(FakeRegistry({}), store, f"{REPO}:v2", small)  # type: ignore[arg-type]
    assert list(found) == [LIBS]
    unknown = [(BASE, 0)]  # no manifest: the size is not known; the units bound what is fetched
    assert list(await find_shared(FakeRegistry({}), store, f"{REPO}:v2", unknown)) == [BASE]  # type: ignore[arg-type]
    other = [("sha512:" + "a" * 128, 100), ("sha256:AB", 100)]  # no profile names such layers, nor tag
    assert await find_shared(FakeRegistry({}), store, f"{REPO}:v2", other) == {}  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the registry

async def test_push_tags_the_profile_per_layer_and_a_rebuild_finds_it_with_few_lookups(tmp_path: Path) -> None:
    registry = await pushed_v1(tmp_path)
    fresh = ProfileStore(tmp_path / "fresh")
    found = await find_shared(registry, fresh, f"{REPO}:v2", V2_LAYERS, lookups=1)  # type: ignore[arg-type]
    assert set(found) == {BASE, LIBS}
    assert {b.where for b in found.values()} == {REPO} and found[BASE].layer == v1_profile().layers[0]
    assert found[BASE].source == f"{REPO}@{V1[:19]} (registry)"
    assert registry.lookups() == [BASE, TOP2], "largest first; the base layer's hit covers the libraries too"
    assert sum(1 for kind, _ in registry.calls if kind == "blob") == 1


async def test_parallel_lookups_fetch_each_profile_once(tmp_path: Path) -> None:
    registry = await pushed_v1(tmp_path)
    found = await find_shared(registry, ProfileStore(tmp_path / "fresh"), f"{REPO}:v2",  # type: ignore[arg-type]
                              V2_LAYERS, lookups=3)
    assert set(found) == {BASE, LIBS}
    assert sum(1 for kind, _ in registry.calls if kind == "blob") == 1


async def test_this_nodes_profiles_spare_the_registry_lookups(tmp_path: Path) -> None:
    registry = await pushed_v1(tmp_path)
    store = ProfileStore(tmp_path / "profiles")
    store.put(v1_profile())
    found = await find_shared(registry, store, f"{REPO}:v2", V2_LAYERS)  # type: ignore[arg-type]
    assert {b.where for b in found.values()} == {"this node"}
    assert registry.lookups() == [TOP2], "only the layer no local profile covers"


async def test_a_broken_or_unreachable_registry_only_means_nothing_borrowed(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    registry = await pushed_v1(tmp_path)
    registry.manifests[layer_tag(BASE)] = b"not json"
    found = await find_shared(registry, ProfileStore(tmp_path / "a"), f"{REPO}:v2", V2_LAYERS,  # type: ignore[arg-type]
                              lookups=1)
    assert set(found) == {BASE, LIBS}, "the libraries' tag still points at v1's profile, which covers both"

    class Down(TagRegistry):
        async def fetch_manifest(self, ref: str, digest_or_tag: str, accept: str = "") -> tuple[str, bytes, str]:
            raise RegistryUnavailable("connection refused")

    assert await find_shared(Down(), ProfileStore(tmp_path / "b"), f"{REPO}:v2", V2_LAYERS) == {}  # type: ignore[arg-type]
    monkeypatch.setattr(profiles, "BORROW_SECONDS", 0.2)
    registry.hang = True
    with trio.fail_after(5):
        assert await find_shared(registry, ProfileStore(tmp_path / "c"), f"{REPO}:v2", V2_LAYERS) == {}  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the image

def image_of(digest: str, layers: list[tuple[str, int]]) -> Image:
    image = Image(f"{REPO}:v2", digest, tuple(d for d, _ in layers), FetchQueue(trio.CapacityLimiter(1)))
    image.layer_sizes = dict(layers)
    return image


async def find_profile(tmp_path: Path, registry: Any, image: Image) -> None:
    async with trio.open_nursery() as nursery:
        images = Images(registry, LocalIndexes(tmp_path / "soci"), ProfileStore(tmp_path / "node"), nursery,
                        ImageOptions(), lambda recording: None)
        await images._find_profile(image)


async def test_an_image_without_a_profile_borrows_and_is_recorded_too(tmp_path: Path) -> None:
    registry = await pushed_v1(tmp_path)
    image = image_of(V2, V2_LAYERS)
    await find_profile(tmp_path, registry, image)
    assert image.profile is not None and [layer.digest for layer in image.profile.layers] == [BASE, LIBS]
    assert [b.layer.digest for b in image.borrowed] == [BASE, LIBS]
    assert image.recording is not None, "v2 gets a profile of its own from this start"
    assert borrowed_note(image, BASE) == f"start profile of {REPO}@{V1[:19]} (registry) for 2 shared layers"
    assert borrowed_note(image, TOP2) == ""


async def test_the_images_own_profile_in_the_registry_wins_over_borrowing(tmp_path: Path) -> None:
    registry = await pushed_v1(tmp_path)
    registry.images["v2"] = V2
    own = fmt.Profile(V2, (fmt.LayerProfile(TOP2, ((0, 800),)),))
    store = ProfileStore(tmp_path / "v2-teacher")
    store.put(own)
    await profiles.push(registry, store, f"{REPO}:v2")  # type: ignore[arg-type]
    image = image_of(V2, V2_LAYERS)
    await find_profile(tmp_path, registry, image)
    assert image.profile == own and image.borrowed == () and image.recording is None


async def test_a_borrowed_profile_prefetches_the_shared_layer_and_says_whose(tmp_path: Path) -> None:
    """Through the manager: the base layer's prefetch comes from another image's profile (named in
    `lazysnap status`), the new layer is fetched only when read."""
    base, top = build(31), build(32)
    registry = FakeRegistry({base.digest: base.blob, top.digest: top.blob}, V2)
    registry.manifest = json.dumps({"schemaVersion": 2, "mediaType": fmt.OCI_MANIFEST, "layers": [
        {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": b.digest, "size": len(b.blob)}
        for b in (base, top)]}).encode()
    other = fmt.Profile(V1, (fmt.LayerProfile(base.digest, ((0, len(base.blob)),)),
                             fmt.LayerProfile(TOP1, ((0, 700),))))
    ProfileStore(tmp_path / "root" / "profiles").put(other)
    async with opened(tmp_path, registry, prefetch=True, record_profiles=True) as env:
        layers = (base.digest, top.digest)
        for i, built in enumerate((base, top)):
            req = request_for(built, layers=layers[i:])
            with trio.fail_after(5):
                assert await env.manager._mount(type(req)(**{**req.__dict__, "manifest_digest": V2})) is not None
        status = env.manager.served.status
        with trio.fail_after(10):
            while not status[base.digest].progress.prefetched_bytes:
                await trio.sleep(0.01)
        assert status[base.digest].reason == \
            f"prefetched the start profile of {V1[:19]} (this node) for 1 shared layer"
        assert status[top.digest].reason == "" and status[top.digest].progress.prefetched_bytes == 0
        assert all(start > 0 for digest, start, _ in registry.reads if digest == top.digest), \
            "of the new layer only its index was fetched: its files wait for reads"
        image = env.manager.images._images[V2]
        assert image.recording is not None and REF == image.ref
        units, sources = prefetch_units(image, base.digest, status[base.digest].layer)  # type: ignore[arg-type]
        assert units and sources == [f"start profile of {V1[:19]} (this node) for 1 shared layer"]
