"""Content digests (`algorithm:hex`) as the OCI image spec defines them: the one place
that computes them and that checks their syntax.

Pure, so the formats can name and check what they describe (a TOC, a zTOC, a span, a
profile, a descriptor) and the registry layer can verify what it downloads with the
same functions. Only sha256 and sha512 can be verified.
"""

from __future__ import annotations

import hashlib
import re

from .errors import FormatError

ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128}
"""Verifiable algorithms and the length of their hex encoding."""
_DIGEST = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")


def content_digest(data: bytes | bytearray | memoryview, algorithm: str = "sha256") -> str:
    """The OCI digest of `data`."""
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def check_syntax(digest: str) -> str:
    """`digest` unchanged if it is a well-formed, verifiable digest; else `FormatError`."""
    if not _DIGEST.match(digest):
        raise FormatError(f"invalid digest {digest!r}: want algorithm:hex")
    algorithm, _, hex_part = digest.partition(":")
    length = ALGORITHMS.get(algorithm)
    if length is None:
        raise FormatError(f"unsupported digest algorithm in {digest!r} (supported: sha256, sha512)")
    if len(hex_part) != length or not all(c in "0123456789abcdef" for c in hex_part):
        raise FormatError(f"invalid digest {digest!r}: want {length} lowercase hex digits")
    return digest
