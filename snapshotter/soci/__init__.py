"""SOCI indexes: found for an image, built from it, kept locally, pushed beside it.

The image itself is never touched: its digest and signatures stay valid, and a
separate index makes its ordinary gzip layers seekable (shared/research/soci.md).
"""
