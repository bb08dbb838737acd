"""What the `index` and `ztoc` commands print: a progress bar and plain-text tables.

The bar is one line redrawn with `\\r` on a terminal, and plain lines (one per layer
started and finished) anywhere else, so logs stay readable.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from ..formats import soci_index, ztoc
from ..sizes import human_size
from .build import BuildResult, LayerResult
from .convert import ConvertResult
from .describe import IndexInfo, LocalEntry, RegistryView, ZtocInfo
from .extract import Extracted
from .push import PushResult

BAR_WIDTH = 24
REDRAW_EVERY = 0.1


def short(digest: str) -> str:
    """`sha256:` and the first 12 hex digits, as `lazysnap status` shows layers."""
    return digest[:19]


class ProgressBar:
    """Implements `build.Progress` for people: a live bar on a TTY, lines otherwise."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.layers = self.total = self.done = self.finished = 0
        self.started = self.drawn = 0.0
        self._visible = False

    def begin(self, layers: int, total_bytes: int) -> None:
        self.layers, self.total, self.done, self.finished = layers, total_bytes, 0, 0
        self.started = time.monotonic()
        if layers and not self.tty:
            self._line(f"indexing {layers} layer(s), {human_size(total_bytes)}")

    def layer_started(self, layer: LayerResult) -> None:
        if not self.tty:
            self._line(f"  layer {layer.position} {short(layer.digest)} ({human_size(layer.size)}): streaming")
        self._draw(force=True)

    def advanced(self, nbytes: int) -> None:
        self.done += nbytes
        self._draw()

    def layer_done(self, layer: LayerResult) -> None:
        self.finished += 1
        if not self.tty:
            what = layer.skipped or (f"{layer.spans} spans, {layer.files} files, zTOC {human_size(layer.ztoc_size)}, "
                                     f"{layer.seconds:.2f} s")
            self._line(f"  layer {layer.position} {short(layer.digest)}: {what}")
        self._draw(force=True)

    def end(self) -> None:
        if self.tty and self._visible:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
            self._visible = False

    def bar(self) -> str:
        fraction = self.done / self.total if self.total else 1.0
        filled = int(BAR_WIDTH * fraction)
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return (f"indexing [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fraction:4.0%}  "
                f"{human_size(self.done)} / {human_size(self.total)}  {self.finished}/{self.layers} layers  "
                f"{human_size(int(self.done / elapsed))}/s")

    def _draw(self, force: bool = False) -> None:
        if not self.tty or not self.layers:
            return
        now = time.monotonic()
        if not force and now - self.drawn < REDRAW_EVERY:
            return
        self.drawn = now
        self.stream.write("\r\x1b[K" + self.bar())
        self.stream.flush()
        self._visible = True

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


def table(rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last column is left ragged."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]).rstrip()
                     for r in rows)


def layer_table(layers: Sequence[LayerResult]) -> str:
    rows = [("LAYER", "SIZE", "ZTOC", "SPANS", "FILES", "SECONDS", "NOTE")]
    for r in layers:
        if r.indexed:
            rows.append((short(r.digest), human_size(r.size), human_size(r.ztoc_size), str(r.spans), str(r.files),
                         "-" if r.reused else f"{r.seconds:.2f}", "reused from the store" if r.reused else ""))
        else:
            rows.append((short(r.digest), human_size(r.size), "-", "-", "-",
                         f"{r.seconds:.2f}" if r.seconds else "-", f"skipped: {r.skipped}"))
    return table(rows)


def _rate(layers: Sequence[LayerResult], seconds: float) -> str:
    built = sum(r.size for r in layers if r.indexed and not r.reused)
    if not built:
        return "nothing streamed (every zTOC reused)"
    return f"streamed {human_size(built)} in {seconds:.2f} s ({built / (1 << 20) / max(seconds, 1e-6):.1f} MiB/s)"


def build_report(result: BuildResult) -> str:
    indexed = sum(1 for r in result.layers if r.indexed)
    return "\n".join([
        layer_table(result.layers),
        "",
        f"index {result.index_digest} (SOCI v1, {indexed} of {len(result.layers)} layers, span size "
        f"{human_size(result.span_size)}, minimum layer size {human_size(result.min_layer_size)})",
        f"image {result.image} ({result.manifest.digest})",
        f"stored in {result.store}; {_rate(result.layers, result.seconds)}",
        f"publish it with: lazysnap index push {result.image}",
    ])


def push_report(result: PushResult) -> str:
    how = ("the registry lists it as a referrer" if result.referrers_api
           else f"listed under the fallback tag {result.fallback_tag} (the registry has no referrers API)")
    return "\n".join([
        f"pushed index {result.index.digest} ({result.ztocs} zTOCs, {human_size(result.ztoc_bytes)}) for "
        f"{result.image}",
        f"subject {result.manifest_digest} (unchanged); {how}",
    ])


