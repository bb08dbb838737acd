"""The tar vocabulary shared by TOCs, and a streaming scanner of tar headers.

Both eStargz TOCs and SOCI zTOCs describe tar members with the same vocabulary (Go's
archive/tar by way of each tool): type names such as `reg` or `symlink`, member names
such as `./usr/bin/`, and RFC 3339 modification times. One reading of each here keeps
the two formats agreeing on what a layer contains.

`TarScanner` push-parses a tar stream's headers as Go's archive/tar reads them and
records each member as a `FileMetadata`, the record a zTOC stores; the zTOC builder
(`ztoc.builder`) feeds it the inflated layer.
"""

from __future__ import annotations

import functools
import posixpath
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from .entries import EntryType
from .errors import FormatError

ENTRY_TYPES: dict[str, EntryType] = {t.value: t for t in EntryType}
"""Index type names (`dir`, `reg`, `symlink`, `hardlink`, `char`, `block`, `fifo`) to tree types."""

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,  # \d is any Unicode digit otherwise ("٢٠٢٣"), which Go's time.Parse refuses
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def clean_path(name: str) -> str:
    """A tar member name as a path relative to the layer root: `./a/b/` -> `a/b`, `./` -> ``."""
    if _is_clean(name):
        return name  # most names of a 30,000-entry index: skip normpath's cost
    return posixpath.normpath("/" + name).lstrip("/")


def _is_clean(name: str) -> bool:
    """Whether `name` is already what `clean_path` would make of it."""
    if not name or name[0] == "/" or name[-1] == "/" or "//" in name:
        return False
    if name[0] != "." and "/." not in name:
        return True  # no component starts with a dot, so none is . or ..
    return not any(part in (".", "..") for part in name.split("/"))


def parse_time(text: str, where: str) -> int:
    """RFC 3339 to nanoseconds since the epoch, exactly (no float rounding); "" is the epoch."""
    if not text:
        return 0
    ns = _parse_time(text)
    if isinstance(ns, str):
        raise FormatError(f"{where}: {text!r} {ns}")
    return ns


@functools.lru_cache(maxsize=4096)
def _parse_time(text: str) -> int | str:
    """Nanoseconds, or why not. Cached: the entries of one layer share a handful of times."""
    m = _RFC3339.fullmatch(text)
    if m is None:
        return "is not RFC 3339"
    year, month, day, hour, minute, second = (int(m[i]) for i in range(1, 7))
    try:
        t = datetime(year, month, day, hour, minute, min(second, 59), tzinfo=UTC)
    except ValueError:
        return "is not a valid time"
    seconds = (t - _EPOCH) // timedelta(seconds=1) + (second - min(second, 59))
    if m[9]:
        offset = (int(m[10]) * 60 + int(m[11])) * 60
        seconds -= offset if m[9] == "+" else -offset
    return seconds * 1_000_000_000 + int((m[7] or "").ljust(9, "0"))


def format_time(total_ns: int) -> str:
    """Go's `time.MarshalText` of a UTC time (RFC 3339, trailing zeros of the fraction cut).

    Go gives up outside years 0-9999 and the tools then store an empty string; so do we.
    """
    seconds, nanos = divmod(total_ns, 1_000_000_000)
    try:
        t = _EPOCH + timedelta(seconds=seconds)
    except OverflowError:
        return ""
    text = f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
    if nanos:
        text += "." + f"{nanos:09d}".rstrip("0")
    return text + "Z"


# --------------------------------------------------------------------------- members

BLOCK_SIZE = 512
"""Tar's unit: a header is one block, and member data is padded to whole blocks."""


