"""Reads that had to go to the registry: the one signal every way of fetching ahead listens to
(background fetch waits for them to go quiet, readahead follows their streaks)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .units import FetchableLayer


@dataclass
class FetchActivity:
    """Foreground fetching, shared by all layers: background work stays out of its way, and
    readahead (`on_miss`) learns where reads are heading."""

    last_foreground: float = field(default_factory=time.monotonic)
    """`time.monotonic()` of the latest read that had to go to the registry, or of the
    latest mount (its container is about to start reading)."""
    foreground_fetches: int = 0
    on_miss: Callable[[FetchableLayer, int, int], None] | None = None

    def mounted(self) -> None:
        self.last_foreground = time.monotonic()

    def foreground(self, layer: FetchableLayer, start: int, end: int) -> None:
        """A read of `layer` had to fetch blob bytes [start, end) itself."""
        self.last_foreground = time.monotonic()
        self.foreground_fetches += 1
        if self.on_miss is not None:
            self.on_miss(layer, start, end)

    def quiet_for(self) -> float:
        return time.monotonic() - self.last_foreground
