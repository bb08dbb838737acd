"""Docker credential helpers and kubelet credential provider plugins, with scripts of the tests' own.

The helper (`docker-credential-testhelper`, on PATH) and the provider (`testprovider`, in
the plugin directory) are small Python scripts that do what a JSON file beside them
says and append one line per run to a log, so that the tests can count runs. The last
tests drive a real RegistryClient against docker-registry behind FaultProxy, which asks
for basic credentials or tokens.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from snapshotter import config as lazysnap_config
from snapshotter.errors import ConfigError
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.credential_helpers import HUB_SERVER_URL, CredentialHelpers
from snapshotter.registry.credential_providers import CredentialProviders, image_matches, parse_duration
from snapshotter.registry.credentials import Credentials
from snapshotter.registry.errors import CredentialConfigError, Unauthorized
from snapshotter.registry.keychain import Keychain
from snapshotter.registry.options import RegistryOptions, Timeouts
from tests.harness.faultproxy import FaultProxy
from tests.harness.registry import Registry
from tests.unit.test_registry_client import upload_blob

LIMIT = 20  # seconds any one test may take before it is a hang
SECRET = "s3cr3t-Do-Not-Log-7f1c"
HELPER = "testhelper"
PROVIDER = "testprovider"

HELPER_SCRIPT = """\
import json, pathlib, sys, time
state_dir = pathlib.Path(__file__).resolve().parent.parent
state = json.loads((state_dir / "helper.json").read_text())
url = sys.stdin.read().strip()
with open(state_dir / "helper-runs.log", "a") as log:
    log.write(f"{sys.argv[1]} {url}\\n")
mode = state.get("mode", "ok")
if mode == "sleep":
    time.sleep(30)
if mode == "notfound":
    print("credentials not found in native keychain")
    sys.exit(1)
if mode == "fail":
    print("error getting credentials - err: exit status 1, out: `vault is sealed`")
    sys.exit(1)
if mode == "badjson":
    print('{"ServerURL": "x", "Username": "bot", "Secret": "' + state["secret"] + '"')  # cut short
    sys.exit(0)
print(json.dumps({"ServerURL": url, "Username": state["username"], "Secret": state["secret"]}))
"""

PROVIDER_SCRIPT = """\
import json, os, pathlib, sys, time
state_dir = pathlib.Path(__file__).resolve().parent.parent
state = json.loads((state_dir / "provider.json").read_text())
request = json.loads(sys.stdin.read())
with open(state_dir / "provider-runs.log", "a") as log:
    log.write(json.dumps({"request": request, "args": sys.argv[1:], "env": os.environ.get("PROVIDER_ENV")}) + "\\n")
time.sleep(state.get("sleep", 0))
if state.get("exit"):
    print("cannot reach the cloud metadata service", file=sys.stderr)
    sys.exit(state["exit"])
if state.get("garbage"):
    print("token: " + state["garbage"])
    sys.exit(0)
response = {"apiVersion": state.get("apiVersion", request["apiVersion"]), "kind": "CredentialProviderResponse",
            "cacheKeyType": state.get("cacheKeyType", "Image"), "auth": state.get("auth", {})}
if "cacheDuration" in state:
    response["cacheDuration"] = state["cacheDuration"]
print(json.dumps(response))
"""


class FakeClock:
    """A monotonic clock the tests move by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write_script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


def runs(tmp_path: Path, name: str) -> list[str]:
    log = tmp_path / f"{name}-runs.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`docker-credential-testhelper` on PATH; its behaviour is tmp_path/helper.json."""
    write_script(tmp_path / "bin" / f"docker-credential-{HELPER}", HELPER_SCRIPT)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    state = tmp_path / "helper.json"
    state.write_text(json.dumps({"username": "robot", "secret": SECRET}))
    return state


