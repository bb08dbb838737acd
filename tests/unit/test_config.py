from pathlib import Path

import pytest

from snapshotter import config
from snapshotter.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "systemd" / "config.toml"


def test_defaults_when_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    cfg = config.load(None)
    assert cfg.root == Path("/var/lib/lazysnap")
    assert cfg.address == Path("/run/lazysnap/lazysnap.sock")


def test_flags_override_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('root = "/srv/ls"\nlog_level = "debug"\n')
    cfg = config.load(path, {"root": Path("/x"), "log_level": None})
    assert cfg.root == Path("/x") and cfg.log_level == "debug"


def test_example_config_is_valid_and_documents_every_setting() -> None:
    cfg = config.load(EXAMPLE)
    assert cfg == config.Config()
    text = EXAMPLE.read_text()
    for field in config.Config.__dataclass_fields__:
        assert f"{field} =" in text, f"systemd/config.toml does not document {field}"


@pytest.mark.parametrize(
    "text, message",
    [
        ("roots = '/x'", "unknown setting"),
        ("root = 'relative'", "absolute"),
        ("address = 'unix:///run/x.sock'", "absolute"),
        ("log_level = 'loud'", "log_level"),
        ("grpc_workers = 'many'", "must be a int"),
        ("grpc_workers = true", "must be a int"),
        ("root = [", "config file"),
        (f"address = '/{'x' * 120}'", "longer than"),
        ("metrics_address = '9650'", "host:port"),
        ("metrics_address = 'localhost:99999'", "host:port"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config.load(path)


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml")
