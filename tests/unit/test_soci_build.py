"""`lazysnap index create` and `ztoc get-file` against a real docker-registry (distribution 2.8).

The image (tests/unit/soci_images.py) has two layers large enough to index and one
below the 64 KiB minimum. Blob traffic is counted in the registry's access log,
whose size field is the body bytes sent.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import tarfile
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from snapshotter.formats import soci_index, ztoc
from snapshotter.formats.tar import clean_path
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.manifest import OCI_MANIFEST
from snapshotter.soci import build, extract
from snapshotter.soci.build import EmptyIndex, SociError
from snapshotter.soci.local import LocalIndexes
from tests.harness.images import sha256_digest
from tests.harness.registry import Registry
from tests.unit.soci_images import (
    MIN,
    SPAN,
    Sample,
    blob_gets,
    options,
    push_by_client,
    pushed,
)

LIMIT = 60


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[RegistryClient]:
    async with RegistryClient(options(tmp_path)) as c:
        yield c


# --------------------------------------------------------------------------- create


async def test_create_indexes_big_layers_and_says_why_the_small_one_is_skipped(
        registry: Registry, image: Sample, client: RegistryClient, store: LocalIndexes) -> None:
    ref = pushed(registry, image, "soci/create")
    mark = registry.mark()
    with trio.fail_after(LIMIT):
        result = await build.create_index(client, store, ref, span_size=SPAN, min_layer_size=MIN)
    assert [r.digest for r in result.layers] == [layer.digest for layer in image.layers]
    assert image.small and len(image.big) == 2
    for r in result.layers:
        if len(image.layers[r.position].blob) < MIN:
            assert not r.indexed and "below the minimum layer size 64.0 KiB" in r.skipped, r
        else:
            assert r.indexed and not r.skipped and r.spans > 2 and r.files > 0 and not r.reused, r

    assert store.index_for(image.manifest_digest) == result.index_digest
    assert store.name_for(image.manifest_digest) == ref
    index = soci_index.parse_index(store.get_blob(result.index_digest) or b"", result.index_digest)
    assert index.artifact_type == soci_index.INDEX_V1
    assert index.subject is not None and index.subject.digest == image.manifest_digest
    assert index.subject.media_type == OCI_MANIFEST
    assert set(index.ztocs) == {layer.digest for layer in image.big}
    assert [json.loads(index.raw)["layers"][i]["annotations"][soci_index.LAYER_DIGEST] for i in range(2)] == \
        [layer.digest for layer in image.big], "zTOCs in image-layer order"
    assert store.get_blob(soci_index.EMPTY_CONFIG_DIGEST) == soci_index.EMPTY_CONFIG

    for layer in image.big:
        ref_ = index.ztocs[layer.digest]
        assert ref_.annotations[soci_index.SPAN_SIZE] == str(SPAN)
        assert ref_.annotations[soci_index.LAYER_MEDIA_TYPE] == layer.media_type
        data = store.get_blob(ref_.digest)
        assert data is not None and len(data) == ref_.size
        z = ztoc.parse_ztoc(data)
        assert z.compressed_archive_size == len(layer.blob)
        tar = image.tars[image.layers.index(layer)]
        assert z.uncompressed_archive_size <= len(tar)
        with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
            assert {clean_path(e.name) for e in z.entries} == set(archive.getnames())
            for e in z.entries:  # each regular file's offset points at its bytes in the uncompressed tar
                if e.type == "reg":
                    f = archive.extractfile(clean_path(e.name))
                    assert f is not None
                    assert tar[e.uncompressed_offset:e.uncompressed_offset + e.uncompressed_size] == f.read()
        assert ztoc.extract_file(z, ztoc.FileExtent(0, z.uncompressed_archive_size), layer.blob) == \
            tar[:z.uncompressed_archive_size]

    # each indexed layer was read once, whole, from the registry; the small one not at all
    for layer in image.big:
        assert blob_gets(registry, layer.digest, mark) == [len(layer.blob)]
    for layer in image.small:
        assert blob_gets(registry, layer.digest, mark) == []


async def test_ztocs_are_reused_unless_forced(registry: Registry, image: Sample, client: RegistryClient,
                                              store: LocalIndexes) -> None:
    ref = pushed(registry, image, "soci/reuse")
    with trio.fail_after(LIMIT):
        first = await build.create_index(client, store, ref, span_size=SPAN, min_layer_size=MIN)
        mark = registry.mark()
        again = await build.create_index(client, store, ref, span_size=SPAN, min_layer_size=MIN)
        assert all(r.reused for r in again.layers if r.indexed)
        assert again.index_digest == first.index_digest
        assert all(blob_gets(registry, layer.digest, mark) == [] for layer in image.layers)

        other_span = await build.create_index(client, store, ref, span_size=2 * SPAN, min_layer_size=MIN)
        assert not any(r.reused for r in other_span.layers), "a zTOC of another span size is not reused"
        assert store.index_for(image.manifest_digest) == other_span.index_digest

        mark = registry.mark()
        forced = await build.create_index(client, store, ref, span_size=SPAN, min_layer_size=MIN, force=True)
        assert not any(r.reused for r in forced.layers)
        assert forced.index_digest == first.index_digest, "building is deterministic"
        assert all(blob_gets(registry, layer.digest, mark) == [len(layer.blob)] for layer in image.big)


async def test_every_layer_skipped_is_an_error(registry: Registry, image: Sample, client: RegistryClient,
                                               store: LocalIndexes) -> None:
    ref = pushed(registry, image, "soci/empty")
    with trio.fail_after(LIMIT), pytest.raises(EmptyIndex, match="no layer of .* can be indexed") as caught:
        await build.create_index(client, store, ref, min_layer_size=1 << 30)
    assert len(caught.value.layers) == 3 and all("minimum layer size 1.0 GiB" in r.skipped
                                                 for r in caught.value.layers)
    assert store.index_for(image.manifest_digest) is None
    assert store.images() == []


async def test_uncompressed_layers_are_indexed_and_zstd_and_unknown_ones_skipped(
        registry: Registry, image: Sample, client: RegistryClient, store: LocalIndexes) -> None:
    ref = f"{registry.host}/soci/kinds:v1"
    tar = image.tars[0]
    not_a_tar = gzip.compress(os.urandom(200_000))
    with trio.fail_after(LIMIT):
        digest = await push_by_client(client, ref, [
            (tar, "application/vnd.oci.image.layer.v1.tar"),
            (os.urandom(100_000), "application/vnd.oci.image.layer.v1.tar+zstd"),
            (os.urandom(100_000), "application/vnd.example.weird"),
            (not_a_tar, "application/vnd.oci.image.layer.v1.tar+gzip"),
        ])
        result = await build.create_index(client, store, ref, span_size=SPAN, min_layer_size=MIN)
    plain, zstd, weird, garbage = result.layers
    assert plain.indexed and plain.spans == -(-len(tar) // SPAN)
    assert "zstd" in zstd.skipped and not zstd.indexed
    assert "unknown layer media type 'application/vnd.example.weird'" in weird.skipped
    assert garbage.skipped.startswith("cannot be indexed: ") and not garbage.indexed

    index = soci_index.parse_index(store.get_blob(result.index_digest) or b"")
    assert list(index.ztocs) == [sha256_digest(tar)]
    z = ztoc.parse_ztoc(store.get_blob(index.ztocs[sha256_digest(tar)].digest) or b"")
    assert z.compression.algorithm == ztoc.CompressionAlgorithm.UNCOMPRESSED

    out = io.BytesIO()
    with trio.fail_after(LIMIT):
        got = await extract.get_file(client, store, ref, sha256_digest(tar), "data/text.log", out.write)
    assert out.getvalue() == image.files[0]["data/text.log"]
    assert got.index_source == "local" and digest


async def test_streaming_keeps_memory_bounded(registry: Registry, client: RegistryClient, store: LocalIndexes) -> None:
    """A 24 MiB layer is indexed with a few MiB of Python memory: no copy of the layer is kept."""
    data = random.Random(1).randbytes(24 << 20)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("big.bin")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    blob = gzip.compress(buf.getvalue(), compresslevel=1, mtime=0)
    del buf, data
    ref = f"{registry.host}/soci/memory:v1"
    with trio.fail_after(LIMIT):
        await push_by_client(client, ref, [(blob, "application/vnd.oci.image.layer.v1.tar+gzip")])
        tracemalloc.start()
        try:
            result = await build.create_index(client, store, ref, min_layer_size=MIN)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert result.layers[0].indexed and result.layers[0].spans >= 5
    assert peak < 14 << 20, f"peak {peak / (1 << 20):.1f} MiB while streaming a {len(blob) >> 20} MiB layer"


# --------------------------------------------------------------------------- get-file


async def test_get_file_is_byte_identical_and_fetches_only_its_spans(
        registry: Registry, image: Sample, client: RegistryClient, store: LocalIndexes) -> None:
    ref = pushed(registry, image, "soci/getfile")
    with trio.fail_after(LIMIT):
        await build.create_index(client, store, ref, span_size=SPAN, min_layer_size=MIN)
    mixed, texts = image.layers[0], image.layers[2]
    cases = [(mixed, "data/random.bin"), (mixed, "data/text.log"), (mixed, "/data/small/03.txt"),
             (mixed, "./data/small/29.txt"), (mixed, "data/empty"), (texts, "srv/doc050.md"),
             (texts, "srv/blob.bin")]
    for layer, path in cases:
        want = image.files[image.layers.index(layer)][clean_path(path)]
        mark = registry.mark()
        out = io.BytesIO()
        with trio.fail_after(LIMIT):
            got = await extract.get_file(client, store, ref, layer.digest, path, out.write)
        assert out.getvalue() == want, path
        assert got.size == len(want) and got.path == clean_path(path) and got.index_source == "local"
        served = sum(blob_gets(registry, layer.digest, mark))
        assert served == got.fetched
        if len(want) < 10_000:
            assert got.spans <= 2 and served < len(layer.blob) // 4, f"{path}: {served} of {len(layer.blob)}"
        assert served <= len(layer.blob)

    out = io.BytesIO()
    with trio.fail_after(LIMIT):
        got = await extract.get_file(client, store, ref, mixed.digest[7:19], "data/hardlink", out.write)
    assert out.getvalue() == image.files[0]["data/small/07.txt"] and got.path == "data/small/07.txt"


async def test_get_file_says_what_is_wrong(registry: Registry, image: Sample, client: RegistryClient,
                                           store: LocalIndexes) -> None:
    ref = pushed(registry, image, "soci/getfile-errors")
    mixed, tiny = image.layers[0], image.layers[1]
    with trio.fail_after(LIMIT):
        with pytest.raises(SociError, match="no SOCI index"):
            await extract.get_file(client, store, ref, mixed.digest, "data/text.log", lambda b: None)
        await build.create_index(client, store, ref, span_size=SPAN, min_layer_size=MIN)
        for layer, path, message in [
            (mixed.digest, "data/symlink", "symbolic link to 'text.log'"),
            (mixed.digest, "data/small", "not a regular file"),
            (mixed.digest, "data/nope", "no 'data/nope' in the layer"),
            (tiny.digest, "etc/tiny.conf", "has no zTOC for layer"),
            ("sha256:" + "0" * 64, "x", "has no layer"),
        ]:
            with pytest.raises(SociError, match=message):
                await extract.get_file(client, store, ref, layer, path, lambda b: None)


async def test_get_file_verifies_every_span(registry: Registry, image: Sample, client: RegistryClient,
                                            store: LocalIndexes) -> None:
    """A zTOC whose span digest does not match the blob gives an error, never the bytes."""
    ref = pushed(registry, image, "soci/tampered")
    with trio.fail_after(LIMIT):
        result = await build.create_index(client, store, ref, span_size=SPAN, min_layer_size=MIN)
    mixed = image.layers[0]
    index = soci_index.parse_index(store.get_blob(result.index_digest) or b"")
    z = ztoc.parse_ztoc(store.get_blob(index.ztocs[mixed.digest].digest) or b"")
    entry = extract.find_entry(z, "data/text.log")
    span = ztoc.span_index(z).span_id_at(entry.uncompressed_offset + 1000)
    z.compression.span_digests[span] = "sha256:" + "0" * 64
    bad = ztoc.serialize_ztoc(z)
    bad_digest = store.put_blob(bad)
    refs = [soci_index.ztoc_ref(bad_digest, len(bad), mixed.digest, mixed.media_type, SPAN) if d == mixed.digest
            else r for d, r in index.ztocs.items()]
    assert index.subject is not None
    raw = soci_index.build_index(refs, subject=index.subject)
    store.set_index(image.manifest_digest, store.put_blob(raw))
    written = bytearray()
    with trio.fail_after(LIMIT), pytest.raises(SociError, match=f"span {span} .*span digest mismatch"):
        await extract.get_file(client, store, ref, mixed.digest, "data/text.log", written.extend)
    want = image.files[0]["data/text.log"]
    assert len(written) < len(want) and want.startswith(bytes(written)), "only verified bytes were written"


def test_tar_headers_with_signed_checksums_still_scan() -> None:
    """Old tars summed header bytes as signed chars; the scanner checks that sum only when the unsigned one fails."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as archive:
        info = tarfile.TarInfo("dätä.txt")
        info.size = 3
        archive.addfile(info, io.BytesIO(b"abc"))
    tar = bytearray(buf.getvalue())
    header = tar[:512]
    assert any(c > 127 for c in header)
    signed = sum(c - 256 if c > 127 else c for c in header[:148] + header[156:]) + 8 * 32
    tar[148:156] = b"%06o\0 " % signed
    scanner = ztoc.TarScanner()
    scanner.feed(bytes(tar))
    entries, _ = scanner.finish()
    assert [(e.name, e.uncompressed_offset, e.uncompressed_size) for e in entries] == [("dätä.txt", 512, 3)]
    tar[148:156] = b"%06o\0 " % (signed + 1)
    with pytest.raises(ztoc.FormatError, match="checksum mismatch"):
        ztoc.TarScanner().feed(bytes(tar))
