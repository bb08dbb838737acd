"""Range headers, Content-Range and multipart/byteranges parsing against hostile input."""

from __future__ import annotations

import os

import pytest

from snapshotter.registry.errors import BadResponse
from snapshotter.registry.ranges import (
    Part,
    assemble,
    boundary,
    content_range,
    header,
    merge,
    parse_multipart,
    total_size,
)

BLOB = os.urandom(5000)
SIZE = len(BLOB)


def multipart(mark: str, spans: list[tuple[int, int]], data: bytes = BLOB, preamble: bytes = b"") -> bytes:
    """A multipart/byteranges body the way Go's http.ServeContent writes it."""
    out = preamble
    for i, (start, end) in enumerate(spans):
        out += (b"\r\n" if i else b"") + f"--{mark}\r\nContent-Type: application/octet-stream\r\n" \
            f"Content-Range: bytes {start}-{end - 1}/{len(data)}\r\n\r\n".encode() + data[start:end]
    return out + f"\r\n--{mark}--\r\n".encode()


def test_header_and_merge() -> None:
    assert header([(0, 10), (100, 101)]) == "bytes=0-9,100-100"
    assert merge([(50, 60), (0, 10), (10, 20), (55, 70), (80, 80), (5, 8)]) == [(0, 20), (50, 70)]
    assert merge([]) == []


def test_content_range_checked_against_the_blob() -> None:
    assert content_range("bytes 0-9/5000", SIZE, "x") == (0, 10)
    assert content_range("bytes 10-19/*", SIZE, "x") == (10, 20)
    assert total_size("bytes 0-0/5000", "x") == 5000 and total_size("bytes */77", "x") == 77
    for bad in (None, "", "bytes 9-0/5000", "bytes 0-5000/5000", "bytes 0-9/4999", "items 0-9/5000", "bytes 0-9"):
        with pytest.raises(BadResponse):
            content_range(bad, SIZE, "x")
    with pytest.raises(BadResponse):
        total_size("bytes 0-9/*", "x")


def test_boundary() -> None:
    assert boundary("multipart/byteranges; boundary=abc123") == "abc123"
    assert boundary('multipart/byteranges; boundary="a b"') == "a b"
    assert boundary("application/octet-stream") is None
    assert boundary("multipart/byteranges") is None


def test_parts_in_any_order_and_merged() -> None:
    parts = parse_multipart(multipart("B0UND", [(300, 400), (0, 100)], preamble=b"\r\n"), "B0UND", SIZE, "x")
    assert [(p.start, p.end) for p in parts] == [(300, 400), (0, 100)]
    assert assemble(parts, [(0, 10), (350, 360), (90, 100), (7, 7)]) == \
        [BLOB[0:10], BLOB[350:360], BLOB[90:100], b""]
    assert assemble(parts, [(0, 10), (150, 160)]) is None, "a range no part covers"


def test_boundary_inside_the_data_does_not_confuse_the_parser() -> None:
    mark = "XyZ"
    data = bytearray(BLOB)
    data[10:19] = b"\r\n--XyZ\r\n"
    parts = parse_multipart(multipart(mark, [(0, 100), (200, 300)], bytes(data)), mark, SIZE, "x")
    assert parts == [Part(0, bytes(data[0:100])), Part(200, bytes(data[200:300]))]


@pytest.mark.parametrize(("body", "why"), [
    (b"no boundary here", "without its boundary"),
    (multipart("B", [(0, 100)])[:-60], "truncated"),
    (multipart("B", [(0, 100)]).replace(b"Content-Range: bytes 0-99/5000\r\n", b""), "without Content-Range"),
    (multipart("B", [(0, 100)]).replace(b"bytes 0-99/5000", b"bytes 0-49/5000"), "longer than announced"),
    (multipart("B", [(0, 100)]).replace(b"/5000", b"/9999"), "says the blob has"),
    (multipart("B", [(0, 100)]).replace(b"bytes 0-99/5000", b"bytes 4990-5089/5000"), "outside"),
    (b"--B\r\nContent-Range: bytes 0-9/5000" + b"x" * 20000, "separator"),
])
def test_hostile_multipart_bodies(body: bytes, why: str) -> None:
    with pytest.raises(BadResponse, match=why):
        parse_multipart(body, "B", SIZE, "blob x")
