"""Registry authentication: Docker `config.json` credentials and the distribution token flow.

A registry that wants authentication answers 401 with `WWW-Authenticate`. For
`Basic` we send the user's credentials; for `Bearer realm=...,service=...,scope=...`
we get a token from the realm (anonymously, with basic credentials, or with an
identity token as an OAuth2 refresh token) and send it as `Authorization: Bearer`.
Tokens are cached per (registry host, scope) until shortly before they expire,
fetched by one task at a time, and dropped when the registry rejects them, so a
revoked or expired token costs exactly one extra round trip.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import trio

from .errors import BadResponse, Unauthorized
from .options import default_docker_config

log = logging.getLogger(__name__)

CLIENT_ID = "lazysnap"
DEFAULT_TOKEN_LIFETIME = 60
"""Seconds a token lives when the token server does not say (the distribution spec's default)."""
MAX_EXPIRY_MARGIN = 30.0
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}


@dataclass(frozen=True)
class Credentials:
    """What config.json holds for one registry."""

    username: str = ""
    password: str = ""
    identity_token: str = ""

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def registry_key(key: str) -> str:
    """A config.json `auths` key or a registry host, reduced to `host[:port]`; Hub aliases become docker.io."""
    text = key.strip().lower()
    host = urlsplit(text).netloc if "://" in text else text.split("/", 1)[0]
    return "docker.io" if host in _HUB_ALIASES else host


class Keychain:
    """Credentials from a Docker config.json, re-read on every lookup so rotated secrets apply at once."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else default_docker_config()
        self._helper_logged: set[str] = set()

    def lookup(self, host: str) -> Credentials | None:
        """Credentials for registry `host`, or None (anonymous)."""
        doc = self._read()
        if doc is None:
            return None
        wanted = registry_key(host)
        auths = doc.get("auths")
        entry: Any = None
        if isinstance(auths, dict):
            entry = auths.get(host)
            if entry is None:
                entry = next((v for k, v in auths.items() if registry_key(k) == wanted), None)
        creds = self._decode(entry, host) if isinstance(entry, dict) else None
        if creds is None:
            self._log_helper(doc, host, wanted)
        return creds

    def _read(self) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable Docker config %s: %s", self.path, e)
            return None
        if not isinstance(doc, dict):
            log.warning("ignoring Docker config %s: not a JSON object", self.path)
            return None
        return doc

    def _decode(self, entry: dict[str, Any], host: str) -> Credentials | None:
        username = entry.get("username") or ""
        password = entry.get("password") or ""
        token = entry.get("identitytoken") or ""
        encoded = entry.get("auth") or ""
        if encoded:
            try:
                user, sep, secret = base64.b64decode(encoded, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                log.warning("%s: auths entry for %s has an invalid `auth` value; ignoring it", self.path, host)
                user, sep, secret = "", "", ""
            if sep:
                username, password = username or user, password or secret
        if not all(isinstance(v, str) for v in (username, password, token)):
            log.warning("%s: auths entry for %s has non-string fields; ignoring it", self.path, host)
            return None
        if not (username or password or token):
            return None
        return Credentials(username, password, token)

    def _log_helper(self, doc: dict[str, Any], host: str, wanted: str) -> None:
        helpers = doc.get("credHelpers")
        helper = None
        if isinstance(helpers, dict):
            helper = next((v for k, v in helpers.items() if registry_key(k) == wanted), None)
        helper = helper or doc.get("credsStore")
        if isinstance(helper, str) and helper and host not in self._helper_logged:
            self._helper_logged.add(host)
            log.info("credential helper docker-credential-%s (from %s) is not supported; "
                     "using anonymous access to %s", helper, self.path, host)


@dataclass(frozen=True)
class Challenge:
    """One challenge of a `WWW-Authenticate` header."""

    scheme: str                     # lower case: "bearer", "basic"
    params: dict[str, str] = field(default_factory=dict)


_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM = re.compile(rf'\s*({_TOKEN})\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*')
_SCHEME = re.compile(rf"\s*({_TOKEN})(?=\s|$|,)")


def parse_challenges(values: list[str]) -> list[Challenge]:
    """Every challenge in the given `WWW-Authenticate` header values, in order."""
    out: list[Challenge] = []
    for value in values:
        pos, current = 0, None
        while pos < len(value):
            if value[pos] in ", \t":
                pos += 1
                continue
            m = _PARAM.match(value, pos)
            if m and current is not None:
                raw = m.group(2)
                if raw.startswith('"'):
                    raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
                current.params[m.group(1).lower()] = raw
                pos = m.end()
                continue
            m = _SCHEME.match(value, pos)
            if not m:
                break
            current = Challenge(m.group(1).lower())
            out.append(current)
            pos = m.end()
    return out


TokenRequest = Callable[[str, str, dict[str, str], bytes | None], Awaitable[tuple[int, bytes]]]
"""(method, url, headers, body) -> (status, body): the HTTP the token flow needs, with the
caller's timeouts and retries; supplied by the transport so that this module stays pure."""


@dataclass
class _Token:
    header: str
    expires: float


