"""eStargz layers made by the real converter (`ctr-remote image convert --estargz --oci`) parse,
verify and read back byte for byte as the original layer extracted with GNU tar.

The flow: push an image to the test registry, `ctr image pull` it into a private
containerd (no lazysnap involved), convert it with ctr-remote, then read the converted
manifest, config and layer blobs out of containerd's content store.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from snapshotter.formats.errors import FormatError
from snapshotter.formats.estargz import (
    FOOTER_READ_SIZE,
    FOOTER_SIZE,
    NO_PREFETCH_LANDMARK,
    TOC_DIGEST_ANNOTATION,
    UNCOMPRESSED_SIZE_ANNOTATION,
    decompress_chunk,
    has_no_prefetch_landmark,
    parse_footer,
    parse_toc,
    prefetch_end,
    verify_toc,
)
from snapshotter.formats.toc import Chunk, Toc
from snapshotter.formats.toc_entries import layer_entries
from snapshotter.layers.tree import OPAQUE_XATTR, EntryType, LayerEntry, build_tree
from tests.harness.containerd import Containerd
from tests.harness.estargz import footer as estargz_footer
from tests.harness.images import DEFAULT_MTIME, Dir, Entry, File, Image, Layer, OCILayout, push
from tests.harness.procs import HarnessError, require_tool, run
from tests.harness.registry import Registry
from tests.harness.tree import Entry as TreeEntry
from tests.harness.tree import diff_trees, snapshot_tree

pytestmark = pytest.mark.integration

DEFAULT_CHUNK = 4 << 20
SMALL_CHUNK = 100_000
CONVERSIONS = {"default": [], "chunk-100k": ["--estargz-chunk-size", str(SMALL_CHUNK)]}
BIG = random.Random(20231114).randbytes(9_000_000)
EXACT = random.Random(4).randbytes(DEFAULT_CHUNK)


def big_layer_entries() -> list[Entry]:
    return [
        Dir("blobs"), File("blobs/nine-mb.bin", BIG), File("blobs/exactly-4mib.bin", EXACT),
        File("blobs/4mib-plus-one.bin", EXACT + b"!"), File("blobs/empty", b""),
        File("blobs/text", "compressible " * 50_000),
    ]


@dataclass
class ConvertedLayer:
    original: Layer
    descriptor: dict[str, Any]
    blob: bytes
    diff_id: str


@dataclass
class Converted:
    image: str
    conversion: str
    layers: list[ConvertedLayer]


def content_get(ctd: Containerd, digest: str) -> bytes:
    """A blob from containerd's content store, checked against its digest."""
    result = subprocess.run(["ctr", "--address", str(ctd.address), "--namespace", "default", "content", "get", digest],
                            capture_output=True, timeout=120)
    if result.returncode != 0:
        raise HarnessError(f"ctr content get {digest} failed: {result.stderr.decode(errors='replace')}")
    if "sha256:" + hashlib.sha256(result.stdout).hexdigest() != digest:
        raise HarnessError(f"ctr content get {digest} returned other bytes")
    return result.stdout


