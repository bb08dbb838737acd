"""A checked TOC (`formats/toc.py`) as the layer's tar members, each file with its chunks.

Its own module because eStargz and zstd:chunked share it, and differ only in where a
chunk's compressed bytes end (`exact_ends`). It runs once per entry of a 30,000-entry
layer on the way to the tree, so it keeps per-entry work small: times are parsed once
per distinct text, and records are built positionally.
"""

from __future__ import annotations

import bisect

from .entries import EntryType, LayerEntry, gc_paused
from .errors import FormatError
from .tar import ENTRY_TYPES, clean_path, parse_time
from .toc import CHUNK, Chunk, Toc, TocEntry, where

_REG = EntryType.REG
_HARDLINK = EntryType.HARDLINK


@gc_paused()
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
    mtimes: dict[str, int] = {}
    out: list[LayerEntry] = []
    index, count = 0, len(entries)
    while index < count:
        entry = entries[index]
        etype = entry.type
        if etype == CHUNK:
            raise FormatError(f"{where(index, entry.name)}: chunk entry does not follow a non-empty regular file")
        mtime = mtimes.get(entry.modtime)
        if mtime is None:
            mtime = mtimes[entry.modtime] = parse_time(entry.modtime, "modtime")  # checked in toc_document
        layer_entry = _layer_entry(index, entry, mtime)
        out.append(layer_entry)
        following = index + 1
        if etype == "reg":
            while following < count and entries[following].type == CHUNK:
                following += 1
            if entry.size > 0:
                layer_entry.content = _file_chunks(entries, index, following, ends, toc_offset, exact_ends)
            elif following > index + 1:
                raise FormatError(f"{where(index + 1, entries[index + 1].name)}: chunk entry does not follow "
                                  "a non-empty regular file")
            else:
                layer_entry.content = ()
        index = following
    if exact_ends:
        _check_disjoint(out)
    return out


def _layer_entry(index: int, entry: TocEntry, mtime_ns: int) -> LayerEntry:
    etype = ENTRY_TYPES[entry.type]
    link_name = entry.link_name
    if etype is _HARDLINK:
        link_name = clean_path(link_name)
        if not link_name:
            raise FormatError(f"{where(index, entry.name)}: hardlink without a target")
    return LayerEntry(
        clean_path(entry.name),
        etype,
        entry.mode & 0o7777,
        entry.uid,
        entry.gid,
        entry.size if etype is _REG else 0,
        mtime_ns,
        link_name,
        entry.dev_major,
        entry.dev_minor,
        dict(entry.xattrs) if entry.xattrs else {},
    )


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
            raise FormatError(f"{where(index, entry.name)}: payload offset {entry.offset} is not before "
                              f"the TOC at {toc_offset}")
        if index > first and entry.name and clean_path(entry.name) != clean_path(file.name):
            raise FormatError(f"{where(index, entry.name)}: chunk entry follows {file.name!r}, a different file")
        start = entry.chunk_offset
        if start != covered:
            raise FormatError(f"{where(index, entry.name)}: chunk starts at {start}, want {covered} "
                              f"(chunks of file {file.name!r} must tile it in order)")
        size = entry.chunk_size or file.size - start
        if size <= 0 or start + size > file.size:
            raise FormatError(f"{where(index, entry.name)}: chunk [{start}, +{size}) does not fit in "
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
    at = where(index, entry.name)
    if compressed_end <= entry.offset:
        raise FormatError(f"{at}: chunk ends at {compressed_end}, not after its offset {entry.offset} "
                          "(no endOffset, or chunks out of order)")
    if compressed_end > toc_offset:
        raise FormatError(f"{at}: chunk [{entry.offset}, {compressed_end}) runs past the payload end {toc_offset}")
    if entry.inner_offset:
        raise FormatError(f"{at}: innerOffset {entry.inner_offset}, but every chunk is its own frames")
    if digest is None:
        raise FormatError(f"{at}: chunk without a digest")


def _check_disjoint(entries: list[LayerEntry]) -> None:
    """No two chunks share blob bytes: one frame is never two files' content."""
    chunks = sorted((c for e in entries if isinstance(e.content, tuple) for c in e.content),
                    key=lambda c: c.compressed_offset)
    for before, after in zip(chunks, chunks[1:]):
        if after.compressed_offset < before.compressed_end:
            raise FormatError(f"chunks [{before.compressed_offset}, {before.compressed_end}) and "
                              f"[{after.compressed_offset}, {after.compressed_end}) overlap in the blob")
