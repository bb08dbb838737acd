"""The house rules, checked on the source, so they cannot drift again.

- `formats/` stands on the ground floor: it imports nothing else of lazysnap.
- Only `fuse/` imports pyfuse3; only `registry/` imports httpx; only the gRPC server
  (`service.py`), the CRI proxy (`cri_proxy.py`), their clients, the table of status codes
  (`grpc_status.py`) and the generated stubs import grpc.
- `layers/` never imports what stands above it (`fuse/`, `dataplane/`, the daemon).
- `fetch/` stands between the cache and registry below and `layers/` above: it imports
  none of `layers/`, `fuse/`, `dataplane/`, the daemon, the service or the command line.
- The data plane process loads neither the HTTP nor the gRPC stack, and the control
  plane never loads pyfuse3 (checked by importing them in a fresh interpreter).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "snapshotter"
GENERATED = ("api", "formats/ztoc_fbs")
GRPC_ALLOWED = ("service.py", "grpc_status.py", "status.py", "cri_proxy.py", "containerd/", "api/")


def modules() -> dict[str, set[str]]:
    """Each module (path relative to the package) -> the absolute names it imports."""
    out: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(GENERATED):
            continue
        package = ["snapshotter", *path.relative_to(PACKAGE).parent.parts]
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                module = ".".join([*base, node.module] if node.module else base)
                names.add(module)
                names.update(f"{module}.{alias.name}" for alias in node.names)
        out[rel] = names
    return out


MODULES = modules()


def importers(prefix: str) -> set[str]:
    return {rel for rel, names in MODULES.items() if any(n == prefix or n.startswith(prefix + ".") for n in names)}


def test_formats_import_nothing_above_them() -> None:
    offenders = {rel: sorted(n for n in names if n.startswith("snapshotter.") and not n.startswith("snapshotter.formats"))
                 for rel, names in MODULES.items() if rel.startswith("formats/")}
    assert {rel: names for rel, names in offenders.items() if names} == {}


@pytest.mark.parametrize("library,allowed", [("pyfuse3", ("fuse/",)), ("httpx", ("registry/",)),
                                             ("grpc", GRPC_ALLOWED)])
def test_only_its_own_corner_imports_a_library(library: str, allowed: tuple[str, ...]) -> None:
    assert sorted(rel for rel in importers(library) if not rel.startswith(allowed)) == []


def test_layers_never_import_what_stands_above_them() -> None:
    above = ("snapshotter.fuse", "snapshotter.dataplane", "snapshotter.daemon", "snapshotter.service",
             "snapshotter.snapshots", "snapshotter.cli")
    offenders = {rel: sorted(n for n in names if n.startswith(above))
                 for rel, names in MODULES.items() if rel.startswith("layers/")}
    assert {rel: names for rel, names in offenders.items() if names} == {}


def test_fetch_never_imports_what_stands_above_it() -> None:
    above = ("snapshotter.layers", "snapshotter.fuse", "snapshotter.dataplane", "snapshotter.daemon",
             "snapshotter.service", "snapshotter.cli")
    offenders = {rel: sorted(n for n in names if n in above or n.startswith(tuple(f"{a}." for a in above)))
                 for rel, names in MODULES.items() if rel.startswith("fetch/")}
    assert any(rel.startswith("fetch/") for rel in MODULES), "the fetch package has moved: update this rule"
    assert {rel: names for rel, names in offenders.items() if names} == {}


@pytest.mark.parametrize("module,absent", [
    ("snapshotter.dataplane.server", ("httpx", "grpc")),
    ("snapshotter.dataplane.__main__", ("httpx", "grpc")),
    ("snapshotter.daemon", ("pyfuse3",)),
])
def test_what_a_process_loads(module: str, absent: tuple[str, ...]) -> None:
    code = (f"import importlib, sys; importlib.import_module({module!r}); "
            f"print(sorted(m for m in {absent!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"importing {module} loads {done.stdout.strip()}"


def test_the_tiers_are_read_off_what_a_module_uses() -> None:
    """tests/conftest.py: `make test-unit` must run without root or processes."""
    from tests.conftest import imports_a_component

    tests = Path(__file__).parents[1]
    assert imports_a_component(tests / "unit" / "test_registry_client.py"), "starts a registry and a fault proxy"
    assert imports_a_component(tests / "unit" / "test_fuse_ops.py"), "mounts FUSE"
    assert not imports_a_component(tests / "unit" / "test_estargz_toc.py"), "pure parsing"
    assert not imports_a_component(tests / "unit" / "test_house_rules.py")
