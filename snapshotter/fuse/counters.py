"""Requests the kernel sent, per FUSE operation, and the time our handlers took for them.

A metadata-heavy workload is slow or fast by how many round trips it costs (each one
is ~50 µs through pyfuse3 before our handler even runs), so the first question about
one is always "which requests, how many". `lazysnap status` prints these.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
