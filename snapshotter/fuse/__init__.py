"""FUSE: attached layers served read-only under one mount (the only package that imports pyfuse3)."""

from .counters import FuseStats, OpCounter
from .filesystem import DEFAULT_READ_TIMEOUT, DEFAULT_ROOT_TIMEOUT, DEFAULT_TIMEOUT, LayerFilesystem, XattrsUnsupported
from .mount import DEFAULT_READAHEAD_KB, FuseMount, clear_stale_mount, serve_fuse

__all__ = [
    "DEFAULT_READAHEAD_KB", "DEFAULT_READ_TIMEOUT", "DEFAULT_ROOT_TIMEOUT", "DEFAULT_TIMEOUT",
    "FuseMount", "FuseStats", "LayerFilesystem", "OpCounter", "XattrsUnsupported", "clear_stale_mount", "serve_fuse",
]
