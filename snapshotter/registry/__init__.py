"""The registry client: the only part of lazysnap that talks HTTP.

    async with RegistryClient(RegistryOptions(...)) as client:
        manifest = await client.resolve("docker.io/library/busybox:latest")
        blob = await client.open_blob(manifest.ref, manifest.layers[0].digest)
        data = await client.read_ranges(blob, [(0, 4096), (1 << 20, (1 << 20) + 4096)])
        socis = await client.referrers(manifest.ref, manifest.digest, "application/vnd.amazon.soci.index.v1+json")

It also pushes (`push_blob`, `push_manifest`, `push_referrer`, `update_referrers_tag`),
to the first endpoint hosts.toml trusts with `push`.
"""

from .auth import Credentials, Keychain
from .client import BlobLocation, RegistryClient
from .errors import (
    BadResponse,
    HostsConfigError,
    InvalidReference,
    NotFoundError,
    PushRejected,
    RegistryError,
    RegistryUnavailable,
    Unauthorized,
)
from .hosts import Capability, Endpoint, HostsConfig, TLSSettings
from .manifest import Descriptor, Manifest
from .options import Platform, RegistryOptions, Timeouts
from .reference import Reference, parse

__all__ = [
    "BadResponse", "BlobLocation", "Capability", "Credentials", "Descriptor", "Endpoint", "HostsConfig",
    "HostsConfigError", "InvalidReference", "Keychain", "Manifest", "NotFoundError", "Platform", "PushRejected",
    "Reference", "RegistryClient", "RegistryError", "RegistryOptions", "RegistryUnavailable", "TLSSettings",
    "Timeouts", "Unauthorized", "parse",
]
