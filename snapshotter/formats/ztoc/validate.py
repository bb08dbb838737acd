"""A zTOC the runtime can trust, and the layer it describes.

`parse_ztoc` reads the blob (`reader`) and checks it (`validate_ztoc`): one digest per
span, offsets inside the layer, members whose data do not overlap. `layer_entries`
turns the checked zTOC into the layer's tar members for `layers.tree.build_tree`.
"""

from __future__ import annotations

import re

from ..digest import content_digest
from ..entries import EntryType, LayerEntry
from ..errors import FormatError
from ..tar import ENTRY_TYPES, block_align, clean_path, parse_time
from .reader import read_ztoc
from .records import XATTR_PAX_PREFIX, ZTOC_VERSION, FileExtent, FileMetadata, Ztoc
from .spans import span_index

_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


def parse_ztoc(data: bytes) -> Ztoc:
    """Parse and validate a zTOC blob; anything malformed or inconsistent is a FormatError.

    Trailing bytes are ignored: soci appends prefetch metadata after the flatbuffer.
    """
    z = read_ztoc(data)
    validate_ztoc(z)
    return z


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
        next_header = block_align(e.uncompressed_offset + e.uncompressed_size)


def ztoc_digest(data: bytes) -> str:
    """The zTOC's content digest: sha256 of the blob exactly as stored."""
    return content_digest(data)


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
