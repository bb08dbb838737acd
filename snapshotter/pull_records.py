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


@dataclass
class LayerOutcome:
    digest: str
    size: int
    how: str
    reason: str = ""
    seconds: float = 0.0


@dataclass
class PullReport:
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