def image_target(ctd: Containerd, ref: str) -> str:
    for line in ctd.ctr("images", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == ref:
            return fields[2]
    raise HarnessError(f"no image {ref} in containerd")


@pytest.fixture(scope="module")
def images(registry: Registry, sample: tuple[Image, str]) -> Iterator[dict[str, tuple[Image, str]]]:
    """The foundation sample image and an image of large files, both pushed."""
    tmp = Path(tempfile.mkdtemp(prefix="lzs-esgz-", dir="/tmp"))
    try:
        layout = OCILayout(tmp / "layout")
        big = layout.add_image("big", [Layer.from_entries(big_layer_entries())])
        ref = push(layout.root, "big", registry, "lazysnap/estargz-big", image=big)
        yield {"sample": sample, "big": (big, ref)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def converted(images: dict[str, tuple[Image, str]]) -> Iterator[dict[tuple[str, str], Converted]]:
    """Every test image converted every way, by ctr-remote in a containerd of its own."""
    ctr_remote = require_tool("ctr-remote", "stargz-snapshotter")
    ctd = Containerd()
    try:
        ctd.start()
        out: dict[tuple[str, str], Converted] = {}
        for name, (image, ref) in images.items():
            ctd.pull(ref, "overlayfs")
            for conversion, flags in CONVERSIONS.items():
                target = f"lazysnap.test/estargz/{name}:{conversion}"
                run([ctr_remote, "--address", str(ctd.address), "--namespace", "default",
                     "image", "convert", "--estargz", "--oci", *flags, ref, target], timeout=300)
                manifest = json.loads(content_get(ctd, image_target(ctd, target)))
                config = json.loads(content_get(ctd, manifest["config"]["digest"]))
                layers = [ConvertedLayer(original, desc, content_get(ctd, desc["digest"]), diff_id)
                          for original, desc, diff_id in zip(image.layers, manifest["layers"],
                                                             config["rootfs"]["diff_ids"], strict=True)]
                out[(name, conversion)] = Converted(name, conversion, layers)
        yield out
    finally:
        ctd.stop()


CASES = [(image, conversion) for image in ("sample", "big") for conversion in CONVERSIONS]


@pytest.fixture(params=CASES, ids=[f"{i}-{c}" for i, c in CASES])
def case(request: pytest.FixtureRequest, converted: dict[tuple[str, str], Converted]) -> Converted:
    return converted[request.param]


def open_layer(layer: ConvertedLayer) -> tuple[Toc, int, list[LayerEntry]]:
    blob = layer.blob
    footer = parse_footer(blob[-FOOTER_READ_SIZE:], blob_size=len(blob))
    assert footer.footer_size == FOOTER_SIZE and not footer.legacy
    start, end = footer.toc_range(len(blob))
    toc = parse_toc(blob[start:end])
    verify_toc(toc, layer.descriptor["annotations"][TOC_DIGEST_ANNOTATION], allow_unverified=False)
    return toc, footer.toc_offset, layer_entries(toc, footer.toc_offset)


def read(blob: bytes, entry: LayerEntry) -> bytes:
    return b"".join(decompress_chunk(blob[c.compressed_offset:c.compressed_end], c) for c in entry.content)


def extract_with_tar(blob: bytes, dest: Path) -> None:
    dest.mkdir()
    run(["tar", "-xzpf", "-", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(dest)],
        input=blob, timeout=120)


def expected_tree(blob: bytes, entries: list[LayerEntry]) -> dict[str, TreeEntry]:
    """What `snapshot_tree` should see after extracting this layer, derived from the TOC alone."""
    kinds = {EntryType.DIR: ("dir", stat.S_IFDIR), EntryType.REG: ("file", stat.S_IFREG),
             EntryType.SYMLINK: ("symlink", stat.S_IFLNK), EntryType.CHAR: ("char", stat.S_IFCHR),
             EntryType.BLOCK: ("block", stat.S_IFBLK), EntryType.FIFO: ("fifo", stat.S_IFIFO)}
    out: dict[str, TreeEntry] = {}
    links: dict[str, list[str]] = {}
    for e in entries:
        if e.type == EntryType.HARDLINK:
            links.setdefault(e.link_name, [e.link_name]).append(e.path)
            continue
        kind, bits = kinds[e.type]
        out[e.path] = TreeEntry(
            type=kind, mode=bits | e.mode, uid=e.uid, gid=e.gid,
            size=e.size if kind == "file" else None,
            sha256=hashlib.sha256(read(blob, e)).hexdigest() if kind == "file" else None,
            target=e.link_name if kind == "symlink" else None,
            rdev=(e.dev_major, e.dev_minor) if kind in ("char", "block") else None,
            xattrs=tuple(sorted(e.xattrs.items())),
        )
    for target, names in links.items():
        group = tuple(sorted(names))
        for name in names:
            out[name] = TreeEntry(**{**out[target].__dict__, "hardlinks": group})
    return out


def test_converted_layers_match_the_original_extracted_with_tar(case: Converted, tmp_path: Path) -> None:
    for index, layer in enumerate(case.layers):
        _, _, entries = open_layer(layer)
        from_toc = expected_tree(layer.blob, entries)
        assert from_toc.pop(NO_PREFETCH_LANDMARK).sha256 == hashlib.sha256(b"\x0f").hexdigest()
        extract_with_tar(layer.original.blob, tmp_path / f"layer{index}")
        on_disk = snapshot_tree(tmp_path / f"layer{index}")
        on_disk.pop(".")
        implicit = {p for p in on_disk.keys() - from_toc.keys() if on_disk[p].type == "dir"}
        assert all(any(q.startswith(p + "/") for q in from_toc) for p in implicit)
        for p in implicit:
            on_disk.pop(p)
        assert diff_trees(on_disk, from_toc, "tar", "toc") == []
        assert all(e.mtime_ns == DEFAULT_MTIME * 10**9 for e in entries if e.path != NO_PREFETCH_LANDMARK)


def test_annotations_and_diff_ids(case: Converted) -> None:
    for layer in case.layers:
        stream = gzip.decompress(layer.blob)
        annotations = layer.descriptor["annotations"]
        assert set(annotations) == {TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION}
        assert int(annotations[UNCOMPRESSED_SIZE_ANNOTATION]) == len(stream)
        assert layer.diff_id == "sha256:" + hashlib.sha256(stream).hexdigest()
        assert layer.descriptor["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        toc, _, _ = open_layer(layer)
        assert toc.digest == annotations[TOC_DIGEST_ANNOTATION]


def test_chunking_landmarks_and_ranges(case: Converted) -> None:
    chunk_size = SMALL_CHUNK if case.conversion == "chunk-100k" else DEFAULT_CHUNK
    for layer in case.layers:
        toc, toc_offset, entries = open_layer(layer)
        assert toc.version == 1
        assert has_no_prefetch_landmark(toc) and prefetch_end(toc) is None
        assert toc.entries[0].name == NO_PREFETCH_LANDMARK
        assert all(e.inner_offset == 0 for e in toc.entries), "ctr-remote 0.12 does not pack payloads"
        assert all(e.chunk_digest for e in toc.entries if e.has_payload)
        chunks: list[Chunk] = [c for e in entries if e.type == EntryType.REG for c in e.content]
        for e in entries:
            if e.type == EntryType.REG and e.size:
                sizes = [c.size for c in e.content]
                assert sizes[:-1] == [chunk_size] * (len(sizes) - 1) and 0 < sizes[-1] <= chunk_size
        offsets = sorted(c.compressed_offset for c in chunks)
        assert len(set(offsets)) == len(offsets), "every chunk is its own gzip member"
        assert max(c.compressed_end for c in chunks) == toc_offset
    if case.image == "big":
        by_path = {e.path: e for e in open_layer(case.layers[0])[2]}
        assert len(by_path["blobs/nine-mb.bin"].content) == -(-len(BIG) // chunk_size)
        assert read(case.layers[0].blob, by_path["blobs/nine-mb.bin"]) == BIG


def test_overlay_view_of_the_converted_sample(converted: dict[tuple[str, str], Converted]) -> None:
    layers = converted[("sample", "default")].layers
    top = build_tree(open_layer(layers[2])[2])
    doomed = top.resolve("data/doomed.txt")
    assert doomed is not None and stat.S_ISCHR(doomed.mode) and doomed.rdev == 0
    opaque = top.resolve("opaque")
    assert opaque is not None and opaque.xattrs.get(OPAQUE_XATTR) == b"y"
    middle = build_tree(open_layer(layers[1])[2])
    hl1, hl2 = middle.resolve("data/hl-1"), middle.resolve("data/hl-2")
    assert hl1 is not None and hl1 is hl2 and hl1.nlink == 2
    base_entries = open_layer(layers[0])[2]
    busybox = next(e for e in base_entries if e.path == "bin/busybox")
    assert read(layers[0].blob, busybox) == Path("/bin/busybox").read_bytes()


def test_real_footer_matches_the_test_writer_and_corruption_is_caught(case: Converted) -> None:
    layer = max(case.layers, key=lambda item: len(item.blob))
    _, toc_offset, entries = open_layer(layer)
    assert layer.blob[-FOOTER_SIZE:] == estargz_footer(toc_offset)
    biggest = max((e for e in entries if e.type == EntryType.REG), key=lambda e: e.size)
    chunk = biggest.content[-1]
    broken = bytearray(layer.blob[chunk.compressed_offset:chunk.compressed_end])
    broken[len(broken) // 2] ^= 0x40
    with pytest.raises(FormatError):
        decompress_chunk(bytes(broken), chunk)
