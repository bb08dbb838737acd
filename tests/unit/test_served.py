"""The control plane's table of served layers (`layers/served.py`), with a fake data plane.

Real store, real chunk cache, real eStargz layers built from in-memory blobs; only the data
plane (which would mount) and the registry (which `restore` reaches lazily) are fakes.
"""

from __future__ import annotations

import errno
import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from snapshotter.cache import ChunkCache
from snapshotter.fetch.activity import FetchActivity
from snapshotter.fetch.blob import StoredBlob
from snapshotter.formats.errors import FormatError
from snapshotter.labels import LayerRequest
from snapshotter.layer_modes import LayerMode
from snapshotter.layers import saved
from snapshotter.layers.estargz import EStargzLayer, fetch_index
from snapshotter.layers.layer import ReadError
from snapshotter.layers.served import AttachError, ServedLayers
from snapshotter.recording import Recording
from snapshotter.store import LayerRecord, Store
from tests.unit.blobs import MemoryBlob
from tests.unit.fakes import Built, FakePlane, FakeRegistry, build
from tests.unit.fuse_layers import force_unmount, mounted


class Env:
    """A control plane root: store, cache, and a `ServedLayers` on a fake data plane."""

    def __init__(self, root: Path, plane: FakePlane, registry: object) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.store = Store(root / "metadata.db")
        self.cache = ChunkCache(root / "cache", 1 << 30)
        self.plane = plane
        self.served = ServedLayers(root, self.store, registry, self.cache, FetchActivity(),  # type: ignore[arg-type]
                                   plane)

    async def attach(self, built: Built, ref: str = "registry.test/app:1") -> tuple[LayerRecord, EStargzLayer]:
        blob = MemoryBlob(built.blob, built.digest)
        index = await fetch_index(blob)
        layer = EStargzLayer(index, blob, self.cache, self.served.activity)
        request = LayerRequest(target="t", image_ref=ref, layer_digest=built.digest, image_layers=(built.digest,))
        record = await self.served.attach_new(request, LayerMode.ESTARGZ, index.member, index.toc.digest,
                                              index.footer.toc_offset, layer, None, self.served.status_of(request))
        return record, layer


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "root"


def request_for(built: Built) -> LayerRequest:
    return LayerRequest(target="t", image_ref="registry.test/app:1", layer_digest=built.digest,
                        image_layers=(built.digest,))


# --------------------------------------------------------------------------- attach


async def test_attach_new_saves_the_index_records_and_serves_the_layer(root: Path) -> None:
    built = build(1)
    env = Env(root, FakePlane(root), registry=object())
    record, layer = await env.attach(built)
    files = saved.files_of(root, record)
    assert files.dir == root / "layers" / str(record.id)
    assert files.index.read_bytes() == layer.index.member, "the verified TOC member is saved as fetched"
    assert not files.meta.exists() and not files.extents.exists(), "no EROFS image when the kernel serves none"
    assert [(r.id, k) for r, k in env.plane.attached] == [(record.id, False)]
    with env.store.transaction() as tx:
        assert tx.layers() == [record]
    assert (record.digest, record.format, record.blob_size) == (built.digest, "estargz", len(built.blob))
    assert record.index_digest == layer.index.toc.digest
    status = env.served.status[built.digest]
    assert (status.mode, status.reason, status.size, status.layer) == ("estargz", "", len(built.blob), layer)
    assert status.path == str(root / "mnt" / str(record.id))
    assert env.served.explain(built.digest) == ("estargz", "")
    # What was saved is what a data plane loads: the digest check against the record passes.
    again = saved.load_layer(root, record, StoredBlob(record.digest, record.blob_size), env.cache)
    assert again.tree.resolve("etc/conf") is not None
    env.store.close()


async def test_attach_error_from_the_data_plane_reaches_the_caller(root: Path) -> None:
    built = build(2)
    env = Env(root, FakePlane(root, attach_error=AttachError("data plane 1: cannot mount layer")), registry=object())
    with pytest.raises(AttachError, match="cannot mount layer"):
        await env.attach(built)
    status = env.served.status[built.digest]
    assert status.mode is None and status.layer is None, "a layer that is not served is not reported as served"
    env.store.close()


