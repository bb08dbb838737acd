"""Content digests (`algorithm:hex`) as the OCI image spec defines them.

Only sha256 and sha512 can be verified; every byte that crosses the registry
boundary is checked against its digest before anyone uses it.
"""

from __future__ import annotations

import hashlib
import re

from ..formats.digest import content_digest
from .errors import BadResponse, InvalidReference

_ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128}
_DIGEST = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")


def validate(digest: str) -> str:
    """`digest` unchanged if it is a well-formed, verifiable digest; else `InvalidReference`."""
    if not _DIGEST.match(digest):
        raise InvalidReference(f"invalid digest {digest!r}: want algorithm:hex")
    algorithm, _, hex_part = digest.partition(":")
    length = _ALGORITHMS.get(algorithm)
    if length is None:
        raise InvalidReference(f"unsupported digest algorithm in {digest!r} (supported: sha256, sha512)")
    if len(hex_part) != length or not all(c in "0123456789abcdef" for c in hex_part):
        raise InvalidReference(f"invalid digest {digest!r}: want {length} lowercase hex digits")
    return digest


def hasher(digest: str) -> hashlib._Hash:
    """A fresh hash object of `digest`'s algorithm, for verifying streamed content."""
    return hashlib.new(validate(digest).partition(":")[0])


of = content_digest
"""The digest of `data` (computed in `formats.digest`, shared with the formats)."""


def verify(data: bytes, digest: str, what: str) -> None:
    """Raise `BadResponse` unless `data` hashes to `digest`."""
    h = hasher(digest)
    h.update(data)
    check(h, digest, what)


def check(h: hashlib._Hash, digest: str, what: str) -> None:
    """Raise `BadResponse` unless the finished hash `h` matches `digest`."""
    got = f"{h.name}:{h.hexdigest()}"
    if got != digest:
        raise BadResponse(f"{what}: digest mismatch, content hashes to {got}, expected {digest}")
