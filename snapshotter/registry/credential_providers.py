"""kubelet image credential provider plugins, run the way the kubelet runs them.

A Kubernetes node gets private-registry credentials from exec plugins (ECR's, GCR's,
ACR's) named in a `CredentialProviderConfig` file, the kubelet's
`--image-credential-provider-config`, whose binaries sit in `--image-credential-provider-bin-dir`.
Given the same two paths, lazysnap gets the credentials the kubelet gets, so private
layers can be served lazily.

For an image that one of a provider's `matchImages` patterns matches, the plugin reads a
`CredentialProviderRequest` on stdin and prints a `CredentialProviderResponse`: an `auth`
map from image patterns to a username and password, to be cached per `cacheKeyType`
(the image, its registry, or everything) for `cacheDuration` (else the provider's
`defaultCacheDuration`). Expiry is compared with a monotonic clock at lookup; nothing
runs in the background. An answer is also forgotten when the registry refuses it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .credential_helpers import kill, message_of
from .credentials import Credentials, Lookup
from .errors import CredentialConfigError

log = logging.getLogger(__name__)

CONFIG_API_VERSIONS = ("kubelet.config.k8s.io/v1", "kubelet.config.k8s.io/v1beta1", "kubelet.config.k8s.io/v1alpha1")
PLUGIN_API_VERSIONS = ("credentialprovider.kubelet.k8s.io/v1", "credentialprovider.kubelet.k8s.io/v1beta1",
                       "credentialprovider.kubelet.k8s.io/v1alpha1")
CACHE_KEY_TYPES = ("Image", "Registry", "Global")
PROVIDER_TIMEOUT = 20.0
"""Seconds a plugin may take. The kubelet allows a minute, but here the lookup runs inside one
registry request (`Timeouts.request`) that a FUSE read waits on for `read_timeout` (30 s): a
plugin slower than that fails the read anyway, and a shorter bound lets its own error,
naming the plugin, reach the log first."""


@dataclass(frozen=True)
class Provider:
    """One entry of `providers[]`."""

    name: str
    match_images: tuple[str, ...]
    default_cache_duration: float
    api_version: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class _Answer:
    """A plugin's response: credentials per image pattern, most specific pattern first."""

    auth: tuple[tuple[str, Credentials], ...]
    expires: float

    def credentials_for(self, image: str) -> Credentials | None:
        return next((creds for pattern, creds in self.auth if image_matches(pattern, image)), None)


class _PluginFailed(Exception):
    """A plugin that could not be run or whose answer cannot be used; the message says why."""