async def test_full_disk_under_layers_is_an_attach_error(root: Path) -> None:
    built = build(3)
    layers = root / saved.INDEX_DIR
    layers.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(layers)], check=True, capture_output=True)
    try:
        assert mounted(layers)
        with pytest.raises(OSError) as filling:  # fill it
            with open(layers / "filler", "wb") as f:
                for _ in range(64):
                    f.write(b"\0" * (16 << 10))
                    f.flush()
        assert filling.value.errno == errno.ENOSPC
        env = Env(root, FakePlane(root), registry=object())
        with pytest.raises(AttachError, match="No space left") as refused:
            await env.attach(built)
        assert str(layers) in str(refused.value)
        assert env.plane.attached == [], "nothing is handed to a data plane without its saved index"
        assert env.served.status[built.digest].mode is None
        assert not list(layers.rglob("*.tmp")) and not list(layers.rglob(".toc.gz.*")), "no torn temporaries"
        env.store.close()
    finally:
        subprocess.run(["umount", str(layers)], check=False, capture_output=True)
        force_unmount(layers)
    assert not mounted(layers)


# --------------------------------------------------------------------------- restore


async def test_restore_attaches_only_unserved_layers_and_detaches_unstored_ones(root: Path) -> None:
    one, two, three = build(4), build(5), build(6)
    first = Env(root, FakePlane(root), registry=object())
    records = [(await first.attach(b))[0] for b in (one, two, three)]
    first.store.close()

    # A restart: a data plane still serves layer `one`, and layer 999, which is no longer stored.
    registry = FakeRegistry({b.digest: b.blob for b in (one, two, three)})
    plane = FakePlane(root, serving={records[0].id, 999})
    env = Env(root, plane, registry=registry)
    assert not env.served.restored.is_set()
    await env.served.restore()
    assert env.served.restored.is_set()
    assert sorted(r.id for r, _ in plane.attached) == [records[1].id, records[2].id]
    assert plane.detached == [999]
    for built, record in zip((one, two, three), records):
        status = env.served.status[built.digest]
        assert status.mode == "estargz" and status.layer is not None and status.reason == ""
        assert status.path == str(root / "mnt" / str(record.id))
    assert registry.opened == [], "a restart must not need the registry"
    env.store.close()


async def test_restore_falls_back_for_a_layer_whose_saved_index_is_gone(root: Path) -> None:
    good, lost = build(7), build(8)
    first = Env(root, FakePlane(root), registry=object())
    await first.attach(good)
    lost_record, _ = await first.attach(lost)
    first.store.close()
    saved.files_of(root, lost_record).index.unlink()
    env = Env(root, FakePlane(root), registry=FakeRegistry({}))
    await env.served.restore()
    assert env.served.status[good.digest].mode == "estargz"
    assert env.served.status[lost.digest].mode == "fallback"
    assert "restore failed" in env.served.status[lost.digest].reason
    assert [r.digest for r, _ in env.plane.attached] == [good.digest]
    env.store.close()


async def test_restore_refuses_a_saved_index_that_is_not_the_recorded_one(root: Path) -> None:
    a, b = build(9), build(10)
    first = Env(root, FakePlane(root), registry=object())
    rec_a, _ = await first.attach(a)
    rec_b, _ = await first.attach(b)
    first.store.close()
    swapped = saved.files_of(root, rec_b).index.read_bytes()
    saved.files_of(root, rec_a).index.write_bytes(swapped)  # a's files now hold b's TOC
    with pytest.raises(FormatError, match="is not"):
        saved.load_layer(root, rec_a, StoredBlob(rec_a.digest, rec_a.blob_size),
                         ChunkCache(root / "cache", 1 << 30))
    env = Env(root, FakePlane(root), registry=FakeRegistry({}))
    await env.served.restore()
    assert env.served.status[a.digest].mode == "fallback"
    assert env.served.status[b.digest].mode == "estargz"
    env.store.close()


# --------------------------------------------------------------------------- the data planes' calls


def chunks_of(layer: EStargzLayer, path: str) -> list:  # type: ignore[type-arg]
    node = layer.tree.resolve(path)
    assert node is not None and isinstance(node.content, tuple)
    return list(node.content)


