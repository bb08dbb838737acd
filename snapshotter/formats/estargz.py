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
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import io
import re
import tarfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

from .entries import EntryType, LayerEntry

from . import inflate
from .digest import content_digest
from .errors import FormatError
from .jsondoc import load_object
from .tar import ENTRY_TYPES, clean_path, parse_time

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
_MAX_INT64 = (1 << 63) - 1
_GZIP_MAGIC = b"\x1f\x8b\x08"
_FLG_FEXTRA = 0x04
_MAGIC = b"STARGZ"
_SUBFIELD_LEN = 16 + len(_MAGIC)
_HEX16 = re.compile(rb"[0-9a-fA-F]{16}")
_DIGEST = re.compile(r"(sha256|sha384|sha512):([0-9a-f]+)")
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")
"""The digest nearly every entry has: checked with one match before the general rule."""
_DIGEST_HEX_LEN = {"sha256": 64, "sha384": 96, "sha512": 128}
_CHUNK = "chunk"
_NO_XATTRS: Mapping[str, bytes] = MappingProxyType({})


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


class TocEntry(NamedTuple):
    """One entry of `stargz.index.json`, field for field (JSON camelCase -> snake_case).

    A named tuple, not a frozen dataclass: a node_modules layer has 30,000 of them, and a
    frozen dataclass takes 5x longer to build.
    """

    name: str
    type: str
    size: int = 0
    modtime: str = ""
    link_name: str = ""
    mode: int = 0
    uid: int = 0
    gid: int = 0
    user_name: str = ""
    group_name: str = ""
    offset: int = 0
    inner_offset: int = 0
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: Mapping[str, bytes] = _NO_XATTRS
    digest: str = ""
    chunk_offset: int = 0
    chunk_size: int = 0
    chunk_digest: str = ""
    end_offset: int = 0
    """zstd:chunked only: where the file's last frame ends in the blob (eStargz has no such field)."""

    @property
    def has_payload(self) -> bool:
        """Whether this entry points at bytes in the blob (a non-empty file's piece)."""
        return self.type == _CHUNK or (self.type == "reg" and self.size > 0)


@dataclass(frozen=True)
class Toc:
    """A parsed TOC. `raw` is kept byte for byte: the digest is over it, never a re-serialisation."""

    raw: bytes
    digest: str
    version: int
    entries: list[TocEntry]
    header: tarfile.TarInfo | None = None
    """The tar header of `stargz.index.json` itself: a whole pull extracts it as a file too."""


class Chunk(NamedTuple):
    """One piece of a regular file and where its compressed bytes live in the blob.

    Inflate blob[compressed_offset:compressed_end], skip `inner_offset` bytes, and the
    next `size` bytes are file bytes [file_offset, file_offset + size). `digest` is the
    sha256 of those bytes, or None when the TOC gives none (legacy stargz). A named
    tuple, like `TocEntry`: cheap to build and hash by the ten thousand.
    """

    file_offset: int
    size: int
    compressed_offset: int
    compressed_end: int
    inner_offset: int
    digest: str | None

    @property
    def compressed_size(self) -> int:
        return self.compressed_end - self.compressed_offset


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
    if toc_offset > _MAX_INT64:
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


def toc_document(raw: bytes) -> tuple[int, list[TocEntry]]:
    """The version and checked entries of a TOC's JSON: eStargz and zstd:chunked share the schema."""
    doc = load_object(raw, "TOC")
    version = doc.get("version")
    if type(version) is not int:
        raise FormatError(f"TOC version is {version!r}, want an integer")
    items = doc.get("entries")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise FormatError(f"TOC entries is a JSON {type(items).__name__}, want an array")
    return version, [_toc_entry(i, item) for i, item in enumerate(items)]


def _gunzip_all(data: bytes, limit: int) -> bytes:
    """Inflate every gzip member in `data`; refuse more than `limit` bytes out, or a truncated member."""
    out = bytearray()
    rest = data
    if not rest:
        raise FormatError("TOC member is empty")
    while rest:
        inflater = zlib.decompressobj(31)
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
        except zlib.error as e:
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


_INT_FIELDS = {
    "size": "size", "mode": "mode", "uid": "uid", "gid": "gid", "offset": "offset",
    "innerOffset": "inner_offset", "devMajor": "dev_major", "devMinor": "dev_minor",
    "chunkOffset": "chunk_offset", "chunkSize": "chunk_size", "endOffset": "end_offset",
}
_STR_FIELDS = {
    "modtime": "modtime", "linkName": "link_name", "userName": "user_name", "groupName": "group_name",
    "digest": "digest", "chunkDigest": "chunk_digest",
}


