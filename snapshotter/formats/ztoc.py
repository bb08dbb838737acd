"""SOCI zTOC: read, validate, write and build the per-layer index of an unmodified tar.gz.

A zTOC (flatbuffers, schema in proto/ztoc.fbs, version "0.9") lists every tar member
with the offset of its data in the *uncompressed* tar, plus the gzip checkpoints that
cut the blob into independently inflatable spans and the sha256 of each span's
compressed bytes. The facts come from shared/research/soci.md §1.

The reader's order of work: fetch the zTOC blob (its digest is in the SOCI index
manifest) -> `parse_ztoc` -> `layer_entries` -> `layers.tree.build_tree`; on a read,
`span_index(z).spans_for(start, end)` -> fetch each span's compressed range ->
`gzip_index.verify_span` against `z.compression.span_digests[span.id]` ->
`gzip_index.inflate_span`. The builder side (`ZtocBuilder`, `build_ztoc`) streams a
layer once. Nothing here does I/O.

Writing uses the flatc-generated code (snapshotter/formats/ztoc_fbs); reading uses a
small bounds-checked reader (`_Reader`), because flatbuffers' Python runtime has no
verifier and is slow per field.
"""

from __future__ import annotations

import enum
import hashlib
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import flatbuffers  # type: ignore[import-untyped]

from .entries import EntryType, LayerEntry

from . import gzip_index
from .digest import content_digest
from .errors import FormatError
from .gzip_index import (
    DEFAULT_SPAN_SIZE,
    CheckpointTable,
    GzipIndexBuilder,
    GzipSpanIndex,
    Span,
)
from .tar import ENTRY_TYPES, clean_path, format_time, parse_time
from .ztoc_fbs.zinfo import TarZinfo as fb_tar_zinfo
from .ztoc_fbs.ztoc import TOC as fb_toc
from .ztoc_fbs.ztoc import CompressionInfo as fb_compression_info
from .ztoc_fbs.ztoc import FileMetadata as fb_file_metadata
from .ztoc_fbs.ztoc import Xattr as fb_xattr
from .ztoc_fbs.ztoc import Ztoc as fb_ztoc

ZTOC_VERSION = "0.9"
DEFAULT_BUILD_TOOL = "lazysnap"
TAR_ZINFO_VERSION = 2
XATTR_PAX_PREFIX = "SCHILY.xattr."

_BLOCK = 512
_MAX_SPECIAL_FILE = 1 << 20  # what Go's archive/tar allows for PAX and GNU long-name data
_MAX_INT64 = (1 << 63) - 1
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


class CompressionAlgorithm(enum.IntEnum):
    """The schema's enum; a zTOC that leaves the field out means gzip."""

    GZIP = 1
    UNCOMPRESSED = 2


# --------------------------------------------------------------------------- records

@dataclass(slots=True)
class FileMetadata:
    """One tar member, field for field as the zTOC stores it.

    `xattrs` holds *all* the member's PAX records (the schema's name notwithstanding);
    only `SCHILY.xattr.*` ones become extended attributes. Strings that are not UTF-8
    survive a round trip through surrogate escapes.
    """

    name: str
    type: str
    uncompressed_offset: int = 0
    uncompressed_size: int = 0
    linkname: str = ""
    mode: int = 0
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mod_time: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)


@dataclass
class CompressionInfo:
    """How the blob is cut into spans: `checkpoints` is the gzip blob or a TarZinfo flatbuffer."""

    algorithm: CompressionAlgorithm = CompressionAlgorithm.GZIP
    max_span_id: int = 0
    span_digests: list[str] = field(default_factory=list)
    checkpoints: bytes = b""


@dataclass
class Ztoc:
    version: str
    build_tool_identifier: str
    compressed_archive_size: int
    uncompressed_archive_size: int
    entries: list[FileMetadata]
    compression: CompressionInfo


class FileExtent(NamedTuple):
    """A regular file's bytes: [uncompressed_offset, +size) of the layer's uncompressed tar.

    A named tuple: a node_modules layer has 30,000, and a frozen dataclass is slow to build.
    """

    uncompressed_offset: int
    size: int

    @property
    def end(self) -> int:
        return self.uncompressed_offset + self.size


@dataclass(frozen=True)
class TarZinfo:
    """The zinfo of an uncompressed layer: spans of `span_size` bytes over `size` bytes."""

    version: int
    span_size: int
    size: int

    @property
    def max_span_id(self) -> int:
        return (self.size - 1) // self.span_size if self.size > 0 else -1


# --------------------------------------------------------------------------- text helpers

def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------- flatbuffers: read

