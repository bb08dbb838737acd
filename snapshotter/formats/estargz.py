"""eStargz: find, check and use the table of contents of a seekable tar.gz layer.

An eStargz blob is an ordinary tar.gz whose file payloads start new gzip members, so a
file's bytes can be inflated from a byte range of the blob. The member before the
footer holds the TOC (`stargz.index.json`, JSON listing every tar member and the blob
offset of each payload piece), and the footer, an empty gzip member, holds the TOC's
offset in its extra field. The facts come from the eStargz spec (see
shared/research/stargz.md, section 2).

The reader's order of work: fetch the last `FOOTER_READ_SIZE` bytes -> `parse_footer`;
fetch the TOC member -> `parse_toc` -> `verify_toc` against the layer annotation;
`layer_entries` -> `layers.tree.build_tree`; on a read, fetch a `Chunk`'s compressed
range -> `decompress_chunk`. Nothing here does I/O.

The TOC's schema and records (`formats/toc.py`) and its tar members (`formats/toc_entries.py`)
have modules of their own, as zstd:chunked shares them; eStargz's readers find them here too.
"""

from __future__ import annotations

import io
import re
import tarfile
import zlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from . import inflate
from .digest import content_digest
from .entries import EntryType, LayerEntry
from .errors import FormatError
from .tar import clean_path
from .toc import MAX_INT64, Chunk, Toc, TocEntry, check_digest_syntax, digest_matches, toc_document
from .toc_entries import layer_entries

__all__ = [  # the TOC's records and entries live in formats/toc.py and toc_entries.py; eStargz readers find them here
    "Chunk", "Footer", "NotEStargz", "Toc", "TocEntry", "decompress_chunk", "has_no_prefetch_landmark", "layer_entries",
    "parse_footer", "parse_toc", "prefetch_end", "toc_file_entry", "verify_toc",
]

FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
FOOTER_READ_SIZE = max(FOOTER_SIZE, LEGACY_FOOTER_SIZE)

TOC_TAR_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"

TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"

DEFAULT_MAX_TOC_SIZE = 256 << 20
"""Inflated size above which a TOC member is refused: real TOCs are a few MiB at most."""

_INFLATE_STEP = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b\x08"
_FLG_FEXTRA = 0x04
_MAGIC = b"STARGZ"
_SUBFIELD_LEN = 16 + len(_MAGIC)
_HEX16 = re.compile(rb"[0-9a-fA-F]{16}")


# --------------------------------------------------------------------------- records

class NotEStargz(FormatError):
    """The blob has no eStargz footer at all: an ordinary layer, not a broken eStargz one."""


@dataclass(frozen=True)
class Footer:
    """Where the TOC member starts, and how many bytes at the end are footer."""

    toc_offset: int
    footer_size: int
    legacy: bool

    def toc_range(self, blob_size: int) -> tuple[int, int]:
        """The blob range [start, end) holding the TOC gzip member."""
        return self.toc_offset, blob_size - self.footer_size


# --------------------------------------------------------------------------- footer

def parse_footer(tail: bytes, *, blob_size: int | None = None) -> Footer:
    """Read the footer from the blob's last `FOOTER_READ_SIZE` bytes (or the whole blob if shorter).

    Tries eStargz (51 bytes) first, then legacy stargz (47). `blob_size` lets the TOC
    offset be checked against where the footer starts; when `tail` is shorter than
    `FOOTER_READ_SIZE` it is the whole blob, so its length is the blob size.
    """
    if blob_size is None and len(tail) < FOOTER_READ_SIZE:
        blob_size = len(tail)
    if blob_size is not None and blob_size < len(tail):
        raise FormatError(f"not an eStargz layer: blob size {blob_size} is less than the {len(tail)} bytes read")
    problems = []
    for size, legacy in ((FOOTER_SIZE, False), (LEGACY_FOOTER_SIZE, True)):
        kind = "legacy stargz" if legacy else "eStargz"
        if len(tail) < size:
            problems.append(f"{kind}: only {len(tail)} bytes, footer is {size}")
            continue
        try:
            toc_offset = _footer_toc_offset(tail[-size:], legacy)
        except FormatError as e:
            problems.append(f"{kind}: {e}")
            continue
        if blob_size is not None and toc_offset >= blob_size - size:
            raise FormatError(f"not an eStargz layer: {kind} footer puts the TOC at {toc_offset}, "
                              f"but the footer itself starts at {blob_size - size}")
        return Footer(toc_offset, size, legacy)
    raise NotEStargz("not an eStargz layer: " + "; ".join(problems))


