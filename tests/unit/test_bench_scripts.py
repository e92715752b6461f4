"""Every benchmark script starts (``--help``) from the repository root, so none of them is broken
by an import, and none shadows a standard-library module (``bench/operator.py`` once broke the rest)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "bench").glob("*.py"))


def test_no_file_shadows_the_standard_library() -> None:
    names = {p.stem for p in REPO.glob("*/**/*.py") if ".venv" not in p.parts and "node_modules" not in p.parts}
    names |= {p.name for p in REPO.glob("*/**/") if (p / "__init__.py").exists() and ".venv" not in p.parts}
    assert not names & sys.stdlib_module_names, sorted(names & sys.stdlib_module_names)


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_benchmark_scripts_start(script: Path) -> None:
    done = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