async def test_serve_unit_returns_verified_chunk_bytes(root: Path) -> None:
    built = build(11)
    env = Env(root, FakePlane(root), registry=object())
    _, layer = await env.attach(built)
    chunks = chunks_of(layer, "big.bin")
    assert len(chunks) == 4 and all(c.digest for c in chunks)
    for chunk in chunks:
        data = await env.served.serve_unit(built.digest, chunk.digest)
        assert data == built.files["big.bin"][chunk.file_offset:chunk.file_offset + chunk.size]
        assert "sha256:" + hashlib.sha256(data).hexdigest() == chunk.digest
        assert chunk.digest in env.cache, "a served miss is cached by the control plane"
    with pytest.raises(ReadError, match="has no chunk"):
        await env.served.serve_unit(built.digest, "sha256:" + "f" * 64)
    env.store.close()


async def test_serve_unit_of_a_restored_layer_waits_for_restore_and_reaches_the_registry_lazily(root: Path) -> None:
    built = build(12)
    first = Env(root, FakePlane(root), registry=object())
    _, before = await first.attach(built)
    first.store.close()
    chunk = chunks_of(before, "big.bin")[2]
    want = built.files["big.bin"][chunk.file_offset:chunk.file_offset + chunk.size]
    registry = FakeRegistry({built.digest: built.blob})
    env = Env(root, FakePlane(root), registry=registry)
    got: list[bytes] = []

    async def ask() -> None:
        got.append(await env.served.serve_unit(built.digest, chunk.digest))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)  # a data plane's miss, before this control plane has restored its layers
            await trio.sleep(0.05)
            assert got == [] and registry.opened == [], "the miss waits for restore instead of failing"
            await env.served.restore()
    assert got == [want]
    assert registry.opened == [("registry.test/app:1", built.digest)], "the blob is located on its first read"
    start, end = registry.ranges[0]
    assert start <= chunk.compressed_offset and chunk.compressed_end <= end, "one range GET brings the chunk"
    env.store.close()


async def test_serve_unit_of_an_unknown_layer_waits_for_restore_then_fails(root: Path) -> None:
    env = Env(root, FakePlane(root), registry=FakeRegistry({}))
    outcome: list[BaseException] = []

    async def ask() -> None:
        try:
            await env.served.serve_unit("sha256:" + "e" * 64, "sha256:" + "0" * 64)
        except ReadError as e:
            outcome.append(e)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await trio.sleep(0.05)
            assert outcome == [], "before restore, a layer may still turn up: the call must wait"
            await env.served.restore()
    assert len(outcome) == 1 and "not served by this control plane" in str(outcome[0])
    with trio.fail_after(1), pytest.raises(ReadError):  # once restored, at once
        await env.served.serve_unit("sha256:" + "e" * 64, "k")
    env.store.close()


async def test_first_reads_reach_the_layers_recordings(root: Path) -> None:
    a, b = build(13), build(14)
    env = Env(root, FakePlane(root), registry=object())
    _, layer_a = await env.attach(a)
    _, layer_b = await env.attach(b)
    recording = Recording("sha256:" + "1" * 64, (a.digest, b.digest), 30.0)
    layer_a.recordings.append(recording)  # b has no recording attached: its reads are not recorded
    env.served.first_reads({a.digest: [[0, 100], [100, 250]], b.digest: [[0, 10]],
                            "sha256:" + "9" * 64: [[0, 1]]})
    assert [(key, v[:2]) for key, v in recording.touched.items()] == [
        ((a.digest, 0), (0, 100)), ((a.digest, 100), (100, 250))]
    assert recording.started is not None
    env.store.close()


async def test_restore_clears_what_a_crash_left_behind(tmp_path: Path) -> None:
    """Saved files of a layer the store does not have, a mountpoint no data plane serves, and
    the pre-data-plane `<root>/fuse` and `<root>/erofs` directories are removed at restore."""
    root = tmp_path / "root"
    plane = FakePlane(root)
    (root / "layers" / "41").mkdir(parents=True)
    (root / "layers" / "41" / "toc.gz").write_bytes(b"orphan")
    (root / "mnt" / "42").mkdir(parents=True)
    (root / "fuse" / "3").mkdir(parents=True)
    (root / "erofs" / "3").mkdir(parents=True)
    store = Store(root / "metadata.db")
    try:
        served = ServedLayers(root, store, FakeRegistry({}), ChunkCache(root / "cache", 1 << 20),  # type: ignore[arg-type]
                              FetchActivity(), plane)
        await served.restore()
    finally:
        store.close()
    assert not (root / "layers" / "41").exists()
    assert list((root / "mnt").iterdir()) == []
    assert not (root / "fuse").exists() and not (root / "erofs").exists()
