"""zstd:chunked: find, check and use the table of contents of a containers/storage chunked zstd layer.

A zstd:chunked blob is one multi-frame zstd stream whose plain decompression is the
layer's tar: tar headers and padding share frames, and every chunk of a file's payload
is a frame of its own. After the tar come three skippable frames, which decoders step
over: the zstd-compressed TOC (JSON with the same entry schema as eStargz's, plus
`endOffset`), the tar-split, and a footer that repeats their positions. There is no
spec; the facts come from containers/storage `pkg/chunked/` (see
shared/research/formats-and-credentials.md, section 1).

What differs from eStargz lives here; the TOC schema, the tree and the chunk records
are eStargz's (`formats/estargz.py`):
- the TOC's position and digest come from the layer descriptor's annotations, which the
  image manifest's digest covers; the footer is only a hint (containers/storage never
  reads it), so an unannotated layer is unverifiable;
- the digest is over the *compressed* TOC bytes (the skippable frame's payload);
- a chunk is exactly its frames, [offset, next chunk's offset or the file's
  `endOffset`): it must decompress to exactly `chunkSize` bytes, and carry a digest.

Nothing here does I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

import zstandard

from .digest import check_syntax, content_digest
from .entries import LayerEntry
from .errors import FormatError
from .toc import Chunk, Toc, toc_document
from .toc_entries import layer_entries as _estargz_entries

FORMAT = "zstd:chunked"

SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
SKIPPABLE_HEADER = 8
"""A skippable frame: its magic, its payload length (u32 LE), then the payload."""

FOOTER_MAGIC = b"GNUlInUx"
FOOTER_SIZE = SKIPPABLE_HEADER + 64
"""Since 2023: TOC offset, length, uncompressed length, type, tar-split offset, length,
uncompressed length (u64 LE each), then the magic."""
LEGACY_FOOTER_MAGIC = b"GnUlInUx"
LEGACY_FOOTER_SIZE = SKIPPABLE_HEADER + 40
"""Before 2023 (and stargz-snapshotter's writer): TOC offset, length, uncompressed length, type, magic."""
FOOTER_READ_SIZE = FOOTER_SIZE

ANNOTATION_PREFIX = "io.github.containers.zstd-chunked."
LEGACY_ANNOTATION_PREFIX = "io.containers.zstd-chunked."
CHECKSUM_ANNOTATION = ANNOTATION_PREFIX + "manifest-checksum"
POSITION_ANNOTATION = ANNOTATION_PREFIX + "manifest-position"
"""`sha256:<hex>` of the compressed TOC; `offset:length:uncompressed length:type` of it."""
TOC_TYPE = 1
"""The only TOC type there is (containers/storage calls it CRFS)."""

MAX_TOC_SIZE = 150 << 20
"""Decompressed TOC bytes above which a TOC is refused (containers/storage's own limit)."""

_FOOTER = struct.Struct("<4sI7Q8s")
_LEGACY_FOOTER = struct.Struct("<4sI4Q8s")
_READ_STEP = 1 << 20


class NotZstdChunked(FormatError):
    """The blob ends in no zstd:chunked footer: not this format (or its footer was stripped)."""


@dataclass(frozen=True)
class Position:
    """A compressed range of the blob (past its skippable frame header) and its decompressed size."""

    offset: int
    size: int
    uncompressed_size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class Footer:
    toc: Position
    tar_split: Position | None
    """None in the legacy footer, which predates the tar-split."""
    size: int
    legacy: bool


@dataclass(frozen=True)
class Annotations:
    """What the layer descriptor says, under either prefix: the root of trust for the TOC."""

    checksum: str
    """"" when only a position is annotated: then nothing vouches for the TOC."""
    position: Position | None


# --------------------------------------------------------------------------- footer and annotations

def parse_footer(tail: bytes, *, blob_size: int) -> Footer:
    """The footer from the blob's last bytes (at least `FOOTER_READ_SIZE`, or the whole blob).

    NotZstdChunked when neither footer's magic is there; FormatError when one is, but
    what it says cannot be (ranges outside the blob, an unknown TOC type).
    """
    for size, layout, magic, legacy in ((FOOTER_SIZE, _FOOTER, FOOTER_MAGIC, False),
                                        (LEGACY_FOOTER_SIZE, _LEGACY_FOOTER, LEGACY_FOOTER_MAGIC, True)):
        if len(tail) < size or tail[-8:] != magic:
            continue
        frame, length, *fields, _ = layout.unpack(tail[-size:])
        kind = "legacy zstd:chunked footer" if legacy else "zstd:chunked footer"
        if frame != SKIPPABLE_MAGIC or length != size - SKIPPABLE_HEADER:
            raise FormatError(f"{kind} is not a {size - SKIPPABLE_HEADER}-byte skippable frame")
        if fields[3] != TOC_TYPE:
            raise FormatError(f"{kind}: TOC type {fields[3]}, want {TOC_TYPE}")
        toc = Position(fields[0], fields[1], fields[2])
        tar_split = None if legacy else Position(fields[4], fields[5], fields[6])
        limit = blob_size - size
        for what, position in (("TOC", toc), ("tar-split", tar_split)):
            if position is None or not position.size:
                continue
            if not SKIPPABLE_HEADER <= position.offset <= position.end <= limit:
                raise FormatError(f"{kind}: {what} [{position.offset}, {position.end}) is not inside the "
                                  f"{limit} bytes before the footer")
        return Footer(toc, tar_split, size, legacy)
    raise NotZstdChunked("not a zstd:chunked layer: no footer magic at the end of the blob")


def parse_annotations(annotations: Mapping[str, str]) -> Annotations | None:
    """The layer's zstd:chunked annotations (new prefix first, then legacy); None if it has none."""
    for prefix in (ANNOTATION_PREFIX, LEGACY_ANNOTATION_PREFIX):
        checksum = annotations.get(prefix + "manifest-checksum", "")
        position = annotations.get(prefix + "manifest-position", "")
        if checksum or position:
            if checksum:
                try:
                    check_syntax(checksum)
                except FormatError as e:
                    raise FormatError(f"annotation {prefix}manifest-checksum: {e}") from None
            return Annotations(checksum, _position(prefix + "manifest-position", position) if position else None)
    return None


def _position(key: str, value: str) -> Position:
    fields = value.split(":")
    # int() refuses more than 4,300 digits, leading zeros included: no u64 has more than 20.
    if len(fields) != 4 or not all(f.isdigit() and f.isascii() and len(f.lstrip("0")) <= 20 for f in fields):
        raise FormatError(f"annotation {key} is {value[:100]!r}, want offset:length:uncompressed-length:type")
    offset, size, uncompressed, toc_type = (int(f.lstrip("0") or "0") for f in fields)
    if toc_type != TOC_TYPE:
        raise FormatError(f"annotation {key}: TOC type {toc_type}, want {TOC_TYPE}")
    return Position(offset, size, uncompressed)


def check_position(position: Position, blob_size: int) -> None:
    """The TOC range must lie inside the blob, after at least its skippable frame header."""
    if position.size <= 0 or position.offset < SKIPPABLE_HEADER or position.end > blob_size:
        raise FormatError(f"TOC [{position.offset}, {position.end}) is not inside the {blob_size}-byte blob")
    if position.uncompressed_size > MAX_TOC_SIZE:
        raise FormatError(f"TOC claims {position.uncompressed_size} bytes, more than the {MAX_TOC_SIZE} allowed")


# --------------------------------------------------------------------------- TOC

def parse_toc(compressed: bytes, *, uncompressed_size: int | None = None, max_size: int = MAX_TOC_SIZE) -> Toc:
    """Parse the TOC from its compressed bytes (the skippable frame's payload).

    `raw` and `digest` of the result are the compressed bytes and their digest: that is
    what the checksum annotation covers. Decompresses at most `max_size` bytes.
    """
    limit = max_size if uncompressed_size is None else min(max_size, uncompressed_size)
    if uncompressed_size is not None and uncompressed_size > max_size:
        raise FormatError(f"TOC claims {uncompressed_size} bytes, more than the {max_size} allowed")
    raw = _decompress(compressed, limit, "TOC")
    if uncompressed_size is not None and len(raw) != uncompressed_size:
        raise FormatError(f"TOC decompresses to {len(raw)} bytes, its position says {uncompressed_size}")
    version, entries = toc_document(raw)
    return Toc(raw=compressed, digest=content_digest(compressed), version=version, entries=entries)


def verify_toc(toc: Toc, expected_digest: str | None, *, allow_unverified: bool) -> None:
    """Check the compressed TOC against the layer's manifest-checksum annotation.

    The TOC vouches for every chunk digest; the footer that located it vouches for
    nothing, so a layer without the annotation is refused unless the caller opted out.
    """
    if not expected_digest:
        if allow_unverified:
            return
        raise FormatError(f"zstd:chunked layer has no {CHECKSUM_ANNOTATION} annotation in the image manifest, "
                          "and unverified TOCs are not allowed")
    if content_digest(toc.raw, check_syntax(expected_digest).partition(":")[0]) != expected_digest:
        raise FormatError(f"TOC checksum mismatch: the annotation says {expected_digest}, the TOC is {toc.digest}")


def layer_entries(toc: Toc, toc_offset: int) -> list[LayerEntry]:
    """The TOC as tar-member records; `toc_offset` is where the TOC's payload starts in the blob.

    Every chunk must lie in the data frames before the TOC's skippable frame header.
    """
    return _estargz_entries(toc, toc_offset - SKIPPABLE_HEADER, exact_ends=True)


# --------------------------------------------------------------------------- chunks

def decompress_chunk(compressed: bytes, chunk: Chunk) -> bytes:
    """The verified bytes of `chunk` from the blob bytes [compressed_offset, compressed_end).

    Those bytes are the chunk's frames and nothing else: they must decompress to exactly
    `chunk.size` bytes (never more than one byte past it is produced) and match its digest.
    """
    where = f"chunk at blob offset {chunk.compressed_offset}"
    if chunk.digest is None:
        raise FormatError(f"{where}: no digest to verify it by")
    data = _decompress(compressed, chunk.size, where)
    if len(data) != chunk.size:
        raise FormatError(f"{where}: decompressed to {len(data)} of {chunk.size} bytes")
    algorithm = check_syntax(chunk.digest).partition(":")[0]
    if content_digest(data, algorithm) != chunk.digest:
        raise FormatError(f"{where}: digest mismatch, want {chunk.digest}")
    return data


def _decompress(compressed: bytes, limit: int, where: str) -> bytes:
    """All frames of `compressed`, decompressed; FormatError if corrupt or more than `limit` bytes."""
    reader = zstandard.ZstdDecompressor().stream_reader(compressed, read_across_frames=True)
    out = bytearray()
    try:
        while len(out) <= limit:
            piece = reader.read(min(_READ_STEP, limit + 1 - len(out)))
            if not piece:
                break
            out += piece
    except zstandard.ZstdError as e:
        raise FormatError(f"{where}: corrupt zstd data: {e}") from None
    if len(out) > limit:
        raise FormatError(f"{where}: decompresses to more than {limit} bytes")
    return bytes(out)