def _footer_toc_offset(footer: bytes, legacy: bool) -> int:
    if footer[:3] != _GZIP_MAGIC:
        raise FormatError("no gzip header")
    if footer[3] != _FLG_FEXTRA:
        raise FormatError(f"gzip flags {footer[3]:#04x}, want FEXTRA only")
    xlen = int.from_bytes(footer[10:12], "little")
    want = _SUBFIELD_LEN if legacy else 4 + _SUBFIELD_LEN
    if xlen != want:
        raise FormatError(f"extra field is {xlen} bytes, want {want}")
    extra = footer[12:12 + xlen]
    if legacy:
        subfield = extra
    else:
        if extra[:2] != b"SG":
            raise FormatError(f"extra subfield id {extra[:2]!r}, want b'SG'")
        if int.from_bytes(extra[2:4], "little") != _SUBFIELD_LEN:
            raise FormatError(f"SG subfield length {int.from_bytes(extra[2:4], 'little')}, want {_SUBFIELD_LEN}")
        subfield = extra[4:]
    if subfield[16:] != _MAGIC:
        raise FormatError("no STARGZ magic")
    if not _HEX16.fullmatch(subfield[:16]):
        raise FormatError(f"TOC offset {subfield[:16]!r} is not 16 hex digits")
    toc_offset = int(subfield[:16], 16)
    if toc_offset > MAX_INT64:
        raise FormatError(f"TOC offset {toc_offset} overflows int64")
    inflater = zlib.decompressobj(31)
    try:
        body = inflater.decompress(footer)
    except zlib.error as e:
        raise FormatError(f"footer is not a valid gzip member: {e}") from None
    if body or not inflater.eof or inflater.unused_data:
        raise FormatError("footer is not exactly one empty gzip member")
    return toc_offset


# --------------------------------------------------------------------------- TOC

def parse_toc(member: bytes, *, max_size: int = DEFAULT_MAX_TOC_SIZE) -> Toc:
    """Parse the TOC from its gzip member: blob bytes [toc_offset, blob_size - footer_size).

    Inflates at most `max_size` bytes, so a hostile layer cannot make us allocate more.
    """
    tar_bytes = _gunzip_all(member, max_size)
    raw, header = _tar_member(tar_bytes, TOC_TAR_NAME)
    version, entries = toc_document(raw)
    return Toc(raw=raw, digest=content_digest(raw), version=version, entries=entries,
               header=header)


def _gunzip_all(data: bytes, limit: int) -> bytes:
    """Inflate every gzip member in `data`; refuse more than `limit` bytes out, or a truncated member.

    With isal when installed (`formats/inflate.py`: 0.008 s instead of zlib's 0.016 for an
    11 MB TOC). What isal refuses, zlib inflates again, so that the answer and the error's
    words are always zlib's.
    """
    if inflate.module is not zlib:
        try:
            return _gunzip_with(inflate.module, data, limit)
        except FormatError:
            pass
    return _gunzip_with(zlib, data, limit)


def _gunzip_with(module: ModuleType, data: bytes, limit: int) -> bytes:
    out = bytearray()
    rest = data
    if not rest:
        raise FormatError("TOC member is empty")
    while rest:
        inflater = module.decompressobj(31)
        pending = rest
        try:
            while not inflater.eof:
                piece = inflater.decompress(pending, min(_INFLATE_STEP, limit - len(out) + 1))
                pending = inflater.unconsumed_tail
                out += piece
                if len(out) > limit:
                    raise FormatError(f"TOC inflates to more than {limit} bytes")
                if not piece and not pending and not inflater.eof:
                    raise FormatError("TOC gzip member is truncated")
        except inflate.ERRORS as e:
            raise FormatError(f"TOC member is not valid gzip: {e}") from None
        rest = inflater.unused_data
    return bytes(out)


def _tar_member(tar_bytes: bytes, name: str) -> tuple[bytes, tarfile.TarInfo]:
    try:
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
            for member in tar:
                if clean_path(member.name) == name and member.isreg():
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    data = extracted.read()
                    if len(data) != member.size:
                        raise FormatError(f"{name} is truncated: {len(data)} of {member.size} bytes")
                    return data, member
    except FormatError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError, LookupError, OverflowError) as e:
        # tarfile lets a ValueError out of PAX sparse records ("GNU.sparse.map=abc"), not a TarError.
        raise FormatError(f"TOC member is not a valid tar: {e}") from None
    raise FormatError(f"TOC member holds no {name}")


