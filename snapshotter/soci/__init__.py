"""SOCI indexes: found for an image, built from it, kept locally, pushed beside it.

The image itself is never touched: its digest and signatures stay valid, and a
separate index makes its ordinary gzip layers seekable (shared/research/soci.md).
"""

DEFAULT_SPAN_SIZE = 4 << 20
DEFAULT_MIN_LAYER_SIZE = 10 << 20
DEFAULT_JOBS = 3
"""Defaults of building an index, here so the command line can show them without importing the builder."""
