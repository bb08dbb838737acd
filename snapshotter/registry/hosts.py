"""Where to send requests for a registry host: containerd's `hosts.toml` semantics.

A node configured for containerd works unchanged: for host `H` we read the first
of `<certs.d>/H_port_/`, `<certs.d>/H/`, `<certs.d>/_default/` that exists. Its
`hosts.toml` lists mirrors as `[host."<url>"]` tables (tried in file order) and
the upstream as top-level `server` (tried last). A directory without
`hosts.toml` contributes Docker-style certificates (`*.crt` CAs, `*.cert`/`*.key`
client pairs) to the default endpoint. Without any configuration the endpoint is
`https://H/v2`, except that Docker Hub is `registry-1.docker.io` and loopback
hosts use plain HTTP, as containerd's CRI does.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import HostsConfigError
from .reference import DOCKER_HUB

log = logging.getLogger(__name__)

DEFAULT_CERTS_DIR = Path("/etc/containerd/certs.d")
DOCKER_HUB_API = "registry-1.docker.io"
"""The host that serves Docker Hub's registry API for the `docker.io` domain."""
HOSTS_FILE = "hosts.toml"
DEFAULT_DIR = "_default"


class Capability(StrEnum):
    """What an endpoint may be trusted with (containerd's HostCapabilities)."""

    PULL = "pull"        # fetch manifests and blobs by digest
    RESOLVE = "resolve"  # turn a tag into a digest: trusted hosts only
    PUSH = "push"


ALL_CAPABILITIES = frozenset(Capability)


@dataclass(frozen=True)
class TLSSettings:
    """How to check a TLS server; endpoints with equal settings share one HTTP client."""

    skip_verify: bool = False
    ca: tuple[Path, ...] = ()
    client_certs: tuple[tuple[Path, Path | None], ...] = ()


@dataclass(frozen=True)
class Endpoint:
    """One place to send registry API requests: `scheme://host/path/<repo>/...`."""

    scheme: str
    host: str
    path: str = "/v2"
    capabilities: frozenset[Capability] = ALL_CAPABILITIES
    tls: TLSSettings = field(default_factory=TLSSettings)
    headers: tuple[tuple[str, str], ...] = ()
    namespace: str | None = None
    """The upstream host when this endpoint is a mirror of it: sent as `?ns=` like containerd."""
    mirror: bool = False
    """A `[host]` entry for another host than the registry's own: a pull-through cache or a P2P agent."""
    dial_timeout: float | None = None
    """Seconds to connect (hosts.toml `dial_timeout`, e.g. Spegel's); None: `Timeouts.connect`."""

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.host}"

    def url(self, repo_path: str, kind: str, obj: str) -> str:
        """The API URL of `kind` ("manifests" or "blobs") `obj` in repository `repo_path`."""
        url = f"{self.scheme}://{self.host}{self.path.rstrip('/')}/{repo_path}/{kind}/{obj}"
        return f"{url}?ns={self.namespace}" if self.namespace else url

    def can(self, capability: Capability) -> bool:
        return capability in self.capabilities

    @property
    def key(self) -> str:
        """Names the endpoint in the client's memory of which hosts failed (origin + API path)."""
        return f"{self.origin}{self.path}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}{self.path}"


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback IPs, with or without a port."""
    name = host
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class HostsConfig:
    """Finds the endpoints for a registry host from a certs.d directory."""

    certs_dir: Path | None = DEFAULT_CERTS_DIR
    """containerd's `config_path`; None means no directory at all."""
    plain_http: bool = False
    """Use http:// for the implicit upstream endpoint (`rpull --plain-http`); explicit URLs keep their scheme."""

    def endpoints(self, host: str) -> list[Endpoint]:
        """Every endpoint for `host` (a reference's domain), in the order to try them."""
        default = self._default(host)
        directory = self.host_dir(host)
        if directory is None:
            return [default]
        loaded = _load_dir(directory, host, default)
        if loaded is not None:
            return loaded
        tls = _docker_certs(directory)
        return [replace(default, tls=tls) if tls is not None else default]

    def host_dir(self, host: str) -> Path | None:
        """The configuration directory that applies to `host`, if any."""
        if self.certs_dir is None:
            return None
        candidates = []
        name, colon, port = host.rpartition(":")
        if colon and name and "]" not in port:
            candidates.append(self.certs_dir / f"{name}_{port}_")
        candidates += [self.certs_dir / host, self.certs_dir / DEFAULT_DIR]
        for candidate in candidates:
            if candidate.is_dir():
                return candidate
        return None

    def _default(self, host: str) -> Endpoint:
        if host == DOCKER_HUB:
            return Endpoint("https", DOCKER_HUB_API)
        scheme = "http" if self.plain_http or is_loopback(host) else "https"
        return Endpoint(scheme, host)


def for_capability(endpoints: list[Endpoint], *needed: Capability) -> list[Endpoint]:
    """The endpoints trusted with all of `needed`, order kept."""
    return [e for e in endpoints if all(e.can(c) for c in needed)]