def docker_config(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "docker" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def provider_config(tmp_path: Path, match: list[str], default: str = "10m", **extra: Any) -> Path:
    """A plugin directory with `testprovider` and a YAML CredentialProviderConfig naming it."""
    write_script(tmp_path / "plugins" / PROVIDER, PROVIDER_SCRIPT)
    state = tmp_path / "provider.json"
    if not state.exists():
        state.write_text(json.dumps({"auth": {"*.example": {"username": "cloud", "password": SECRET}}}))
    lines = ["apiVersion: kubelet.config.k8s.io/v1", "kind: CredentialProviderConfig", "providers:",
             f"  - name: {PROVIDER}", "    matchImages:"]
    lines += [f'      - "{m}"' for m in match]
    lines += [f'    defaultCacheDuration: "{default}"', "    apiVersion: credentialprovider.kubelet.k8s.io/v1"]
    for key, value in extra.items():
        lines.append(f"    {key}: {json.dumps(value)}")
    path = tmp_path / "credential-provider.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def set_provider(tmp_path: Path, **state: Any) -> None:
    (tmp_path / "provider.json").write_text(json.dumps(state))


def providers(tmp_path: Path, match: list[str], clock: FakeClock | None = None, timeout: float = 5.0,
              **extra: Any) -> CredentialProviders:
    path = provider_config(tmp_path, match, **extra)
    return CredentialProviders(path, tmp_path / "plugins", timeout=timeout, **({"clock": clock} if clock else {}))


# --------------------------------------------------------------------------- Docker credential helpers


async def test_cred_helper_for_the_host_then_creds_store(tmp_path: Path, helper: Path) -> None:
    path = docker_config(tmp_path, {"credHelpers": {"reg.example:5000": HELPER}, "credsStore": "absent-store",
                                    "auths": {"reg.example:5000": {"auth": "c3RhbGU6b2xk"}}})  # stale:old
    found = await Keychain(path).find("reg.example:5000", "team/app")
    assert found.credentials == Credentials("robot", SECRET), "a credHelpers entry outranks auths, as in Docker"
    assert found.credentials is not None and found.credentials.source == f"docker-credential-{HELPER}"
    assert runs(tmp_path, "helper") == ["get reg.example:5000"], "the server URL on stdin, `get` as the command"
    assert SECRET not in repr(found), "records print without their secret"

    path = docker_config(tmp_path, {"credsStore": HELPER})
    found = await Keychain(path).find("registry-1.docker.io", "library/busybox")
    assert found.credentials == Credentials("robot", SECRET)
    assert runs(tmp_path, "helper")[-1] == f"get {HUB_SERVER_URL}", "Docker Hub is asked for by its old URL"


async def test_token_username_means_an_identity_token(tmp_path: Path, helper: Path) -> None:
    helper.write_text(json.dumps({"username": "<token>", "secret": SECRET}))
    found = await Keychain(docker_config(tmp_path, {"credsStore": HELPER})).find("reg.example")
    assert found.credentials == Credentials(identity_token=SECRET)


async def test_helper_without_credentials_falls_back_to_auths(tmp_path: Path, helper: Path) -> None:
    helper.write_text(json.dumps({"mode": "notfound"}))
    path = docker_config(tmp_path, {"credsStore": HELPER, "auths": {"reg.example": {"auth": "YWxpY2U6cHc="}}})
    found = await Keychain(path).find("reg.example")
    assert found.credentials == Credentials("alice", "pw")
    assert found.tried[0] == f"credsStore of {path}: docker-credential-{HELPER}: no credentials for reg.example"
    found = await Keychain(path).find("other.example")
    assert found.credentials is None, "`credentials not found in native keychain` is an answer, not a failure"


async def test_helper_answers_are_cached_briefly_and_forgotten_on_refusal(tmp_path: Path, helper: Path) -> None:
    clock = FakeClock()
    keychain = Keychain(docker_config(tmp_path, {"credsStore": HELPER}), helpers=CredentialHelpers(clock=clock))
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(keychain.find, "reg.example", "app")
    await keychain.find("reg.example", "other")
    assert len(runs(tmp_path, "helper")) == 1, "requests at once and right after share one run"
    clock.now += keychain.helpers.lifetime + 0.1
    await keychain.find("reg.example")
    assert len(runs(tmp_path, "helper")) == 2, "an answer lives only seconds"
    helper.write_text(json.dumps({"username": "robot", "secret": "rotated"}))
    keychain.forget("reg.example")
    assert (await keychain.find("reg.example")).credentials == Credentials("robot", "rotated")
    assert len(runs(tmp_path, "helper")) == 3


@pytest.mark.parametrize("mode, said", [
    ("fail", "failed: exit status 1: error getting credentials - err: exit status 1, out: `vault is sealed`"),
    ("badjson", "failed: it printed no valid credentials JSON"),
    ("sleep", "failed: no answer within 0.5 s"),
])
async def test_failing_helper_is_named_and_lookup_goes_on(tmp_path: Path, helper: Path, mode: str, said: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    helper.write_text(json.dumps({"mode": mode, "secret": SECRET}))
    path = docker_config(tmp_path, {"credHelpers": {"reg.example": HELPER}})
    keychain = Keychain(path, helpers=CredentialHelpers(timeout=0.5))
    with trio.fail_after(5):
        found = await keychain.find("reg.example", "app")
        again = await keychain.find("reg.example", "app")
    assert found.credentials is None
    assert found.tried[0].startswith(f"credHelpers of {path}: docker-credential-{HELPER} get for reg.example {said}")
    assert again == found and len(runs(tmp_path, "helper")) == 1, "a failure is remembered as briefly as an answer"
    assert caplog.text.count(f"docker-credential-{HELPER} get for reg.example failed") == 1
    assert SECRET not in caplog.text and SECRET not in found.explain()


async def test_helper_not_on_path(tmp_path: Path) -> None:
    path = docker_config(tmp_path, {"credsStore": "nonexistent-helper-xyz"})
    found = await Keychain(path).find("reg.example")
    assert found.credentials is None
    assert "docker-credential-nonexistent-helper-xyz get for reg.example failed: " \
           "docker-credential-nonexistent-helper-xyz is not on PATH" in found.explain()


# --------------------------------------------------------------------------- kubelet credential providers


@pytest.mark.parametrize("pattern, image, matches", [
    ("*.azurecr.io", "myreg.azurecr.io/app", True),
    ("*.azurecr.io", "azurecr.io/app", False),                     # a glob is one label, never none
    ("*.io", "a.k8s.io/app", False),                               # and never two
    ("*.*.registry.io", "a.b.registry.io/x", True),
    ("app*.k8s.io", "app-1.k8s.io/x", True),                       # partial labels
    ("app*.k8s.io", "web.k8s.io/x", False),
    ("k8s.*", "k8s.io/x", True),
    ("123456789.dkr.ecr.*.amazonaws.com", "123456789.dkr.ecr.us-east-1.amazonaws.com/team/app", True),
    ("registry.io:8080/path", "registry.io:8080/path/app", True),
    ("registry.io:8080/path", "registry.io:8080/other/app", False),  # the path is a prefix
    ("registry.io:8080/path", "registry.io/path/app", False),       # the pattern's port must be there
    ("registry.io", "registry.io:5000/app", False),                # and ports are compared as given
    ("gcr.io", "gcr.io/project/app", True),
    ("GCR.io", "gcr.io/project/app", True),
    ("gcr.io", "us.gcr.io/project/app", False),
])
def test_match_images(pattern: str, image: str, matches: bool) -> None:
    assert image_matches(pattern, image) is matches


@pytest.mark.parametrize("text, seconds", [("0", 0.0), ("0s", 0.0), ("1s", 1.0), ("12h", 43200.0),
                                           ("1h30m", 5400.0), ("5m0s", 300.0), ("500ms", 0.5), ("1.5h", 5400.0)])
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "-1s", "1d", "s", 5])
def test_bad_go_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


