"""Image references, parsed and normalised the way containerd and docker do.

`[host[:port]/]path[:tag][@algorithm:hex]`. The first path component is a host
only if it looks like one (has a `.` or `:`, is `localhost`, or has upper case);
otherwise the image is on Docker Hub, where one-component names live under
`library/`. So `busybox` is `docker.io/library/busybox:latest`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from . import digest as digests
from .errors import InvalidReference

DOCKER_HUB = "docker.io"
"""The domain Docker Hub images are named under (its API host is in `hosts.py`)."""
_LEGACY_HUB = "index.docker.io"
DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255

_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"^(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?$")
_PATH_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_HEX64 = re.compile(r"^[a-f0-9]{64}$")


@dataclass(frozen=True)
class Reference:
    """A normalised image reference: always has a domain, and a tag or a digest (or both)."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """`domain/path`, the repository without tag or digest."""
        return f"{self.domain}/{self.path}"

    @property
    def object(self) -> str:
        """What to ask `/manifests/` for: the digest when pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_digest(self, digest: str) -> Reference:
        return replace(self, digest=digests.validate(digest))

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse(text: str) -> Reference:
    """Parse and normalise `text`; raise `InvalidReference` saying what is wrong."""
    if not isinstance(text, str) or not text:
        raise InvalidReference(f"invalid reference {text!r}: empty")
    if text != text.strip() or any(c.isspace() for c in text):
        raise InvalidReference(f"invalid reference {text!r}: contains whitespace")
    rest, at, digest = text.partition("@")
    if at:
        try:
            digests.validate(digest)
        except InvalidReference as e:
            raise InvalidReference(f"invalid reference {text!r}: {e}") from None
    tag: str | None = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG.match(tag):
            raise InvalidReference(f"invalid reference {text!r}: bad tag {tag!r}")
    domain, path = _split_domain(rest, text)
    if len(domain) + 1 + len(path) > MAX_NAME_LENGTH:
        raise InvalidReference(f"invalid reference {text!r}: name longer than {MAX_NAME_LENGTH} characters")
    if not at and tag is None:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest if at else None)


def _split_domain(name: str, text: str) -> tuple[str, str]:
    first, slash, remainder = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first.lower() != first):
        domain, path = first, remainder
        if not _DOMAIN.match(domain):
            raise InvalidReference(f"invalid reference {text!r}: bad registry host {domain!r}")
    else:
        domain, path = DOCKER_HUB, name
    if domain == _LEGACY_HUB:
        domain = DOCKER_HUB
    if not path:
        raise InvalidReference(f"invalid reference {text!r}: no repository name")
    if path.lower() != path:
        raise InvalidReference(f"invalid reference {text!r}: repository name must be lowercase")
    for component in path.split("/"):
        if not _PATH_COMPONENT.match(component):
            raise InvalidReference(f"invalid reference {text!r}: bad repository name component {component!r}")
    if domain == DOCKER_HUB and "/" not in path:
        if _HEX64.match(path):
            raise InvalidReference(f"invalid reference {text!r}: a 64-hex-digit name looks like an image id")
        path = f"library/{path}"
    return domain, path


def validate_tag(tag: str) -> str:
    """`tag` unchanged if it is a valid tag; else `InvalidReference`."""
    if not isinstance(tag, str) or not _TAG.match(tag):
        raise InvalidReference(f"invalid tag {tag!r}")
    return tag


def repository(ref: Reference | str) -> Reference:
    """`ref` as a Reference (parsing a string); used where only the repository matters."""
    return ref if isinstance(ref, Reference) else parse(ref)
