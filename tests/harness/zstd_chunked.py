"""Build zstd:chunked layers in tests, as containers/storage lays them out, without podman.

`build_zstd_chunked` writes the entries of `tests.harness.images` as a PAX tar, then walks
that tar keeping raw offsets: tar headers and padding go into shared zstd frames, every
fixed-size chunk of a file's payload into a frame of its own, the end-of-archive blocks
into the last frame; then the TOC, a tar-split and the footer as skippable frames, and
the descriptor annotations a converter sets. Plain zstd decompression of the blob gives
back the tar exactly (`ZstdChunkedLayer.tar`), so the DiffID is the tar's.

Tests that need a broken layer pass `mutate` (edits the TOC dict before it is written)
or take a good one apart with `assemble` (payload frames + any TOC JSON).
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import struct
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import zstandard

from .images import Entry, Layer, layer_tar, sha256_digest

MEDIA_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
PREFIX = "io.github.containers.zstd-chunked."
LEGACY_PREFIX = "io.containers.zstd-chunked."
CHECKSUM_ANNOTATION = PREFIX + "manifest-checksum"
POSITION_ANNOTATION = PREFIX + "manifest-position"
TARSPLIT_POSITION_ANNOTATION = PREFIX + "tarsplit-position"
SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
DEFAULT_CHUNK_SIZE = 64 << 10

_TYPES = {
    tarfile.DIRTYPE: "dir", tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg", tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo",
}


@dataclass
class ZstdChunkedLayer:
    """A built zstd:chunked blob and the facts a test checks the reader against."""

    blob: bytes
    tar: bytes
    payload: bytes
    """The data frames: everything before the TOC's skippable frame."""
    toc: dict[str, Any]
    toc_json: bytes
    toc_compressed: bytes
    toc_offset: int
    """Where the TOC's compressed bytes start (past the skippable frame header)."""
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return sha256_digest(self.blob)

    @property
    def diff_id(self) -> str:
        return sha256_digest(self.tar)

    @property
    def checksum(self) -> str:
        return sha256_digest(self.toc_compressed)

    def layer(self, annotations: dict[str, str] | None = None) -> Layer:
        """As an image layer for `OCILayout.add_image`: zstd media type, the converter's annotations."""
        return Layer(self.blob, self.diff_id, MEDIA_LAYER_ZSTD,
                     annotations=dict(self.annotations if annotations is None else annotations))


def frame(data: bytes, level: int = 3) -> bytes:
    """One complete zstd frame."""
    return zstandard.ZstdCompressor(level=level).compress(data)


def skippable(payload: bytes) -> bytes:
    return SKIPPABLE_MAGIC + struct.pack("<I", len(payload)) + payload


def footer(toc: tuple[int, int, int], tar_split: tuple[int, int, int], *, legacy: bool = False) -> bytes:
    """The footer frame: 64-byte payload ending in `GNUlInUx`, or the legacy 40-byte one (`GnUlInUx`)."""
    if legacy:
        return skippable(struct.pack("<4Q", *toc, 1) + b"GnUlInUx")
    return skippable(struct.pack("<7Q", *toc, 1, *tar_split) + b"GNUlInUx")


def assemble(payload: bytes, toc_json: bytes, *, tar_split: bytes = b"", legacy: bool = False
             ) -> tuple[bytes, bytes, int, dict[str, str]]:
    """(blob, compressed TOC, TOC offset, annotations) for data frames `payload`, any TOC JSON and
    a compressed tar-split."""
    toc_compressed = frame(toc_json)
    toc_offset = len(payload) + 8
    tar_split = tar_split or frame(b"")
    split_offset = toc_offset + len(toc_compressed) + 8
    blob = (payload + skippable(toc_compressed) + skippable(tar_split)
            + footer((toc_offset, len(toc_compressed), len(toc_json)), (split_offset, len(tar_split), 0),
                     legacy=legacy))
    prefix = LEGACY_PREFIX if legacy else PREFIX
    annotations = {
        prefix + "manifest-checksum": sha256_digest(toc_compressed),
        prefix + "manifest-position": f"{toc_offset}:{len(toc_compressed)}:{len(toc_json)}:1",
    }
    if not legacy:
        annotations[prefix + "tarsplit-position"] = f"{split_offset}:{len(tar_split)}:0"
    return blob, toc_compressed, toc_offset, annotations


