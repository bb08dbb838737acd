"""Content digests (`algorithm:hex`) as the OCI image spec defines them.

Only sha256 and sha512 can be verified; every byte that crosses the registry
boundary is checked against its digest before anyone uses it.
"""

from __future__ import annotations

import hashlib

from ..formats.digest import check_syntax, content_digest
from ..formats.errors import FormatError
from .errors import BadResponse, InvalidReference


def validate(digest: str) -> str:
    """`digest` unchanged if it is a well-formed, verifiable digest; else `InvalidReference`."""
    try:
        return check_syntax(digest)
    except FormatError as e:
        raise InvalidReference(str(e)) from None


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