async def test_provider_request_args_env_and_answer(tmp_path: Path) -> None:
    chain = providers(tmp_path, ["*.example"], args=["--region", "eu"], env=[{"name": "PROVIDER_ENV", "value": "x1"}])
    found = await chain.find("reg.example/team/app")
    assert found.credentials == Credentials("cloud", SECRET)
    assert found.credentials is not None and found.credentials.source == f"credential provider {PROVIDER}"
    [run] = [json.loads(line) for line in runs(tmp_path, "provider")]
    assert run == {"request": {"apiVersion": "credentialprovider.kubelet.k8s.io/v1",
                               "kind": "CredentialProviderRequest", "image": "reg.example/team/app"},
                   "args": ["--region", "eu"], "env": "x1"}
    assert (await chain.find("reg.other/app")).credentials is None
    assert len(runs(tmp_path, "provider")) == 1, "a provider is run only for images it matches"
    assert "none matches reg.other/app" in (await chain.find("reg.other/app")).explain()


async def test_provider_token_expires_and_the_next_lookup_reruns_it(tmp_path: Path) -> None:
    chain = providers(tmp_path, ["*.example"])
    set_provider(tmp_path, cacheDuration="1s", auth={"reg.example": {"username": "u", "password": SECRET}})
    with trio.fail_after(LIMIT):
        assert (await chain.find("reg.example/app")).credentials == Credentials("u", SECRET)
        assert (await chain.find("reg.example/app")).credentials == Credentials("u", SECRET)
        assert len(runs(tmp_path, "provider")) == 1, "cached for its cacheDuration"
        set_provider(tmp_path, cacheDuration="1s", auth={"reg.example": {"username": "u", "password": "renewed"}})
        await trio.sleep(1.1)
        assert (await chain.find("reg.example/app")).credentials == Credentials("u", "renewed")
        assert len(runs(tmp_path, "provider")) == 2, "an expired answer makes the next lookup run the plugin"