def verify_toc(toc: Toc, expected_digest: str | None, *, allow_unverified: bool) -> None:
    """Check the TOC against the layer's `TOC_DIGEST_ANNOTATION`.

    The TOC vouches for every chunk digest, so an unverified TOC means unverified file
    bytes; a layer without the annotation is refused unless the caller opted out. A
    sha256 annotation is compared with `toc.digest`, which `parse_toc` computed over the
    same bytes (hashing an 11 MB TOC again took 0.008 s).
    """
    if not expected_digest:
        if allow_unverified:
            return
        raise FormatError(f"layer has no {TOC_DIGEST_ANNOTATION} annotation, and unverified TOCs are not allowed")
    algorithm, _ = check_digest_syntax(expected_digest, "expected TOC digest")
    if algorithm == "sha256":
        matches = toc.digest == expected_digest
    else:
        matches = digest_matches(toc.raw, expected_digest, "expected TOC digest")
    if not matches:
        raise FormatError(f"TOC digest mismatch: the annotation says {expected_digest}, the TOC is {toc.digest}")


def toc_file_entry(toc: Toc) -> LayerEntry | None:
    """`stargz.index.json` as the file a whole pull extracts (the TOC does not list itself).

    Its content is the TOC's own raw bytes, already verified, so it is served from memory.
    """
    header = toc.header
    if header is None:
        return None
    return LayerEntry(path=TOC_TAR_NAME, type=EntryType.REG, mode=header.mode & 0o7777, uid=header.uid,
                      gid=header.gid, size=len(toc.raw), mtime_ns=int(header.mtime * 1_000_000_000),
                      content=toc.raw)


# --------------------------------------------------------------------------- chunks

def decompress_chunk(compressed: bytes, chunk: Chunk) -> bytes:
    """The verified bytes of `chunk`, from the blob bytes [compressed_offset, compressed_end).

    Inflates only as far as the chunk reaches, unless the TOC gave no digest for it: then
    the whole gzip member is inflated so that at least its CRC is checked.
    """
    skip, want = chunk.inner_offset, chunk.size
    out = bytearray()
    inflater = inflate.module.decompressobj(31)
    pending = compressed
    try:
        while len(out) < want:
            if inflater.eof:
                pending = inflater.unused_data
                if not pending:
                    break
                inflater = inflate.module.decompressobj(31)
            piece = inflater.decompress(pending, min(_INFLATE_STEP, skip + want - len(out)))
            pending = inflater.unconsumed_tail
            if not piece and not pending and not inflater.eof:
                break
            dropped = min(skip, len(piece))
            skip -= dropped
            out += piece[dropped:]
        if chunk.digest is None:
            _inflate_to_member_end(inflater, pending)
    except inflate.ERRORS as e:
        raise FormatError(f"chunk at blob offset {chunk.compressed_offset}: corrupt gzip data: {e}") from None
    if len(out) < want:
        raise FormatError(f"chunk at blob offset {chunk.compressed_offset}: inflated to {len(out)} of "
                          f"{want} bytes (after skipping {chunk.inner_offset})")
    data = bytes(out)
    if chunk.digest is not None and not digest_matches(data, chunk.digest, "chunk digest"):
        raise FormatError(f"chunk at blob offset {chunk.compressed_offset}: digest mismatch, want {chunk.digest}")
    return data


def _inflate_to_member_end(inflater: Any, pending: bytes) -> None:
    """Run the member to its end, discarding output: zlib checks the gzip CRC and size there."""
    while not inflater.eof:
        piece = inflater.decompress(pending, _INFLATE_STEP)
        pending = inflater.unconsumed_tail
        if not piece and not pending and not inflater.eof:
            raise FormatError("gzip member is truncated before its CRC")


# --------------------------------------------------------------------------- landmarks

def prefetch_end(toc: Toc) -> int | None:
    """Blob bytes [0, this) hold the files the image's optimiser marked for prefetch, if it marked any."""
    for entry in toc.entries:
        if entry.type == "reg" and clean_path(entry.name) == PREFETCH_LANDMARK:
            return entry.offset
    return None


def has_no_prefetch_landmark(toc: Toc) -> bool:
    """Whether the image says "prefetch nothing" (`ctr-remote convert` without a record)."""
    return any(entry.type == "reg" and clean_path(entry.name) == NO_PREFETCH_LANDMARK for entry in toc.entries)
