"""The layer manager (`layers/manager.py`): resolve, verify, attach, and every way a layer falls back.

Real store, chunk cache, resolver, image discovery and eStargz layers; the data plane
(which would mount) and the registry are fakes (`fakes.py`). The manager is opened with
`open_manager` as the daemon does, and `_mount` (the trio side of containerd's Prepare)
is called directly.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from snapshotter.cache import ChunkCache
from snapshotter.labels import LayerRequest
from snapshotter.layers import saved
from snapshotter.layers.estargz import EStargzLayer
from snapshotter.layers.manager import LayerManager, ManagerOptions, open_manager
from snapshotter.layers.served import AttachError
from snapshotter.registry.errors import RegistryUnavailable
from snapshotter.store import LayerRecord, Store
from tests.harness.hostile import build_hostile_estargz, retarget_hardlink
from tests.harness.images import File, Hardlink
from tests.unit.fakes import Built, FakePlane, FakeRegistry, build

REF = "registry.test/app:1"


def quiet_options(**changes: Any) -> ManagerOptions:
    """No background work: no background fetch, profiles, prefetch, readahead or EROFS probe."""
    options: dict[str, Any] = dict(background=None, record_profiles=False, prefetch=False, readahead_max=0,
                                   kernel_metadata=False)
    options.update(changes)
    return ManagerOptions(**options)


@dataclass
class Env:
    manager: LayerManager
    plane: FakePlane
    registry: FakeRegistry
    store: Store
    root: Path

    def layers(self) -> list[LayerRecord]:
        with self.store.transaction() as tx:
            return tx.layers()


@asynccontextmanager
async def opened(tmp_path: Path, registry: FakeRegistry, plane: FakePlane | None = None,
                 **options: Any) -> AsyncIterator[Env]:
    root = tmp_path / "root"
    root.mkdir(parents=True, exist_ok=True)
    plane = plane or FakePlane(root)
    store = Store(root / "metadata.db")
    try:
        cache = ChunkCache(root / "cache", 1 << 30)
        async with open_manager(root, store, registry, cache, plane,  # type: ignore[arg-type]
                                quiet_options(**options)) as manager:
            yield Env(manager, plane, registry, store, root)
    finally:
        store.close()


def request(digest: str, *, toc_digest: str = "", layers: tuple[str, ...] = ()) -> LayerRequest:
    return LayerRequest(target=f"chain-{digest[7:19]}", image_ref=REF, layer_digest=digest,
                        image_layers=layers or (digest,), toc_digest=toc_digest)


def request_for(built: Built, *, layers: tuple[str, ...] = ()) -> LayerRequest:
    return request(built.digest, toc_digest=built.toc_digest, layers=layers)


# --------------------------------------------------------------------------- served lazily


async def test_an_estargz_layer_with_its_toc_digest_is_attached_and_serves_verified_chunks(tmp_path: Path) -> None:
    built = build(1)
    async with opened(tmp_path, FakeRegistry({built.digest: built.blob})) as env:
        with trio.fail_after(5):
            layer_id = await env.manager._mount(request_for(built))
        assert isinstance(layer_id, int)
        (record,) = env.layers()
        assert record.id == layer_id and (record.digest, record.format) == (built.digest, "estargz")
        assert [(r.id, kernel) for r, kernel in env.plane.attached] == [(layer_id, False)]
        status = env.manager.served.status[built.digest]
        assert (status.mode, status.reason, status.size) == ("estargz", "", len(built.blob))
        assert status.path == str(env.plane.layer_path(layer_id))
        assert env.manager.explain(built.digest) == ("estargz", "")
        assert saved.files_of(env.root, record).index.exists(), "the verified TOC is saved for restarts"

        layer = status.layer
        assert isinstance(layer, EStargzLayer)
        node = layer.tree.resolve("big.bin")
        assert node is not None and isinstance(node.content, tuple) and len(node.content) == 4
        chunk = node.content[2]
        assert chunk.digest
        reads_before = len(env.registry.reads)
        with trio.fail_after(5):
            data = await env.manager.serve_unit(built.digest, chunk.digest)
        assert data == built.files["big.bin"][chunk.file_offset:chunk.file_offset + chunk.size]
        assert "sha256:" + hashlib.sha256(data).hexdigest() == chunk.digest
        assert len(env.registry.reads) > reads_before, "the miss was fetched from the registry"
        assert env.registry.opens_of(built.digest) == 1, "the blob is located once, at resolution"


# --------------------------------------------------------------------------- fallbacks


async def test_a_wrong_toc_digest_falls_back_and_attaches_nothing(tmp_path: Path) -> None:
    built = build(2)
    async with opened(tmp_path, FakeRegistry({built.digest: built.blob})) as env:
        wrong = "sha256:" + hashlib.sha256(b"not this TOC").hexdigest()
        with trio.fail_after(5):
            assert await env.manager._mount(request(built.digest, toc_digest=wrong)) is None
        status = env.manager.served.status[built.digest]
        assert status.mode == "fallback"
        assert "TOC digest" in status.reason and wrong in status.reason
        assert status.layer is None
        assert env.plane.attached == [] and env.layers() == []


async def test_a_layer_without_a_toc_digest_falls_back_unless_unverified_tocs_are_allowed(tmp_path: Path) -> None:
    built = build(3)
    async with opened(tmp_path, FakeRegistry({built.digest: built.blob})) as env:
        with trio.fail_after(5):
            assert await env.manager._mount(request(built.digest)) is None
        assert env.manager.served.status[built.digest].mode == "fallback"
        assert "toc.digest" in env.manager.served.status[built.digest].reason
    async with opened(tmp_path / "b", FakeRegistry({built.digest: built.blob}), allow_unverified=True) as env:
        with trio.fail_after(5):
            assert await env.manager._mount(request(built.digest)) is not None
        assert env.manager.served.status[built.digest].mode == "estargz"


async def test_a_hardlink_to_a_missing_target_falls_back_with_the_reason(tmp_path: Path) -> None:
    hostile = build_hostile_estargz([File("bin/tool", b"#!/bin/sh\n" * 100), Hardlink("bin/again", "bin/tool")],
                                    retarget_hardlink("bin/again", "bin/nowhere"))
    async with opened(tmp_path, FakeRegistry({hostile.digest: hostile.blob})) as env:
        with trio.fail_after(5):
            # The TOC digest is right: the TOC is the one the image vouches for, and it lies.
            assert await env.manager._mount(request(hostile.digest, toc_digest=hostile.toc_digest)) is None
        status = env.manager.served.status[hostile.digest]
        assert status.mode == "fallback"
        assert "hardlink" in status.reason and "bin/nowhere" in status.reason
        assert status.reason.startswith("unusable estargz index:")
        assert env.plane.attached == [] and env.layers() == []


async def test_an_attach_error_falls_back_and_forgets_the_layer_record(tmp_path: Path) -> None:
    built = build(4)
    plane = FakePlane(tmp_path / "root", attach_error=AttachError("boom"))
    async with opened(tmp_path, FakeRegistry({built.digest: built.blob}), plane) as env:
        with trio.fail_after(5):
            assert await env.manager._mount(request_for(built)) is None
        status = env.manager.served.status[built.digest]
        assert (status.mode, status.reason, status.layer) == ("fallback", "boom", None)
        assert env.layers() == [], "nothing is left to restore at the next start"
        layers_dir = env.root / saved.INDEX_DIR
        assert not layers_dir.exists() or list(layers_dir.iterdir()) == [], "nor its saved index"
        assert plane.attached == []


async def test_a_registry_error_at_open_blob_falls_back_with_a_registry_reason(tmp_path: Path) -> None:
    built = build(5)
    registry = FakeRegistry({built.digest: built.blob})
    registry.open_error = RegistryUnavailable(f"blob {built.digest} of {REF}: connection refused")
    async with opened(tmp_path, registry) as env:
        with trio.fail_after(5):
            assert await env.manager._mount(request_for(built)) is None
        status = env.manager.served.status[built.digest]
        assert status.mode == "fallback"
        assert status.reason.startswith("registry:") and "connection refused" in status.reason
        assert env.plane.attached == [] and env.layers() == []


async def test_a_registry_that_never_answers_falls_back_after_the_resolve_timeout(tmp_path: Path) -> None:
    built = build(6)
    registry = FakeRegistry({built.digest: built.blob})
    registry.hang_open = True
    async with opened(tmp_path, registry, resolve_timeout=0.5) as env:
        start = trio.current_time()
        with trio.fail_after(5):
            assert await env.manager._mount(request_for(built)) is None
        elapsed = trio.current_time() - start
        assert 0.45 <= elapsed < 1.0, elapsed
        status = env.manager.served.status[built.digest]
        assert status.mode == "fallback"
        assert "took over 0.5 s" in status.reason
        assert registry.opens_of(built.digest) == 1
        assert env.plane.attached == [] and env.layers() == []


# --------------------------------------------------------------------------- looking ahead


async def test_mounting_a_layer_resolves_the_images_other_layers_ahead(tmp_path: Path) -> None:
    one, two = build(7), build(8)
    registry = FakeRegistry({one.digest: one.blob, two.digest: two.blob})
    async with opened(tmp_path, registry) as env:
        with trio.fail_after(5):
            first = await env.manager._mount(request_for(one, layers=(one.digest, two.digest)))
            assert first is not None
            while not any(d == two.digest for d, _, _ in registry.reads):  # its footer read, in the background
                await trio.sleep(0.01)
        assert registry.opens_of(one.digest) == 1
        assert registry.opens_of(two.digest) == 1, "layer 2's index is fetched before its own Prepare"
        assert env.plane.attached[0][0].digest == one.digest and len(env.plane.attached) == 1

        with trio.fail_after(5):
            second = await env.manager._mount(request_for(two))
        assert second is not None and second != first
        assert registry.opens_of(two.digest) == 1, "the second Prepare uses the index fetched ahead"
        reads_of_two = [(s, e) for d, s, e in registry.reads if d == two.digest]
        assert len(reads_of_two) == len(set(reads_of_two)), "no part of layer 2's index is fetched twice"
        assert [r.digest for r, _ in env.plane.attached] == [one.digest, two.digest]
        assert env.manager.served.status[two.digest].mode == "estargz"
        assert "resolve" in registry.calls, "the image was looked up (for its SOCI index) once per image"
        assert registry.calls.count("resolve") == 1


async def test_an_expected_image_has_every_layer_resolved_before_its_first_prepare(tmp_path: Path) -> None:
    one, two = build(9), build(10)
    registry = FakeRegistry({one.digest: one.blob, two.digest: two.blob})
    async with opened(tmp_path, registry) as env:
        env.manager.expect(request_for(one, layers=(one.digest, two.digest)))  # rpull, once the manifest is resolved
        with trio.fail_after(5):
            while not all(any(d == b.digest for d, _, _ in registry.reads) for b in (one, two)):
                await trio.sleep(0.01)
        assert env.plane.attached == [], "expecting an image attaches nothing: only its Prepares do"
        with trio.fail_after(5):
            first = await env.manager._mount(request_for(one, layers=(one.digest, two.digest)))
            second = await env.manager._mount(request_for(two))
        assert first is not None and second is not None
        assert (registry.opens_of(one.digest), registry.opens_of(two.digest)) == (1, 1), \
            "the Prepares use the indexes fetched when the image was expected"
        assert [r.digest for r, _ in env.plane.attached] == [one.digest, two.digest]


# --------------------------------------------------------------------------- release


async def test_release_cancels_the_layers_tasks_and_detaches_it(tmp_path: Path) -> None:
    built = build(9)
    async with opened(tmp_path, FakeRegistry({built.digest: built.blob})) as env:
        with trio.fail_after(5):
            layer_id = await env.manager._mount(request_for(built))
        assert layer_id is not None
        (record,) = env.layers()
        status = env.manager.served.status[built.digest]
        started, cancelled = trio.Event(), trio.Event()

        async def forever() -> None:
            started.set()
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                cancelled.set()
                raise

        with trio.fail_after(5):
            env.manager.nursery.start_soon(status.run_task, forever)
            await started.wait()
            await trio.sleep(0.05)
            assert status.tasks and not cancelled.is_set(), "the task runs until the layer is released"
            await env.manager.served.release([record])
            await cancelled.wait()
            while status.tasks:  # every task of the layer ends with it
                await trio.sleep(0.01)
        assert env.plane.detached == [layer_id]
        assert built.digest not in env.manager.served.status
        assert not saved.files_of(env.root, record).dir.exists()


# --------------------------------------------------------------------------- a layer shared by two images


async def test_a_failed_prepare_of_an_already_served_layer_leaves_it_served(tmp_path: Path) -> None:
    """Image B shares layer X with image A, whose containers run on it. B's Prepare of X
    falls back (here the registry fails; a timeout or a refused attach does the same): X must
    stay served for A, since A's snapshot and the data plane's mount of X are still there."""
    built = build(10)
    registry = FakeRegistry({built.digest: built.blob})
    async with opened(tmp_path, registry) as env:
        env.manager.served.restored.set()  # as the daemon does at start, before any Prepare
        with trio.fail_after(5):
            layer_id = await env.manager._mount(request_for(built))
        assert layer_id is not None
        status = env.manager.served.status[built.digest]
        layer = status.layer
        assert isinstance(layer, EStargzLayer)

        registry.open_error = RegistryUnavailable("connection refused")
        other = LayerRequest(target="chain-of-b", image_ref="registry.test/other:2", layer_digest=built.digest,
                             image_layers=(built.digest,), toc_digest=built.toc_digest)
        with trio.fail_after(5):
            assert await env.manager._mount(other) == layer_id  # served already: B uses it too
        assert env.plane.detached == [] and [r.id for r, _ in env.plane.attached] == [layer_id]
        node = layer.tree.resolve("big.bin")
        assert node is not None and isinstance(node.content, tuple)
        chunk = node.content[0]
        # A's containers read X through the data plane, whose misses come here:
        assert env.manager.explain(built.digest) == ("estargz", "")
        with trio.fail_after(5):
            data = await env.manager.serve_unit(built.digest, chunk.digest)
        assert data == built.files["big.bin"][:chunk.size]
