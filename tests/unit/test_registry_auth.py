"""Credentials from Docker's config.json and WWW-Authenticate parsing (the token flow is in test_registry_live;
credential helpers and kubelet credential providers in test_registry_credentials)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import trio

from snapshotter.registry.auth import Challenge, Credentials, Keychain, parse_challenges
from snapshotter.registry.options import default_docker_config


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def lookup(keychain: Keychain, host: str) -> Credentials | None:
    return trio.run(keychain.find, host).credentials


def config(tmp_path: Path, doc: object) -> Keychain:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return Keychain(path)


def test_auth_field_username_password_and_identity_token(tmp_path: Path) -> None:
    keychain = config(tmp_path, {"auths": {
        "reg.example": {"auth": b64("alice:s3:cr:et")},
        "https://other.example:5000/v2/": {"username": "bob", "password": "pw"},
        "tok.example": {"identitytoken": "refresh-me"},
        "https://index.docker.io/v1/": {"auth": b64("hubuser:hubpass")},
    }})
    assert lookup(keychain, "reg.example") == Credentials("alice", "s3:cr:et"), "password may contain colons"
    assert lookup(keychain, "other.example:5000") == Credentials("bob", "pw"), "URL keys match their host"
    assert lookup(keychain, "other.example") is None, "the port is part of the key"
    assert lookup(keychain, "tok.example") == Credentials(identity_token="refresh-me")
    for hub in ("docker.io", "registry-1.docker.io", "index.docker.io"):
        assert lookup(keychain, hub) == Credentials("hubuser", "hubpass"), hub
    assert lookup(keychain, "unknown.example") is None
    assert Credentials("u", "p").basic() == "Basic " + b64("u:p")


def test_file_is_reread_on_every_lookup(tmp_path: Path) -> None:
    keychain = config(tmp_path, {"auths": {"reg.example": {"auth": b64("old:1")}}})
    assert lookup(keychain, "reg.example") == Credentials("old", "1")
    (tmp_path / "config.json").write_text(json.dumps({"auths": {"reg.example": {"auth": b64("new:2")}}}))
    assert lookup(keychain, "reg.example") == Credentials("new", "2")


def test_docker_config_env_and_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "dc"))
    assert default_docker_config() == tmp_path / "dc" / "config.json"
    (tmp_path / "dc").mkdir()
    (tmp_path / "dc" / "config.json").write_text(json.dumps({"auths": {"r.io": {"auth": b64("e:v")}}}))
    assert lookup(Keychain(), "r.io") == Credentials("e", "v")
    monkeypatch.delenv("DOCKER_CONFIG")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_docker_config() == tmp_path / "home" / ".docker" / "config.json"
    assert lookup(Keychain(), "r.io") is None, "a missing config.json means anonymous"


@pytest.mark.parametrize("doc", ["{not json", "[1, 2]", {"auths": {"r.io": {"auth": "!!!notbase64"}}},
                                 {"auths": {"r.io": {"username": 5, "password": "x"}}}])
def test_broken_config_means_anonymous_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                      doc: object) -> None:
    assert lookup(config(tmp_path, doc), "r.io") is None
    assert "config.json" in caplog.text


def test_parse_bearer_challenge() -> None:
    [c] = parse_challenges(['Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
                            'scope="repository:library/busybox:pull"'])
    assert c == Challenge("bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                                     "scope": "repository:library/busybox:pull"})


def test_parse_several_challenges_quoting_and_case() -> None:
    got = parse_challenges(['Basic realm="x, y", BEARER Realm=https://a.example/t , service="s \\"q\\""',
                            'Negotiate'])
    assert got == [Challenge("basic", {"realm": "x, y"}),
                   Challenge("bearer", {"realm": "https://a.example/t", "service": 's "q"'}),
                   Challenge("negotiate", {})]
    assert parse_challenges([]) == [] and parse_challenges([""]) == []
