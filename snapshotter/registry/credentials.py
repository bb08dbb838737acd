"""Registry credentials as every source hands them over, and the record of a search for them.

Secrets never reach a log line or an error message: the records print without them
(`repr=False`), and everything said about a lookup (`Lookup.explain`) names sources,
users and outcomes only.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}


@dataclass(frozen=True)
class Credentials:
    """A username and password, or an identity token (an OAuth2 refresh token for the token server)."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    source: str = field(default="", compare=False)
    """Where they came from, in words for messages: a file, a helper, a provider."""

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def who(self) -> str:
        """Who these credentials say we are, for messages (never the secret)."""
        return repr(self.username) if self.username else "an identity token"

    def described(self) -> str:
        """"the credentials of 'alice' from <source>", for messages."""
        where = f" from {self.source}" if self.source else ""
        return f"the credentials of {self.who()}{where}"


@dataclass(frozen=True)
class Lookup:
    """What a keychain found for one registry, and what each source it asked answered."""

    credentials: Credentials | None
    tried: tuple[str, ...] = ()
    """One line per source consulted, e.g. "docker-credential-pass (credsStore): no credentials"."""

    def explain(self) -> str:
        return "; ".join(self.tried) if self.tried else "no credential source is configured"


class Renewals:
    """When credentials or a token were last obtained for each registry and repository (wall clock),
    so that `lazysnap status` can show how fresh a layer's access is. Written by the auth flow in
    the event loop, read by the Status API's threads: single dict operations, no lock needed."""

    def __init__(self) -> None:
        self._at: dict[tuple[str, str], float] = {}

    def note(self, host: str, repository: str = "") -> None:
        self._at[(registry_key(host), repository)] = time.time()

    def last(self, host: str, repository: str = "") -> float:
        """Unix time of the last renewal for `repository` on `host` (else for the host alone); 0: never."""
        key = registry_key(host)
        return self._at.get((key, repository)) or self._at.get((key, ""), 0.0)


def registry_key(key: str) -> str:
    """A config.json `auths` key or a registry host, reduced to `host[:port]`; Hub aliases become docker.io."""
    text = key.strip().lower()
    host = urlsplit(text).netloc if "://" in text else text.split("/", 1)[0]
    return "docker.io" if host in _HUB_ALIASES else host


def repository_of(scope: str) -> str:
    """The repository path of the first `repository:<path>:<actions>` in an auth scope ("" if none)."""
    for part in scope.split():
        kind, _, rest = part.partition(":")
        path, sep, _ = rest.rpartition(":")
        if kind == "repository" and sep and path:
            return path
    return ""
