"""Content digests (`algorithm:hex`) of bytes: the one place that computes them.

Pure, so the formats can name what they describe (a TOC, a zTOC, a span, a profile)
and the registry layer can verify what it downloads with the same function.
"""

from __future__ import annotations

import hashlib


def content_digest(data: bytes | bytearray | memoryview, algorithm: str = "sha256") -> str:
    """The OCI digest of `data`."""
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
