"""`make demo`, one of the README's two commands, keeps working and keeps telling its story."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]


def test_the_demo_runs_both_pulls_side_by_side() -> None:
    done = subprocess.run([sys.executable, "-m", "tests.demo"], cwd=REPO, capture_output=True, text=True,
                          timeout=280)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    rows = {m["name"]: float(m["total"]) for m in re.finditer(
        r"^(?P<name>overlayfs|lazysnap)\s+[\d.]+s\s+[\d.]+s\s+(?P<total>[\d.]+)s\s+[\d.]+ MiB", output, re.MULTILINE)}
    assert set(rows) == {"overlayfs", "lazysnap"}, output
    assert rows["lazysnap"] < rows["overlayfs"], output
    assert "hello from lazysnap" in output, output