class Authenticator:
    """Produces `Authorization` headers for one client; all state is per registry host."""

    def __init__(self, keychain: Keychain) -> None:
        self.keychain = keychain
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._bearer: dict[str, Challenge] = {}
        self._basic: dict[str, str] = {}
        self._locks: dict[tuple[str, str], trio.Lock] = {}
        self.token_fetches = 0

    def cached(self, host: str, scope: str) -> str | None:
        """A header we can send without asking anyone, if we have one."""
        token = self._tokens.get((host, scope))
        if token is not None and token.expires > trio.current_time():
            return token.header
        return self._basic.get(host)

    def knows(self, host: str) -> bool:
        """True when `host` is known to want a bearer token, so one can be fetched before asking."""
        return host in self._bearer

    def describe(self, host: str, header: str | None) -> str:
        """What we sent as `header`, in words for an error message (never the secret)."""
        if header is None:
            return "anonymous access"
        if header.startswith("Basic "):
            creds = self.keychain.lookup(host)
            user = creds.username if creds is not None else "?"
            return f"the credentials of {user!r} from {self.keychain.path}"
        return "a fresh bearer token"

    async def authorization(self, host: str, scope: str, send: TokenRequest) -> str | None:
        """The header for a first request to `host` for `scope` (None: try without)."""
        header = self.cached(host, scope)
        if header is not None or host not in self._bearer:
            return header
        return await self._refresh(host, scope, self._bearer[host], None, send)

    async def challenged(self, host: str, scope: str, www_authenticate: list[str], rejected: str | None,
                         send: TokenRequest) -> str:
        """React to a 401 from `host`: a new header to retry with, or `Unauthorized`."""
        challenges = parse_challenges(www_authenticate)
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        if bearer is not None:
            if not bearer.params.get("realm"):
                raise Unauthorized(f"{host} asked for a bearer token without a realm: {www_authenticate}")
            self._bearer[host] = bearer
            return await self._refresh(host, scope, bearer, rejected, send)
        if any(c.scheme == "basic" for c in challenges):
            creds = self.keychain.lookup(host)
            if creds is None or not (creds.username or creds.password):
                raise Unauthorized(f"{host} wants basic authentication and {self.keychain.path} "
                                   f"has no username/password for it")
            header = creds.basic()
            if header == rejected:
                raise Unauthorized(f"{host} rejected the credentials of {creds.username!r} from {self.keychain.path}")
            self._basic[host] = header
            return header
        raise Unauthorized(f"{host} answered 401 without a usable challenge (WWW-Authenticate: {www_authenticate})")

    async def _refresh(self, host: str, scope: str, challenge: Challenge, rejected: str | None,
                       send: TokenRequest) -> str:
        key = (host, scope)
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:
            current = self._tokens.get(key)
            if current is not None and current.header != rejected and current.expires > trio.current_time():
                return current.header
            self._tokens.pop(key, None)
            token = await self._fetch(host, scope, challenge, send)
            self._tokens[key] = token
            return token.header

    async def _fetch(self, host: str, scope: str, challenge: Challenge, send: TokenRequest) -> _Token:
        realm = challenge.params["realm"]
        service = challenge.params.get("service", "")
        scopes = scope.split()
        asked = challenge.params.get("scope", "")
        if asked and asked not in scopes:
            scopes.append(asked)
        creds = self.keychain.lookup(host)
        self.token_fetches += 1
        who = "anonymously"
        if creds is not None and creds.identity_token:
            who = f"with the identity token for {host}"
            form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token, "service": service,
                    "scope": " ".join(scopes), "client_id": CLIENT_ID}
            status, body = await send("POST", realm, {"Content-Type": "application/x-www-form-urlencoded"},
                                      urlencode(form).encode())
        else:
            params = [("service", service)] if service else []
            query = urlencode(params + [("scope", s) for s in scopes])
            headers: dict[str, str] = {}
            if creds is not None and (creds.username or creds.password):
                headers["Authorization"] = creds.basic()
                who = f"as {creds.username!r}"
            sep = "&" if "?" in realm else "?"
            status, body = await send("GET", f"{realm}{sep}{query}" if query else realm, headers, None)
        if status in (401, 403):
            raise Unauthorized(f"token server {realm} refused a token for {scope} on {host} {who} (HTTP {status})")
        if status != 200:
            raise BadResponse(f"token server {realm} answered HTTP {status} for {scope} on {host}")
        return _parse_token(body, realm, scope)


def _parse_token(body: bytes, realm: str, scope: str) -> _Token:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise BadResponse(f"token server {realm} sent invalid JSON for {scope}") from None
    if not isinstance(doc, dict):
        raise BadResponse(f"token server {realm} sent a non-object for {scope}")
    token = doc.get("token") or doc.get("access_token")
    if not isinstance(token, str) or not token:
        raise BadResponse(f"token server {realm} sent no token for {scope}")
    lifetime = doc.get("expires_in")
    if not isinstance(lifetime, (int, float)) or isinstance(lifetime, bool) or lifetime <= 0:
        lifetime = DEFAULT_TOKEN_LIFETIME
    margin = min(MAX_EXPIRY_MARGIN, lifetime * 0.2)
    return _Token(f"Bearer {token}", trio.current_time() + lifetime - margin)
