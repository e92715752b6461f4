"""Every benchmark runs in its ``--smoke`` mode (tiny sizes, the same code path) and ends with one JSON
object on its last stdout line: the code that turns measurements into published figures
(percentiles, ratios, spreads, metric parsers) runs in CI, not only ``--help``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "bench").glob("*.py"))


def test_every_benchmark_has_a_smoke_mode() -> None:
    lacking = [p.name for p in SCRIPTS if "--smoke" not in p.read_text()]
    assert lacking == []


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_a_benchmark_smoke_run_ends_with_one_json_object(script: Path) -> None:
    done = subprocess.run([sys.executable, str(script), "--smoke"], cwd=REPO, capture_output=True, text=True,
                          timeout=900, check=False)  # fmt: skip
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])
    last = done.stdout.strip().splitlines()[-1]
    figures = json.loads(last)
    assert isinstance(figures, dict) and figures, last
    assert figures.get("smoke", True) is True or figures.get("scale") == "smoke", last
    if script.name == "bench_operator.py":  # both life cycles, the happy one's headline figures named as published
        for key in ("happy_api_requests_per_job", "happy_p99_ratio", "happy_rss_mb", "failure_api_requests_per_job"):
            assert isinstance(figures.get(key), int | float), (key, last)
