"""The TOML files shipped in systemd/: each parses, and the containerd snippets carry the
keys lazysnap depends on, spelled as containerd reads them.

- config version 2 (containerd 1.6/1.7): systemd/containerd-config.toml
- config version 3 (containerd 2.x): systemd/containerd2-config.toml
Key names: containerd's cmd/containerd/server/config/config.go (ProxyPlugin),
internal/cri/config/config.go (CRI image config), plugins/transfer/plugin.go
(unpack_config) and core/transfer/local/pull.go (enable_remote_snapshot_annotations).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from snapshotter.config import Config
from tests.harness.containerd import CRI_TEMPLATE, PROXY_TEMPLATE

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
SHIPPED = sorted(SYSTEMD.glob("*.toml"))
SNIPPETS = sorted(p for p in SHIPPED if p.name.startswith("containerd"))
CRI_V2 = "io.containerd.grpc.v1.cri"       # version 2: [plugins."io.containerd.grpc.v1.cri".containerd]
CRI_V3 = "io.containerd.cri.v1.images"     # version 3: [plugins."io.containerd.cri.v1.images"]
TRANSFER = "io.containerd.transfer.v1.local"
DEFAULTS = Config()


def load(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text())


def by_version() -> dict[int, Path]:
    return {load(p)["version"]: p for p in SNIPPETS}


def cri_images(doc: dict[str, Any]) -> dict[str, Any]:
    """The table holding CRI's `snapshotter` and `disable_snapshot_annotations` for the file's version."""
    plugins = doc.get("plugins", {})
    if doc["version"] == 2:
        return plugins[CRI_V2]["containerd"]
    return plugins[CRI_V3]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_toml_parses(path: Path) -> None:
    assert isinstance(load(path), dict)


def test_a_snippet_for_each_config_version() -> None:
    assert SNIPPETS and set(by_version()) == {2, 3}
    assert by_version()[2].name == "containerd-config.toml"
    assert by_version()[3].name == "containerd2-config.toml"


@pytest.mark.parametrize("path", SNIPPETS, ids=lambda p: p.name)
def test_proxy_plugin_points_at_lazysnaps_socket(path: Path) -> None:
    proxy = load(path)["proxy_plugins"]["lazysnap"]
    assert proxy["type"] == "snapshot"
    # containerd dials the address as given: a plain path (no unix://), the same as lazysnap's default.
    assert proxy["address"] == str(DEFAULTS.address)
    assert proxy["address"] == load(SYSTEMD / "config.toml")["address"]
    exports = proxy.get("exports", {})
    # Exports is a map[string]string in containerd: a TOML boolean or number would not decode.
    assert all(isinstance(v, str) for v in exports.values()), exports
    if "root" in exports:
        assert exports["root"] == str(DEFAULTS.root)


@pytest.mark.parametrize("path", SNIPPETS, ids=lambda p: p.name)
def test_cri_pulls_into_lazysnap_with_annotations(path: Path) -> None:
    images = cri_images(load(path))
    assert images["snapshotter"] == "lazysnap"
    assert images["disable_snapshot_annotations"] is False


def test_version_2_has_no_version_3_tables() -> None:
    doc = load(by_version()[2])
    assert set(doc.get("plugins", {})) == {CRI_V2}


def test_version_3_exports_annotations_for_the_transfer_service() -> None:
    doc = load(by_version()[3])
    assert doc["proxy_plugins"]["lazysnap"]["exports"]["enable_remote_snapshot_annotations"] == "true"
    assert CRI_V2 not in doc["plugins"]
    unpack = doc["plugins"][TRANSFER]["unpack_config"]
    snapshotters = {u["snapshotter"] for u in unpack}
    # The list replaces containerd's default, so the default snapshotter must stay in it.
    assert {"lazysnap", "overlayfs"} <= snapshotters
    for entry in unpack:
        assert set(entry) <= {"platform", "snapshotter", "differ", "config_type", "layer_types", "optional"}
        assert entry["platform"].startswith("linux")


def test_the_tested_containerd_config_matches_the_version_2_snippet() -> None:
    """tests/harness/containerd.py writes the config every containerd test runs with."""
    snippet = load(by_version()[2])
    harness = tomllib.loads("version = 2\n"
                            + CRI_TEMPLATE.format(sandbox_image="pause", cni="/cni", snapshotter="lazysnap")
                            + PROXY_TEMPLATE.format(name="lazysnap", address=DEFAULTS.address))
    assert harness["proxy_plugins"]["lazysnap"]["type"] == snippet["proxy_plugins"]["lazysnap"]["type"]
    assert harness["proxy_plugins"]["lazysnap"]["address"] == snippet["proxy_plugins"]["lazysnap"]["address"]
    assert cri_images(harness) == cri_images(snippet)


def containerd_version() -> tuple[int, ...] | None:
    if shutil.which("containerd") is None:
        return None
    out = subprocess.run(["containerd", "--version"], capture_output=True, text=True, timeout=30).stdout
    found = re.search(r"\bv?(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(n) for n in found.groups()) if found else None


def test_containerd_reads_the_version_2_snippet() -> None:
    """containerd's own parser (`config dump` drops keys it does not know): Debian 12 ships 1.6."""
    version = containerd_version()
    assert version is not None and version[0] == 1, (
        f"needs containerd 1.x (Debian 12's `containerd` package, installed by `make test`), found {version}")
    dump = subprocess.run(["containerd", "--config", str(by_version()[2]), "config", "dump"],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    doc = tomllib.loads(dump)
    assert doc["proxy_plugins"]["lazysnap"]["type"] == "snapshot"
    assert doc["proxy_plugins"]["lazysnap"]["address"] == str(DEFAULTS.address)
    assert cri_images(doc)["snapshotter"] == "lazysnap"
    assert cri_images(doc)["disable_snapshot_annotations"] is False