def convert_report(result: ConvertResult) -> str:
    platform = "/".join(str(result.platform[k]) for k in ("os", "architecture", "variant") if result.platform.get(k))
    return "\n".join([
        layer_table(result.layers),
        "",
        f"{result.new_ref}: OCI image index {result.index_digest} ({platform})",
        f"  image manifest {result.image_manifest_digest} (the original plus {soci_index.INDEX_DIGEST})",
        f"  SOCI v2 index  {result.soci_index_digest}",
        f"{result.image} ({result.manifest_digest}) is unchanged; {_rate(result.layers, result.seconds)}",
        *([f"note: {result.image} is a multi-platform index ({result.source_index}); {result.new_ref} holds "
           f"only {platform}"] if result.source_index else []),
    ])


def local_list(entries: Sequence[LocalEntry], directory: str) -> str:
    if not entries:
        return f"no indexes in {directory}"
    rows = [("INDEX", "VERSION", "ZTOCS", "ZTOC SIZE", "IMAGE MANIFEST", "IMAGE")]
    for e in entries:
        if e.problem:
            rows.append((short(e.index_digest), "?", "-", "-", short(e.image_digest), f"{e.image} ({e.problem})"))
        else:
            rows.append((short(e.index_digest), e.version, str(e.ztocs), human_size(e.ztoc_bytes),
                         short(e.image_digest), e.image or "-"))
    return f"local indexes in {directory}:\n" + table(rows)


def registry_view(view: RegistryView) -> str:
    lines = [f"registry, for {view.image} ({view.manifest_digest}):"]
    if view.found.index is not None:
        lines.append(f"  discovery finds {view.found.index.digest} (source {view.found.source}, "
                     f"{len(view.found.index.ztocs)} zTOCs)")
    else:
        lines.append(f"  discovery finds nothing: {view.found.reason}")
    if view.referrers_problem:
        lines.append(f"  v1 referrers: {view.referrers_problem}")
    elif view.v1_referrers:
        lines += [f"  v1 referrer {d.digest} ({d.size} bytes)" for d in view.v1_referrers]
    else:
        lines.append("  no v1 referrers")
    return "\n".join(lines)


def index_info(info: IndexInfo) -> str:
    doc = json.loads(info.index.raw)
    head = f"index {info.digest} (SOCI {info.version}, from {info.source}"
    head += f", for {info.image})" if info.image else ")"
    rows = [("LAYER", "ZTOC", "ZTOC SIZE", "SPANS", "SPAN SIZE", "FILES", "LAYER SIZE / PROBLEM")]
    for z in info.ztocs:
        if z.ztoc is None:
            rows.append((short(z.layer), short(z.ref.digest), human_size(z.ref.size), "-", "-", "-", z.problem))
        else:
            rows.append((short(z.layer), short(z.ref.digest), human_size(z.ref.size), str(z.spans),
                         human_size(z.span_size), str(z.files), human_size(z.ztoc.compressed_archive_size)))
    return "\n".join([head, json.dumps(doc, indent=2), "", table(rows)])


def ztoc_info(info: ZtocInfo, files: int = 10) -> str:
    z = info.ztoc
    regular = [e for e in z.entries if e.type == "reg"]
    index = ztoc.span_index(z)
    lines = [
        f"zTOC {info.digest} (from {info.source})",
        f"  version:            {z.version}",
        f"  build tool:         {z.build_tool_identifier}",
        f"  zTOC size:          {info.size} ({human_size(info.size)})",
        f"  compression:        {z.compression.algorithm.name.lower()}",
        f"  compressed size:    {z.compressed_archive_size} ({human_size(z.compressed_archive_size)})",
        f"  uncompressed size:  {z.uncompressed_archive_size} ({human_size(z.uncompressed_archive_size)})",
        f"  spans:              {z.compression.max_span_id + 1}",
        f"  span size:          {info.span_size} ({human_size(info.span_size)})",
        f"  files:              {len(z.entries)} entries, {len(regular)} regular files",
    ]
    shown = sorted(z.entries, key=lambda e: e.uncompressed_offset)[:files]
    if shown:
        rows = [("TYPE", "SIZE", "OFFSET", "SPANS", "NAME")]
        for e in shown:
            spans = "-"
            if e.type == "reg" and e.uncompressed_size:
                first = index.span_id_at(e.uncompressed_offset)
                last = index.span_id_at(e.uncompressed_offset + e.uncompressed_size - 1)
                spans = str(first) if first == last else f"{first}-{last}"
            name = e.name + (f" -> {e.linkname}" if e.linkname else "")
            rows.append((e.type, str(e.uncompressed_size), str(e.uncompressed_offset), spans, name))
        lines += ["", f"first {len(shown)} of {len(z.entries)} entries:", table(rows)]
    return "\n".join(lines)


def extracted(ex: Extracted, destination: str) -> str:
    return (f"{ex.path}: {ex.size} bytes to {destination}; fetched {ex.spans} of {ex.total_spans} spans, "
            f"{human_size(ex.fetched)} of the {human_size(ex.layer_size)} layer (zTOC {short(ex.ztoc)}, "
            f"index {short(ex.index)} from {ex.index_source})")
