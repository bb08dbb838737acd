"""Requests the kernel sent, per FUSE operation, and the time our handlers took for them.

A metadata-heavy workload is slow or fast by how many round trips it costs (each one
is ~50 µs through pyfuse3 before our handler even runs), so the first question about
one is always "which requests, how many". `lazysnap status` prints these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class ReadFailure(enum.Enum):
    """Why a read got EIO: what an operator alerts on differs (a registry outage vs. corrupt data)."""

    TIMEOUT = "timeout"
    """No answer within read_timeout (registry or control plane too slow, or away)."""
    UNAVAILABLE = "unavailable"
    """The bytes could not be had or failed verification (the layer's ReadError says which)."""
    RETRY_TOO_SOON = "retry_too_soon"
    """Failed moments ago through the same open file; not tried again yet (fail fast)."""
    DETACHED = "detached"
    SHORT = "short_read"
    UNEXPECTED = "unexpected"


@dataclass
class OpCounter:
    """One operation: requests answered (with data or an error) and handler wall time.

    The time runs from the handler's start to its answer, so a read includes its wait on
    the cache or the registry; pyfuse3's own per-request cost is not in it.
    """

    count: int = 0
    seconds: float = 0.0


@dataclass
class FuseStats:
    """All counters of one FUSE session."""

    ops: dict[str, OpCounter] = field(default_factory=dict)
    read_bytes: int = 0
    read_errors: int = 0
    read_failures: dict[ReadFailure, int] = field(default_factory=dict)
    """`read_errors` by cause."""

    def read_failed(self, why: ReadFailure) -> None:
        self.read_errors += 1
        self.read_failures[why] = self.read_failures.get(why, 0) + 1

    def failures(self) -> dict[str, int]:
        return {why.value: n for why, n in self.read_failures.items()}

    def record(self, op: str, seconds: float) -> None:
        counter = self.ops.get(op)
        if counter is None:
            counter = self.ops[op] = OpCounter()
        counter.count += 1
        counter.seconds += seconds

    def count(self, op: str) -> int:
        counter = self.ops.get(op)
        return counter.count if counter is not None else 0

    def report(self) -> dict[str, object]:
        """The counters in the shape of the Status API's `Fuse` message, busiest first."""
        ops = sorted(self.ops.items(), key=lambda item: (-item[1].count, item[0]))
        return {
            "ops": [{"name": name, "count": c.count, "seconds": c.seconds} for name, c in ops],
            "read_bytes": self.read_bytes,
            "read_errors": self.read_errors,
        }