class CredentialProviders:
    """The providers of one `CredentialProviderConfig`, their plugins run on demand, answers cached."""

    def __init__(self, config: Path, bin_dir: Path, timeout: float = PROVIDER_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.bin_dir = bin_dir
        self.providers = load_config(config, bin_dir)
        self.timeout = timeout
        self.clock = clock
        self.runs = 0
        self._cache: dict[tuple[str, str, str], _Answer] = {}
        self._locks: dict[tuple[str, str], trio.Lock] = {}

    async def find(self, image: str) -> Lookup:
        """Credentials for `image` (`host[:port]/path`, no tag) from the first provider that has some."""
        matching = [p for p in self.providers if any(image_matches(m, image) for m in p.match_images)]
        if not matching:
            return Lookup(None, (f"kubelet credential providers ({self.config}): none matches {image}",))
        tried: list[str] = []
        for provider in matching:
            what = f"credential provider {provider.name} ({self.config})"
            try:
                answer = await self._answer(provider, image)
            except _PluginFailed as e:
                tried.append(f"{what} for {image} failed: {e}")
                continue
            creds = answer.credentials_for(image)
            if creds is not None:
                tried.append(f"{what}: credentials of {creds.who()}")
                return Lookup(creds, tuple(tried))
            tried.append(f"{what}: no credentials for {image}")
        return Lookup(None, tuple(tried))

    def forget(self, image: str) -> None:
        """Drop every cached answer that would serve `image`: the registry refused it."""
        for provider in self.providers:
            for key in _cache_keys(provider.name, image):
                self._cache.pop(key, None)

    async def _answer(self, provider: Provider, image: str) -> _Answer:
        lock = self._locks.setdefault((provider.name, image), trio.Lock())
        async with lock:  # one run per image at a time, as the kubelet's singleflight
            now = self.clock()
            for key in _cache_keys(provider.name, image):  # image, then registry, then global
                cached = self._cache.get(key)
                if cached is not None and cached.expires > now:
                    return cached
                if cached is not None:
                    del self._cache[key]
            try:
                key_type, answer = await self._run(provider, image)
            except _PluginFailed as e:
                log.warning("credential provider %s for %s failed: %s; going on without its credentials",
                            provider.name, image, e)
                raise
            if answer.expires > self.clock():
                self._cache[_cache_keys(provider.name, image)[CACHE_KEY_TYPES.index(key_type)]] = answer
            return answer

    async def _run(self, provider: Provider, image: str) -> tuple[str, _Answer]:
        """Run the plugin once: (its cacheKeyType, its answer)."""
        request = {"apiVersion": provider.api_version, "kind": "CredentialProviderRequest", "image": image}
        env = dict(os.environ)
        env.update(provider.env)
        self.runs += 1
        result = None
        try:
            with trio.move_on_after(self.timeout):
                result = await trio.run_process([str(self.bin_dir / provider.name), *provider.args],
                                                stdin=json.dumps(request).encode(), capture_stdout=True,
                                                capture_stderr=True, check=False, env=env, deliver_cancel=kill)
        except OSError as e:
            raise _PluginFailed(f"cannot run {self.bin_dir / provider.name}: {e.strerror or e}") from None
        if result is None:
            raise _PluginFailed(f"no answer within {self.timeout:g} s")
        if result.returncode != 0:
            said = message_of(result.stderr.decode("utf-8", "replace"))
            raise _PluginFailed(f"exit status {result.returncode}{': ' + said if said else ''}")
        return self._parse(result.stdout, provider, self.clock())

    def _parse(self, raw: bytes, provider: Provider, now: float) -> tuple[str, _Answer]:
        """A `CredentialProviderResponse`; errors name fields, never values that could be secret."""
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            doc = None
        if not isinstance(doc, dict):
            raise _PluginFailed(f"it printed no CredentialProviderResponse JSON ({len(raw)} bytes, not shown)")
        if doc.get("apiVersion") != provider.api_version:
            raise _PluginFailed(f"it answered apiVersion {str(doc.get('apiVersion'))[:80]!r}, "
                                f"not the configured {provider.api_version!r}")
        if doc.get("kind", "CredentialProviderResponse") != "CredentialProviderResponse":
            raise _PluginFailed(f"it answered kind {str(doc.get('kind'))[:80]!r}, not CredentialProviderResponse")
        key_type = doc.get("cacheKeyType")
        if key_type not in CACHE_KEY_TYPES:
            raise _PluginFailed(f"its cacheKeyType {str(key_type)[:80]!r} is none of {', '.join(CACHE_KEY_TYPES)}")
        duration = doc.get("cacheDuration")
        if duration is None:
            lifetime = provider.default_cache_duration
        else:
            try:
                lifetime = parse_duration(duration)
            except ValueError as e:
                raise _PluginFailed(f"its cacheDuration: {e}") from None
        auth = doc.get("auth") or {}
        if not isinstance(auth, dict):
            raise _PluginFailed("its auth is not a map of image patterns")
        entries: list[tuple[str, Credentials]] = []
        for pattern, value in auth.items():
            if not isinstance(value, dict):
                raise _PluginFailed(f"its auth entry for {pattern[:200]!r} is not an object")
            username, password = value.get("username") or "", value.get("password") or ""
            if not isinstance(username, str) or not isinstance(password, str):
                raise _PluginFailed(f"its auth entry for {pattern[:200]!r} has a non-string username or password")
            entries.append((pattern, Credentials(username, password, source=f"credential provider {provider.name}")))
        entries.sort(key=lambda e: e[0], reverse=True)  # the kubelet's order: more specific patterns first
        return key_type, _Answer(tuple(entries), now + lifetime)


def _cache_keys(name: str, image: str) -> tuple[tuple[str, str, str], ...]:
    """The cache keys of `image` for provider `name`, in lookup order (Image, Registry, Global)."""
    return (name, "Image", image), (name, "Registry", image.split("/", 1)[0]), (name, "Global", "")


# ---------------------------------------------------------------------- matching


def image_matches(pattern: str, image: str) -> bool:
    """The kubelet's `URLsMatch`: each `*` (or `?`, `[...]`) stays within one host label, the
    label counts are equal, the ports are equal (none on both sides counts), and the
    pattern's path is a prefix of the image's."""
    glob_host, glob_port, glob_path = _split(pattern)
    host, port, path = _split(image)
    if glob_port != port or not path.startswith(glob_path):
        return False
    glob_labels, labels = glob_host.split("."), host.split(".")
    return len(glob_labels) == len(labels) and all(_label_matches(g, t) for g, t in zip(glob_labels, labels))


def _split(text: str) -> tuple[str, str, str]:
    """(host, port, path) of `host[:port][/path]`, a scheme tolerated; the host lower-cased."""
    text = text.split("://", 1)[1] if "://" in text else text
    authority, slash, path = text.partition("/")
    host, colon, port = authority.rpartition(":")
    if not colon or not port.isdigit():
        host, port = authority, ""
    return host.lower(), port, slash + path


def _label_matches(glob: str, label: str) -> bool:
    """Go's `filepath.Match` for one host label: `*`, `?` and `[...]` classes."""
    return re.fullmatch(_glob_regex(glob), label) is not None


def _glob_regex(glob: str) -> str:
    out, i = [], 0
    while i < len(glob):
        c = glob[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[" and "]" in glob[i + 1:]:
            end = glob.index("]", i + 1)
            body = glob[i + 1:end]
            negate = body.startswith("^")
            body = body[1:] if negate else body
            out.append("[" + ("^" if negate else "") + body.replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


# ---------------------------------------------------------------------- durations

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: Any) -> float:
    """A Go duration string (`"12h"`, `"1h30m"`, `"500ms"`, `"0s"`, `"0"`) in seconds; never negative."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a duration string")
    if text in ("0", "+0"):
        return 0.0
    body = text.removeprefix("+")
    total, pos = 0.0, 0
    while pos < len(body):
        m = _DURATION_PART.match(body, pos)
        if m is None:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if not body or pos != len(body):
        raise ValueError(f"{text[:40]!r} is not a duration (like \"12h\", \"30m\" or \"0s\")")
    return total


# ---------------------------------------------------------------------- the config file


def load_config(path: Path, bin_dir: Path) -> tuple[Provider, ...]:
    """The providers of a `CredentialProviderConfig` file (JSON or YAML), checked as the kubelet checks them."""
    try:
        text = path.read_text()
    except OSError as e:
        raise CredentialConfigError(f"cannot read the credential provider config {path}: {e.strerror or e}") from None
    doc = _parse_document(text, path)
    where = f"credential provider config {path}"
    if not isinstance(doc, dict):
        raise CredentialConfigError(f"{where}: not a CredentialProviderConfig object")
    if doc.get("apiVersion") not in CONFIG_API_VERSIONS:
        raise CredentialConfigError(f"{where}: apiVersion must be one of {', '.join(CONFIG_API_VERSIONS)}, "
                                    f"got {doc.get('apiVersion')!r}")
    if doc.get("kind") != "CredentialProviderConfig":
        raise CredentialConfigError(f"{where}: kind must be CredentialProviderConfig, got {doc.get('kind')!r}")
    entries = doc.get("providers")
    if not isinstance(entries, list) or not entries:
        raise CredentialConfigError(f"{where}: providers must be a non-empty list")
    providers: list[Provider] = []
    for i, entry in enumerate(entries):
        provider = _provider(entry, f"{where}: providers[{i}]", bin_dir)
        if provider is None:
            continue
        if any(p.name == provider.name for p in providers):
            raise CredentialConfigError(f"{where}: provider name {provider.name!r} appears twice")
        providers.append(provider)
    return tuple(providers)


def _parse_document(text: str, path: Path) -> Any:
    """JSON, else YAML (the kubelet accepts both; JSON is YAML, so YAML's parser only runs for YAML)."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        import yaml
    except ImportError:
        raise CredentialConfigError(f"credential provider config {path} is not JSON, and PyYAML is not "
                                    f"installed to read it as YAML") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CredentialConfigError(f"credential provider config {path} is neither JSON nor YAML: {e}") from None


def _provider(entry: Any, where: str, bin_dir: Path) -> Provider | None:
    """One provider, checked; None (with a warning) for one lazysnap cannot serve."""
    if not isinstance(entry, dict):
        raise CredentialConfigError(f"{where}: not an object")
    name = entry.get("name")
    if not isinstance(name, str) or not name or "/" in name or " " in name or name in (".", ".."):
        raise CredentialConfigError(f"{where}: name must be a file name (no '/' or spaces), got {name!r}")
    where = f"{where} ({name})"
    images = entry.get("matchImages")
    if not isinstance(images, list) or not images or not all(isinstance(m, str) and m for m in images):
        raise CredentialConfigError(f"{where}: matchImages must be a non-empty list of image patterns")
    if "defaultCacheDuration" not in entry:
        raise CredentialConfigError(f"{where}: defaultCacheDuration is required")
    try:
        default_duration = parse_duration(entry["defaultCacheDuration"])
    except ValueError as e:
        raise CredentialConfigError(f"{where}: defaultCacheDuration: {e}") from None
    api_version = entry.get("apiVersion")
    if api_version not in PLUGIN_API_VERSIONS:
        raise CredentialConfigError(f"{where}: apiVersion must be one of {', '.join(PLUGIN_API_VERSIONS)}, "
                                    f"got {api_version!r}")
    args = entry.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise CredentialConfigError(f"{where}: args must be a list of strings")
    env = entry.get("env") or []
    if not isinstance(env, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str) and e["name"]
                                            and isinstance(e.get("value"), str) for e in env):
        raise CredentialConfigError(f"{where}: env must be a list of {{name, value}} strings")
    if entry.get("tokenAttributes"):
        log.warning("%s: tokenAttributes asks for a pod's service account token, which lazysnap does not have; "
                    "this provider is not used", where)
        return None
    binary = bin_dir / name
    if not os.access(binary, os.X_OK) or not binary.is_file():
        raise CredentialConfigError(f"{where}: no executable {binary} (image_credential_provider_bin_dir)")
    return Provider(name, tuple(images), default_duration, api_version, tuple(args),
                    tuple((e["name"], e["value"]) for e in env))
