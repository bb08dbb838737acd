"""Python CPU of serving one eStargz layer: TOC parse, layer tree, EROFS image (issue 15).

Why: on a fast registry the pull of the many-files image (30,000 small files in 1,200
directories) is bound by lazysnap's own Python work before the layer can be mounted,
not by the network. This times that work stage by stage, exactly as production calls it
(`layers/estargz.fetch_index` -> `formats.estargz.parse_toc`; `layers/manager.py` ->
`verify_toc`, then `EStargzLayer(...)` (entries + tree + chunk units) and
`layers.erofs.image_of`), on a synthetic layer shaped like many-files: the
benchmark image's own entries (`benchmarks.images.many_files_entries`) written as a real
eStargz blob by the test harness's writer (`tests.harness.estargz`), which the parser
never shares code with.

    .venv/bin/python -m benchmarks.pull_cpu [--runs 5] [--hash]

Prints, per stage, the median and min-max over the runs, and the total of the medians;
`--hash` also prints the sha256 of the EROFS image and of the TOC entries, so a change
that must not alter the image can be checked against the figures before it.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, cast

from snapshotter.formats import estargz
from snapshotter.layers import erofs
from snapshotter.layers.estargz import ESTARGZ_CHUNKS, EStargzIndex, EStargzLayer
from snapshotter.layers.tree import build_tree
from tests.harness.estargz import build_estargz

from .images import many_files_entries


def synthetic_layer() -> tuple[bytes, int, str]:
    """(TOC gzip member, TOC offset, TOC digest) of a many-files-shaped eStargz blob."""
    layer = build_estargz(many_files_entries(), level=1)
    start, end = layer.toc_offset, len(layer.blob) - layer.footer_size
    footer = estargz.parse_footer(layer.blob[-estargz.FOOTER_READ_SIZE:], blob_size=len(layer.blob))
    assert footer.toc_range(len(layer.blob)) == (start, end)
    return layer.blob[start:end], layer.toc_offset, layer.toc_digest


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    begin = time.process_time()
    out = fn()
    return time.process_time() - begin, out


def run_once(member: bytes, toc_offset: int, toc_digest: str) -> tuple[dict[str, float], Any]:
    """One pass through the production stages; returns per-stage CPU seconds and the image."""
    times: dict[str, float] = {}
    times["TOC parse"], toc = _timed(lambda: estargz.parse_toc(member))
    times["TOC verify"], _ = _timed(lambda: estargz.verify_toc(toc, toc_digest, allow_unverified=False))
    index = EStargzIndex(estargz.Footer(toc_offset, 51, False), toc, member, ESTARGZ_CHUNKS)
    times["layer (entries+tree+units)"], layer = _timed(lambda: EStargzLayer(index, cast(Any, None), cast(Any, None)))
    times["EROFS image"], image = _timed(lambda: erofs.image_of(layer))
    return times, (toc, layer, image)


def breakdown(member: bytes, toc_offset: int) -> dict[str, float]:
    """The layer stage's parts, for diagnosis only (not part of the total). The rest of it is
    `EStargzLayer`'s own work (chunks in blob order, fetch units) and the collections it triggers."""
    toc = estargz.parse_toc(member)
    t_entries, entries = _timed(lambda: estargz.layer_entries(toc, toc_offset))
    t_tree, _ = _timed(lambda: build_tree(entries))
    return {"  of which layer_entries": t_entries, "  of which build_tree": t_tree}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--hash", action="store_true", help="print the sha256 of the EROFS image and TOC entries")
    args = parser.parse_args(argv)
    begin = time.monotonic()
    member, toc_offset, toc_digest = synthetic_layer()
    print(f"synthetic layer built in {time.monotonic() - begin:.1f} s: TOC member {len(member)} bytes")
    samples: dict[str, list[float]] = {}
    extra: dict[str, list[float]] = {}
    result = None
    for _ in range(args.runs):
        times, result = run_once(member, toc_offset, toc_digest)
        for stage, seconds in times.items():
            samples.setdefault(stage, []).append(seconds)
        for stage, seconds in breakdown(member, toc_offset).items():
            extra.setdefault(stage, []).append(seconds)
    assert result is not None
    toc, layer, image = result
    print(f"{len(toc.entries)} TOC entries, {len(layer.tree.nodes)} inodes, EROFS image {len(image.meta)} bytes")
    print(f"{'stage (CPU s, ' + str(args.runs) + ' runs)':36} {'median':>8} {'min':>8} {'max':>8}")
    for stage, values in (samples | extra).items():
        print(f"{stage:36} {statistics.median(values):8.3f} {min(values):8.3f} {max(values):8.3f}")
    rest = statistics.median(samples["layer (entries+tree+units)"]) - sum(statistics.median(v) for v in extra.values())
    print(f"{'  of which the rest (medians)':36} {rest:8.3f}")
    totals = [sum(run) for run in zip(*samples.values())]
    print(f"{'total':36} {statistics.median(totals):8.3f} {min(totals):8.3f} {max(totals):8.3f}")
    if args.hash:
        print("EROFS image sha256", hashlib.sha256(image.meta).hexdigest(), "data size", image.data_size)
        print("entries sha256", hashlib.sha256(repr(toc.entries).encode()).hexdigest())
    return 0


if __name__ == "__main__":
    sys.exit(main())