def block_align(n: int) -> int:
    """`n` rounded up to whole blocks: where the next header starts after `n` bytes of data."""
    return (n + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE


def decode_text(raw: bytes) -> str:
    """A header's (or a zTOC's) string; bytes that are not UTF-8 survive as surrogate escapes."""
    return raw.decode("utf-8", "surrogateescape")


def encode_text(text: str) -> bytes:
    """The bytes `decode_text` read, exactly."""
    return text.encode("utf-8", "surrogateescape")


@dataclass(slots=True)
class FileMetadata:
    """One tar member as its header says, field for field as a zTOC stores it (soci's name).

    `uncompressed_offset` is where the member's data starts in the tar stream. `xattrs`
    holds *all* the member's PAX records (the schema's name notwithstanding); only
    `SCHILY.xattr.*` ones become extended attributes. Strings that are not UTF-8 survive
    a round trip through surrogate escapes (`decode_text`).
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


# --------------------------------------------------------------------------- scanning

_MAX_SPECIAL_FILE = 1 << 20  # what Go's archive/tar allows for PAX and GNU long-name data
_MAX_INT64 = (1 << 63) - 1
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
        self._need = BLOCK_SIZE
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
        if block.count(0) == BLOCK_SIZE:
            self._zero_blocks += 1
            if self._zero_blocks == 2:
                self.done = True
            return
        if self._zero_blocks:
            raise FormatError(f"tar: a zero block followed by data at offset {self.pos - BLOCK_SIZE}")
        self._header(block)

    def _header(self, block: bytes) -> None:
        where = f"tar header at offset {self.pos - BLOCK_SIZE}"
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
        self._need = BLOCK_SIZE
        self._skip = block_align(size) - size
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
                number = _pax_int(value)
                if number is None:
                    raise FormatError(f"{where}: PAX {key.decode()} {value[:40]!r} is not an int64")
                if key == b"size":
                    size = number
                else:
                    h[key.decode()] = number
            elif key == b"mtime":
                h["mtime_ns"] = _pax_time(value, where)
            elif key.startswith(b"GNU.sparse."):
                raise FormatError(f"{where}: sparse files are not supported")
        if self._long_name:
            name, self._long_name = self._long_name, b""
        if self._long_link:
            linkname, self._long_link = self._long_link, b""
        etype = _TAR_TYPES.get(flag)
        if flag == b"\0" and name.endswith(b"/"):  # as Go reads it: only type '\0' (TypeRegA) with a slash is a dir
            etype = "dir"
        if etype is None:
            raise FormatError(f"{where}: unsupported tar entry type {flag!r} for {decode_text(name)!r}")
        if size < 0:
            raise FormatError(f"{where}: negative size {size}")
        self.entries.append(FileMetadata(
            name=decode_text(name), type=etype, uncompressed_offset=self.pos, uncompressed_size=size,
            linkname=decode_text(linkname), mode=h["mode"], uid=h["uid"] & 0xFFFFFFFF, gid=h["gid"] & 0xFFFFFFFF,
            uname=decode_text(h["uname"]), gname=decode_text(h["gname"]), mod_time=format_time(h["mtime_ns"]),
            devmajor=h["devmajor"], devminor=h["devminor"],
            xattrs={decode_text(k): v for k, v in records.items()} if records else {},
        ))
        self._skip = 0 if etype in _HEADER_ONLY else block_align(size)


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
        digits = rest[:space].lstrip(b"0")  # int() refuses 4,300 digits, leading zeros included
        if space <= 0 or not rest[:space].isdigit() or len(digits) > 18:
            raise FormatError(f"{where}: malformed PAX record")
        length = int(digits or b"0")
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


def _pax_int(value: bytes) -> int | None:
    """A PAX record's decimal number, or None unless it fits an int64 (Go's strconv.ParseInt(v, 10, 64))."""
    digits = value.lstrip(b"+-").lstrip(b"0")
    if not _DECIMAL.fullmatch(value) or len(digits) > 19:
        return None  # also keeps int() from thousands of digits (leading zeros count), which it refuses
    number = int(digits or b"0") * (-1 if value.startswith(b"-") else 1)
    return number if -(1 << 63) <= number <= _MAX_INT64 else None


def _pax_time(value: bytes, where: str) -> int:
    m = _PAX_TIME.fullmatch(value.decode("latin-1"))
    seconds = None if m is None else _pax_int(m[1].encode())
    if m is None or seconds is None:
        raise FormatError(f"{where}: PAX time {value[:40]!r} is not a decimal number of seconds in int64")
    nanos = int((m[2] or "")[:9].ljust(9, "0"))
    return seconds * 1_000_000_000 + (-nanos if m[1].startswith("-") else nanos)

