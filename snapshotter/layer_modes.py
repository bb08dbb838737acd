"""How a layer is obtained (its mode) and, when it is not served lazily, why (its fallback cause).

Ground floor, imported by both sides: the control plane saves a layer's mode with its record,
the data plane picks a reader by it, and status, metrics, rpull's report and the command line
show it. `LayerMode` is a string enum, so the values saved in the store and sent over the Status API
are the strings they always were.
"""

from __future__ import annotations

import enum


class LayerMode(enum.StrEnum):
    """The formats served lazily, or how the layer is pulled whole."""

    ESTARGZ = "estargz"
    ZSTD_CHUNKED = "zstd:chunked"
    SOCI = "soci"
    FALLBACK = "fallback"
    """Pulled whole by containerd (lazysnap could not obtain it either)."""
    WHOLE = "whole"
    """Pulled whole by lazysnap itself (`whole/pull.py`): containerd downloads nothing."""


def mode_named(value: str) -> LayerMode | None:
    """The mode a string from the wire or the store names; None for "" or one this build does not know
    (a newer daemon's), so that a client shows the layer rather than failing on it."""
    try:
        return LayerMode(value)
    except ValueError:
        return None


CHUNKED = frozenset({LayerMode.ESTARGZ, LayerMode.ZSTD_CHUNKED})
"""The modes served by `EStargzLayer`: files are TOC-listed chunks, cached as their bytes. (A set of
string enum members also holds the plain strings a layer record saves.)"""


class FallbackCause(enum.Enum):
    """Why a layer is pulled whole, in classes an operator can count (the reason text says more)."""

    NO_INDEX = "no_index"
    """Neither an eStargz or zstd:chunked TOC nor a SOCI zTOC for it."""
    BROKEN_INDEX = "broken_index"
    """An index that does not parse, or describes an impossible tree."""
    VERIFICATION = "verification"
    """The index cannot be verified (no or a wrong TOC digest or checksum annotation)."""
    REGISTRY = "registry"
    TIMEOUT = "timeout"
    XATTRS = "xattrs"
    """Extended attributes with fuse_xattrs off and no kernel metadata."""
    ATTACH = "attach"
    """Saving its index or serving it failed (a full disk, a data plane that refused)."""
    RESTORE = "restore"
    INTERNAL = "internal"