def _toc_entry(index: int, item: Any) -> TocEntry:
    """One checked entry. Runs 30,000 times for a node_modules layer, so it visits only the
    keys the entry has, and builds its error context only when there is an error."""
    if not isinstance(item, dict):
        raise FormatError(f"TOC entry {index} is a JSON {type(item).__name__}, want an object")
    name = item.get("name")
    if not isinstance(name, str):
        raise FormatError(f"{_where(index, name)}: name is not a string")
    etype = item.get("type")
    if etype != _CHUNK and (type(etype) is not str or etype not in ENTRY_TYPES):  # a list is unhashable
        raise FormatError(f"{_where(index, name)}: unknown type {etype!r}")
    if not name and etype != _CHUNK:
        raise FormatError(f"{_where(index, name)}: empty name")
    values: dict[str, Any] = {"name": name, "type": etype}
    for key, value in item.items():
        if value is None:
            continue
        attr = _INT_FIELDS.get(key)
        if attr is not None:
            if type(value) is not int:
                raise FormatError(f"{_where(index, name)}: {key} is {value!r}, want an integer")
            if not 0 <= value <= _MAX_INT64:
                raise FormatError(f"{_where(index, name)}: {key} {value} is out of range")
            values[attr] = value
            continue
        attr = _STR_FIELDS.get(key)
        if attr is not None:
            if not isinstance(value, str):
                raise FormatError(f"{_where(index, name)}: {key} is {value!r}, want a string")
            values[attr] = value
    for attr, key in (("digest", "digest"), ("chunk_digest", "chunkDigest")):
        digest = values.get(attr)
        if digest and not _SHA256.fullmatch(digest):
            _check_digest_syntax(digest, f"{_where(index, name)}: {key}")
    if values.get("modtime"):
        try:
            parse_time(values["modtime"], "modtime")
        except FormatError as e:
            raise FormatError(f"{_where(index, name)} {e}") from None
    xattrs = item.get("xattrs")
    if xattrs is not None:
        values["xattrs"] = _xattrs(xattrs, _where(index, name))
    return TocEntry(**values)


def _where(index: int, name: object) -> str:
    return f"TOC entry {index} ({name!r})"


def _xattrs(value: Any, where: str) -> dict[str, bytes]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FormatError(f"{where}: xattrs is {value!r}, want an object")
    out = {}
    for key, encoded in value.items():
        if not isinstance(encoded, str):
            raise FormatError(f"{where}: xattr {key!r} is {encoded!r}, want a base64 string")
        try:
            out[key] = base64.b64decode(encoded, validate=True)
        except ValueError:  # binascii.Error, or a non-ASCII string (a plain ValueError)
            raise FormatError(f"{where}: xattr {key!r} is not valid base64") from None
    return out


def _check_digest_syntax(digest: str, where: str) -> tuple[str, str]:
    m = _DIGEST.fullmatch(digest)
    if m is None or len(m[2]) != _DIGEST_HEX_LEN[m[1]]:
        raise FormatError(f"{where} {digest!r} is not a sha256/sha384/sha512 digest")
    return m[1], m[2]


def _digest_matches(data: bytes, digest: str, where: str) -> bool:
    algorithm, hexdigest = _check_digest_syntax(digest, where)
    return hashlib.new(algorithm, data).hexdigest() == hexdigest


def verify_toc(toc: Toc, expected_digest: str | None, *, allow_unverified: bool) -> None:
    """Check the TOC against the layer's `TOC_DIGEST_ANNOTATION`.

    The TOC vouches for every chunk digest, so an unverified TOC means unverified file
    bytes; a layer without the annotation is refused unless the caller opted out.
    """
    if not expected_digest:
        if allow_unverified:
            return
        raise FormatError(f"layer has no {TOC_DIGEST_ANNOTATION} annotation, and unverified TOCs are not allowed")
    if not _digest_matches(toc.raw, expected_digest, "expected TOC digest"):
        raise FormatError(f"TOC digest mismatch: the annotation says {expected_digest}, the TOC is {toc.digest}")


# --------------------------------------------------------------------------- entries

def layer_entries(toc: Toc, toc_offset: int, *, exact_ends: bool = False) -> list[LayerEntry]:
    """The TOC as tar-member records for `build_tree`; regular files carry a tuple of `Chunk`s.

    Landmark files are kept: they are real members of the layer's tar stream.
    `toc_offset` bounds the payload: every chunk lies before it. `exact_ends` is
    zstd:chunked's rule (`formats/zstd_chunked.py`): a chunk ends where the file's next
    chunk starts, the last at the file's `endOffset`, each chunk must carry a digest, and
    no two chunks may share blob bytes. Without it (eStargz), a chunk ends where the
    next payload in the blob starts, and may share its gzip member with what follows.
    """
    entries = toc.entries
    ends = [] if exact_ends else sorted({e.offset for e in entries if e.has_payload})
    out: list[LayerEntry] = []
    index, count = 0, len(entries)
    while index < count:
        entry = entries[index]
        if entry.type == _CHUNK:
            raise FormatError(f"{_where(index, entry.name)}: chunk entry does not follow a non-empty regular file")
        layer_entry = _layer_entry(index, entry)
        out.append(layer_entry)
        following = index + 1
        if entry.type == "reg":
            while following < count and entries[following].type == _CHUNK:
                following += 1
            if entry.size > 0:
                layer_entry.content = _file_chunks(entries, index, following, ends, toc_offset, exact_ends)
            elif following > index + 1:
                raise FormatError(f"{_where(index + 1, entries[index + 1].name)}: chunk entry does not follow "
                                  "a non-empty regular file")
            else:
                layer_entry.content = ()
        index = following
    if exact_ends:
        _check_disjoint(out)
    return out


