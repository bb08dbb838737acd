"""Registry authentication: the distribution token flow, with credentials from the keychain.

A registry that wants authentication answers 401 with `WWW-Authenticate`. For
`Basic` we send the user's credentials; for `Bearer realm=...,service=...,scope=...`
we get a token from the realm (anonymously, with basic credentials, or with an
identity token as an OAuth2 refresh token) and send it as `Authorization: Bearer`.
Tokens are cached per (registry host, scope) until shortly before they expire,
fetched by one task at a time, and dropped when the registry rejects them, so a
revoked or expired token costs exactly one extra round trip. Credentials that the
registry or its token server refuse (401 or 403) are looked up afresh once, as the
keychain's helpers and providers may have rotated them. Every token fetched and every
credential found is noted in the keychain's `renewals`, for `lazysnap status`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlencode

import trio

from .credentials import Credentials, Lookup, repository_of
from .errors import BadResponse, Unauthorized
from .keychain import Keychain

log = logging.getLogger(__name__)

CLIENT_ID = "lazysnap"
DEFAULT_TOKEN_LIFETIME = 60
"""Seconds a token lives when the token server does not say (the distribution spec's default)."""
MAX_EXPIRY_MARGIN = 30.0


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
        self._basic: dict[tuple[str, str], str] = {}
        """(host, repository) -> the basic header that worked: credentials may be per repository
        (a pod's pull secret, a provider's `matchImages`), so one repository's never go to another."""
        self._locks: dict[tuple[str, str], trio.Lock] = {}
        self._looked_up: dict[str, Lookup] = {}
        self.token_fetches = 0

    def cached(self, host: str, scope: str) -> str | None:
        """A header we can send without asking anyone, if we have one."""
        token = self._tokens.get((host, scope))
        if token is not None and token.expires > trio.current_time():
            return token.header
        return self._basic.get((host, repository_of(scope)))

    def knows(self, host: str) -> bool:
        """True when `host` is known to want a bearer token, so one can be fetched before asking."""
        return host in self._bearer

    def describe(self, host: str, header: str | None) -> str:
        """What we sent as `header`, and where credentials were looked for, in words (never the secret)."""
        found = self._looked_up.get(host)
        creds = found.credentials if found is not None else None
        if header is None:
            sent = "anonymous access"
        elif header.startswith("Basic "):
            sent = creds.described() if creds is not None else "basic credentials"
        else:
            sent = f"a bearer token got with {creds.described()}" if creds is not None else \
                "a bearer token got anonymously"
        return f"{sent} (credentials looked for: {found.explain()})" if found is not None else sent

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
            found = await self._look_up(host, scope, fresh=rejected is not None)
            creds = found.credentials
            if creds is None or not (creds.username or creds.password):
                raise Unauthorized(f"{host} wants basic authentication and no username/password was found for it "
                                   f"(credentials looked for: {found.explain()})")
            header = creds.basic()
            if header == rejected:
                raise Unauthorized(f"{host} rejected {creds.described()} (credentials looked for: {found.explain()})")
            self._basic[(host, repository_of(scope))] = header
            return header
        raise Unauthorized(f"{host} answered 401 without a usable challenge (WWW-Authenticate: {www_authenticate})")

    async def forbidden(self, host: str, scope: str, rejected: str) -> None:
        """React to a 403 from `host` to `rejected`: forget it and the credentials behind it, so that
        the one retry the transport makes goes with fresh ones (a rotated secret, an expired cloud token)."""
        self.keychain.forget(host, repository_of(scope))
        token = self._tokens.get((host, scope))
        if token is not None and token.header == rejected:
            del self._tokens[(host, scope)]
        basic = (host, repository_of(scope))
        if self._basic.get(basic) == rejected:
            creds = (await self._look_up(host, scope)).credentials
            if creds is not None and (creds.username or creds.password):
                self._basic[basic] = creds.basic()
            else:
                del self._basic[basic]

    async def _look_up(self, host: str, scope: str, fresh: bool = False) -> Lookup:
        """The keychain's credentials for `host` and `scope`'s repository; `fresh` skips its caches."""
        repository = repository_of(scope)
        if fresh:
            self.keychain.forget(host, repository)
        found = await self.keychain.find(host, repository)
        self._looked_up[host] = found
        if found.credentials is not None:
            self.keychain.renewals.note(host, repository)
        return found

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
            self.keychain.renewals.note(host, repository_of(scope))
            return token.header

    async def _fetch(self, host: str, scope: str, challenge: Challenge, send: TokenRequest) -> _Token:
        """A token from the realm; credentials it refuses are looked up afresh and tried once more."""
        realm = challenge.params["realm"]
        found = await self._look_up(host, scope)
        status, body, who = await self._ask(host, scope, challenge, found.credentials, send)
        if status in (401, 403) and found.credentials is not None:
            renewed = await self._look_up(host, scope, fresh=True)
            if renewed.credentials != found.credentials:
                found = renewed
                status, body, who = await self._ask(host, scope, challenge, found.credentials, send)
        if status in (401, 403):
            raise Unauthorized(f"token server {realm} refused a token for {scope} on {host} {who} (HTTP {status}; "
                               f"credentials looked for: {found.explain()})")
        if status != 200:
            raise BadResponse(f"token server {realm} answered HTTP {status} for {scope} on {host}")
        return _parse_token(body, realm, scope)

    async def _ask(self, host: str, scope: str, challenge: Challenge, creds: Credentials | None,
                   send: TokenRequest) -> tuple[int, bytes, str]:
        """One token request: (status, body, who we said we were, in words)."""
        realm = challenge.params["realm"]
        service = challenge.params.get("service", "")
        scopes = scope.split()
        asked = challenge.params.get("scope", "")
        if asked and asked not in scopes:
            scopes.append(asked)
        self.token_fetches += 1
        if creds is not None and creds.identity_token:
            form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token, "service": service,
                    "scope": " ".join(scopes), "client_id": CLIENT_ID}
            status, body = await send("POST", realm, {"Content-Type": "application/x-www-form-urlencoded"},
                                      urlencode(form).encode())
            return status, body, f"with the identity token from {creds.source or host}"
        params = [("service", service)] if service else []
        query = urlencode(params + [("scope", s) for s in scopes])
        headers: dict[str, str] = {}
        who = "anonymously"
        if creds is not None and (creds.username or creds.password):
            headers["Authorization"] = creds.basic()
            who = f"as {creds.who()}"
        sep = "&" if "?" in realm else "?"
        status, body = await send("GET", f"{realm}{sep}{query}" if query else realm, headers, None)
        return status, body, who


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
