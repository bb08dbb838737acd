"""Settings: defaults, overridden by /etc/lazysnap/config.toml, overridden by flags.

Every key is documented in systemd/config.toml. Unknown keys are an error, so a typo
never silently leaves a default in force.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

FETCH_CONCURRENCY = 6
"""Range GETs one image's prefetch keeps in flight (`fetch_concurrency`). A GET's slot is held
while its batch is decoded and cached too (0.78 s of python-app's 2.9 s replay), so 4 left the
link at 78 Mbit/s of 95. Measured on python-app's first start with its start profile
(100 Mbit/s + 20 ms, interleaved rounds of one cold run each; benchmarks/RESULTS.md): 4 GETs
4.28 s median of 6 runs [3.99-4.46], 5 GETs 4.06 s (3 runs), 6 GETs 3.97 s [3.87-4.30] (6 runs),
8 GETs 4.31 s (3 runs); the same 28.9 MiB in 72 GETs each time. More GETs than that share
the link among more batches, and the most urgent ones arrive later."""

DEFAULT_CONFIG_PATH = Path("/etc/lazysnap/config.toml")
LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_SOCKET_PATH = 107
"""Linux's limit on a unix socket path (sun_path minus the NUL)."""


@dataclass
class Config:
    root: Path = Path("/var/lib/lazysnap")
    """State: metadata.db and snapshots/<id>/{fs,work}."""
    address: Path = Path("/run/lazysnap/lazysnap.sock")
    """The gRPC socket containerd's proxy_plugins entry points at."""
    log_level: str = "info"
    grpc_workers: int = 16
    """Threads serving gRPC calls at once."""
    lazy: bool = True
    """Serve eStargz layers lazily; false makes lazysnap a plain overlayfs-style snapshotter."""
    allow_unverified: bool = False
    """Mount layers whose TOC digest is not given by an annotation (their bytes cannot be verified)."""
    resolve_timeout: float = 30.0
    """Seconds a Prepare waits for a layer's index before falling back to a full pull."""
    read_timeout: float = 30.0
    """Seconds a FUSE read may wait for the registry before it fails with EIO."""
    kernel_metadata: bool = True
    """Mount each lazy layer's metadata as an EROFS image, so the kernel answers lookups,
    stats and xattrs itself and only file bytes go through FUSE (path walks run at native
    speed). Needs Linux 6.12+ (file-backed EROFS); lazysnap probes at start and otherwise
    serves metadata through FUSE."""
    fuse_xattrs: bool = True
    """Serve extended attributes from lazy layers. False makes metadata walks through a
    container's overlay ~4x faster (overlayfs asks every lower entry for trusted.overlay.*
    and the kernel caches no FUSE xattr answer), and layers with xattrs or opaque
    directories are then pulled whole."""
    cache_max_mib: int = 10240
    """Upper bound of the on-disk chunk cache; least recently used chunks go first."""
    certs_dir: Path = Path("/etc/containerd/certs.d")
    """containerd's hosts.toml directory: mirrors, plain-HTTP registries, TLS settings."""
    docker_config: Path | None = None
    """Docker config.json with registry credentials (default $DOCKER_CONFIG or ~/.docker)."""
    image_credential_provider_config: Path | None = None
    """The kubelet's CredentialProviderConfig file (same as its --image-credential-provider-config);
    None: no credential provider plugins."""
    image_credential_provider_bin_dir: Path | None = None
    """The directory of those plugins (the kubelet's --image-credential-provider-bin-dir)."""
    cri_image_service_address: Path | None = None
    """A unix socket on which lazysnap serves the CRI image service in front of containerd's, for
    the kubelet's --image-service-endpoint: the credentials of each PullImage (a pod's
    imagePullSecrets) then reach lazysnap's reads of that image. None: no CRI proxy."""
    cri_containerd_address: Path = Path("/run/containerd/containerd.sock")
    """containerd's socket, where the CRI proxy forwards every call."""
    prefetch: bool = True
    """Prefetch at mount what an image reads first: its start profile, eStargz landmark, SOCI prefetch artifact."""
    record_profiles: bool = True
    """Record the start profile of an image that has none, under <root>/profiles."""
    profile_seconds: float = 30.0
    """How long after an image's first read its start profile records."""
    fetch_concurrency: int = FETCH_CONCURRENCY
    """Parallel range GETs of one image's prefetch."""
    readahead_max_mib: int = 8
    """Largest readahead when reads walk forward through a layer blob; 0 turns it off."""
    background_fetch: bool = True
    """Fetch the rest of every lazy layer into the cache once reads go quiet."""
    background_quiet_seconds: float = 10.0
    """Seconds without a read going to the registry before background fetch starts or resumes."""
    background_rate_mib: float = 32.0
    """MiB/s background fetch may take at most; 0 means no limit."""
    metrics_address: str = ""
    """host:port to serve Prometheus metrics on (/metrics); empty: no metrics endpoint."""

    def validate(self) -> Config:
        if not self.root.is_absolute():
            raise ConfigError(f"root must be an absolute path, got {self.root}")
        if not self.address.is_absolute():
            raise ConfigError(f"address must be an absolute path (no unix:// prefix), got {self.address}")
        if len(str(self.address)) > MAX_SOCKET_PATH:
            raise ConfigError(f"address {self.address} is longer than {MAX_SOCKET_PATH} characters")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.grpc_workers < 1:
            raise ConfigError(f"grpc_workers must be at least 1, got {self.grpc_workers}")
        for name in ("resolve_timeout", "read_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("profile_seconds", "background_quiet_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.fetch_concurrency < 1:
            raise ConfigError(f"fetch_concurrency must be at least 1, got {self.fetch_concurrency}")
        if self.readahead_max_mib < 0:
            raise ConfigError(f"readahead_max_mib must not be negative, got {self.readahead_max_mib}")
        if self.background_rate_mib < 0:
            raise ConfigError(f"background_rate_mib must not be negative, got {self.background_rate_mib}")
        if self.metrics_address:
            try:
                parse_address(self.metrics_address)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        providers = (self.image_credential_provider_config, self.image_credential_provider_bin_dir)
        if (providers[0] is None) != (providers[1] is None):
            raise ConfigError("image_credential_provider_config and image_credential_provider_bin_dir "
                              "go together: set both or neither")
        for name, path in zip(("image_credential_provider_config", "image_credential_provider_bin_dir"), providers):
            if path is not None and not path.is_absolute():
                raise ConfigError(f"{name} must be an absolute path, got {path}")
        for name in ("cri_image_service_address", "cri_containerd_address"):
            path = getattr(self, name)
            if path is not None and not path.is_absolute():
                raise ConfigError(f"{name} must be an absolute path (no unix:// prefix), got {path}")
            if path is not None and len(str(path)) > MAX_SOCKET_PATH:
                raise ConfigError(f"{name} {path} is longer than {MAX_SOCKET_PATH} characters")
        if self.cri_image_service_address in (self.address, self.cri_containerd_address):
            raise ConfigError(f"cri_image_service_address {self.cri_image_service_address} must be a socket "
                              f"of its own, not lazysnap's address or containerd's")
        if self.cache_max_mib < 1:
            raise ConfigError(f"cache_max_mib must be at least 1, got {self.cache_max_mib}")
        return self


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` (`[::1]:port` for IPv6) as (host, port); ValueError if it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"metrics_address must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


_KINDS: dict[str, type] = {
    "root": Path, "address": Path, "log_level": str, "grpc_workers": int, "lazy": bool,
    "allow_unverified": bool, "resolve_timeout": float, "read_timeout": float, "fuse_xattrs": bool,
    "kernel_metadata": bool,
    "cache_max_mib": int,
    "certs_dir": Path, "docker_config": Path,
    "image_credential_provider_config": Path, "image_credential_provider_bin_dir": Path,
    "cri_image_service_address": Path, "cri_containerd_address": Path,
    "prefetch": bool, "record_profiles": bool, "profile_seconds": float,
    "fetch_concurrency": int, "readahead_max_mib": int, "background_fetch": bool,
    "background_quiet_seconds": float,
    "background_rate_mib": float,
    "metrics_address": str,
}


def load(path: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read `path` (None: the default path, if it exists) and apply non-None overrides."""
    values: dict[str, Any] = {}
    source = path or DEFAULT_CONFIG_PATH
    if path is not None or source.exists():
        try:
            values = tomllib.loads(source.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {source} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {source}: {e}") from None
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return _build(values, source)


def _build(values: dict[str, Any], source: Path) -> Config:
    fields = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        kind = _KINDS[name]
        if kind is Path and isinstance(value, (str, Path)):
            value = None if value == "" and fields[name].default is None else Path(value)  # "": unset
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
            raise ConfigError(f"{source}: {name} must be a {kind.__name__}, got {value!r}")
        kwargs[name] = value
    return Config(**kwargs).validate()
