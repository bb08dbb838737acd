"""containerd hosts.toml semantics: which endpoints, in which order, with which TLS and headers."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapshotter.registry.errors import HostsConfigError
from snapshotter.registry.hosts import Capability, Endpoint, HostsConfig, TLSSettings, for_capability, is_loopback


def write(certs: Path, host_dir: str, text: str) -> Path:
    directory = certs / host_dir
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hosts.toml").write_text(text)
    return directory


def urls(endpoints: list[Endpoint]) -> list[str]:
    return [str(e) for e in endpoints]


def test_defaults_without_configuration(tmp_path: Path) -> None:
    hosts = HostsConfig(tmp_path)
    assert urls(hosts.endpoints("registry.example.com")) == ["https://registry.example.com/v2"]
    assert urls(hosts.endpoints("docker.io")) == ["https://registry-1.docker.io/v2"]
    [hub] = hosts.endpoints("docker.io")
    assert hub.namespace is None and hub.capabilities == frozenset(Capability)
    for local in ("localhost", "localhost:5000", "127.0.0.1:5000", "127.1.2.3", "[::1]:5000"):
        assert hosts.endpoints(local)[0].scheme == "http", local
    assert HostsConfig(None).endpoints("reg.io:443")[0].url("a/b", "blobs", "sha256:x") == \
        "https://reg.io:443/v2/a/b/blobs/sha256:x"


def test_plain_http_override_applies_to_the_implicit_upstream(tmp_path: Path) -> None:
    assert HostsConfig(tmp_path, plain_http=True).endpoints("reg.example")[0].scheme == "http"
    write(tmp_path, "reg.example", 'server = "https://reg.example"\n[host."https://mirror.example"]\n')
    explicit = HostsConfig(tmp_path, plain_http=True).endpoints("reg.example")
    assert [e.scheme for e in explicit] == ["https", "https"], "explicit URLs keep their scheme"


def test_is_loopback() -> None:
    assert is_loopback("localhost") and is_loopback("127.0.0.1:1") and is_loopback("[::1]:80") and is_loopback("::1")
    assert not is_loopback("10.0.0.1:5000") and not is_loopback("localhost.example.com") and not is_loopback("reg.io")


def test_mirrors_in_file_order_then_server(tmp_path: Path) -> None:
    write(tmp_path, "docker.io", """
server = "https://registry-1.docker.io"
capabilities = ["pull", "resolve"]

[host."https://zz-mirror.example"]
  capabilities = ["pull"]

[host."http://aa-mirror.example:5000/cache"]
  capabilities = ["pull", "resolve"]
  [host."http://aa-mirror.example:5000/cache".header]
    X-Single = "one"
    X-Many = ["a", "b"]

[host."mm-mirror.example/custom/api"]
  override_path = true
""")
    endpoints = HostsConfig(tmp_path).endpoints("docker.io")
    assert urls(endpoints) == [
        "https://zz-mirror.example/v2",
        "http://aa-mirror.example:5000/cache/v2",
        "https://mm-mirror.example/custom/api",
        "https://registry-1.docker.io/v2",
    ]
    zz, aa, mm, upstream = endpoints
    assert zz.capabilities == {Capability.PULL}
    assert aa.capabilities == {Capability.PULL, Capability.RESOLVE}
    assert mm.capabilities == frozenset(Capability), "no capabilities key means all of them"
    assert upstream.capabilities == {Capability.PULL, Capability.RESOLVE}
    assert aa.headers == (("X-Single", "one"), ("X-Many", "a"), ("X-Many", "b"))
    assert [e.namespace for e in endpoints] == ["docker.io", "docker.io", "docker.io", None]
    assert [e.mirror for e in endpoints] == [True, True, True, False], "mirrors are read without HEAD"
    assert aa.url("library/busybox", "manifests", "latest") == \
        "http://aa-mirror.example:5000/cache/v2/library/busybox/manifests/latest?ns=docker.io"
    assert mm.url("x/y", "blobs", "d") == "https://mm-mirror.example/custom/api/x/y/blobs/d?ns=docker.io"
    assert urls(for_capability(endpoints, Capability.PULL, Capability.RESOLVE)) == [
        "http://aa-mirror.example:5000/cache/v2", "https://mm-mirror.example/custom/api",
        "https://registry-1.docker.io/v2"]


def test_tls_settings_resolve_relative_paths(tmp_path: Path) -> None:
    directory = write(tmp_path, "reg.example", """
server = "https://reg.example"
ca = "ca.pem"

[host."https://m1.example"]
  skip_verify = true
[host."https://m2.example"]
  ca = ["/etc/ssl/one.pem", "two.pem"]
  client = [["c.cert", "c.key"], "both.pem"]
""")
    m1, m2, server = HostsConfig(tmp_path).endpoints("reg.example")
    assert m1.tls == TLSSettings(skip_verify=True)
    assert m2.tls.ca == (Path("/etc/ssl/one.pem"), directory / "two.pem")
    assert m2.tls.client_certs == ((directory / "c.cert", directory / "c.key"), (directory / "both.pem", None))
    assert server.tls == TLSSettings(ca=(directory / "ca.pem",))


def test_without_server_the_default_upstream_comes_last_with_top_level_settings(tmp_path: Path) -> None:
    directory = write(tmp_path, "reg.example:5000", """