async def test_cache_key_type_registry_image_and_global(tmp_path: Path) -> None:
    clock = FakeClock()
    chain = providers(tmp_path, ["*.example", "*.other"], clock=clock)
    auth = {"*.example": {"username": "u", "password": SECRET}, "*.other": {"username": "o", "password": SECRET}}

    set_provider(tmp_path, cacheKeyType="Registry", cacheDuration="1m", auth=auth)
    await chain.find("reg.example/a")
    await chain.find("reg.example/b")
    assert len(runs(tmp_path, "provider")) == 1, "Registry: one answer serves every image of the registry"
    await chain.find("reg.other/a")
    assert len(runs(tmp_path, "provider")) == 2, "but not another registry"

    clock.now += 61
    set_provider(tmp_path, cacheKeyType="Image", cacheDuration="1m", auth=auth)
    await chain.find("reg.example/a")
    await chain.find("reg.example/a")
    await chain.find("reg.example/b")
    assert len(runs(tmp_path, "provider")) == 4, "Image: one answer per image"

    clock.now += 61
    set_provider(tmp_path, cacheKeyType="Global", cacheDuration="1m", auth=auth)
    await chain.find("reg.example/a")
    assert (await chain.find("reg.other/z")).credentials == Credentials("o", SECRET)
    assert len(runs(tmp_path, "provider")) == 5, "Global: one answer for everything, matched by its auth keys"

    clock.now += 61
    set_provider(tmp_path, cacheKeyType="Image", auth=auth)  # no cacheDuration: the default, 10m
    await chain.find("reg.example/a")
    clock.now += 599
    await chain.find("reg.example/a")
    assert len(runs(tmp_path, "provider")) == 6
    clock.now += 2
    await chain.find("reg.example/a")
    assert len(runs(tmp_path, "provider")) == 7, "defaultCacheDuration when the answer has none"

    set_provider(tmp_path, cacheKeyType="Image", cacheDuration="0s", auth=auth)
    await chain.find("reg.example/a")  # the 10m answer above is still valid
    clock.now += 601
    await chain.find("reg.example/a")
    await chain.find("reg.example/a")
    assert len(runs(tmp_path, "provider")) == 9, "0s: never cached"
    chain.forget("reg.example/a")


async def test_most_specific_auth_key_wins(tmp_path: Path) -> None:
    chain = providers(tmp_path, ["*.example"])
    set_provider(tmp_path, auth={"*.example": {"username": "wide", "password": "p"},
                                 "reg.example/team": {"username": "team", "password": "p"},
                                 "reg.example/elsewhere": {"username": "no", "password": "p"}})
    assert (await chain.find("reg.example/team/app")).credentials == Credentials("team", "p")
    assert (await chain.find("mirror.example/team/app")).credentials == Credentials("wide", "p")


@pytest.mark.parametrize("state, said", [
    ({"exit": 2}, "failed: exit status 2: cannot reach the cloud metadata service"),
    ({"garbage": SECRET}, "failed: it printed no CredentialProviderResponse JSON"),
    ({"apiVersion": "credentialprovider.kubelet.k8s.io/v1beta1"}, "failed: it answered apiVersion"),
    ({"cacheKeyType": "Pod"}, "failed: its cacheKeyType 'Pod' is none of Image, Registry, Global"),
    ({"cacheDuration": "soon"}, "failed: its cacheDuration: 'soon' is not a duration"),
    ({"sleep": 30}, "failed: no answer within 0.5 s"),
])
async def test_failing_provider_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture, state: dict[str, Any],
                                         said: str) -> None:
    caplog.set_level("DEBUG")
    chain = providers(tmp_path, ["*.example"], timeout=0.5)
    set_provider(tmp_path, **state)
    with trio.fail_after(5):
        found = await chain.find("reg.example/app")
    assert found.credentials is None
    assert f"credential provider {PROVIDER} ({chain.config}) for reg.example/app {said}" in found.explain()
    assert f"credential provider {PROVIDER} for reg.example/app failed" in caplog.text
    assert SECRET not in caplog.text and SECRET not in found.explain()


