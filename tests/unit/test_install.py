"""`make install`, the way to install lazysnap on a node, run into a temp dir.

The Makefile's INSTALL_* variables move the venv, the command's link, the unit and the
config; the defaults are what systemd/lazysnap.service runs. About 10 s with pip's wheel
cache, 40 s without (pyfuse3 is compiled).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


from snapshotter.config import DEFAULT_CONFIG_PATH

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "lazysnap.service"

def make_install(tmp_path: Path) -> dict[str, Path]:
    dirs = {"INSTALL_VENV": tmp_path / "venv", "INSTALL_BIN": tmp_path / "bin",
            "INSTALL_ETC": tmp_path / "etc", "INSTALL_UNIT": tmp_path / "unit"}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "MAKEFLAGS")}
    result = subprocess.run(["make", "-s", "-C", str(REPO), "install", *(f"{k}={v}" for k, v in dirs.items())],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return dirs


def exec_start(unit: Path) -> list[str]:
    line = next(line for line in unit.read_text().splitlines() if line.startswith("ExecStart="))
    return line.removeprefix("ExecStart=").split()


def test_defaults_match_the_shipped_unit() -> None:
    argv = exec_start(UNIT)
    assert argv[:2] == ["/usr/local/bin/lazysnap", "serve"]
    assert argv[argv.index("--config") + 1] == str(DEFAULT_CONFIG_PATH)
    dry = subprocess.run(["make", "-s", "-n", "-C", str(REPO), "install"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "python3 -m venv /opt/lazysnap" in dry
    assert "ln -sfn /opt/lazysnap/bin/lazysnap /usr/local/bin/lazysnap" in dry
    assert "/etc/systemd/system/lazysnap.service" in dry
    assert f"{DEFAULT_CONFIG_PATH.parent}/config.toml" in dry


def test_install_into_a_temp_prefix_and_again(tmp_path: Path) -> None:
    dirs = make_install(tmp_path)
    venv, link = dirs["INSTALL_VENV"], dirs["INSTALL_BIN"] / "lazysnap"
    assert link.is_symlink() and link.resolve() == (venv / "bin" / "lazysnap").resolve()

    # The unit runs the linked command with the installed config.
    argv = exec_start(dirs["INSTALL_UNIT"] / "lazysnap.service")
    assert argv[0] == str(link)
    config = Path(argv[argv.index("--config") + 1])
    assert config == dirs["INSTALL_ETC"] / "config.toml"
    assert config.read_text() == (REPO / "systemd" / "config.toml").read_text()

    # The command works and its package (control plane and data plane) comes from the venv.
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    version = subprocess.run([str(link), "--version"], capture_output=True, text=True, timeout=60, env=clean,
                             cwd=tmp_path, check=True).stdout
    assert version.startswith("lazysnap ")
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import snapshotter, snapshotter.daemon, snapshotter.dataplane.server;"
                            "print(snapshotter.__file__)"],
                           capture_output=True, text=True, timeout=60, env=clean, cwd=tmp_path, check=True).stdout
    assert Path(where.strip()).is_relative_to(venv)

    # Run again (an upgrade): the operator's config stays as it is.
    config.write_text('log_level = "debug"\n')
    make_install(tmp_path)
    assert config.read_text() == 'log_level = "debug"\n'
    assert link.resolve() == (venv / "bin" / "lazysnap").resolve()
