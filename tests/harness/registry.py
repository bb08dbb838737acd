"""A real `docker-registry` (distribution 2.8) on a loopback port, for tests.

distribution writes two lines per request to its log: a logrus "response
completed" line and, after it, an Apache combined-format access line from
gorilla/handlers:

    127.0.0.1 - - [23/Nov/2026:13:07:44 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"

The size field is the number of body bytes written (0 for HEAD, the range
length for a 206), which is what `requests()` parses and what tests count
bytes served per blob with. Range headers themselves are not logged.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .procs import ManagedProcess, free_port, require_tool, wait_until

_ACCESS_LINE = re.compile(
    r'^(?P<remote>\S+) \S+ \S+ \[(?P<time>[^\]]+)\] '
    r'"(?P<method>[A-Z]+) (?P<path>\S+) (?P<proto>[^"]+)" (?P<status>\d{3}) (?P<size>\d+|-)'
    r'(?: "(?P<referer>[^"]*)" "(?P<agent>[^"]*)")?\s*$'
)
_BLOB_PATH = re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<digest>[a-z0-9]+:[0-9a-f]+)$")


@dataclass(frozen=True)
class Request:
    """One access-log line."""

    method: str
    path: str                     # the request URI, query string included
    status: int
    bytes: int                    # response body bytes written
    agent: str = ""

    @property
    def blob(self) -> tuple[str, str] | None:
        """(repo, digest) when this was a blob request."""
        m = _BLOB_PATH.match(self.path.split("?", 1)[0])
        return (m["repo"], m["digest"]) if m else None


def parse_access_log(text: str) -> list[Request]:
    """The combined-format access lines of a registry log, in order; other lines are ignored."""
    out = []
    for line in text.splitlines():
        m = _ACCESS_LINE.match(line)
        if m is None:
            continue
        size = m["size"]
        out.append(Request(m["method"], m["path"], int(m["status"]), 0 if size == "-" else int(size),
                           m["agent"] or ""))
    return out


CONFIG_TEMPLATE = """\
version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: lazysnap-test-secret
"""


PROXY = """\
proxy:
  remoteurl: {remoteurl}
"""
"""A pull-through cache of `remoteurl` (distribution's proxy mode; it refuses pushes)."""


HTPASSWD_AUTH = """\
auth:
  htpasswd:
    realm: lazysnap-test
    path: {path}
"""


@dataclass
class Registry:
    """`docker-registry serve` with filesystem storage in a temp dir, plain HTTP; no auth, or
    with `users`, basic auth from an htpasswd file (bcrypt, made with apache2-utils' htpasswd);
    with `remoteurl`, a pull-through cache of another registry."""

    workdir: Path | None = None
    port: int = 0
    users: dict[str, str] = field(default_factory=dict)
    remoteurl: str | None = None
    """When set, this registry is a pull-through cache of that registry (`proxy: remoteurl:`)."""
    proc: ManagedProcess | None = field(default=None, init=False)
    _own_workdir: bool = field(default=False, init=False)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "registry.log"

    def start(self, timeout: float = 30.0) -> Registry:
        binary = require_tool("docker-registry", "docker-registry")
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="lzs-reg-", dir="/tmp"))
            self._own_workdir = True
        if not self.port:
            self.port = free_port()
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.yml"
        text = CONFIG_TEMPLATE.format(storage=storage, port=self.port)
        if self.remoteurl:
            text += PROXY.format(remoteurl=self.remoteurl)
        if self.users:
            text += HTPASSWD_AUTH.format(path=self._htpasswd())
        config.write_text(text)
        self.proc = ManagedProcess("docker-registry", [binary, "serve", str(config)], self.log_path).start()
        wait_until(self._answers, timeout, f"registry on {self.host}", self.proc)
        return self

    @property
    def credentials(self) -> tuple[str, str] | None:
        """A (user, password) the registry accepts, when it wants any."""
        return next(iter(self.users.items()), None)

    def _htpasswd(self) -> Path:
        assert self.workdir is not None
        tool = require_tool("htpasswd", "apache2-utils")
        lines = [subprocess.run([tool, "-Bbn", user, password], check=True, capture_output=True, text=True,
                                timeout=30).stdout.strip() for user, password in self.users.items()]
        path = self.workdir / "htpasswd"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=1) as resp:
                return resp.status == 200
        except urllib.error.HTTPError as e:
            return e.code == 401 and bool(self.users)
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def close(self) -> None:
        self.stop()
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ inspection

    def requests(self, settle: float = 0.0) -> list[Request]:
        """Every request logged so far, oldest first.

        The access line is written just after the response, so a client can see
        its last byte before the line lands; `settle` waits until the log has
        not grown for that many seconds (at most 5 s) before reading it.
        """
        if settle > 0 and self.proc is not None:
            deadline, last, quiet_since = time.monotonic() + 5.0, -1, time.monotonic()
            while time.monotonic() < deadline:
                size = self.log_path.stat().st_size if self.log_path.exists() else 0
                if size != last:
                    last, quiet_since = size, time.monotonic()
                elif time.monotonic() - quiet_since >= settle:
                    break
                time.sleep(0.02)
        return parse_access_log(self.proc.log_text() if self.proc is not None else "")

    def mark(self) -> int:
        """A position in the request log; pass it to `requests_since`."""
        return len(self.requests())

    def requests_since(self, mark: int) -> list[Request]:
        return self.requests()[mark:]

    def blob_bytes_served(self, digest: str, since: int = 0, settle: float = 0.2) -> int:
        """Body bytes sent for GETs of blob `digest` (any repo), counting from log position `since`."""
        return sum(r.bytes for r in self.requests(settle)[since:]
                   if r.method == "GET" and r.blob is not None and r.blob[1] == digest)

    def manifest_digest(self, repo: str, reference: str) -> str:
        from .images import fetch_manifest
        digest, _ = fetch_manifest(self.host, repo, reference, self.credentials)
        return digest

    def log_tail(self) -> str:
        return self.proc.log_tail() if self.proc is not None else ""
