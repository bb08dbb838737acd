"""Knobs of the registry client, with defaults that suit a node pulling over a WAN.

Every network operation is bounded: a FUSE read waiting on the registry must end
(with data or EIO) within `Timeouts.operation`, retries included.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .hosts import DEFAULT_CERTS_DIR

MiB = 1 << 20


def default_docker_config() -> Path:
    """`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`, as the docker CLI looks."""
    env = os.environ.get("DOCKER_CONFIG")
    return Path(env) / "config.json" if env else Path.home() / ".docker" / "config.json"


@dataclass(frozen=True)
class Timeouts:
    """Seconds; each bounds a different way of hanging."""

    connect: float = 5.0
    """TCP + TLS handshake."""
    read: float = 30.0
    """Silence while waiting for the next bytes of a response."""
    request: float = 60.0
    """One attempt, from sending to the last body byte (not for `stream_blob`, which only has `read`)."""
    operation: float = 120.0
    """One client call, all retries and backoff included."""


@dataclass(frozen=True)
class Platform:
    """The platform to pick from an image index."""

    os: str = "linux"
    architecture: str = "amd64"
    variant: str | None = None


@dataclass(frozen=True)
class RegistryOptions:
    timeouts: Timeouts = field(default_factory=Timeouts)
    retries: int = 3
    """Extra attempts after a connect error, timeout, 429 or 5xx; anything else fails at once."""
    backoff_base: float = 0.2
    """First retry waits about this long (with jitter), doubling each time."""
    backoff_max: float = 5.0
    retry_after_max: float = 30.0
    """Longest `Retry-After` we honour; a registry asking for more is treated as unavailable."""
    max_connections_per_host: int = 8
    certs_dir: Path | None = DEFAULT_CERTS_DIR
    """containerd's hosts.toml directory (`config_path`)."""
    plain_http: bool = False
    """Plain HTTP for registries without hosts.toml (`rpull --plain-http`)."""
    docker_config: Path | None = None
    """Credentials file; None means `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`."""
    credential_provider_config: Path | None = None
    """The kubelet's `CredentialProviderConfig` (its `--image-credential-provider-config`); None: no providers."""
    credential_provider_bin_dir: Path | None = None
    """The directory of that config's plugins (the kubelet's `--image-credential-provider-bin-dir`)."""
    platform: Platform = field(default_factory=Platform)
    user_agent: str = "lazysnap/0.1"
    max_manifest_size: int = 4 * MiB
    small_blob_size: int = 16 * MiB
    """Default `max_size` of `fetch_blob`."""
    whole_body_limit: int = 8 * MiB
    """When a server ignores Range and sends the whole blob, accept it up to this size and slice."""
    stream_chunk_size: int = MiB
    failover_budget: float = 10.0
    """Seconds one blob read may spend on a host, retries included, when hosts.toml lists another host to
    try next; the last host has all of `Timeouts.operation`. Keeps a hung mirror from eating a FUSE read's time."""
    failed_host_seconds: float = 30.0
    """How long blob reads pass over a host after it failed one (unreachable, 5xx, timeout), before trying it again."""
    blob_avoid_seconds: float = 10.0
    """How long one blob's reads pass over a host that could not serve its ranges: it answered a range with the
    whole blob (a pull-through cache still fetching it), did not have it, or sent a broken answer."""
