"""Credentials the kubelet hands over with a CRI `PullImage`: a pod's imagePullSecrets.

lazysnap's CRI proxy (`cri_proxy.py`) passes each pull's `AuthConfig` here before it
forwards the pull to containerd; the keychain asks this store *first* when lazysnap
fetches from that image's registry and repository, as stargz's and soci's CRI keychains
do: the pull secret is the one the pod named for this very image, so it outranks the
node-wide sources.

Which credentials, as containerd's CRI `ParseAuth` reads them (so lazysnap sends what
containerd sent): none if `server_address` names another registry; else username and
password, else `identity_token` (an OAuth2 refresh token for the token server), else
the base64 `auth` ("user:password"). `registry_token` is ignored, as containerd ignores it.

Lifetime (in memory only, never on disk, never logged):
- an entry serves the pulled image's repository (`host/path`): all its tags and digests;
- while a pull runs its credentials are offered first, the older ones after; when it
  succeeds they replace the older ones, when it fails they are dropped and the older
  ones stay (a failed attempt with a stale secret never breaks a working image);
- an entry lasts until `RemoveImage` has removed every image pulled with it (the
  kubelet's image GC, which never removes an image a container uses), so the layers of a
  long-running pod can always fetch. There is no TTL: the kubelet does not pull an image
  that is present again, so a TTL would only make lazy reads of long-lived pods fail
  (soci-snapshotter #1084); a short-lived token inside a secret is the registry's to
  refuse, and the next PullImage of the image brings a fresh one;
- at most `MAX_ENTRIES` repositories, the least recently used dropped first;
- lost when lazysnap restarts: images pulled before then fetch with the other sources
  (config.json, helpers, kubelet credential providers) until the kubelet pulls again.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from .credentials import Credentials, registry_key
from .errors import InvalidReference
from .reference import parse

log = logging.getLogger(__name__)

_IMAGE_ID = re.compile(r"^(?:[a-z0-9]+:)?[a-f0-9]{64}$")
"""An image id (`sha256:<hex>`, or the bare hex): `parse` would take it for docker.io/library/sha256."""

MAX_ENTRIES = 4096
"""Repositories remembered at once; more images than this on one node is far beyond the usual."""


@dataclass(frozen=True)
class CriAuth:
    """The fields of CRI's `AuthConfig`, as plain values; the secrets never print."""

    username: str = ""
    password: str = field(default="", repr=False)
    auth: str = field(default="", repr=False)
    server_address: str = ""
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    def credentials(self, host: str, image: str) -> Credentials | None:
        """What containerd's `ParseAuth` makes of these for registry `host`; None: anonymous."""
        if self.server_address and registry_key(self.server_address) != registry_key(host):
            return None
        source = f"the CRI PullImage of {image}"
        if self.username:
            return Credentials(self.username, self.password, source=source)
        if self.identity_token:
            return Credentials(identity_token=self.identity_token, source=source)
        if self.auth:
            try:
                user, sep, secret = base64.b64decode(self.auth, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return None
            if sep:
                return Credentials(user, secret.strip("\0"), source=source)
        return None


@dataclass(frozen=True)
class Pull:
    """A pull in progress: what `begin` returned, for `finish`."""

    key: tuple[str, str]
    image: str
    credentials: Credentials = field(repr=False)
    seq: int = 0


@dataclass
class _Entry:
    credentials: Credentials | None = None
    images: dict[str, str] = field(default_factory=dict)
    """Each image reference pulled with these credentials -> the image id containerd answered."""
    pending: list[Pull] = field(default_factory=list)


class CriCredentials:
    """The credentials of CRI pulls, per (registry host, repository); safe to use from any thread."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._seq = itertools.count(1)

    def begin(self, image: str, auth: CriAuth) -> Pull | None:
        """Offer `auth` for `image`'s repository while containerd pulls it; None when it gives none."""
        key = _key(image)
        if key is None:
            return None
        creds = auth.credentials(key[0], image)
        if creds is None:
            return None
        pull = Pull(key, image, creds, next(self._seq))
        with self._lock:
            entry = self._entries.setdefault(key, _Entry())
            entry.pending.append(pull)
            self._touch(key)
        return pull

    def finish(self, pull: Pull, image_id: str | None) -> None:
        """The pull ended: with the image id containerd answered (success), or None (failure)."""
        with self._lock:
            entry = self._entries.get(pull.key)
            if entry is None:
                return
            if pull in entry.pending:
                entry.pending.remove(pull)
            if image_id is not None:
                entry.credentials = pull.credentials
                entry.images[_normal(pull.image)] = image_id
            if not entry.images and not entry.pending:  # a failed first pull, or its images were removed meanwhile
                del self._entries[pull.key]

    def remove(self, image: str) -> bool:
        """containerd removed `image` (a reference or an image id), with every reference to it.
        True when that dropped the credentials of a repository."""
        wanted = _normal(image)
        dropped = False
        with self._lock:
            ids = {wanted} | {i for e in self._entries.values() for ref, i in e.images.items() if ref == wanted}
            for key, entry in list(self._entries.items()):
                entry.images = {ref: i for ref, i in entry.images.items() if i not in ids and ref != wanted}
                if not entry.images and not entry.pending:
                    del self._entries[key]
                    dropped = True
        return dropped

    def find(self, host: str, repository: str) -> Credentials | None:
        """The credentials for `repository` on registry `host`: a running pull's first, newest first."""
        key = (registry_key(host), repository)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry.pending[-1].credentials if entry.pending else entry.credentials

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _touch(self, key: tuple[str, str]) -> None:
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            dropped, _ = self._entries.popitem(last=False)
            log.info("forgetting the CRI pull credentials for %s/%s: more than %d repositories",
                     dropped[0], dropped[1], self.max_entries)


def _key(image: str) -> tuple[str, str] | None:
    """(registry host, repository path) of an image reference; None for an image id or a bad reference."""
    if _IMAGE_ID.match(image):
        return None
    try:
        ref = parse(image)
    except InvalidReference:
        return None
    return registry_key(ref.domain), ref.path


def _normal(image: str) -> str:
    """An image reference normalised (`busybox` -> `docker.io/library/busybox:latest`); anything else as is."""
    if _IMAGE_ID.match(image):
        return image
    try:
        return str(parse(image))
    except InvalidReference:
        return image
