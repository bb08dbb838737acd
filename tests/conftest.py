"""The three tiers of the suite, each runnable alone (`make test-unit`, `test-component`,
`test-system`; `make test` runs them all):

- unit: code alone, no root, no servers or mounts (a short tool such as ruff may run);
- component: one real part at a time (a FUSE or EROFS mount, a registry, one `lazysnap serve`);
- system (`integration`): real containerd, registry and lazysnap, running containers.

A test's tier is read off what it uses, so it cannot drift from a list: tests under
`integration/` are system; a unit-directory test is component when its module imports a
harness that starts processes or mounts, or when it asks for a fixture that does.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

HERE = Path(__file__).parent
COMPONENT_IMPORTS = (
    "pyfuse3", "tests.harness.registry", "tests.harness.lazysnap", "tests.harness.containerd",
    "tests.harness.faultproxy", "tests.harness.hostile", "tests.harness.procs", "tests.unit.fuse_layers",
    "tests.unit.soci_images", "snapshotter.fuse.mount", "snapshotter.layers.erofs",
)
"""Imports that mean a module starts a server, talks to a real part, or mounts."""
NEEDS_ROOT = frozenset({"test_estargz_writer.py", "test_snapshots.py", "test_whole_apply.py", "test_whole_pull.py",
                        "test_whole_pulls.py"})
"""Unit-directory modules that need root without a mount (they chown, make device nodes): found
by running the unit tier as `nobody` (64 of 787 tests failed; none once these are component)."""
COMPONENT_FIXTURES = frozenset({"daemon", "client", "registry", "image", "mnt", "needs_fuse", "short_tmp"})
"""tests/unit/conftest.py's fixtures that start a process or need root."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "unit: code alone: no root, no servers or mounts (make test-unit)")
    config.addinivalue_line("markers", "component: one real part: a mount, a registry or one daemon (make test-component)")


@cache
def imports_a_component(path: Path) -> bool:
    tree = ast.parse(path.read_text(), str(path))
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return any(name == c or name.startswith(c + ".") for name in names for c in COMPONENT_IMPORTS)


def tier(item: pytest.Item) -> str:
    path = Path(str(item.fspath))
    if HERE / "integration" in path.parents:
        return "integration"
    if path.name in NEEDS_ROOT or imports_a_component(path) or COMPONENT_FIXTURES & set(getattr(item, "fixturenames", ())):
        return "component"
    return "unit"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        name = tier(item)
        if name != "integration":  # integration/conftest.py marks its own
            item.add_marker(getattr(pytest.mark, name))
