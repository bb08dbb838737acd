"""The generated stubs in snapshotter/api must be what proto/generate.py makes now."""

import filecmp
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_current(tmp_path: Path) -> None:
    out = tmp_path / "api"
    subprocess.run([sys.executable, str(REPO / "proto" / "generate.py"), "--out", str(out)], check=True)
    committed = REPO / "snapshotter" / "api"
    generated = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    existing = sorted(p.relative_to(committed) for p in committed.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert generated == existing, "run `make proto`: the set of generated files changed"
    stale = [str(p) for p in generated if not filecmp.cmp(out / p, committed / p, shallow=False)]
    assert not stale, f"run `make proto`: stale generated files {stale}"
