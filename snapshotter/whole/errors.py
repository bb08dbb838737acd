"""The error a refused layer raises, wherever in the applier it is refused.

It lives below `apply.py`, `paths.py` and `headers.py` so that all three can raise it without
importing one another in a circle. Callers import it from `apply.py`, which re-exports it.
"""

from __future__ import annotations

from snapshotter.formats.errors import FormatError


class ApplyError(FormatError):
    """The layer's tar stream is refused: malformed, truncated, or asking for something unsafe."""
