"""HTTP byte ranges: `Range` headers, `Content-Range`, and `multipart/byteranges` bodies.

Pure functions over bytes. Ranges in this package are Python-style half-open
`(start, end)` pairs; HTTP's inclusive `first-last` form exists only in headers.
Parsers trust nothing: every part must lie inside the blob and be exactly as
long as its `Content-Range` says.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import BadResponse

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
MAX_PART_HEADERS = 8192
"""Bytes of headers we accept for one multipart part."""


@dataclass(frozen=True)
class Part:
    """A piece of a blob: `data` holds bytes `[start, start + len(data))`."""

    start: int
    data: bytes

    @property
    def end(self) -> int:
        return self.start + len(self.data)


def header(ranges: Sequence[tuple[int, int]]) -> str:
    """The `Range` header asking for the half-open `ranges`."""
    return "bytes=" + ",".join(f"{start}-{end - 1}" for start, end in ranges)


def merge(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ranges with overlapping and touching ones joined (servers may refuse overlaps)."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def content_range(value: str | None, size: int, what: str) -> tuple[int, int]:
    """The half-open range a `Content-Range: bytes a-b/size` header announces; checked against `size`."""
    m = _CONTENT_RANGE.match(value or "")
    if not m:
        raise BadResponse(f"{what}: bad Content-Range {value!r}")
    first, last, total = int(m.group(1)), int(m.group(2)), m.group(3)
    if total != "*" and int(total) != size:
        raise BadResponse(f"{what}: Content-Range {value!r} says the blob has {total} bytes, expected {size}")
    if first > last or last >= size:
        raise BadResponse(f"{what}: Content-Range {value!r} lies outside the {size}-byte blob")
    return first, last + 1


def total_size(value: str | None, what: str) -> int:
    """The blob size a `Content-Range` header announces (`bytes a-b/size` or `bytes */size`)."""
    m = re.match(r"^\s*bytes\s+(?:\d+-\d+|\*)/(\d+)\s*$", value or "", re.IGNORECASE)
    if not m:
        raise BadResponse(f"{what}: Content-Range {value!r} does not give the blob size")
    return int(m.group(1))


def boundary(content_type: str) -> str | None:
    """The boundary of a `multipart/byteranges` content type, or None for anything else."""
    if not content_type.lower().startswith("multipart/byteranges"):
        return None
    m = _BOUNDARY.search(content_type)
    if not m:
        return None
    return m.group(1) or m.group(2)


def parse_multipart(body: bytes, boundary_value: str, size: int, what: str) -> list[Part]:
    """The parts of a `multipart/byteranges` body, in the order sent.

    Each part's length comes from its Content-Range, never from searching for the
    boundary, so binary data that happens to contain the boundary cannot confuse us.
    """
    delimiter = b"--" + boundary_value.encode("latin-1")
    parts: list[Part] = []
    pos = body.find(delimiter)
    if pos < 0:
        raise BadResponse(f"{what}: multipart body without its boundary")
    while True:
        pos += len(delimiter)
        if body.startswith(b"--", pos):
            return parts
        line_end = body.find(b"\r\n", pos)
        if line_end < 0 or body[pos:line_end].strip():
            raise BadResponse(f"{what}: malformed multipart boundary line")
        headers_end = body.find(b"\r\n\r\n", line_end)
        if headers_end < 0 or headers_end - line_end > MAX_PART_HEADERS:
            raise BadResponse(f"{what}: multipart part without a header/body separator")
        part_range = None
        for line in body[line_end + 2:headers_end].split(b"\r\n"):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-range":
                part_range = content_range(value, size, what)
        if part_range is None:
            raise BadResponse(f"{what}: multipart part without Content-Range")
        start = headers_end + 4
        stop = start + (part_range[1] - part_range[0])
        if stop > len(body):
            raise BadResponse(f"{what}: multipart part {part_range[0]}-{part_range[1] - 1} is truncated")
        parts.append(Part(part_range[0], body[start:stop]))
        next_delimiter = body.find(delimiter, stop)
        if next_delimiter < 0 or body[stop:next_delimiter].strip(b"\r\n"):
            raise BadResponse(f"{what}: multipart part {part_range[0]}-{part_range[1] - 1} is longer than announced")
        pos = next_delimiter


def assemble(parts: Sequence[Part], wanted: Sequence[tuple[int, int]]) -> list[bytes] | None:
    """Each wanted range cut from whichever part covers it (empty ranges are empty); None if one is not covered."""
    out: list[bytes] = []
    for start, end in wanted:
        if start >= end:
            out.append(b"")
            continue
        part = next((p for p in parts if p.start <= start and end <= p.end), None)
        if part is None:
            return None
        out.append(part.data[start - part.start:end - part.start])
    return out