ca = "reg.crt"
[header]
  Authorization-Hint = "x"
[host."http://mirror.local:8080"]
""")
    endpoints = HostsConfig(tmp_path).endpoints("reg.example:5000")
    assert urls(endpoints) == ["http://mirror.local:8080/v2", "https://reg.example:5000/v2"]
    assert endpoints[1].tls.ca == (directory / "reg.crt",)
    assert endpoints[1].headers == (("Authorization-Hint", "x"),)
    assert endpoints[1].capabilities == frozenset(Capability)


def test_directory_lookup_order(tmp_path: Path) -> None:
    write(tmp_path, "_default", '[host."https://fallback-mirror.example"]\n')
    assert urls(HostsConfig(tmp_path).endpoints("other.example")) == [
        "https://fallback-mirror.example/v2", "https://other.example/v2"]
    write(tmp_path, "reg.example:5000", 'server = "https://colon.example"\n')
    assert urls(HostsConfig(tmp_path).endpoints("reg.example:5000")) == ["https://colon.example/v2"]
    write(tmp_path, "reg.example_5000_", 'server = "https://underscore.example"\n')
    assert urls(HostsConfig(tmp_path).endpoints("reg.example:5000")) == ["https://underscore.example/v2"], \
        "host_port_ is looked up before host:port, as in containerd"


def test_docker_certs_layout_without_hosts_toml(tmp_path: Path) -> None:
    directory = tmp_path / "reg.example"
    directory.mkdir()
    for name in ("ca.crt", "client.cert", "client.key", "lonely.cert", "notes.txt"):
        (directory / name).write_text("x")
    [endpoint] = HostsConfig(tmp_path).endpoints("reg.example")
    assert str(endpoint) == "https://reg.example/v2"
    assert endpoint.tls.ca == (directory / "ca.crt",)
    assert set(endpoint.tls.client_certs) == {(directory / "client.cert", directory / "client.key"),
                                              (directory / "lonely.cert", None)}


@pytest.mark.parametrize(("text", "why"), [
    ("server = ", "not valid TOML"),
    ('[host."https://m.example"]\ncapabilities = ["pull", "fly"]\n', "unknown capability"),
    ('[host."https://m.example"]\nskip_verify = "yes"\n', "skip_verify must be true or false"),
    ('[host."https://m.example"]\nca = 3\n', "ca must be a string or a list"),
    ('[host."https://m.example"]\nclient = [["a"]]\n', "bad client entry"),
    ('[host."https://m.example"]\nheader = "x"\n', "header must be a table"),
    ("server = 5\n", "server"),
    ('host = "x"\n', "host"),
])
def test_broken_hosts_toml_is_a_clear_error(tmp_path: Path, text: str, why: str) -> None:
    write(tmp_path, "reg.example", text)
    with pytest.raises(HostsConfigError, match=why) as info:
        HostsConfig(tmp_path).endpoints("reg.example")
    assert "reg.example/hosts.toml" in str(info.value)


def test_unknown_keys_are_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(tmp_path, "reg.example", '[host."https://m.example"]\n  skipverify = true\n')
    endpoints = HostsConfig(tmp_path).endpoints("reg.example")
    assert endpoints[0].tls.skip_verify is False
    assert "skipverify" in caplog.text


def test_dial_timeout_is_a_go_duration(tmp_path: Path) -> None:
    """Spegel writes `dial_timeout` for its mirrors, so a dead node is given up on quickly."""
    directory = tmp_path / "ghcr.io"
    directory.mkdir()
    (directory / "hosts.toml").write_text(
        "server = 'https://ghcr.io'\n"
        "[host.'http://10.0.0.5:30020']\ncapabilities = ['pull', 'resolve']\ndial_timeout = '200ms'\n"
        "[host.'http://10.0.0.5:30021']\ncapabilities = ['pull']\ndial_timeout = '1m1.5s'\n")
    spegel, other, upstream = HostsConfig(tmp_path).endpoints("ghcr.io")
    assert (spegel.dial_timeout, other.dial_timeout, upstream.dial_timeout) == (0.2, 61.5, None)
    assert spegel.mirror and not upstream.mirror
    (directory / "hosts.toml").write_text("[host.'http://10.0.0.5:30020']\ndial_timeout = 'soon'\n")
    with pytest.raises(HostsConfigError, match="dial_timeout must be a duration"):
        HostsConfig(tmp_path).endpoints("ghcr.io")


def test_clients_share_the_system_ca_context_but_read_named_ca_files_afresh() -> None:
    """Loading the system's CAs took 26 ms on the trio thread for every new client; certificate
    files named in hosts.toml are still read at each use, as containerd reads them."""
    import ssl

    import certifi

    from snapshotter.registry.transport import _ssl_context

    system = _ssl_context(TLSSettings())
    assert _ssl_context(TLSSettings()) is system and system.verify_mode == ssl.CERT_REQUIRED
    insecure = _ssl_context(TLSSettings(skip_verify=True))
    assert insecure is not system and insecure.verify_mode == ssl.CERT_NONE and not insecure.check_hostname
    named = TLSSettings(ca=(Path(certifi.where()),))
    first, second = _ssl_context(named), _ssl_context(named)
    assert first is not second and first is not system
    assert first.cert_store_stats()["x509_ca"] > 0
