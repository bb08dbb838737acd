"""Where a registry's credentials come from.

Sources are asked in this order, and the first with credentials wins:

1. the credentials the kubelet passed with the CRI PullImage of an image of this
   repository (a pod's imagePullSecrets, `cri_credentials.py`), when lazysnap's CRI proxy
   is on: they were chosen for this very image, as stargz and soci rank them;
2. the Docker credential helper config.json names for the registry (`credHelpers`),
   else its default helper (`credsStore`): Docker's own precedence, in which a helper
   outranks a stale `auths` entry;
3. the config.json `auths` entry for the registry;
4. the kubelet's image credential provider plugins, when configured.

config.json is re-read on every lookup, so an edited file applies at once; helpers and
providers are cached by their modules and forgotten (`forget`) when the registry
refuses what they gave; CRI pull credentials are not (only the kubelet's next pull can
replace them). Every lookup also says what each source answered, so that a
refusal can name all of them (never a secret). `renewals` records when credentials or a
token were last obtained for each registry, for `lazysnap status`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from pathlib import Path
from typing import Any

from .credential_helpers import CredentialHelpers
from .credential_providers import CredentialProviders
from .cri_credentials import CriCredentials
from .credentials import Credentials, Lookup, Renewals, registry_key
from .errors import CredentialConfigError
from .options import RegistryOptions, default_docker_config

log = logging.getLogger(__name__)


class Keychain:
    """Credentials per registry host (and repository, for the kubelet's providers)."""

    def __init__(self, path: Path | None = None, providers: CredentialProviders | None = None,
                 helpers: CredentialHelpers | None = None, cri: CriCredentials | None = None) -> None:
        self.path = path if path is not None else default_docker_config()
        self.providers = providers
        self.helpers = helpers if helpers is not None else CredentialHelpers()
        self.cri = cri
        self.renewals = Renewals()

    @classmethod
    def for_options(cls, options: RegistryOptions, cri: CriCredentials | None = None) -> Keychain:
        """The keychain `options` describe; a broken provider config is an error here, at start."""
        providers = None
        if options.credential_provider_config is not None:
            if options.credential_provider_bin_dir is None:
                raise CredentialConfigError(f"credential provider config {options.credential_provider_config} "
                                            f"is given without the directory of its plugins")
            providers = CredentialProviders(options.credential_provider_config, options.credential_provider_bin_dir)
        return cls(options.docker_config, providers, cri=cri)

    async def find(self, host: str, repository: str = "") -> Lookup:
        """Credentials for registry `host` (the image `host/repository`), or None: anonymous."""
        tried: list[str] = []
        if self.cri is not None:
            creds = self.cri.find(host, repository)
            if creds is not None:
                tried.append(f"CRI pull credentials: {creds.described()}")
                return Lookup(creds, tuple(tried))
            tried.append(f"CRI pull credentials: none for {image_name(host, repository)}")
        doc, problem = self._read()
        if doc is None:
            tried.append(f"{self.path}: {problem}")
        else:
            helper, field = self._helper_for(doc, host)
            if helper:
                answer = await self.helpers.get(helper, host)
                tried.append(f"{field} of {self.path}: {answer.outcome}")
                if answer.credentials is not None:
                    return Lookup(answer.credentials, tuple(tried))
            creds = self._auths(doc, host)
            if creds is not None:
                tried.append(f"auths of {self.path}: credentials of {creds.who()}")
                return Lookup(creds, tuple(tried))
            tried.append(f"auths of {self.path}: nothing for {registry_key(host)}")
        if self.providers is not None:
            found = await self.providers.find(image_name(host, repository))
            tried.extend(found.tried)
            if found.credentials is not None:
                return Lookup(found.credentials, tuple(tried))
        return Lookup(None, tuple(tried))

    def forget(self, host: str, repository: str = "") -> None:
        """Drop what helpers and providers said for this registry: it refused their credentials."""
        self.helpers.forget(host)
        if self.providers is not None:
            self.providers.forget(image_name(host, repository))

    def _read(self) -> tuple[dict[str, Any] | None, str]:
        """config.json as an object, or None and why not."""
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None, "not there"
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable Docker config %s: %s", self.path, e)
            return None, "unreadable"
        if not isinstance(doc, dict):
            log.warning("ignoring Docker config %s: not a JSON object", self.path)
            return None, "not a JSON object"
        return doc, ""

    def _helper_for(self, doc: dict[str, Any], host: str) -> tuple[str, str]:
        """(helper name, "credHelpers" or "credsStore"), or ("", "") when none applies."""
        wanted = registry_key(host)
        helpers = doc.get("credHelpers")
        if isinstance(helpers, dict):
            helper = next((v for k, v in helpers.items() if registry_key(k) == wanted), None)
            if isinstance(helper, str) and helper:
                return helper, "credHelpers"
        store = doc.get("credsStore")
        if isinstance(store, str) and store:
            return store, "credsStore"
        return "", ""

    def _auths(self, doc: dict[str, Any], host: str) -> Credentials | None:
        auths = doc.get("auths")
        if not isinstance(auths, dict):
            return None
        entry = auths.get(host)
        if entry is None:
            wanted = registry_key(host)
            entry = next((v for k, v in auths.items() if registry_key(k) == wanted), None)
        return self._decode(entry, host) if isinstance(entry, dict) else None

    def _decode(self, entry: dict[str, Any], host: str) -> Credentials | None:
        username = entry.get("username") or ""
        password = entry.get("password") or ""
        token = entry.get("identitytoken") or ""
        encoded = entry.get("auth") or ""
        if encoded:
            try:
                user, sep, secret = base64.b64decode(encoded, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError, TypeError, ValueError):
                log.warning("%s: auths entry for %s has an invalid `auth` value; ignoring it", self.path, host)
                user, sep, secret = "", "", ""
            if sep:
                username, password = username or user, password or secret.rstrip("\0")
        if not all(isinstance(v, str) for v in (username, password, token)):
            log.warning("%s: auths entry for %s has non-string fields; ignoring it", self.path, host)
            return None
        if not (username or password or token):
            return None
        return Credentials(username, password, token, source=str(self.path))


def image_name(host: str, repository: str) -> str:
    """The image as the kubelet names it to its providers: `host[:port]/path`, Hub as docker.io."""
    key = registry_key(host)
    return f"{key}/{repository}" if repository else key
