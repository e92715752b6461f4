"""checkov (PyPI, its own cached virtual environment) over what edgetune puts into a cluster: the
chart with every optional part, a trainer Job as the operator generates it, and the agent example.
Every finding left must be justified in docs/security.md ("checkov"), and every justification
there must still be needed."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from edgetune_api import EdgeTrainingJob
from edgetune_operator.reconcile.training_job import JobRef, Target, trainer_job
from edgetune_operator.settings import Settings, default_profiles
from edgetune_testenv import binaries
from tests.support import CHART_EVERYTHING
from tests.trainer_support import REPO

pytestmark = pytest.mark.slow

EVERYTHING = [*CHART_EVERYTHING, "--set=operator.requireSignedAdapters=true"]


def _documented() -> set[str]:
    text = (REPO / "docs" / "security.md").read_text()
    section = text.split("## checkov", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(CKV2?_K8S_\d+)`", section, flags=re.MULTILINE))


def test_every_checkov_finding_is_justified(tmp_path: Path) -> None:
    checkov = binaries.python_tool("checkov", binaries.CHECKOV_VERSION, "checkov")
    helm = str(binaries.binary(binaries.HELM, "helm"))
    chart = subprocess.run([helm, "template", "edgetune", str(REPO / "charts" / "edgetune"), "--kube-version=1.36.3",
                            "--namespace=edgetune-system", *EVERYTHING],
                           capture_output=True, text=True, check=True)  # fmt: skip
    (tmp_path / "chart.yaml").write_text(chart.stdout)
    spec = EdgeTrainingJob.model_validate(yaml.safe_load((REPO / "examples" / "trainingjob-gpu.yaml").read_text())).spec
    job = trainer_job(spec, JobRef("vibration", "plant", "0b7d2a66-1c1f-4bb4-9a43-0d7b4bb6f3d1"),
                      Target("edge-a", "gpu-0"), Settings(), default_profiles()["gpu"][0])  # fmt: skip
    (tmp_path / "trainer.yaml").write_text(yaml.safe_dump(job))
    for example in (REPO / "examples" / "agent").glob("*.yaml"):
        (tmp_path / f"agent-{example.name}").write_text(example.read_text())
    done = subprocess.run([str(checkov), "-d", str(tmp_path), "--framework", "kubernetes", "--skip-download",
                           "--quiet", "-o", "json"], capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode in (0, 1), done.stderr[-3000:]  # 1: findings
    report = json.loads(done.stdout)
    summary = report["summary"]
    findings = sorted({(f["check_id"], f["resource"].split(".app.kubernetes.io")[0])
                       for f in report["results"]["failed_checks"]})  # fmt: skip
    print(
        f"checkov {summary['checkov_version']}: {summary['passed']} passed, {summary['failed']} failed over "
        f"{summary['resource_count']} resources"
    )  # the summary, in the test log
    for check, resource in findings:
        print(f"  {check} {resource}")
    assert summary["parsing_errors"] == 0 and summary["resource_count"] >= 25
    failed = {check for check, _ in findings}
    documented = _documented()
    assert failed <= documented, f"unjustified checkov findings: {sorted(failed - documented)}"
    assert documented <= failed, f"justified in docs/security.md but no longer found: {sorted(documented - failed)}"