def test_provider_config_json_and_errors(tmp_path: Path) -> None:
    write_script(tmp_path / "plugins" / PROVIDER, PROVIDER_SCRIPT)
    doc: dict[str, Any] = {"apiVersion": "kubelet.config.k8s.io/v1", "kind": "CredentialProviderConfig",
                           "providers": [{"name": PROVIDER, "matchImages": ["*.example"],
                                          "defaultCacheDuration": "12h",
                                          "apiVersion": "credentialprovider.kubelet.k8s.io/v1"}]}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc))
    [provider] = CredentialProviders(path, tmp_path / "plugins").providers
    assert (provider.name, provider.match_images, provider.default_cache_duration) == (PROVIDER, ("*.example",),
                                                                                      43200.0)

    def broken(change: dict[str, Any], message: str, where: str = "provider") -> None:
        bad = json.loads(json.dumps(doc))
        (bad["providers"][0] if where == "provider" else bad).update(change)
        path.write_text(json.dumps(bad))
        with pytest.raises(CredentialConfigError, match=message):
            CredentialProviders(path, tmp_path / "plugins")

    broken({"apiVersion": "kubelet.config.k8s.io/v2"}, "apiVersion must be one of kubelet", where="config")
    broken({"providers": []}, "providers must be a non-empty list", where="config")
    broken({"name": "../evil"}, "name must be a file name")
    broken({"name": "absent"}, "no executable .*absent")
    broken({"matchImages": []}, "matchImages must be a non-empty list")
    broken({"defaultCacheDuration": "forever"}, "defaultCacheDuration: 'forever' is not a duration")
    broken({"apiVersion": "credentialprovider.kubelet.k8s.io/v9"}, "apiVersion must be one of credentialprovider")
    broken({"env": [{"name": "X"}]}, "env must be a list")
    path.write_text("providers: [unclosed")
    with pytest.raises(CredentialConfigError, match="neither JSON nor YAML"):
        CredentialProviders(path, tmp_path / "plugins")
    with pytest.raises(CredentialConfigError, match="cannot read"):
        CredentialProviders(tmp_path / "absent.yaml", tmp_path / "plugins")


async def test_keychain_order_auths_helpers_then_providers(tmp_path: Path, helper: Path) -> None:
    path = docker_config(tmp_path, {"credHelpers": {"helped.example": HELPER},
                                    "auths": {"listed.example": {"auth": "YWxpY2U6cHc="}}})
    keychain = Keychain(path, providers(tmp_path, ["*.example"]))
    assert (await keychain.find("helped.example", "app")).credentials == Credentials("robot", SECRET)
    assert (await keychain.find("listed.example", "app")).credentials == Credentials("alice", "pw")
    assert runs(tmp_path, "provider") == []
    found = await keychain.find("other.example", "team/app")
    assert found.credentials == Credentials("cloud", SECRET)
    assert found.tried == (f"auths of {path}: nothing for other.example",
                           f"credential provider {PROVIDER} ({keychain.providers.config}): credentials of 'cloud'")
    assert json.loads(runs(tmp_path, "provider")[0])["request"]["image"] == "other.example/team/app"


