"""What eStargz TOCs and SOCI zTOCs share about tar members: type names, paths, times.

Both formats describe tar members with the same vocabulary (Go's archive/tar by way of
each tool): type names such as `reg` or `symlink`, member names such as `./usr/bin/`,
and RFC 3339 modification times. One reading of each here keeps the two formats
agreeing on what a layer contains.
"""

from __future__ import annotations

import functools
import posixpath
import re
from datetime import UTC, datetime, timedelta

from .entries import EntryType
from .errors import FormatError

ENTRY_TYPES: dict[str, EntryType] = {t.value: t for t in EntryType}
"""Index type names (`dir`, `reg`, `symlink`, `hardlink`, `char`, `block`, `fifo`) to tree types."""

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))"
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
