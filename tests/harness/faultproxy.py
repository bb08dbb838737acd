"""A fault-injecting HTTP reverse proxy to put in front of a real registry in tests.

It runs in a thread of the test process on a free 127.0.0.1 port and forwards
everything to the upstream registry, except for the faults switched on at run
time:

    with FaultProxy(registry.host) as proxy:
        proxy.fail(503, times=2)                # the next 2 registry requests get 503
        proxy.flip = {"blobs"}                  # one byte of every blob body is flipped
        proxy.redirect_blobs = True             # blob GET/HEAD answer 307 to /_redirected/<gen>/...
        proxy.require_bearer(users={"u": "p"})  # token auth with its own /token endpoint
        proxy.serve_referrers()                 # a referrers API (distribution 2.8 has none)
        proxy.hostile(LONG_BODY, match=digest)  # ranged blob answers of that blob get extra bytes
        proxy.calm()                            # every hostile answer switched off

Bodies are streamed through in chunks, so large blobs cost the proxy no memory.
`Location` headers naming the registry are rewritten to name the proxy, so upload
sessions (`POST .../blobs/uploads/` then `PUT <Location>`) stay behind it.
It counts requests and body bytes per path (query string dropped), and keeps a
log of every request it answered, for tests to assert on.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import secrets
import socket
import ssl
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

CHUNK = 64 * 1024
REDIRECT_PREFIX = "/_redirected/"
LOOP_PREFIX = "/_loop"

# Hostile answers (`FaultProxy.hostile`): registries that answer a request with something else
# than what was asked. All but REDIRECT_LOOP act on 206 answers to GETs with a Range header.
LONG_BODY = "long_body"
"""A 206 whose body is `extra` bytes longer than its Content-Range (Content-Length counts them)."""
TRAILING_BYTES = "trailing_bytes"
"""A 206 whose Content-Length agrees with its Content-Range, followed by `extra` bytes more on the
connection (they are where the next answer on it should start)."""
SHORT_BODY = "short_body_counted"
"""A 206 with half the bytes its Content-Range names, and a Content-Length that agrees with the body."""
TRUNCATED = "truncated"
"""A 206 whose Content-Length agrees with its Content-Range, cut after half the body: connection closed."""
WRONG_RANGE = "wrong_range"
"""A 206 for another range than asked (the next one of the same length, or the previous one at the
blob's end), with that range's bytes and a Content-Range that names it truthfully."""
WRONG_BOUNDARY = "wrong_boundary"
"""A multipart/byteranges 206 whose body is delimited by another boundary than its Content-Type
names (a single-range answer is turned into a one-part multipart body). `variant="prefix"`: the
body's boundary starts with the Content-Type's, as a careless `find` would accept."""
REDIRECT_LOOP = "redirect_loop"
"""GET and HEAD answer 307: to the same URL (`variant="self"`), or back and forth between the path and
/_loop<path> (`variant="pair"`)."""
SLOW_DRIP = "slow_drip"
"""Headers at once, then the body `drip_bytes` at a time every `drip_interval` seconds: never silent
long enough for a read timeout, far too slow to finish. `whole=True` drips 200 answers too."""
HOSTILE_KINDS = (LONG_BODY, TRAILING_BYTES, SHORT_BODY, TRUNCATED, WRONG_RANGE, WRONG_BOUNDARY, REDIRECT_LOOP,
                 SLOW_DRIP)
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-authorization", "proxy-authenticate", "host"}


@dataclass(frozen=True)
class Hit:
    """One request the proxy answered."""

    method: str
    path: str
    query: str
    status: int
    range: str | None
    authorization: str | None


@dataclass
class _Failure:
    status: int
    times: int
    match: str
    retry_after: str | None
    method: str | None = None


@dataclass
class _Hostile:
    kind: str
    match: str
    times: int | None
    """Answers left to spoil; None: until switched off."""
    extra: int = 4096
    variant: str = ""
    drip_bytes: int = 512
    drip_interval: float = 0.25
    whole: bool = False
    range: str | None = None
    """Spoil only requests with exactly this Range header."""


@dataclass
class _Auth:
    scheme: str                                   # "bearer" or "basic"
    users: dict[str, str]
    anonymous: bool
    expires_in: int | None
    token_field: str
    refresh_tokens: set[str] = field(default_factory=set)
    tokens: dict[str, float] = field(default_factory=dict)   # token -> expiry (monotonic)
    issued: int = 0
    scoped: bool = False
    grants: dict[str, set[tuple[str, str]]] = field(default_factory=dict)  # token -> {(repo, action)}


class FaultProxy:
    """The proxy; every public attribute below is a fault that can be flipped between requests."""

    def __init__(self, upstream: str, tls: tuple[Path, Path] | None = None) -> None:
        self.upstream = upstream
        self.tls = tls
        self.flip: set[str] = set()
        """Kinds of bodies ("blobs", "manifests") whose middle byte is flipped, or paths containing one
        of these strings (e.g. a digest: only that blob is corrupted)."""
        self.delay = 0.0
        """Seconds to wait before answering requests whose path contains `delay_match`."""
        self.delay_match = "/v2/"
        self.refuse_multirange = False
        """Answer 400 to a Range header with more than one range."""
        self.first_range_only = False
        """Forward only the first range of a multi-range request (a server answering one plain 206)."""
        self.ignore_ranges = False
        """Drop Range headers, so the registry answers 200 with the whole body."""
        self.refuse_head = False
        """Answer 405 to HEAD of a blob."""
        self.redirect_blobs = False
        """Blob GET/HEAD answer 307 to a /_redirected/<generation>/ path on this proxy."""
        self.wrong_content_range = False
        """Shift the range in the Content-Range header of single-part 206 answers by one byte."""
        self.short_body = False
        """Send one byte less of each blob body, with a Content-Length that agrees."""
        self.wrong_digest_header = False
        """Replace every `Docker-Content-Digest` the registry sends with the digest of something else."""
        self.referrers: dict[str, list[dict[str, object]]] | None = None
        """Subject digest -> referrers list, when the proxy serves the referrers API (`serve_referrers`)."""
        self.hostile_answers: Counter[str] = Counter()
        """Hostile kind -> answers spoilt so far (`hostile`)."""
        self._hostile: list[_Hostile] = []
        self.requests: Counter[str] = Counter()
        """"METHOD path" -> number of requests."""
        self.bytes_sent: Counter[str] = Counter()
        """path -> body bytes written."""
        self.log: list[Hit] = []
        self._failures: list[_Failure] = []
        self._drops: list[_Failure] = []
        self._auth: _Auth | None = None
        self._generation = 1
        self._lock = threading.Condition()
        self._in_flight = 0
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        assert self._server is not None, "proxy not started"
        return self._server.server_address[1]

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def start(self) -> FaultProxy:
        server = _Server(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(self.tls[0]), str(self.tls[1]))
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def die(self) -> None:
        """Stop, and reset every open connection too (`stop` lets keep-alive connections go on):
        a server that crashed."""
        self.stop()
        if self._server is not None:
            self._server.reset_connections()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ faults

    def fail(self, status: int, times: int, match: str = "/v2/", retry_after: str | None = None,
             method: str | None = None) -> None:
        """Answer `status` to the next `times` requests whose path contains `match` (and of `method`, if given)."""
        with self._lock:
            self._failures.append(_Failure(status, times, match, retry_after, method))

    def drop(self, times: int, match: str = "/blobs/") -> None:
        """Close the connection halfway through the body of the next `times` matching answers."""
        with self._lock:
            self._drops.append(_Failure(0, times, match, None))

    def hostile(self, kind: str, match: str = "/blobs/", times: int | None = None, *, extra: int = 4096,
                variant: str = "", drip_bytes: int = 512, drip_interval: float = 0.25, whole: bool = False,
                range: str | None = None) -> None:
        """Spoil answers to requests whose path contains `match` (and, if `range` is given, whose Range
        header is exactly that) the `kind` way (one of HOSTILE_KINDS): the next `times` such answers, or
        every one until `calm`. Answers the kind does not apply to (not a 206, no Range asked) pass
        untouched and do not count."""
        if kind not in HOSTILE_KINDS:
            raise ValueError(f"unknown hostile answer {kind!r}; one of {', '.join(HOSTILE_KINDS)}")
        if kind == REDIRECT_LOOP and variant not in ("", "self", "pair"):
            raise ValueError(f"redirect loop variant {variant!r}: 'self' or 'pair'")
        with self._lock:
            self._hostile.append(_Hostile(kind, match, times, extra, variant, drip_bytes, drip_interval, whole,
                                          range))

    def calm(self, kind: str | None = None) -> None:
        """Switch off the hostile answers of `kind` (None: all). Answers already dripping go on dripping."""
        with self._lock:
            self._hostile = [h for h in self._hostile if kind is not None and h.kind != kind]

    def expire_redirects(self) -> None:
        """Make every redirect target handed out so far answer 403, as an expired S3 URL does."""
        with self._lock:
            self._generation += 1

    def require_bearer(self, users: dict[str, str] | None = None, anonymous: bool = True,
                       expires_in: int | None = 300, token_field: str = "token",
                       refresh_tokens: set[str] | None = None, scoped: bool = False) -> None:
        """Registry requests need a token from this proxy's /token endpoint (`realm`).

        GET /token takes basic `users` (or nobody, if `anonymous`); POST /token takes an
        OAuth2 form with grant_type=refresh_token and one of `refresh_tokens`. With
        `scoped`, a token is good only for the `repository:<name>:<actions>` scopes it
        was asked for: GET and HEAD need `pull`, other methods `push`, and a token
        without them gets a challenge naming the scope needed, as distribution does.
        """
        self._auth = _Auth("bearer", dict(users or {}), anonymous, expires_in, token_field, set(refresh_tokens or ()),
                           scoped=scoped)

    def serve_referrers(self, lists: dict[str, list[dict[str, object]]] | None = None) -> None:
        """Answer the referrers API instead of passing it to the registry (which has none).

        `GET /v2/<name>/referrers/<digest>` returns an OCI index of `lists[digest]`
        (empty for an unknown digest), filtered by `?artifactType=` with
        `OCI-Filters-Applied`. A manifest pushed with a `subject` is added to the
        list of its subject and answered with `OCI-Subject`, as the spec asks.
        """
        with self._lock:
            self.referrers = {k: list(v) for k, v in (lists or {}).items()}

    def require_basic(self, users: dict[str, str]) -> None:
        """Registry requests need HTTP basic credentials."""
        self._auth = _Auth("basic", dict(users), False, None, "token")

    def revoke_tokens(self) -> None:
        """Forget every token issued, so the next request with one gets 401."""
        if self._auth is not None:
            with self._lock:
                self._auth.tokens.clear()

    @property
    def tokens_issued(self) -> int:
        return self._auth.issued if self._auth is not None else 0

    # ------------------------------------------------------------------ counting

    def count(self, method: str | None = None, contains: str = "") -> int:
        with self._settled():
            return sum(n for key, n in self.requests.items()
                       if (method is None or key.split(" ", 1)[0] == method) and contains in key)

    def hits(self, contains: str = "") -> list[Hit]:
        with self._settled():
            return [h for h in self.log if contains in h.path]

    def reset_counts(self) -> None:
        with self._settled():
            self.requests.clear()
            self.bytes_sent.clear()
            self.log.clear()

    def _settled(self, timeout: float = 2.0) -> threading.Condition:
        """The lock, taken once no request is half-answered: a client can see the last byte
        of an answer before the handler has logged it."""
        self._lock.acquire()
        try:
            self._lock.wait_for(lambda: self._in_flight == 0, timeout)
        finally:
            self._lock.release()
        return self._lock

    # ------------------------------------------------------------------ internals used by the handler

    def _begin(self) -> None:
        with self._lock:
            self._in_flight += 1

    def _take(self, queue: list[_Failure], path: str, method: str = "") -> _Failure | None:
        with self._lock:
            for f in queue:
                if f.times > 0 and f.match in path and f.method in (None, method):
                    f.times -= 1
                    return f
        return None

    def _take_hostile(self, path: str, method: str, range_header: str | None) -> _Hostile | None:
        """The first hostile answer switched on for this request, its count taken (`_spared` gives it back)."""
        ranged = bool(range_header)
        with self._lock:
            for h in self._hostile:
                if h.match not in path or (h.times is not None and h.times <= 0):
                    continue
                if h.range is not None and h.range != range_header:
                    continue
                if h.kind == REDIRECT_LOOP:
                    applies = method in ("GET", "HEAD")
                elif h.kind == SLOW_DRIP:
                    applies = method == "GET" and (ranged or h.whole)
                else:
                    applies = method == "GET" and ranged
                if applies:
                    if h.times is not None:
                        h.times -= 1
                    return h
        return None

    def _spoilt(self, h: _Hostile) -> None:
        with self._lock:
            self.hostile_answers[h.kind] += 1

    def _spared(self, h: _Hostile) -> None:
        """`h` turned out not to apply to the answer: it does not count."""
        with self._lock:
            if h.times is not None:
                h.times += 1

    def _record(self, hit: Hit, body_bytes: int) -> None:
        with self._lock:
            self.requests[f"{hit.method} {hit.path}"] += 1
            self.bytes_sent[hit.path] += body_bytes
            self.log.append(hit)
            self._in_flight -= 1
            self._lock.notify_all()


class _Server(ThreadingHTTPServer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def reset_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: object, client_address: object) -> None:
        """Clients hanging up (as tests make them) is not worth a traceback."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        pass
    Handler.proxy = proxy
    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: FaultProxy

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the proxy keeps its own log."""

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    # ------------------------------------------------------------------ dispatch

    def _handle(self) -> None:
        p = self.proxy
        p._begin()
        parts = urlsplit(self.path)
        path, query = parts.path, parts.query
        request_body = self._request_body()
        status, sent = 0, 0
        try:
            if path == "/token" and p._auth is not None:
                status, sent = self._token(query, request_body)
                return
            if path.startswith(REDIRECT_PREFIX):
                generation, _, rest = path[len(REDIRECT_PREFIX):].partition("/")
                if generation != str(p._generation):
                    status, sent = self._send_simple(403, b"redirect URL expired\n")
                    return
                path = "/" + rest
            else:
                if path.startswith(LOOP_PREFIX + "/v2/"):
                    path = path[len(LOOP_PREFIX):]
                if path.startswith("/v2/") and p._auth is not None and not self._authorized(path):
                    status, sent = self._challenge(path)
                    return
            if p.delay and p.delay_match in path and p._stopping.wait(p.delay):
                return
            failure = p._take(p._failures, path, self.command)
            if failure is not None:
                headers = {"Retry-After": failure.retry_after} if failure.retry_after else {}
                status, sent = self._send_simple(failure.status, b'{"errors":[{"code":"INJECTED"}]}', headers)
                return
            hostile = p._take_hostile(path, self.command, self.headers.get("Range")) \
                if p._hostile else None
            if hostile is not None:
                status, sent = self._hostile_answer(hostile, path, query)
                return
            is_blob = "/blobs/" in path
            if is_blob and p.redirect_blobs and self.command in ("GET", "HEAD") \
                    and not self.path.startswith(REDIRECT_PREFIX):
                target = f"{REDIRECT_PREFIX}{p._generation}{path}?sig={secrets.token_hex(4)}"
                status, sent = self._send_simple(307, b"", {"Location": target})
                return
            if is_blob and p.refuse_head and self.command == "HEAD":
                status, sent = self._send_simple(405, b"")
                return
            range_header = self.headers.get("Range")
            if range_header and "," in range_header and p.refuse_multirange:
                status, sent = self._send_simple(400, b"multi-range not supported\n")
                return
            if range_header and "," in range_header and p.first_range_only:
                range_header = range_header.split(",", 1)[0]
            if p.referrers is not None and "/referrers/" in path and self.command in ("GET", "HEAD"):
                status, sent = self._referrers(path, query)
                return
            subject = self._subject(path, request_body) if p.referrers is not None else None
            status, sent = self._forward(path, query, request_body, None if p.ignore_ranges else range_header,
                                         subject)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            p._record(Hit(self.command, parts.path, query, status, self.headers.get("Range"),
                          self.headers.get("Authorization")), sent)

    def _request_body(self) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length:
            return self.rfile.read(int(length))
        return None

    # ------------------------------------------------------------------ auth

    def _authorized(self, path: str) -> bool:
        auth = self.proxy._auth
        assert auth is not None
        value = self.headers.get("Authorization") or ""
        if auth.scheme == "basic":
            return value.startswith("Basic ") and _basic_user(value[6:], auth.users) is not None
        if not value.startswith("Bearer "):
            return False
        with self.proxy._lock:
            expiry = auth.tokens.get(value[7:])
            grants = auth.grants.get(value[7:], set())
        if expiry is None or expiry <= time.monotonic():
            return False
        repo = _repository(path)
        return not (auth.scoped and repo) or (repo, self._action()) in grants

    def _action(self) -> str:
        return "pull" if self.command in ("GET", "HEAD") else "push"

    def _challenge(self, path: str) -> tuple[int, int]:
        auth = self.proxy._auth
        assert auth is not None
        if auth.scheme == "basic":
            header = 'Basic realm="faultproxy"'
        else:
            header = f'Bearer realm="{self.proxy.url}/token",service="faultproxy"'
            repo = _repository(path)
            if repo:
                actions = "pull" if not auth.scoped or self._action() == "pull" else "pull,push"
                header += f',scope="repository:{repo}:{actions}"'
        body = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
        return self._send_simple(401, body, {"WWW-Authenticate": header, "Content-Type": "application/json"})

    def _token(self, query: str, body: bytes | None) -> tuple[int, int]:
        auth = self.proxy._auth
        assert auth is not None
        value = self.headers.get("Authorization") or ""
        if self.command == "POST":
            form = parse_qs((body or b"").decode())
            if form.get("grant_type") != ["refresh_token"] or \
                    not set(form.get("refresh_token", [])) & auth.refresh_tokens:
                return self._send_simple(401, b'{"details":"bad refresh token"}')
            query = "&".join(f"scope={s}" for s in form.get("scope", [""])[0].split())
        elif value.startswith("Basic "):
            if _basic_user(value[6:], auth.users) is None:
                return self._send_simple(401, b'{"details":"bad credentials"}')
        elif not auth.anonymous:
            return self._send_simple(401, b'{"details":"credentials required"}')
        params = parse_qs(query)
        token = secrets.token_hex(16)
        lifetime = auth.expires_in if auth.expires_in is not None else 60
        grants = set()
        for scope in params.get("scope", []):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and name:
                grants |= {(name, a) for a in actions.split(",") if a in ("pull", "push")}
        with self.proxy._lock:
            auth.tokens[token] = time.monotonic() + lifetime
            auth.grants[token] = grants
            auth.issued += 1
        doc: dict[str, object] = {auth.token_field: token, "scope": params.get("scope", [])}
        if auth.expires_in is not None:
            doc["expires_in"] = auth.expires_in
        return self._send_simple(200, json.dumps(doc).encode(), {"Content-Type": "application/json"})

    # ------------------------------------------------------------------ referrers API

    def _referrers(self, path: str, query: str) -> tuple[int, int]:
        p = self.proxy
        subject = path.rsplit("/referrers/", 1)[1]
        wanted = parse_qs(query).get("artifactType")
        with p._lock:
            listed = list((p.referrers or {}).get(subject, []))
        headers = {"Content-Type": "application/vnd.oci.image.index.v1+json"}
        if wanted:
            listed = [d for d in listed if d.get("artifactType") == wanted[0]]
            headers["OCI-Filters-Applied"] = "artifactType"
        body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                           "manifests": listed}).encode()
        return self._send_simple(200, body, headers)

    def _subject(self, path: str, body: bytes | None) -> dict[str, object] | None:
        """The `subject` of a manifest being pushed, if it has one."""
        if self.command != "PUT" or "/manifests/" not in path or not body:
            return None
        try:
            doc = json.loads(body)
        except ValueError:
            return None
        subject = doc.get("subject") if isinstance(doc, dict) else None
        return subject if isinstance(subject, dict) and isinstance(subject.get("digest"), str) else None

    def _add_referrer(self, subject: dict[str, object], body: bytes) -> None:
        doc = json.loads(body)
        config = doc.get("config") if isinstance(doc.get("config"), dict) else {}
        entry: dict[str, object] = {
            "mediaType": doc.get("mediaType") or self.headers.get("Content-Type", ""),
            "digest": "sha256:" + hashlib.sha256(body).hexdigest(), "size": len(body),
            "artifactType": doc.get("artifactType") or config.get("mediaType", ""),
        }
        if doc.get("annotations"):
            entry["annotations"] = doc["annotations"]
        p = self.proxy
        with p._lock:
            assert p.referrers is not None
            listed = p.referrers.setdefault(str(subject["digest"]), [])
            if all(d["digest"] != entry["digest"] for d in listed):
                listed.append(entry)

    # ------------------------------------------------------------------ responses

    def _send_simple(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, int]:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return status, len(body) if self.command != "HEAD" else 0

    def _forward(self, path: str, query: str, body: bytes | None, range_header: str | None,
                 subject: dict[str, object] | None = None) -> tuple[int, int]:
        p = self.proxy
        conn = http.client.HTTPConnection(p.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in _HOP_BY_HOP and k.lower() not in ("authorization", "range")}
            if range_header:
                headers["Range"] = range_header
            conn.request(self.command, path + (f"?{query}" if query else ""), body=body, headers=headers)
            upstream = conn.getresponse()
            upstream_origin = f"http://{p.upstream}"
            out_headers = [(k, p.url + v[len(upstream_origin):] if k.lower() == "location"
                            and v.startswith(upstream_origin + "/") else v)
                           for k, v in upstream.getheaders() if k.lower() not in _HOP_BY_HOP]
            if p.wrong_digest_header:
                other = "sha256:" + hashlib.sha256(b"something else").hexdigest()
                out_headers = [(k, other if k.lower() == "docker-content-digest" else v) for k, v in out_headers]
            if subject is not None and upstream.status == 201:
                self._add_referrer(subject, body or b"")
                out_headers.append(("OCI-Subject", str(subject["digest"])))
            length_text = upstream.getheader("Content-Length")
            if self.command == "HEAD":
                return self._relay_head(upstream.status, out_headers)
            if length_text is None:
                data = upstream.read()
                out_headers.append(("Content-Length", str(len(data))))
                return self._relay(upstream.status, out_headers, path, len(data), iter([data]))
            return self._relay(upstream.status, out_headers, path, int(length_text), _chunks(upstream))
        finally:
            conn.close()

    def _relay_head(self, status: int, headers: list[tuple[str, str]]) -> tuple[int, int]:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        return status, 0

    def _relay(self, status: int, headers: list[tuple[str, str]], path: str, length: int,
               chunks: Iterable[bytes]) -> tuple[int, int]:
        p = self.proxy
        is_blob, is_manifest = "/blobs/" in path, "/manifests/" in path
        ok = status in (200, 206)
        named = any(f in path for f in p.flip if f not in ("blobs", "manifests"))
        flip_at = length // 2 if ok and length and ((is_blob and "blobs" in p.flip) or named
                                                   or (is_manifest and "manifests" in p.flip)) else -1
        send_length = length - 1 if ok and is_blob and p.short_body and length else length
        drop = p._take(p._drops, path) if ok else None
        stop_at = length // 2 if drop is not None else send_length
        self.send_response(status)
        for name, value in headers:
            lower = name.lower()
            if lower == "content-length":
                value = str(send_length)
            elif lower == "content-range" and status == 206 and p.wrong_content_range:
                value = _shift_range(value)
            self.send_header(name, value)
        self.end_headers()
        sent = 0
        for chunk in chunks:
            if flip_at >= sent and flip_at < sent + len(chunk):
                mutable = bytearray(chunk)
                mutable[flip_at - sent] ^= 0xFF
                chunk = bytes(mutable)
            room = stop_at - sent
            if room <= 0:
                break
            piece = chunk[:room]
            self.wfile.write(piece)
            sent += len(piece)
        if drop is not None:
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
        return status, sent


    # ------------------------------------------------------------------ hostile answers

    def _hostile_answer(self, h: _Hostile, path: str, query: str) -> tuple[int, int]:
        """Answer this request the way `h` says, from what the registry answers it."""
        p = self.proxy
        if h.kind == REDIRECT_LOOP:
            p._spoilt(h)
            if h.variant == "pair":
                target = path if self.path.startswith(LOOP_PREFIX + "/") else LOOP_PREFIX + path
                target += f"?{query}" if query else ""
            else:
                target = self.path
            return self._send_simple(307, b"", {"Location": target})
        asked = self.headers.get("Range")
        if h.kind == WRONG_RANGE:
            span = _single_range(asked)
            if span is None:  # open-ended or multi-range: not this fault's
                p._spared(h)
                return self._forward(path, query, None, asked)
            first, last = span
            length = last - first + 1
            status, headers, body = self._upstream(path, query, f"bytes={first + length}-{last + length}")
            if status == 416:
                earlier = max(0, first - length)
                status, headers, body = self._upstream(path, query, f"bytes={earlier}-{earlier + length - 1}")
            if status != 206 or _content_range_start(headers) == first:  # no other range to send
                p._spared(h)
                return self._forward(path, query, None, asked)
            p._spoilt(h)
            return self._send_body(status, headers, body)
        if h.kind == SLOW_DRIP:
            return self._drip(h, path, query, asked)
        status, headers, body = self._upstream(path, query, asked)
        if status != 206 or not body:
            p._spared(h)
            return self._send_body(status, headers, body)
        p._spoilt(h)
        filler = bytes((0xA5 ^ (i & 0xFF)) for i in range(h.extra))
        if h.kind == LONG_BODY:
            return self._send_body(status, headers, body + filler)
        if h.kind == SHORT_BODY:
            return self._send_body(status, headers, body[:len(body) // 2])
        if h.kind == TRAILING_BYTES:
            return self._send_body(status, headers, body, after=filler)
        if h.kind == TRUNCATED:
            return self._send_body(status, headers, body, cut_at=len(body) // 2)
        assert h.kind == WRONG_BOUNDARY
        content_type = _header(headers, "content-type") or ""
        real = _boundary_of(content_type)
        if real is not None:   # a multipart answer already: its Content-Type names another boundary
            wrong = real[:-4] if h.variant == "prefix" and len(real) > 4 else "not-" + real
            headers = [(k, v.replace(real, wrong) if k.lower() == "content-type" else v) for k, v in headers]
            return self._send_body(status, headers, body)
        named = "lazysnap0hostile0boundary"
        used = named + "Z9x" if h.variant == "prefix" else "another0boundary0entirely"
        part_range = _header(headers, "content-range") or ""
        wrapped = (f"--{used}\r\nContent-Type: {content_type or 'application/octet-stream'}\r\n"
                   f"Content-Range: {part_range}\r\n\r\n").encode() + body + f"\r\n--{used}--\r\n".encode()
        headers = [(k, v) for k, v in headers if k.lower() not in ("content-type", "content-range")]
        headers.append(("Content-Type", f"multipart/byteranges; boundary={named}"))
        return self._send_body(status, headers, wrapped)

    def _upstream(self, path: str, query: str, range_header: str | None
                  ) -> tuple[int, list[tuple[str, str]], bytes]:
        """The registry's whole answer to this GET with `range_header` (status, headers but framing, body)."""
        conn = http.client.HTTPConnection(self.proxy.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in _HOP_BY_HOP and k.lower() not in ("authorization", "range")}
            if range_header:
                headers["Range"] = range_header
            conn.request(self.command, path + (f"?{query}" if query else ""), headers=headers)
            upstream = conn.getresponse()
            try:
                body = upstream.read()
            except http.client.IncompleteRead as e:  # distribution's 416 announces the blob's length
                body = e.partial
            out = [(k, v) for k, v in upstream.getheaders()
                   if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length"]
            return upstream.status, out, body
        finally:
            conn.close()

    def _send_body(self, status: int, headers: list[tuple[str, str]], body: bytes, *, after: bytes = b"",
                   cut_at: int | None = None) -> tuple[int, int]:
        """`body` with a Content-Length that counts it; then `after` (bytes no framing counts), or
        only `cut_at` bytes of it and the connection closed."""
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        out = body + after if cut_at is None else body[:cut_at]
        self.wfile.write(out)
        self.wfile.flush()
        if cut_at is not None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
        return status, len(out)

    def _drip(self, h: _Hostile, path: str, query: str, range_header: str | None) -> tuple[int, int]:
        """The registry's answer, its body trickled `drip_bytes` every `drip_interval` seconds
        (until the client hangs up or the proxy stops)."""
        p = self.proxy
        conn = http.client.HTTPConnection(p.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in _HOP_BY_HOP and k.lower() not in ("authorization", "range")}
            if range_header:
                headers["Range"] = range_header
            conn.request("GET", path + (f"?{query}" if query else ""), headers=headers)
            upstream = conn.getresponse()
            if upstream.status not in (200, 206) or upstream.getheader("Content-Length") is None:
                p._spared(h)
                try:
                    body = upstream.read()
                except http.client.IncompleteRead as e:
                    body = e.partial
                return self._send_body(upstream.status, [(k, v) for k, v in upstream.getheaders()
                                                         if k.lower() not in _HOP_BY_HOP
                                                         and k.lower() != "content-length"], body)
            p._spoilt(h)
            self.send_response(upstream.status)
            for name, value in upstream.getheaders():
                if name.lower() not in _HOP_BY_HOP:
                    self.send_header(name, value)
            self.end_headers()
            self.wfile.flush()
            sent = 0
            for chunk in _chunks(upstream):
                for i in range(0, len(chunk), h.drip_bytes):
                    if p._stopping.wait(h.drip_interval):
                        self.close_connection = True
                        return upstream.status, sent
                    self.wfile.write(chunk[i:i + h.drip_bytes])
                    self.wfile.flush()
                    sent += len(chunk[i:i + h.drip_bytes])
            return upstream.status, sent
        finally:
            conn.close()


def _chunks(response: http.client.HTTPResponse) -> Iterator[bytes]:
    while True:
        chunk = response.read(CHUNK)
        if not chunk:
            return
        yield chunk


def _shift_range(value: str) -> str:
    unit, _, rest = value.partition(" ")
    span, _, total = rest.partition("/")
    first, _, last = span.partition("-")
    a, b, size = int(first), int(last), int(total)
    delta = 1 if b + 1 < size else -1
    return f"{unit} {a + delta}-{b + delta}/{total}"


def _repository(path: str) -> str:
    rest = path[len("/v2/"):]
    for marker in ("/blobs/", "/manifests/", "/tags/", "/referrers/"):
        if marker in rest:
            return rest.split(marker, 1)[0]
    return ""


def _basic_user(encoded: str, users: dict[str, str]) -> str | None:
    try:
        user, _, password = base64.b64decode(encoded).decode().partition(":")
    except ValueError:
        return None
    return user if users.get(user) == password else None


def _single_range(value: str | None) -> tuple[int, int] | None:
    """(first, last) of a `Range: bytes=first-last` header asking for one closed range; else None."""
    unit, _, spec = (value or "").partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    if not first.isdigit() or not last.isdigit() or int(last) < int(first):
        return None
    return int(first), int(last)


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    return next((v for k, v in headers if k.lower() == name), None)


def _content_range_start(headers: list[tuple[str, str]]) -> int | None:
    value = _header(headers, "content-range") or ""
    first = value.partition(" ")[2].partition("-")[0]
    return int(first) if first.isdigit() else None


def _boundary_of(content_type: str) -> str | None:
    if not content_type.lower().startswith("multipart/"):
        return None
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary":
            return value.strip('"')
    return None