def _load_dir(directory: Path, host: str, default: Endpoint) -> list[Endpoint] | None:
    """Endpoints from `directory/hosts.toml`, or None when there is no such file.

    Without `server`, the implicit upstream `default` comes last and takes the
    file's top-level `ca`, `client`, `skip_verify` and `header`, as in containerd.
    """
    path = directory / HOSTS_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise HostsConfigError(f"cannot read {path}: {e}") from None
    if not text.strip():
        return None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise HostsConfigError(f"{path}: not valid TOML: {e}") from None
    out: list[Endpoint] = []
    mirrors = doc.get("host", {})
    if not isinstance(mirrors, dict):
        raise HostsConfigError(f"{path}: `host` must be a table of [host.\"<url>\"] tables")
    for url, table in mirrors.items():
        if not isinstance(table, dict):
            raise HostsConfigError(f"{path}: [host.{url!r}] must be a table")
        out.append(_parse_host(path, directory, url, table, host, mirror=True))
    server = doc.get("server")
    if server is None:
        where = f"{path}: top level"
        out.append(replace(default, tls=_tls(where, directory, doc), headers=_headers(where, doc.get("header")),
                           dial_timeout=_duration(where, "dial_timeout", doc.get("dial_timeout"))))
    elif not isinstance(server, str) or not server:
        raise HostsConfigError(f"{path}: `server` must be a URL string")
    else:
        out.append(_parse_host(path, directory, server, doc, host))
    return out


_KNOWN_KEYS = {"capabilities", "ca", "client", "skip_verify", "header", "override_path", "dial_timeout"}


def _parse_host(path: Path, directory: Path, url: str, table: Mapping[str, Any], upstream: str,
                mirror: bool = False) -> Endpoint:
    where = f"{path}: host {url!r}"
    unknown = sorted(set(table) - _KNOWN_KEYS - {"server", "host"})
    if unknown:
        log.warning("%s: ignoring unknown key(s) %s", where, ", ".join(unknown))
    if not url.startswith(("http://", "https://")):
        url = f"https://{url}"
    parts = urlsplit(url)
    if not parts.hostname:
        raise HostsConfigError(f"{where}: no host name in URL")
    override = table.get("override_path", False)
    if not isinstance(override, bool):
        raise HostsConfigError(f"{where}: override_path must be true or false")
    api_path = parts.path.rstrip("/")
    if not override and not api_path.endswith("/v2"):
        api_path += "/v2"
    capabilities = _capabilities(where, table.get("capabilities"))
    tls = _tls(where, directory, table)
    netloc = parts.netloc
    namespace = None if _same_registry(netloc, upstream) else upstream
    return Endpoint(parts.scheme, netloc, api_path or "/", capabilities, tls, _headers(where, table.get("header")),
                    namespace, mirror and namespace is not None,
                    _duration(where, "dial_timeout", table.get("dial_timeout")))


def _tls(where: str, directory: Path, table: Mapping[str, Any]) -> TLSSettings:
    skip_verify = table.get("skip_verify", False)
    if not isinstance(skip_verify, bool):
        raise HostsConfigError(f"{where}: skip_verify must be true or false")
    return TLSSettings(
        skip_verify=skip_verify,
        ca=tuple(_abs(directory, p) for p in _strings(where, "ca", table.get("ca"))),
        client_certs=_client_pairs(where, directory, table.get("client")),
    )


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(where: str, key: str, value: Any) -> float | None:
    """Seconds of a Go duration string ("200ms", "1m30s"), as containerd reads `dial_timeout`."""
    if value is None:
        return None
    if not isinstance(value, str) or not value or _DURATION_PART.sub("", value) != "":
        raise HostsConfigError(f"{where}: {key} must be a duration such as \"500ms\" or \"2s\", got {value!r}")
    seconds = sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(value))
    return seconds if seconds > 0 else None


def _same_registry(netloc: str, upstream: str) -> bool:
    return netloc == upstream or (upstream == DOCKER_HUB and netloc == DOCKER_HUB_API)


def _capabilities(where: str, value: Any) -> frozenset[Capability]:
    if value is None or value == []:
        return ALL_CAPABILITIES
    names = _strings(where, "capabilities", value)
    try:
        return frozenset(Capability(n.lower()) for n in names)
    except ValueError:
        raise HostsConfigError(f"{where}: unknown capability in {names} (want pull, resolve, push)") from None


def _strings(where: str, key: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise HostsConfigError(f"{where}: {key} must be a string or a list of strings")


def _client_pairs(where: str, directory: Path, value: Any) -> tuple[tuple[Path, Path | None], ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise HostsConfigError(f"{where}: client must be a path, a list of paths or a list of [cert, key] pairs")
    pairs: list[tuple[Path, Path | None]] = []
    for item in items:
        if isinstance(item, str):
            pairs.append((_abs(directory, item), None))
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(p, str) for p in item):
            pairs.append((_abs(directory, item[0]), _abs(directory, item[1])))
        else:
            raise HostsConfigError(f"{where}: bad client entry {item!r} (want a path or [cert, key])")
    return tuple(pairs)


def _headers(where: str, value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise HostsConfigError(f"{where}: header must be a table")
    out: list[tuple[str, str]] = []
    for name, values in value.items():
        out += [(name, v) for v in _strings(where, f"header {name}", values)]
    return tuple(out)


def _abs(directory: Path, p: str) -> Path:
    path = Path(p)
    return path if path.is_absolute() else directory / path


def _docker_certs(directory: Path) -> TLSSettings | None:
    """Docker's certs.d layout, used when a host directory has no hosts.toml."""
    try:
        files = sorted(p for p in directory.iterdir() if p.is_file())
    except OSError:
        return None
    ca = tuple(p for p in files if p.suffix == ".crt")
    pairs = []
    for cert in (p for p in files if p.suffix == ".cert"):
        key = cert.with_suffix(".key")
        pairs.append((cert, key if key.exists() else None))
    if not ca and not pairs:
        return None
    return TLSSettings(ca=ca, client_certs=tuple(pairs))
