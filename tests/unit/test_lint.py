"""No unused imports, undefined names or syntax errors anywhere (generated code excepted)."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_ruff_finds_no_errors() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is not installed (it is a test dependency: `make test` installs it)"
    done = subprocess.run(
        [ruff, "check", "--select", "F,E9", "--exclude", "snapshotter/api,snapshotter/formats/ztoc_fbs",
         "snapshotter", "tests", "benchmarks", "proto"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
