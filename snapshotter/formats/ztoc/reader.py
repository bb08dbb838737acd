"""The bounds-checked flatbuffer reader: a zTOC's bytes to records, not yet validated.

`parse_ztoc` (in `validate`) reads with `read_ztoc`, then checks what the runtime relies
on. Why not flatbuffers' generated classes: see `_Reader`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from ..errors import FormatError
from ..tar import decode_text
from .records import CompressionAlgorithm, CompressionInfo, FileMetadata, TarZinfo, Ztoc

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


def read_ztoc(data: bytes) -> Ztoc:
    """A zTOC blob's records, unchecked (`parse_ztoc` checks them); a malformed buffer is a FormatError.

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
    return Ztoc(
        version=decode_text(version or b""),
        build_tool_identifier=decode_text(tool or b""),
        compressed_archive_size=compressed_size or 0,
        uncompressed_archive_size=uncompressed_size or 0,
        entries=[_file_metadata(fm) for fm in (toc[0] or [])] if toc is not None else [],
        compression=CompressionInfo(algorithm, max_span_id or 0, [decode_text(d) for d in digests or []],
                                    checkpoints or b""),
    )


def _file_metadata(fields: list[Any]) -> FileMetadata:
    (name, etype, offset, size, linkname, mode, uid, gid, uname, gname, mod_time, devmajor, devminor,
     xattrs) = fields
    text = decode_text
    return FileMetadata(
        text(name) if name else "", text(etype) if etype else "", offset or 0, size or 0,
        text(linkname) if linkname else "", mode or 0, uid or 0, gid or 0,
        text(uname) if uname else "", text(gname) if gname else "", text(mod_time) if mod_time else "",
        devmajor or 0, devminor or 0,
        {text(k or b""): v or b"" for k, v in xattrs} if xattrs else {},
    )


def parse_tar_zinfo(data: bytes) -> TarZinfo:
    """The nested TarZinfo flatbuffer that an uncompressed layer's zTOC keeps in `checkpoints`."""
    version, span_size, size = _Reader(bytes(data), "TarZinfo").root("TarZinfo")
    return TarZinfo(version or 0, span_size or 0, size or 0)