def build_zstd_chunked(entries: Iterable[Entry], *, chunk_size: int = DEFAULT_CHUNK_SIZE, legacy: bool = False,
                       mutate: Callable[[dict[str, Any]], None] | None = None) -> ZstdChunkedLayer:
    """A zstd:chunked layer of `entries`; files over `chunk_size` get `chunk` entries."""
    tar = layer_tar(entries)
    out = bytearray()
    pending = bytearray()
    toc_entries: list[dict[str, Any]] = []
    position = 0
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        for member in archive:
            pending += tar[position:member.offset_data]
            position = member.offset_data
            entry = _toc_entry(member)
            toc_entries.append(entry)
            if not (member.isreg() and member.size > 0):
                continue
            if pending:
                out += frame(bytes(pending))
                pending.clear()
            data = tar[member.offset_data:member.offset_data + member.size]
            entry["digest"] = sha256_digest(data)
            entry["offset"] = len(out)
            pieces = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)]
            offsets = []
            for piece in pieces:
                offsets.append(len(out))
                out += frame(piece)
            entry["endOffset"] = len(out)
            position = member.offset_data + member.size
            if len(pieces) > 1:
                entry.update(chunkSize=len(pieces[0]), chunkDigest=sha256_digest(pieces[0]))
                for i in range(1, len(pieces)):
                    toc_entries.append({"type": "chunk", "name": member.name, "chunkOffset": i * chunk_size,
                                        "chunkSize": len(pieces[i]), "offset": offsets[i],
                                        "chunkDigest": sha256_digest(pieces[i])})
    pending += tar[position:]
    out += frame(bytes(pending))
    tar_split = frame(b'{"type":2,"payload":""}\n')  # a stand-in: lazysnap does not read the tar-split
    toc: dict[str, Any] = {"version": 1, "entries": toc_entries, "tarSplitDigest": sha256_digest(tar_split)}
    if mutate is not None:
        mutate(toc)
    toc_json = json.dumps(toc).encode()
    blob, toc_compressed, toc_offset, annotations = assemble(bytes(out), toc_json, tar_split=tar_split, legacy=legacy)
    return ZstdChunkedLayer(blob, tar, bytes(out), toc, toc_json, toc_compressed, toc_offset, annotations)


def _toc_entry(member: tarfile.TarInfo) -> dict[str, Any]:
    """The TOC entry containers/storage writes for a tar member (before its payload fields)."""
    entry: dict[str, Any] = {"type": _TYPES[member.type], "name": member.name, "mode": member.mode,
                             "size": member.size if member.isreg() else 0, "uid": member.uid, "gid": member.gid,
                             "modtime": _rfc3339(member.mtime), "accesstime": "0001-01-01T00:00:00Z",
                             "changetime": "0001-01-01T00:00:00Z"}
    if member.linkname:
        entry["linkName"] = member.linkname
    if member.ischr() or member.isblk():
        entry["devMajor"], entry["devMinor"] = member.devmajor, member.devminor
    xattrs = {k[len("SCHILY.xattr."):]: v for k, v in member.pax_headers.items() if k.startswith("SCHILY.xattr.")}
    if xattrs:
        entry["xattrs"] = {k: base64.b64encode(v.encode("utf-8", "surrogateescape")).decode()
                           for k, v in xattrs.items()}
    return entry


def _rfc3339(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(int(seconds), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def decompress_all(blob: bytes) -> bytes:
    """What a plain zstd decoder makes of the blob: every data frame, skippable frames skipped."""
    reader = zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True)
    out = bytearray()
    while piece := reader.read(1 << 20):
        out += piece
    return bytes(out)


def chunk_ranges(layer: ZstdChunkedLayer, name: str) -> list[tuple[int, int]]:
    """The blob ranges of the frames holding file `name`'s payload, from the TOC (for fetch accounting)."""
    for entry in layer.toc["entries"]:
        if entry["type"] == "reg" and entry["name"] == name:
            return [(entry.get("offset", 0), entry.get("endOffset", 0))]
    raise KeyError(name)
