"""Recording a start profile: which units an image's layers are read in during its first start.

It sits beside `profiles.py`, which stores and publishes what it records, and below the
layers, which call `touch` on every read while a recording is attached to them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import trio

from .formats.profile import LayerProfile, Profile


class ReadHook(Protocol):
    """What a layer's `recordings` hold: a `Recording`, or in the data plane the link that
    reports first reads to the control plane (where the recording is)."""

    def touch(self, layer: str, start: int, end: int) -> None:
        """Bytes [start, end) of layer `layer`'s blob (a unit) were read."""
        ...


class Recorded(Protocol):
    """A layer a recording can be attached to."""

    recordings: list[ReadHook]


@dataclass(eq=False)
class Recording:
    """The units an image's layers are read in during its first start, in first-read order.

    Layers call `touch` on every read while the recording is attached to them. The
    window opens at the first read and closes `seconds` later (then it is detached
    and the profile saved).
    """

    image: str
    layers: tuple[str, ...]
    seconds: float
    started: float | None = None
    first_read: trio.Event = field(default_factory=trio.Event)
    """Set by the first `touch`: the window opens."""
    touched: dict[tuple[str, int], tuple[int, int, int]] = field(default_factory=dict)
    """(layer digest, unit start) -> (start, end, milliseconds after the first read), in first-read order."""
    max_units: int = 1 << 18
    _attached: list[list[ReadHook]] = field(default_factory=list, repr=False)
    """The `recordings` lists of the layers it is attached to."""

    def attach(self, layer: Recorded) -> None:
        """Have `layer`'s reads touch this recording, until `detach`."""
        layer.recordings.append(self)
        self._attached.append(layer.recordings)

    def detach(self) -> None:
        """The window is over: no layer touches it any more."""
        for recordings in self._attached:
            if self in recordings:
                recordings.remove(self)
        self._attached.clear()

    def touch(self, layer: str, start: int, end: int) -> None:
        now = time.monotonic()
        if self.started is None:
            self.started = now
            self.first_read.set()
        key = (layer, start)
        if key not in self.touched and len(self.touched) < self.max_units:
            self.touched[key] = (start, end, int(1000 * (now - self.started)))

    def profile(self) -> Profile:
        per_layer: dict[str, list[tuple[int, int, int]]] = {digest: [] for digest in self.layers}
        for (layer, _), read in self.touched.items():
            per_layer.setdefault(layer, []).append(read)
        out = []
        for digest, reads in per_layer.items():
            if reads:
                merged = _merge_adjacent(reads)
                out.append(LayerProfile(digest, tuple((s, e) for s, e, _ in merged), tuple(t for _, _, t in merged)))
        return Profile(self.image, tuple(out), self.seconds)


def _merge_adjacent(reads: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Join a read to the previous one when it starts where that one ends (order and the
    earlier time kept)."""
    out: list[tuple[int, int, int]] = []
    for start, end, at in reads:
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], end, out[-1][2])
        else:
            out.append((start, end, at))
    return out
