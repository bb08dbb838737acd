"""The fastest correct inflate at hand: isal when installed, else the stdlib's zlib.

Both expose zlib's `decompressobj` API (wbits, zdict, max_length, unconsumed_tail,
unused_data, eof) and give the same bytes; isal is about 1.5x (gzip chunks) to 1.8x
(raw SOCI spans) faster on this kind of machine (shared/research/python-limits.md §3).
Callers look `module` up at call time, so tests can run every path through both.
"""

from __future__ import annotations

import importlib
import zlib
from types import ModuleType

isal: ModuleType | None
try:
    isal = importlib.import_module("isal.isal_zlib")
except ImportError:  # optional: zlib gives the same bytes, only slower
    isal = None

module: ModuleType = isal if isal is not None else zlib
ERRORS: tuple[type[Exception], ...] = (zlib.error, *([isal.error] if isal is not None else []))
