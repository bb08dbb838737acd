"""A phase and the reason behind it: how `lazysnap status` says where fetching ahead is with a
layer, and `lazysnap prefetch` where its warming is ("background stopped: 503 from the registry").

Ground floor: the phase enums live with what they describe (`fetch/progress.py`,
`pull_records.py`); this is the record both say them with.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Generic, TypeVar

P = TypeVar("P", bound=enum.Enum)


@dataclass(frozen=True)
class PhaseState(Generic[P]):
    phase: P
    detail: str = ""
    """Why, for the phases that need a reason."""

    def __str__(self) -> str:
        return f"{self.phase.value}: {self.detail}" if self.detail else str(self.phase.value)
