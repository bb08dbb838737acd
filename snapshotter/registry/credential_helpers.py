"""Docker credential helpers: `docker-credential-<name> get`, run the way the docker CLI runs them.

Docker's config.json names a helper per registry (`credHelpers`) or one for every
registry (`credsStore`); ECR, GCR and ACR hand out credentials this way. The helper
reads the server URL on stdin and prints `{"ServerURL", "Username", "Secret"}`; the
username `<token>` means the secret is an identity token. A helper that has nothing
for the registry prints `credentials not found in native keychain` and exits 1: that
is an answer ("anonymous"), not a failure.

An answer is reused for `ANSWER_LIFETIME` seconds, so that a pull runs the helper once
rather than once per request, and forgotten when the registry refuses it, so that a
rotated secret is picked up at the next try. A failure is remembered as long, so a
broken helper is not re-run (and logged) for every request either.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from .credentials import Credentials, registry_key

log = logging.getLogger(__name__)

HELPER_TIMEOUT = 10.0
"""Seconds a helper may take. Cloud helpers make one HTTPS round trip, far below this;
a hung helper must fail the lookup well before a FUSE read's deadline (`read_timeout`)."""
ANSWER_LIFETIME = 10.0
"""Seconds a helper's answer is reused: a pull's burst of requests runs the helper once,
and a secret rotated behind the helper applies within seconds even without a refusal."""
NOT_FOUND = "credentials not found in native keychain"
"""The exact message of docker-credential-helpers' `ErrCredentialsNotFound`."""
TOKEN_USERNAME = "<token>"
"""The username a helper gives when its secret is an identity token."""
HUB_SERVER_URL = "https://index.docker.io/v1/"
"""The server URL the docker CLI asks helpers for Docker Hub by."""
_MESSAGE_LIMIT = 200


def server_url(host: str) -> str:
    """What the helper is asked for: `host[:port]`, and Hub's historical URL for Docker Hub."""
    key = registry_key(host)
    return HUB_SERVER_URL if key == "docker.io" else key


@dataclass(frozen=True)
class HelperAnswer:
    """What one helper said about one server: credentials, none, or why it failed (`failed`)."""

    credentials: Credentials | None
    outcome: str
    """In words, for error messages: "no credentials", "credentials of 'alice'", "failed: ..."."""
    failed: bool = False


class CredentialHelpers:
    """Runs helpers, bounded by a timeout, and remembers their answers for a few seconds."""

    def __init__(self, timeout: float = HELPER_TIMEOUT, lifetime: float = ANSWER_LIFETIME,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self.lifetime = lifetime
        self.clock = clock
        self.runs = 0
        self._answers: dict[tuple[str, str], tuple[HelperAnswer, float]] = {}
        self._locks: dict[tuple[str, str], trio.Lock] = {}

    async def get(self, helper: str, host: str) -> HelperAnswer:
        """The helper's credentials for registry `host`, from the cache while they are fresh."""
        key = (helper, server_url(host))
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:  # one run per (helper, server), however many requests want it at once
            cached = self._answers.get(key)
            if cached is not None and cached[1] > self.clock():
                return cached[0]
            answer = await self._run(helper, key[1], host)
            self._answers[key] = (answer, self.clock() + self.lifetime)
            if answer.failed:
                log.warning("%s; going on without its credentials", answer.outcome)
            return answer

    def forget(self, host: str) -> None:
        """Drop every helper's answer for `host`: the registry refused what we sent."""
        url = server_url(host)
        for key in [k for k in self._answers if k[1] == url]:
            del self._answers[key]

    async def _run(self, helper: str, url: str, host: str) -> HelperAnswer:
        program = f"docker-credential-{helper}"
        what = f"{program} get for {host}"
        if not helper or "/" in helper or helper.startswith("."):
            return HelperAnswer(None, f"{what} failed: {helper!r} is not a helper name", failed=True)
        path = shutil.which(program)
        if path is None:
            return HelperAnswer(None, f"{what} failed: {program} is not on PATH "
                                      f"({os.environ.get('PATH', os.defpath)})", failed=True)
        self.runs += 1
        result = None
        try:
            with trio.move_on_after(self.timeout):
                result = await trio.run_process([path, "get"], stdin=url.encode() + b"\n", capture_stdout=True,
                                                capture_stderr=True, check=False, deliver_cancel=kill)
        except OSError as e:
            return HelperAnswer(None, f"{what} failed: cannot run {path}: {e.strerror or e}", failed=True)
        if result is None:
            return HelperAnswer(None, f"{what} failed: no answer within {self.timeout:g} s", failed=True)
        out = result.stdout.decode("utf-8", "replace").strip()
        if result.returncode != 0:
            if out == NOT_FOUND:
                return HelperAnswer(None, f"{program}: no credentials for {host}")
            said = message_of(out) or message_of(result.stderr.decode("utf-8", "replace"))
            return HelperAnswer(None, f"{what} failed: exit status {result.returncode}"
                                      f"{': ' + said if said else ''}", failed=True)
        creds = parse_answer(result.stdout, program)
        if creds is None:
            return HelperAnswer(None, f"{what} failed: it printed no valid credentials JSON "
                                      f"({len(result.stdout)} bytes, not shown)", failed=True)
        if not (creds.username or creds.password or creds.identity_token):
            return HelperAnswer(None, f"{program}: no credentials for {host}")
        return HelperAnswer(creds, f"{program}: credentials of {creds.who()}")


def parse_answer(raw: bytes, program: str) -> Credentials | None:
    """`{"ServerURL","Username","Secret"}` as credentials; None when it is not that."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    username, secret = doc.get("Username", ""), doc.get("Secret", "")
    if not isinstance(username, str) or not isinstance(secret, str):
        return None
    if username == TOKEN_USERNAME:
        return Credentials(identity_token=secret, source=program)
    return Credentials(username, secret, source=program)


def message_of(text: str) -> str:
    """A helper's error output, fit for a message: its first line, short, never anything JSON-like
    (which could hold a secret)."""
    first = text.strip().splitlines()[0].strip() if text.strip() else ""
    if first.startswith(("{", "[")):
        return ""
    return first if len(first) <= _MESSAGE_LIMIT else first[:_MESSAGE_LIMIT] + "..."


async def kill(process: trio.Process) -> None:
    """Cancel a helper or provider at once: they hold no state worth a graceful stop."""
    process.kill()
