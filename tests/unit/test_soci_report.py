"""Sizes on the command line, the progress bar, and the tables `lazysnap index` prints."""

from __future__ import annotations

import io

import pytest

from snapshotter.sizes import parse_size
from snapshotter.soci.build import LayerResult
from snapshotter.soci.report import ProgressBar, layer_table, table


@pytest.mark.parametrize(("text", "value"), [
    ("65536", 65536), ("4MiB", 4 << 20), ("4mib", 4 << 20), ("10MB", 10_000_000), ("10 MB", 10_000_000),
    ("64KiB", 64 << 10), ("64kB", 64_000), ("4M", 4 << 20), ("1G", 1 << 30), ("1.5MiB", 3 << 19), ("512B", 512),
    ("0", 0),
])
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "MiB", "-1", "4 MiBs", "1.3B", "4Xb", "4iB", "0x10"])
def test_bad_sizes_say_what_is_wanted(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def layers() -> list[LayerResult]:
    built = LayerResult(0, "sha256:" + "a" * 64, "application/vnd.oci.image.layer.v1.tar+gzip", 12 << 20)
    built.ztoc_size, built.spans, built.files, built.seconds = 300 << 10, 3, 120, 0.4
    built.ztoc = object()  # type: ignore[assignment]
    small = LayerResult(1, "sha256:" + "b" * 64, "application/vnd.oci.image.layer.v1.tar+gzip", 900,
                        skipped="900 B is below the minimum layer size 10.0 MiB")
    return [built, small]


def test_plain_progress_is_one_line_per_event() -> None:
    out = io.StringIO()
    bar = ProgressBar(out, tty=False)
    built, _ = layers()
    bar.begin(1, built.size)
    bar.layer_started(built)
    for _ in range(12):
        bar.advanced(1 << 20)
    bar.layer_done(built)
    bar.end()
    lines = out.getvalue().splitlines()
    assert lines == [
        "indexing 1 layer(s), 12.0 MiB",
        "  layer 0 sha256:aaaaaaaaaaaa (12.0 MiB): streaming",
        "  layer 0 sha256:aaaaaaaaaaaa: 3 spans, 120 files, zTOC 300.0 KiB, 0.40 s",
    ]
    assert "\r" not in out.getvalue()


def test_tty_progress_redraws_one_line() -> None:
    out = io.StringIO()
    bar = ProgressBar(out, tty=True)
    built, _ = layers()
    bar.begin(1, built.size)
    bar.layer_started(built)
    bar.advanced(6 << 20)
    bar.layer_done(built)
    bar.advanced(6 << 20)
    bar.end()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    frames = [f for f in text.rstrip("\n").split("\r\x1b[K") if f]
    assert frames[0].startswith("indexing [") and "0/1 layers" in frames[0]
    assert "100%" in frames[-1] and "12.0 MiB / 12.0 MiB" in frames[-1] and "1/1 layers" in frames[-1]


def test_nothing_to_stream_draws_nothing() -> None:
    out = io.StringIO()
    bar = ProgressBar(out, tty=True)
    bar.begin(0, 0)
    bar.end()
    assert out.getvalue() == ""


def test_layer_table_says_why_a_layer_was_skipped() -> None:
    rows = layer_table(layers()).splitlines()
    assert rows[0].split() == ["LAYER", "SIZE", "ZTOC", "SPANS", "FILES", "SECONDS", "NOTE"]
    assert rows[1].split() == ["sha256:aaaaaaaaaaaa", "12.0", "MiB", "300.0", "KiB", "3", "120", "0.40"]
    assert rows[2].endswith("skipped: 900 B is below the minimum layer size 10.0 MiB")


def test_table_pads_all_but_the_last_column() -> None:
    assert table([("A", "BB", "last"), ("ccc", "d", "x y")]) == "A    BB  last\nccc  d   x y"