def test_settings(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('image_credential_provider_config = "/etc/kubernetes/cp.yaml"\n'
                    'image_credential_provider_bin_dir = "/usr/libexec/cp"\n')
    cfg = lazysnap_config.load(path)
    assert cfg.image_credential_provider_config == Path("/etc/kubernetes/cp.yaml")
    assert cfg.image_credential_provider_bin_dir == Path("/usr/libexec/cp")
    path.write_text('image_credential_provider_config = "/etc/kubernetes/cp.yaml"\n')
    with pytest.raises(ConfigError, match="set both or neither"):
        lazysnap_config.load(path)
    path.write_text('image_credential_provider_config = "cp.yaml"\nimage_credential_provider_bin_dir = "/x"\n')
    with pytest.raises(ConfigError, match="must be an absolute path"):
        lazysnap_config.load(path)
    path.write_text('image_credential_provider_config = ""\nimage_credential_provider_bin_dir = ""\n')
    assert lazysnap_config.load(path) == lazysnap_config.Config()


# --------------------------------------------------------------------------- through the registry client


@pytest.fixture(scope="module")
def blob() -> Iterator[tuple[Registry, str]]:
    with Registry() as registry:
        yield registry, upload_blob(registry, "team/app", b"private bytes\n" * 100)


@pytest.fixture
def proxy(blob: tuple[Registry, str]) -> Iterator[FaultProxy]:
    with FaultProxy(blob[0].host) as p:
        yield p


def options(tmp_path: Path, **overrides: Any) -> RegistryOptions:
    return RegistryOptions(timeouts=Timeouts(connect=1.0, read=5.0, request=10.0, operation=15.0), retries=1,
                           backoff_base=0.01, backoff_max=0.05, certs_dir=None, plain_http=True,
                           docker_config=tmp_path / "docker" / "config.json", **overrides)


async def test_helper_credentials_through_the_client_rotated_and_refused(
        tmp_path: Path, helper: Path, proxy: FaultProxy, blob: tuple[Registry, str],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    digest = blob[1]
    docker_config(tmp_path, {"credHelpers": {proxy.host: HELPER}})
    proxy.require_basic({"robot": SECRET})
    with trio.fail_after(LIMIT):
        async with RegistryClient(options(tmp_path)) as client:
            for _ in range(3):
                assert (await client.fetch_blob(f"{proxy.host}/team/app", digest)).startswith(b"private bytes")
            assert len(runs(tmp_path, "helper")) == 1, "one helper run for the whole burst"

            proxy.require_basic({"robot": "rotated-" + SECRET})  # the registry changes the password...
            helper.write_text(json.dumps({"username": "robot", "secret": "rotated-" + SECRET}))  # ...and the helper
            assert (await client.fetch_blob(f"{proxy.host}/team/app", digest)).startswith(b"private bytes")
            assert len(runs(tmp_path, "helper")) == 2, "a 401 to our credentials runs the helper again at once"

            proxy.fail(403, 1, match="/blobs/")
            assert (await client.fetch_blob(f"{proxy.host}/team/app", digest)).startswith(b"private bytes")
            assert len(runs(tmp_path, "helper")) == 3, "so does a 403"

            proxy.require_basic({"robot": "nobody-knows"})
            with pytest.raises(Unauthorized) as refused:
                await client.fetch_blob(f"{proxy.host}/team/app", digest)
    message = str(refused.value)
    assert f"{proxy.host} rejected the credentials of 'robot' from docker-credential-{HELPER}" in message
    assert f"credHelpers of {tmp_path / 'docker' / 'config.json'}: docker-credential-{HELPER}" in message
    assert SECRET not in message and SECRET not in caplog.text


async def test_refusal_names_every_source_tried(tmp_path: Path, helper: Path, proxy: FaultProxy,
                                                blob: tuple[Registry, str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    helper.write_text(json.dumps({"mode": "fail"}))
    path = docker_config(tmp_path, {"credsStore": HELPER})
    config = provider_config(tmp_path, [proxy.host])
    set_provider(tmp_path, cacheKeyType="Registry", auth={proxy.host: {"username": "cloud", "password": SECRET}})
    proxy.require_bearer(users={"cloud": "something-else"}, anonymous=False)
    with trio.fail_after(LIMIT):
        async with RegistryClient(options(tmp_path, credential_provider_config=config,
                                          credential_provider_bin_dir=tmp_path / "plugins")) as client:
            with pytest.raises(Unauthorized) as refused:
                await client.fetch_blob(f"{proxy.host}/team/app", blob[1])
    message = str(refused.value)
    assert f"refused a token for repository:team/app:pull on {proxy.host} as 'cloud'" in message
    assert f"credsStore of {path}: docker-credential-{HELPER} get for {proxy.host} failed: exit status 1" in message
    assert f"auths of {path}: nothing for {proxy.host}" in message
    assert f"credential provider {PROVIDER} ({config}): credentials of 'cloud'" in message
    assert len(runs(tmp_path, "provider")) == 2, "a refused token request forgets the cached answer and asks again"
    assert SECRET not in message and SECRET not in caplog.text