# Field kinds of each table, in vtable-slot order (proto/ztoc.fbs).
_S, _I8, _I32, _U32, _I64 = "string", "int8", "int32", "uint32", "int64"
_SCHEMA: dict[str, tuple[Any, ...]] = {
    "Ztoc": (_S, _S, _I64, _I64, ("table", "TOC"), ("table", "CompressionInfo")),
    "TOC": (("tables", "FileMetadata"),),
    "FileMetadata": (_S, _S, _I64, _I64, _S, _I64, _U32, _U32, _S, _S, _S, _I64, _I64, ("tables", "Xattr")),
    "Xattr": (_S, _S),
    "CompressionInfo": (_I8, _I32, "strings", "bytes"),
    "TarZinfo": (_I32, _I64, _I64),
}
_SCALARS = {_I8: struct.Struct("<b"), _I32: struct.Struct("<i"), _U32: struct.Struct("<I"), _I64: struct.Struct("<q")}
_U16 = struct.Struct("<H")
_U32S = struct.Struct("<I")
_I32S = struct.Struct("<i")


class _Reader:
    """Reads the schema's tables with a bounds check on every offset it follows.

    Why not the generated classes: flatbuffers' Python runtime has no verifier (a garbage
    offset reads elsewhere or loops over billions of elements), and its per-field
    accessors cost ~0.2 ms per file entry. The generated code still writes zTOCs.
    Work is bounded by the buffer size: a table takes at least 4 bytes, so a buffer that
    makes us visit more than len/4 tables reuses them, which no writer does.
    """

    def __init__(self, buf: bytes, what: str) -> None:
        self.buf = buf
        self.size = len(buf)
        self.what = what
        self.tables = 0
        self.max_tables = max(len(buf) // 4, 1)
        self._layouts: dict[tuple[int, str], tuple[int, list[tuple[int, int, Any, Any]], struct.Struct | None]] = {}

    def fail(self, msg: str) -> FormatError:
        return FormatError(f"{self.what} is not a valid flatbuffer: {msg}")

    def _check(self, pos: int, size: int) -> None:
        if pos < 0 or size < 0 or pos + size > self.size:
            raise self.fail(f"{size} bytes at offset {pos} run past the {self.size}-byte buffer")

    def _u32(self, pos: int) -> int:
        self._check(pos, 4)
        return int(_U32S.unpack_from(self.buf, pos)[0])

    def root(self, table: str) -> list[Any]:
        if self.size < 8:
            raise self.fail(f"only {self.size} bytes")
        return self.table(self._u32(0), table)

    def table(self, pos: int, name: str) -> list[Any]:
        """The table's fields in slot order; None where a field is absent (the schema default)."""
        self.tables += 1
        if self.tables > self.max_tables:
            raise self.fail("more tables than the buffer can hold")
        buf, size = self.buf, self.size
        if pos < 0 or pos + 4 > size:
            self._check(pos, 4)
        vtable = pos - int(_I32S.unpack_from(buf, pos)[0])
        layout = self._layouts.get((vtable, name))
        if layout is None:
            layout = self._layout(vtable, pos, name)
        t_len, fields, unpack = layout
        if pos + t_len > size:
            self._check(pos, t_len)
        values: list[Any] = [None] * len(_SCHEMA[name])
        if unpack is not None:
            raw: Sequence[int] = unpack.unpack_from(buf, pos)
        else:
            raw = [(scalar or _U32S).unpack_from(buf, pos + off)[0] for _, off, _, scalar in fields]
        for (slot, off, kind, scalar), value in zip(fields, raw):
            if scalar is not None:
                values[slot] = value
                continue
            target = pos + off + value
            if kind is _S:
                # `_bytes`, inlined: a node_modules zTOC has 200,000 strings.
                if target + 4 > size:
                    raise self.fail(f"4 bytes at offset {target} run past the {size}-byte buffer")
                start = target + 4
                end = start + int(_U32S.unpack_from(buf, target)[0])
                if end + 1 > size:
                    raise self.fail(f"{end + 1 - start} bytes at offset {start} run past the {size}-byte buffer")
                values[slot] = buf[start:end]
            elif kind == "bytes":
                values[slot] = self._bytes(target, 0)
            elif kind == "strings":
                values[slot] = [self._bytes(t) for t in self._vector(target)]
            elif kind[0] == "table":
                values[slot] = self.table(target, kind[1])
            elif target + 4 <= size and not _U32S.unpack_from(buf, target)[0]:
                values[slot] = []  # the usual xattrs of a file: none
            else:
                values[slot] = [self.table(t, kind[1]) for t in self._vector(target)]
        return values

    def _layout(self, vtable: int, pos: int, name: str
                ) -> tuple[int, list[tuple[int, int, Any, Any]], struct.Struct | None]:
        """Check a vtable once (writers share one among similar tables): which fields, where,
        in offset order, and one struct that reads them all (scalars, and offsets of the rest)."""
        buf = self.buf
        self._check(vtable, 4)
        vt_len, t_len = _U16.unpack_from(buf, vtable)[0], _U16.unpack_from(buf, vtable + 2)[0]
        if vt_len < 4 or vt_len % 2 or t_len < 4:
            raise self.fail(f"{name} table at {pos} has a {vt_len}-byte vtable for {t_len} bytes")
        self._check(vtable, vt_len)
        kinds = _SCHEMA[name]
        fields = []
        for slot in range(min(len(kinds), (vt_len - 4) // 2)):
            off = _U16.unpack_from(buf, vtable + 4 + 2 * slot)[0]
            if not off:
                continue
            kind = kinds[slot]
            scalar = _SCALARS.get(kind) if isinstance(kind, str) else None
            if off < 4 or off + (scalar.size if scalar is not None else 4) > t_len:
                raise self.fail(f"{name} field {slot} at +{off} is outside its {t_len}-byte table")
            fields.append((slot, off, kind, scalar))
        fields.sort(key=lambda f: f[1])
        layout = (t_len, fields, _unpacker(fields))
        self._layouts[(vtable, name)] = layout
        return layout

    def _bytes(self, target: int, nul: int = 1) -> bytes:
        """A string, or a [ubyte] (nul=0); strings end with a NUL the writer adds, so a cut buffer shows."""
        length = self._u32(target)
        self._check(target + 4, length + nul)
        return self.buf[target + 4:target + 4 + length]

    def _vector(self, target: int) -> list[int]:
        """Where each element of a vector of offsets points."""
        count = self._u32(target)
        self._check(target + 4, 4 * count)
        start = target + 4
        return [start + 4 * i + off for i, off in enumerate(struct.unpack_from(f"<{count}I", self.buf, start))]


def _unpacker(fields: list[tuple[int, int, Any, Any]]) -> struct.Struct | None:
    """One struct over a table's fields in offset order, or None if a (hostile) vtable overlaps them.

    A node_modules zTOC has 30,000 FileMetadata tables of a dozen fields: one unpack per
    table instead of one per field halves the parse.
    """
    fmt, at = "<", 0
    for _, off, _, scalar in fields:
        if off < at:
            return None
        code = (scalar or _U32S).format[-1]
        fmt += f"{off - at}x{code}" if off > at else code
        at = off + struct.calcsize("<" + code)
    return struct.Struct(fmt)


# --------------------------------------------------------------------------- parse

def parse_ztoc(data: bytes) -> Ztoc:
    """Parse and validate a zTOC blob; anything malformed or inconsistent is a FormatError.

    Trailing bytes are ignored: soci appends prefetch metadata after the flatbuffer.
    """
    version, tool, compressed_size, uncompressed_size, toc, info = _Reader(bytes(data), "zTOC").root("Ztoc")
    if info is None:
        raise FormatError("zTOC has no compression_info")
    algorithm, max_span_id, digests, checkpoints = info
    try:
        algorithm = CompressionAlgorithm(1 if algorithm is None else algorithm)
    except ValueError:
        raise FormatError(f"zTOC compression algorithm {algorithm} is not gzip (1) or uncompressed (2)") from None
    z = Ztoc(
        version=_text(version or b""),
        build_tool_identifier=_text(tool or b""),
        compressed_archive_size=compressed_size or 0,
        uncompressed_archive_size=uncompressed_size or 0,
        entries=[_file_metadata(fm) for fm in (toc[0] or [])] if toc is not None else [],
        compression=CompressionInfo(algorithm, max_span_id or 0, [_text(d) for d in digests or []],
                                    checkpoints or b""),
    )
    validate_ztoc(z)
    return z


def _file_metadata(fields: list[Any]) -> FileMetadata:
    (name, etype, offset, size, linkname, mode, uid, gid, uname, gname, mod_time, devmajor, devminor,
     xattrs) = fields
    return FileMetadata(
        _text(name) if name else "", _text(etype) if etype else "", offset or 0, size or 0,
        _text(linkname) if linkname else "", mode or 0, uid or 0, gid or 0,
        _text(uname) if uname else "", _text(gname) if gname else "", _text(mod_time) if mod_time else "",
        devmajor or 0, devminor or 0,
        {_text(k or b""): v or b"" for k, v in xattrs} if xattrs else {},
    )


def parse_tar_zinfo(data: bytes) -> TarZinfo:
    """The nested TarZinfo flatbuffer that an uncompressed layer's zTOC keeps in `checkpoints`."""
    version, span_size, size = _Reader(bytes(data), "TarZinfo").root("TarZinfo")
    return TarZinfo(version or 0, span_size or 0, size or 0)


def validate_ztoc(z: Ztoc) -> None:
    """The consistency the runtime relies on: one digest per span, offsets inside the layer."""
    if z.version != ZTOC_VERSION:
        raise FormatError(f"zTOC version {z.version!r} is not supported (want {ZTOC_VERSION!r})")
    if z.compressed_archive_size < 0 or z.uncompressed_archive_size < 0:
        raise FormatError(f"zTOC archive sizes are negative ({z.compressed_archive_size}, "
                          f"{z.uncompressed_archive_size})")
    c = z.compression
    if c.max_span_id < 0 or len(c.span_digests) != c.max_span_id + 1:
        raise FormatError(f"zTOC has {len(c.span_digests)} span digests for max_span_id {c.max_span_id}")
    for i, digest in enumerate(c.span_digests):
        if not _SHA256.fullmatch(digest):
            raise FormatError(f"span digest {i} {digest!r} is not a sha256 digest")
    spans = span_index(z)
    if spans.max_span_id != c.max_span_id:
        raise FormatError(f"zTOC checkpoints describe {spans.max_span_id + 1} spans, but max_span_id is "
                          f"{c.max_span_id}")
    _validate_entries(z)


def _validate_entries(z: Ztoc) -> None:
    order = sorted(range(len(z.entries)), key=lambda i: z.entries[i].uncompressed_offset)
    next_header = 0
    for i in order:
        e = z.entries[i]
        if e.type not in ENTRY_TYPES:
            raise FormatError(f"{_where(i, e)}: unknown type {e.type!r}")
        if e.uncompressed_offset < 0 or e.uncompressed_size < 0:
            raise FormatError(f"{_where(i, e)}: negative offset or size")
        if e.uncompressed_offset < next_header:
            raise FormatError(f"{_where(i, e)}: data at {e.uncompressed_offset} overlaps the entry before it")
        end = e.uncompressed_offset + (e.uncompressed_size if e.type == "reg" else 0)
        if end > z.uncompressed_archive_size:
            raise FormatError(f"{_where(i, e)}: data [{e.uncompressed_offset}, {end}) runs past the "
                              f"{z.uncompressed_archive_size}-byte tar")
        next_header = _align(e.uncompressed_offset + e.uncompressed_size)


def _align(n: int) -> int:
    return (n + _BLOCK - 1) // _BLOCK * _BLOCK


def ztoc_digest(data: bytes) -> str:
    """The zTOC's content digest: sha256 of the blob exactly as stored."""
    return content_digest(data)


# --------------------------------------------------------------------------- serialize

def serialize_ztoc(z: Ztoc) -> bytes:
    """The flatbuffer, built in the order soci's Go marshaller builds it.

    Same call order means the same bytes for the same content, which keeps zTOC digests
    stable; it was not checked against soci itself (no soci binary here).
    """
    c = z.compression
    b = flatbuffers.Builder(len(c.checkpoints) + 256 * len(z.entries) + 1024)
    version = b.CreateString(_raw(z.version))
    tool = b.CreateString(_raw(z.build_tool_identifier))
    toc = _serialize_toc(b, z.entries)
    checkpoints = b.CreateByteVector(bytes(c.checkpoints))
    digest_offsets = [b.CreateString(_raw(d)) for d in c.span_digests]
    fb_compression_info.StartSpanDigestsVector(b, len(digest_offsets))
    for off in reversed(digest_offsets):
        b.PrependUOffsetTRelative(off)
    digests = b.EndVector()
    fb_compression_info.Start(b)
    fb_compression_info.AddMaxSpanId(b, c.max_span_id)
    fb_compression_info.AddSpanDigests(b, digests)
    fb_compression_info.AddCheckpoints(b, checkpoints)
    fb_compression_info.AddCompressionAlgorithm(b, int(c.algorithm))
    info = fb_compression_info.End(b)
    fb_ztoc.Start(b)
    fb_ztoc.AddVersion(b, version)
    fb_ztoc.AddBuildToolIdentifier(b, tool)
    fb_ztoc.AddToc(b, toc)
    fb_ztoc.AddCompressedArchiveSize(b, z.compressed_archive_size)
    fb_ztoc.AddUncompressedArchiveSize(b, z.uncompressed_archive_size)
    fb_ztoc.AddCompressionInfo(b, info)
    b.Finish(fb_ztoc.End(b))
    return bytes(b.Output())


def _serialize_toc(b: flatbuffers.Builder, entries: Sequence[FileMetadata]) -> int:
    offsets = [0] * len(entries)
    for i in range(len(entries) - 1, -1, -1):
        offsets[i] = _serialize_file_metadata(b, entries[i])
    fb_toc.StartMetadataVector(b, len(offsets))
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    metadata = b.EndVector()
    fb_toc.Start(b)
    fb_toc.AddMetadata(b, metadata)
    return int(fb_toc.End(b))


def _serialize_file_metadata(b: flatbuffers.Builder, e: FileMetadata) -> int:
    name, etype, linkname, uname, gname, mod_time = (
        b.CreateString(_raw(s)) for s in (e.name, e.type, e.linkname, e.uname, e.gname, e.mod_time))
    xattr_offsets = []
    for key in sorted(e.xattrs):
        k = b.CreateString(_raw(key))
        v = b.CreateString(bytes(e.xattrs[key]))
        fb_xattr.Start(b)
        fb_xattr.AddKey(b, k)
        fb_xattr.AddValue(b, v)
        xattr_offsets.append(fb_xattr.End(b))
    fb_file_metadata.StartXattrsVector(b, len(xattr_offsets))
    for off in reversed(xattr_offsets):
        b.PrependUOffsetTRelative(off)
    xattrs = b.EndVector()
    fb_file_metadata.Start(b)
    fb_file_metadata.AddName(b, name)
    fb_file_metadata.AddType(b, etype)
    fb_file_metadata.AddUncompressedOffset(b, e.uncompressed_offset)
    fb_file_metadata.AddUncompressedSize(b, e.uncompressed_size)
    fb_file_metadata.AddLinkname(b, linkname)
    fb_file_metadata.AddMode(b, e.mode)
    fb_file_metadata.AddUid(b, e.uid & 0xFFFFFFFF)
    fb_file_metadata.AddGid(b, e.gid & 0xFFFFFFFF)
    fb_file_metadata.AddUname(b, uname)
    fb_file_metadata.AddGname(b, gname)
    fb_file_metadata.AddModTime(b, mod_time)
    fb_file_metadata.AddDevmajor(b, e.devmajor)
    fb_file_metadata.AddDevminor(b, e.devminor)
    fb_file_metadata.AddXattrs(b, xattrs)
    return int(fb_file_metadata.End(b))


def serialize_tar_zinfo(t: TarZinfo) -> bytes:
    b = flatbuffers.Builder(64)
    fb_tar_zinfo.Start(b)
    fb_tar_zinfo.AddVersion(b, t.version)
    fb_tar_zinfo.AddSpanSize(b, t.span_size)
    fb_tar_zinfo.AddSize(b, t.size)
    b.Finish(fb_tar_zinfo.End(b))
    return bytes(b.Output())


# --------------------------------------------------------------------------- entries

def layer_entries(z: Ztoc) -> list[LayerEntry]:
    """The zTOC as tar members for `build_tree`, in tar order; regular files carry a `FileExtent`."""
    out = []
    for i, e in sorted(enumerate(z.entries), key=lambda ie: ie[1].uncompressed_offset):
        etype = ENTRY_TYPES.get(e.type)
        if etype is None:
            raise FormatError(f"{_where(i, e)}: unknown type {e.type!r}")
        link_name = e.linkname
        if etype is _HARDLINK:
            link_name = clean_path(link_name)
            if not link_name:
                raise FormatError(f"{_where(i, e)}: hardlink without a target")
        is_reg = etype is _REG
        try:
            mtime_ns = parse_time(e.mod_time, "mod_time")
        except FormatError as error:
            raise FormatError(f"{_where(i, e)}: {error}") from None
        xattrs = {k[len(XATTR_PAX_PREFIX):]: v for k, v in e.xattrs.items()
                  if k.startswith(XATTR_PAX_PREFIX)} if e.xattrs else {}
        out.append(LayerEntry(
            clean_path(e.name),
            etype,
            e.mode & 0o7777,
            e.uid,
            e.gid,
            e.uncompressed_size if is_reg else 0,
            mtime_ns,
            link_name,
            e.devmajor,
            e.devminor,
            xattrs,
            FileExtent(e.uncompressed_offset, e.uncompressed_size) if is_reg else None,
        ))
    return out


_REG, _HARDLINK = EntryType.REG, EntryType.HARDLINK


def _where(index: int, entry: FileMetadata) -> str:
    return f"zTOC entry {index} ({entry.name!r})"


# --------------------------------------------------------------------------- spans

class TarSpanIndex:
    """Span geometry of an uncompressed layer: fixed spans, compressed bytes = uncompressed bytes."""

    def __init__(self, zinfo: TarZinfo, compressed_size: int) -> None:
        if zinfo.span_size <= 0:
            raise FormatError(f"TarZinfo span size {zinfo.span_size} is not positive")
        if zinfo.size != compressed_size:
            raise FormatError(f"TarZinfo size {zinfo.size} differs from the {compressed_size}-byte blob")
        self.zinfo = zinfo
        self.uncompressed_size = zinfo.size

    @property
    def max_span_id(self) -> int:
        return self.zinfo.max_span_id

    def span_id_at(self, offset: int) -> int:
        return min(offset // self.zinfo.span_size, max(self.max_span_id, 0))

    def span(self, i: int) -> Span:
        start = i * self.zinfo.span_size
        end = self.zinfo.size if i == self.max_span_id else start + self.zinfo.span_size
        return Span(i, start, end, start, end, None)

    def spans_for(self, start: int, end: int) -> list[Span]:
        return [self.span(i) for i in gzip_index._span_ids(self, start, end)]


SpanIndex = GzipSpanIndex | TarSpanIndex


def span_index(z: Ztoc) -> SpanIndex:
    """The span geometry of a zTOC; build it once per layer, it parses the checkpoint blob."""
    c = z.compression
    if c.algorithm == CompressionAlgorithm.UNCOMPRESSED:
        return TarSpanIndex(parse_tar_zinfo(c.checkpoints), z.compressed_archive_size)
    return GzipSpanIndex(CheckpointTable(c.checkpoints), z.compressed_archive_size, z.uncompressed_archive_size)


def spans_for(z_or_index: Ztoc | SpanIndex, uncompressed_start: int, uncompressed_end: int) -> list[Span]:
    """The spans whose bytes cover uncompressed [start, end), in order."""
    index = span_index(z_or_index) if isinstance(z_or_index, Ztoc) else z_or_index
    return index.spans_for(uncompressed_start, uncompressed_end)


def extract_file(z: Ztoc, extent: FileExtent, blob: bytes | memoryview, index: SpanIndex | None = None) -> bytes:
    """A regular file's bytes from the whole layer blob, each span verified before it is inflated.

    The core of `ztoc get-file`; the runtime does the same span by span from ranged fetches.
    """
    if len(blob) != z.compressed_archive_size:
        raise FormatError(f"blob is {len(blob)} bytes, the zTOC says {z.compressed_archive_size}")
    index = index or span_index(z)
    view = memoryview(blob)
    pieces = []
    for span in index.spans_for(extent.uncompressed_offset, extent.end):
        compressed = view[span.compressed_start:span.compressed_end]
        gzip_index.verify_span(compressed, z.compression.span_digests[span.id])
        data = gzip_index.inflate_span(compressed, span)
        lo = max(extent.uncompressed_offset, span.uncompressed_start) - span.uncompressed_start
        hi = min(extent.end, span.uncompressed_end) - span.uncompressed_start
        pieces.append(data[lo:hi])
    out = b"".join(pieces)
    if len(out) != extent.size:
        raise FormatError(f"file at {extent.uncompressed_offset}: got {len(out)} of {extent.size} bytes")
    return out


# --------------------------------------------------------------------------- tar scanning

_TAR_TYPES = {b"0": "reg", b"\0": "reg", b"1": "hardlink", b"2": "symlink", b"3": "char", b"4": "block",
              b"5": "dir", b"6": "fifo"}
_HEADER_ONLY = {"hardlink", "symlink", "char", "block", "dir", "fifo"}
_DECIMAL = re.compile(rb"[+-]?[0-9]+")
_OCTAL = re.compile(rb"[0-7]+")
_PAX_TIME = re.compile(r"([+-]?[0-9]+)(?:\.([0-9]*))?")


class TarScanner:
    """Push-parses a tar stream's headers as Go's archive/tar (and so soci) reads them.

    Records each member's data offset in the stream; member data is skipped, never kept.
    Handles ustar prefixes, GNU long names/links, PAX records (all kept, as soci keeps
    them) and base-256 numbers. `size` is where Go's reader stops: after the end-of-archive
    blocks, not after the record padding tar adds behind them. Global PAX headers are
    skipped (soci refuses them); other member types soci cannot represent are errors.
    """

    def __init__(self) -> None:
        self.entries: list[FileMetadata] = []
        self.pos = 0
        self._buf = bytearray()
        self._need = _BLOCK
        self._skip = 0
        self._meta: str | None = None  # type flag whose data is being collected
        self._pax: dict[bytes, bytes] | None = None
        self._long_name = b""
        self._long_link = b""
        self._zero_blocks = 0
        self.done = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        i, n = 0, len(view)
        while i < n and not self.done:
            if self._skip:
                step = min(self._skip, n - i)
                self._skip -= step
                self.pos += step
                i += step
                continue
            want = self._need - len(self._buf)
            piece = view[i:i + want]
            self._buf += piece
            self.pos += len(piece)
            i += len(piece)
            if len(self._buf) == self._need:
                block = bytes(self._buf)
                self._buf.clear()
                self._block(block)

    def finish(self) -> tuple[list[FileMetadata], int]:
        """The members and the tar size; a stream cut inside a member is an error."""
        if not self.done and (self._buf or self._skip or self._meta is not None or self._pax is not None
                              or self._long_name or self._long_link):
            raise FormatError(f"tar stream is truncated at offset {self.pos}")
        return self.entries, self.pos

    def _block(self, block: bytes) -> None:
        if self._meta is not None:
            self._special(block)
            return
        if block.count(0) == _BLOCK:
            self._zero_blocks += 1
            if self._zero_blocks == 2:
                self.done = True
            return
        if self._zero_blocks:
            raise FormatError(f"tar: a zero block followed by data at offset {self.pos - _BLOCK}")
        self._header(block)

    def _header(self, block: bytes) -> None:
        where = f"tar header at offset {self.pos - _BLOCK}"
        try:
            stored = _octal(block[148:156], where)
        except FormatError:
            raise FormatError(f"{where}: bad checksum field (not a tar stream?)") from None
        unsigned = sum(block) - sum(block[148:156]) + 8 * 32
        if stored != unsigned:  # old tars summed signed chars; count the high bytes only then (it is slow)
            signed = unsigned - 256 * sum(1 for c in block[:148] + block[156:] if c > 127)
            if stored != signed:
                raise FormatError(f"{where}: checksum mismatch (not a tar stream?)")
        magic, version = block[257:263], block[263:265]
        flag = block[156:157]
        name = _cstr(block[0:100])
        linkname = _cstr(block[157:257])
        size = _numeric(block[124:136], where)
        h: dict[str, Any] = {
            "mode": _numeric(block[100:108], where), "uid": _numeric(block[108:116], where),
            "gid": _numeric(block[116:124], where), "mtime_ns": _numeric(block[136:148], where) * 1_000_000_000,
            "uname": b"", "gname": b"", "devmajor": 0, "devminor": 0,
        }
        prefix = b""
        if magic == b"ustar\0" or (magic == b"ustar " and version == b" \0"):
            h["uname"], h["gname"] = _cstr(block[265:297]), _cstr(block[297:329])
            h["devmajor"], h["devminor"] = _numeric(block[329:337], where), _numeric(block[337:345], where)
            if magic == b"ustar\0":  # POSIX: a name prefix; star's is shorter, before its trailer
                prefix = _cstr(block[345:476] if block[508:512] == b"tar\0" else block[345:500])
        if prefix:
            name = prefix + b"/" + name
        if size < 0:
            raise FormatError(f"{where}: negative size {size}")
        if flag in (b"x", b"g", b"L", b"K"):
            if size > _MAX_SPECIAL_FILE:
                raise FormatError(f"{where}: {flag.decode()} header data of {size} bytes is too large")
            self._meta = flag.decode()
            self._need = size
            if size == 0:
                self._special(b"")
            return
        self._member(flag, name, linkname, size, h, where)

    def _special(self, data: bytes) -> None:
        flag, size = self._meta, self._need
        self._meta = None
        self._need = _BLOCK
        self._skip = _align(size) - size
        if flag == "L":
            self._long_name = _cstr(data)
        elif flag == "K":
            self._long_link = _cstr(data)
        elif flag == "x":
            self._pax = _parse_pax(data, f"PAX header ending at offset {self.pos}")
        else:
            _parse_pax(data, f"global PAX header ending at offset {self.pos}")

    def _member(self, flag: bytes, name: bytes, linkname: bytes, size: int, h: dict[str, Any], where: str) -> None:
        pax = self._pax or {}
        records = self._pax
        self._pax = None
        for key, value in pax.items():
            if not value:
                continue
            if key == b"path":
                name = value
            elif key == b"linkpath":
                linkname = value
            elif key in (b"uname", b"gname"):
                h[key.decode()] = value
            elif key in (b"uid", b"gid", b"size"):
                if not _DECIMAL.fullmatch(value):
                    raise FormatError(f"{where}: PAX {key.decode()} {value!r} is not a number")
                if key == b"size":
                    size = int(value)
                else:
                    h[key.decode()] = int(value)
            elif key == b"mtime":
                h["mtime_ns"] = _pax_time(value, where)
            elif key.startswith(b"GNU.sparse."):
                raise FormatError(f"{where}: sparse files are not supported")
        if self._long_name:
            name, self._long_name = self._long_name, b""
        if self._long_link:
            linkname, self._long_link = self._long_link, b""
        etype = _TAR_TYPES.get(flag)
        if flag in (b"0", b"\0") and name.endswith(b"/"):
            etype = "dir"
        if etype is None:
            raise FormatError(f"{where}: unsupported tar entry type {flag!r} for {_text(name)!r}")
        if size < 0:
            raise FormatError(f"{where}: negative size {size}")
        self.entries.append(FileMetadata(
            name=_text(name), type=etype, uncompressed_offset=self.pos, uncompressed_size=size,
            linkname=_text(linkname), mode=h["mode"], uid=h["uid"] & 0xFFFFFFFF, gid=h["gid"] & 0xFFFFFFFF,
            uname=_text(h["uname"]), gname=_text(h["gname"]), mod_time=format_time(h["mtime_ns"]),
            devmajor=h["devmajor"], devminor=h["devminor"],
            xattrs={_text(k): v for k, v in records.items()} if records else {},
        ))
        self._skip = 0 if etype in _HEADER_ONLY else _align(size)


def _cstr(field_bytes: bytes) -> bytes:
    end = field_bytes.find(b"\0")
    return field_bytes if end < 0 else field_bytes[:end]


def _octal(field_bytes: bytes, where: str) -> int:
    text = _cstr(field_bytes.strip(b" \0"))
    if not text:
        return 0
    if not _OCTAL.fullmatch(text):
        raise FormatError(f"{where}: numeric field {field_bytes!r} is not octal")
    return int(text, 8)


def _numeric(field_bytes: bytes, where: str) -> int:
    """Octal, or base-256 when the top bit is set (GNU/star extension for big numbers)."""
    if field_bytes and field_bytes[0] & 0x80:
        value = int.from_bytes(bytes([field_bytes[0] & 0x7F]) + field_bytes[1:], "big")
        if field_bytes[0] & 0x40:
            value -= 1 << (8 * len(field_bytes) - 1)
        if not -(1 << 63) <= value <= _MAX_INT64:
            raise FormatError(f"{where}: base-256 number overflows int64")
        return value
    return _octal(field_bytes, where)


def _parse_pax(data: bytes, where: str) -> dict[bytes, bytes]:
    """PAX records `"<len> <key>=<value>\\n"`, later ones winning, as Go's reader keeps them."""
    records: dict[bytes, bytes] = {}
    rest = data
    while rest:
        space = rest.find(b" ")
        if space <= 0 or not rest[:space].isdigit():
            raise FormatError(f"{where}: malformed PAX record")
        length = int(rest[:space])
        if length < 5 or length > len(rest) or rest[length - 1:length] != b"\n" or length <= space + 1:
            raise FormatError(f"{where}: malformed PAX record")
        key, eq, value = rest[space + 1:length - 1].partition(b"=")
        if not eq or not key or b"\0" in key:
            raise FormatError(f"{where}: malformed PAX record {rest[:length]!r}")
        if key in (b"path", b"linkpath", b"uname", b"gname") and b"\0" in value:
            raise FormatError(f"{where}: PAX {key.decode()} contains NUL")
        records[key] = value
        rest = rest[length:]
    return records


def _pax_time(value: bytes, where: str) -> int:
    m = _PAX_TIME.fullmatch(value.decode("latin-1"))
    if m is None:
        raise FormatError(f"{where}: PAX time {value!r} is not a decimal number")
    seconds = int(m[1])
    nanos = int((m[2] or "")[:9].ljust(9, "0"))
    return seconds * 1_000_000_000 + (-nanos if m[1].startswith("-") else nanos)


# --------------------------------------------------------------------------- building

class _FixedSpanHasher:
    """sha256 of each `span_size` slice of a stream (the spans of an uncompressed layer)."""

    def __init__(self, span_size: int) -> None:
        self.span_size = span_size
        self.digests: list[str] = []
        self._hash = hashlib.sha256()
        self._filled = 0
        self.size = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            step = min(self.span_size - self._filled, len(view))
            self._hash.update(view[:step])
            self._filled += step
            self.size += step
            view = view[step:]
            if self._filled == self.span_size:
                self.digests.append("sha256:" + self._hash.hexdigest())
                self._hash = hashlib.sha256()
                self._filled = 0

    def finish(self) -> list[str]:
        if self._filled:
            self.digests.append("sha256:" + self._hash.hexdigest())
        return self.digests


class ZtocBuilder:
    """Streams a layer blob once (push chunks with `feed`) and makes its zTOC.

    Memory stays bounded: the tar scanner keeps only headers, the gzip builder a 32 KiB
    window; the zTOC itself (entries and ~32 KiB per span) is the only growth.
    """

    def __init__(self, span_size: int = DEFAULT_SPAN_SIZE, *,
                 compression: CompressionAlgorithm = CompressionAlgorithm.GZIP,
                 build_tool_identifier: str = DEFAULT_BUILD_TOOL) -> None:
        if span_size <= 0:
            raise ValueError(f"span size must be positive, not {span_size}")
        self.span_size = span_size
        self.compression = compression
        self.build_tool_identifier = build_tool_identifier
        self.tar = TarScanner()
        self.compressed_size = 0
        self._gzip: GzipIndexBuilder | None = None
        self._fixed: _FixedSpanHasher | None = None
        if compression == CompressionAlgorithm.GZIP:
            self._gzip = GzipIndexBuilder(span_size, self.tar.feed)
        else:
            self._fixed = _FixedSpanHasher(span_size)

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        self.compressed_size += len(chunk)
        if self._gzip is not None:
            self._gzip.feed(chunk)
        else:
            assert self._fixed is not None
            self.tar.feed(chunk)
            self._fixed.feed(chunk)

    def finish(self) -> Ztoc:
        if self.compressed_size == 0:
            raise FormatError("empty layer blob")
        if self._gzip is not None:
            index = self._gzip.finish()
            entries, tar_size = self.tar.finish()
            compression = CompressionInfo(CompressionAlgorithm.GZIP, len(index.checkpoints) - 1,
                                          index.span_digests, index.blob())
        else:
            assert self._fixed is not None
            entries, tar_size = self.tar.finish()
            digests = self._fixed.finish()
            zinfo = TarZinfo(TAR_ZINFO_VERSION, self.span_size, self.compressed_size)
            compression = CompressionInfo(CompressionAlgorithm.UNCOMPRESSED, zinfo.max_span_id, digests,
                                          serialize_tar_zinfo(zinfo))
        return Ztoc(ZTOC_VERSION, self.build_tool_identifier, self.compressed_size, tar_size, entries, compression)


def build_ztoc(chunks: Iterable[bytes | bytearray | memoryview], span_size: int = DEFAULT_SPAN_SIZE,
               compressed_size: int | None = None, *,
               compression: CompressionAlgorithm = CompressionAlgorithm.GZIP,
               build_tool_identifier: str = DEFAULT_BUILD_TOOL) -> bytes:
    """The serialized zTOC of a layer given as a stream of blob chunks (gzip, or a plain tar)."""
    builder = ZtocBuilder(span_size, compression=compression, build_tool_identifier=build_tool_identifier)
    for chunk in chunks:
        builder.feed(chunk)
    z = builder.finish()
    if compressed_size is not None and compressed_size != z.compressed_archive_size:
        raise FormatError(f"layer blob is {z.compressed_archive_size} bytes, expected {compressed_size}")
    return serialize_ztoc(z)


__all__ = [
    "DEFAULT_BUILD_TOOL", "DEFAULT_SPAN_SIZE", "TAR_ZINFO_VERSION", "XATTR_PAX_PREFIX", "ZTOC_VERSION",
    "CompressionAlgorithm", "CompressionInfo", "FileExtent", "FileMetadata", "SpanIndex", "TarScanner",
    "TarSpanIndex", "TarZinfo", "Ztoc", "ZtocBuilder", "build_ztoc", "extract_file",
    "layer_entries", "parse_tar_zinfo", "parse_ztoc", "serialize_tar_zinfo",
    "serialize_ztoc", "span_index", "spans_for", "validate_ztoc", "ztoc_digest",
]
