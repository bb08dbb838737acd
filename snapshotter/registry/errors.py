"""The errors the registry client raises.

Callers (the fetcher, the layer resolver, `rpull`) decide what to do by class:
`NotFoundError` means "this content is not there", `RegistryUnavailable` means
"try again later or fall back", `BadResponse` means "the registry lied or broke
the protocol: never use what it sent", `Unauthorized` means "fix credentials",
`PushRejected` means "the registry refused what we pushed: do not send it again".
Every message names what was asked for, from where, and why it failed.
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base of every error raised by `snapshotter.registry`."""


class InvalidReference(RegistryError, ValueError):
    """An image reference or digest string that cannot be parsed."""


class HostsConfigError(RegistryError):
    """A `hosts.toml` file that cannot be used (bad TOML, wrong types, unknown capability)."""


class CredentialConfigError(RegistryError):
    """A kubelet `CredentialProviderConfig` (or its plugin directory) that cannot be used."""


class Unauthorized(RegistryError):
    """The registry refused us: no credentials, rejected credentials, or access denied."""


class NotFoundError(RegistryError):
    """The registry answered that the manifest, blob or repository is unknown."""


class RegistryUnavailable(RegistryError):
    """The registry could not be reached or kept failing (after retries, or past a deadline)."""


class BadResponse(RegistryError):
    """The registry's answer broke the protocol or failed verification (digest, size, ranges, JSON)."""


class PushRejected(RegistryError):
    """The registry refused an upload or a manifest (HTTP 4xx: invalid manifest, unknown blob, digest
    mismatch, too large, unsupported); sending the same bytes again would be refused again."""