def _file_chunks(entries: list[TocEntry], first: int, end: int, ends: list[int], toc_offset: int,
                 exact_ends: bool) -> tuple[Chunk, ...]:
    """The chunks of the file at `entries[first]` (itself the first piece, then `chunk` entries
    up to `end`), checked to tile the file [0, size) exactly and in order."""
    file = entries[first]
    chunks = []
    covered = 0
    for index in range(first, end):
        entry = entries[index]
        if entry.offset >= toc_offset:
            raise FormatError(f"{_where(index, entry.name)}: payload offset {entry.offset} is not before "
                              f"the TOC at {toc_offset}")
        if index > first and entry.name and clean_path(entry.name) != clean_path(file.name):
            raise FormatError(f"{_where(index, entry.name)}: chunk entry follows {file.name!r}, a different file")
        start = entry.chunk_offset
        if start != covered:
            raise FormatError(f"{_where(index, entry.name)}: chunk starts at {start}, want {covered} "
                              f"(chunks of file {file.name!r} must tile it in order)")
        size = entry.chunk_size or file.size - start
        if size <= 0 or start + size > file.size:
            raise FormatError(f"{_where(index, entry.name)}: chunk [{start}, +{size}) does not fit in "
                              f"file {file.name!r} of {file.size} bytes")
        digest = entry.chunk_digest or None
        if digest is None and start == 0 and size == file.size and file.digest:
            digest = file.digest
        if exact_ends:
            compressed_end = entries[index + 1].offset if index + 1 < end else file.end_offset
            _check_exact(index, entry, compressed_end, toc_offset, digest)
        else:
            after = bisect.bisect_right(ends, entry.offset)
            compressed_end = ends[after] if after < len(ends) else toc_offset
        chunks.append(Chunk(start, size, entry.offset, compressed_end, entry.inner_offset, digest))
        covered = start + size
    if covered != file.size:
        raise FormatError(f"chunks of file {file.name!r} cover {covered} of its {file.size} bytes")
    return tuple(chunks)


def _check_exact(index: int, entry: TocEntry, compressed_end: int, toc_offset: int, digest: str | None) -> None:
    """A zstd:chunked chunk: its own frames [offset, end) before the TOC, and a digest to check them by."""
    where = _where(index, entry.name)
    if compressed_end <= entry.offset:
        raise FormatError(f"{where}: chunk ends at {compressed_end}, not after its offset {entry.offset} "
                          "(no endOffset, or chunks out of order)")
    if compressed_end > toc_offset:
        raise FormatError(f"{where}: chunk [{entry.offset}, {compressed_end}) runs past the payload end {toc_offset}")
    if entry.inner_offset:
        raise FormatError(f"{where}: innerOffset {entry.inner_offset}, but every chunk is its own frames")
    if digest is None:
        raise FormatError(f"{where}: chunk without a digest")


def _check_disjoint(entries: list[LayerEntry]) -> None:
    """No two chunks share blob bytes: one frame is never two files' content."""
    chunks = sorted((c for e in entries if isinstance(e.content, tuple) for c in e.content),
                    key=lambda c: c.compressed_offset)
    for before, after in zip(chunks, chunks[1:]):
        if after.compressed_offset < before.compressed_end:
            raise FormatError(f"chunks [{before.compressed_offset}, {before.compressed_end}) and "
                              f"[{after.compressed_offset}, {after.compressed_end}) overlap in the blob")


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


_REG = EntryType.REG
_HARDLINK = EntryType.HARDLINK


def _layer_entry(index: int, entry: TocEntry) -> LayerEntry:
    etype = ENTRY_TYPES[entry.type]
    link_name = entry.link_name
    if etype is _HARDLINK:
        link_name = clean_path(link_name)
        if not link_name:
            raise FormatError(f"{_where(index, entry.name)}: hardlink without a target")
    return LayerEntry(
        clean_path(entry.name),
        etype,
        entry.mode & 0o7777,
        entry.uid,
        entry.gid,
        entry.size if etype is _REG else 0,
        parse_time(entry.modtime, "modtime"),  # checked in parse_toc
        link_name,
        entry.dev_major,
        entry.dev_minor,
        dict(entry.xattrs) if entry.xattrs else {},
    )


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
    if chunk.digest is not None and not _digest_matches(data, chunk.digest, "chunk digest"):
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
