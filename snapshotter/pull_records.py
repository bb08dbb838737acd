"""The records of a pull: what a client asks the daemon to pull, and what the pull did.

Kept apart from the pull itself so that `lazysnap rpull` can send the one and print the
other without importing the machinery in between.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SnapshotterError
from .registry.options import RegistryOptions
from .sizes import human_size

LAZY = "lazy"
WHOLE_BY_LAZYSNAP = "pulled whole by lazysnap"
"""A layer without a usable index that lazysnap fetched itself, so containerd did not."""


@dataclass(frozen=True)
class PullOrder:
    """What a client asks the daemon to pull, and where to."""

    ref: str
    namespace: str
    containerd: str
    """containerd's socket."""
    snapshotter: str
    """The proxy_plugins name under which containerd knows lazysnap."""
    registry: RegistryOptions


@dataclass(frozen=True)
class LayerOutcome:
    """How one layer of a pulled image came, as rpull's report says it."""

    digest: str
    size: int
    how: str
    """`LAZY`, `LAZY` and the layer's format ("lazy estargz"), or `WHOLE_BY_LAZYSNAP` (`containerd.pull.how_obtained`)."""
    reason: str = ""
    """Why the layer is not lazy; empty when it is."""
    seconds: float = 0.0


@dataclass(frozen=True)
class PullReport:
    """What a pull did: the image, and each of its layers, bottom first."""

    image: str
    manifest_digest: str
    layers: list[LayerOutcome]
    seconds: float

    @property
    def lazy_layers(self) -> int:
        return sum(1 for layer in self.layers if layer.how.startswith(LAZY))


PullEvent = str | PullReport | SnapshotterError
"""What a running pull tells its client: progress lines, then the report or the error that ended it."""


def format_report(report: PullReport) -> str:
    """The table rpull ends with: one row per layer, how it was obtained and why."""
    rows = [("LAYER", "SIZE", "HOW", "SECONDS", "WHY")]
    for layer in report.layers:
        rows.append((layer.digest[:19], human_size(layer.size), layer.how, f"{layer.seconds:.2f}", layer.reason))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4] for row in rows]
    lines.append(f"{report.image}: {report.lazy_layers} of {len(report.layers)} layers lazy, "
                 f"pulled in {report.seconds:.2f} s")
    return "\n".join(line.rstrip() for line in lines)


@dataclass(frozen=True)
class WarmedLayer:
    """How much of one layer of a prefetched image is in the chunk cache (compressed bytes)."""

    digest: str
    content_bytes: int
    complete_bytes: int
    fetched_bytes: int
    state: str
    """"complete", "warming", "waiting", "pulled whole", or what stopped it."""


@dataclass(frozen=True)
class WarmReport:
    """What `lazysnap prefetch` warmed: at the start (`finished` False) or at the end."""

    image: str
    manifest_digest: str
    layers: tuple[WarmedLayer, ...]
    seconds: float
    sources: tuple[str, ...] = ()
    """What is fetched first (start profile, landmark, SOCI prefetch artifact); empty: whole layers only."""
    note: str = ""
    """Why less than the whole image is warmed (the cache is too small, a layer failed)."""
    finished: bool = False

    @property
    def failed(self) -> bool:
        return any(layer.state.startswith("failed") for layer in self.layers)


PrefetchEvent = str | PullReport | WarmReport | SnapshotterError
"""What a running prefetch tells its client: the pull's lines and report, warming progress, then
the warming's report or the error that ended it."""


def percent(done: int, total: int) -> str:
    """Rounded down, so that 100 % means complete."""
    return f"{done * 100 // total} %" if total else "-"


def format_warm_report(report: WarmReport) -> str:
    """The table prefetch ends with: each layer's share in the cache, and what stopped it."""
    rows = [("LAYER", "SIZE", "CACHED", "FETCHED", "STATE")]
    for layer in report.layers:
        lazy = layer.content_bytes > 0
        rows.append((layer.digest[:19], human_size(layer.content_bytes) if lazy else "-",
                     percent(layer.complete_bytes, layer.content_bytes) if lazy else "-",
                     human_size(layer.fetched_bytes) if lazy else "-", layer.state))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4] for row in rows]
    total = sum(layer.content_bytes for layer in report.layers)
    done = sum(layer.complete_bytes for layer in report.layers)
    fetched = sum(layer.fetched_bytes for layer in report.layers)
    first = f", {' and '.join(report.sources)} first" if report.sources else ""
    if report.finished or done == total:
        lines.append(f"{report.image}: {human_size(done)} of {human_size(total)} in the cache "
                     f"({percent(done, total)}), {human_size(fetched)} fetched{first}, in {report.seconds:.2f} s")
    else:
        lines.append(f"{report.image}: warming {human_size(total - done)} more in the daemon{first}; "
                     "`lazysnap status` shows how far")
    if report.note:
        lines.append(f"note: {report.note}")
    return "\n".join(line.rstrip() for line in lines)
