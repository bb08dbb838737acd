"""What every index format describes: the entries of a layer's tar, one record each.

The formats (eStargz TOC, zTOC, tar headers) turn their bytes into these; the layer tree
(`layers/tree.py`) is built from them. They live on the ground floor so that the formats
import nothing above them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class EntryType(enum.Enum):
    DIR = "dir"
    REG = "reg"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"

    # Members are singletons, so identity hashing is right, and it runs in C: Enum's own
    # __hash__ is Python code, and the tree builder hashes a type per entry.
    __hash__ = object.__hash__


@dataclass(slots=True)
class LayerEntry:
    """One tar member as an index describes it; `content` is the format's handle on its bytes."""

    path: str
    type: EntryType
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    link_name: str = ""
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    content: Any = None
