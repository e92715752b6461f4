"""`make demo`, headless: the product's whole story on fresh clusters, exactly as a newcomer runs it.

The command brings up its own hub and two edge sites, installs the operator with the Helm chart
(the operator runs from the chart's Deployment under its ServiceAccount, so a permission missing
from the chart fails here), trains on the nodes, releases a good and a miswired adapter, and writes
its summary and plots. The test asserts what the story claims, from the summary the command wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
PNG = b"\x89PNG\r\n\x1a\n"


def test_the_demo_tells_the_whole_story(tmp_path: Path) -> None:
    results = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "edgetune_testenv", "demo", "--headless", f"--workdir={tmp_path / 'work'}",
         f"--results={results}"],
        capture_output=True, text=True, timeout=1200, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    summary = json.loads((results / "summary.json").read_text())
    failed = [c for c in summary["checks"] if not c["passed"]]
    assert not failed and len(summary["checks"]) >= 15, failed
    # every Grafana panel's query, run over the demo's time range, shows data
    series = summary["dashboard_series"]
    assert len(series) >= 20 and all(n > 0 for n in series.values()), series

    assert summary["releases"] == {"meters-rollout": "Promoted", "meters-miswired": "RolledBack"}
    for site in summary["accuracy"]:  # the shift hurts, the released adapter recovers, the miswired one inverts
        assert site["base"] < 0.7 and site["good"] >= 0.85 and site["miswired"] < 0.3, site
    trainers = summary["trainers"]
    assert len(trainers) == 8 and all(t["phase"] == "Succeeded" for t in trainers)
    assert all(0 < t["peak_memory_bytes"] <= t["budget_bytes"] for t in trainers)
    assert all(0 < t["package_bytes"] < 20_000 for t in trainers)  # KB-sized deltas, signed and hashed
    fedavg = {t["version"] for t in trainers if t["job"] == "meters-gpu-fedavg"}
    assert fedavg == {summary["versions"]["good"]}  # one averaged adapter from every GPU node

    for name in ("loss.png", "memory-energy.png", "rollout.png"):
        assert (results / name).read_bytes()[:8] == PNG, name
    assert "checks passed" in done.stdout
