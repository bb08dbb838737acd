"""The records of a pull: what a client asks the daemon to pull, and what the pull did.

Kept apart from the pull itself so that `lazysnap rpull` can send the one and print the
other without importing the machinery in between.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .errors import SnapshotterError
from .layer_modes import LayerMode
from .phases import PhaseState
from .registry.options import RegistryOptions
from .sizes import human_size

WHOLE_BY_LAZYSNAP = "pulled whole by lazysnap"
"""How rpull says a layer without a usable index came: lazysnap fetched it, so containerd did not."""


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
    mode: LayerMode | None
    """How lazysnap serves the layer (`WHOLE`: pulled whole by lazysnap); None when it did not say."""
    reason: str = ""
    """Why the layer is not lazy; empty when it is."""
    seconds: float = 0.0

    @property
    def lazy(self) -> bool:
        return self.mode not in (LayerMode.WHOLE, LayerMode.FALLBACK)

    @property
    def how(self) -> str:
        """As rpull's report says it: "lazy estargz", "lazy" (format not said), or `WHOLE_BY_LAZYSNAP`."""
        if self.mode is LayerMode.WHOLE:
            return WHOLE_BY_LAZYSNAP
        if self.mode is LayerMode.FALLBACK:
            return "pulled whole by containerd"
        return f"lazy {self.mode}" if self.mode else "lazy"


@dataclass(frozen=True)
class PullReport:
    """What a pull did: the image, and each of its layers, bottom first."""

    image: str
    manifest_digest: str
    layers: list[LayerOutcome]
    seconds: float

    @property
    def lazy_layers(self) -> int:
        return sum(1 for layer in self.layers if layer.lazy)


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


class WarmPhase(enum.Enum):
    """Where the warming of one layer is (its value is how `lazysnap prefetch` says it)."""

    WAITING = "waiting"
    WARMING = "warming"
    COMPLETE = "complete"
    PARTIAL = "partial"
    """Stopped with the cache full (the detail says so)."""
    PULLED_WHOLE = "pulled whole"
    NOT_LAZY = "not served lazily"
    STOPPED = "stopped"
    """The layer was released while warming."""
    FAILED = "failed"


WarmState = PhaseState[WarmPhase]


@dataclass(frozen=True)
class WarmedLayer:
    """How much of one layer of a prefetched image is in the chunk cache (compressed bytes)."""

    digest: str
    content_bytes: int
    complete_bytes: int
    fetched_bytes: int
    state: WarmState


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
        return any(layer.state.phase is WarmPhase.FAILED for layer in self.layers)


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
                     human_size(layer.fetched_bytes) if lazy else "-", str(layer.state)))
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
