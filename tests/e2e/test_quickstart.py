"""The documented path is the tested path: ``docs/quickstart.md`` and every file in ``examples/``,
run against the local environment (``edgetune_testenv.localenv``) exactly as a newcomer would.

The quickstart's ``sh`` blocks run in order, unchanged, in one bash session (``set -euo
pipefail``) whose environment is the local environment's ``env.sh`` and whose working folder holds
links to ``charts/`` and ``examples/`` (the files a reader creates land there, not in the checkout):
``localenv.run_quickstart``, which ``bench/bench_quickstart.py`` times.
Then each example that the quickstart did not apply is applied as shipped and must reach the end
state or wait reason its ``# expect:`` line documents.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgetune_testenv.localenv import LocalEnvironment, run_quickstart

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def expectation(path: Path) -> str:
    """An example's documented end state (its ``# expect:`` line)."""
    match = re.search(r"^# expect: (.+)$", path.read_text(), flags=re.MULTILINE)
    assert match, f"{path.name} says nowhere what it ends in (# expect: …)"
    return match.group(1).strip()


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalEnvironment, Path, dict[str, str]]]:
    folder = tmp_path_factory.mktemp("local-env")
    with LocalEnvironment(folder / "env") as env:
        yield env, folder / "reader", {**os.environ, **env.variables()}


def kubectl(environ: dict[str, str], *args: str, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["kubectl", *args], env=environ, input=input_text, capture_output=True, text=True,
                          check=False, timeout=60)  # fmt: skip


def get(environ: dict[str, str], *args: str) -> dict[str, Any]:
    done = kubectl(environ, "get", *args, "-o", "json")
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_every_example_documents_what_it_ends_in() -> None:
    """Each example says what to create first (or needs nothing) and what it ends in."""
    for path in sorted(EXAMPLES.rglob("*.yaml")):
        expectation(path)
        for doc in yaml.safe_load_all(path.read_text().replace("${BASE_SHA256}", "0" * 64)):
            assert doc["apiVersion"] and doc["kind"], path


def test_the_quickstart_as_written_reaches_a_promoted_adapter_and_an_abort(
    local: tuple[LocalEnvironment, Path, dict[str, str]],
) -> None:
    env, work, environ = local
    code, took, text = run_quickstart(env, work)
    assert code == 0, f"the quickstart failed after {took:.0f} s:\n{text[-6000:]}"
    print(f"quickstart: {took:.0f} s from an empty local environment to a promoted adapter and an abort")

    rollout = get(environ, "--context", "hub", "-n", "team-a", "adapterrelease", "meter-lora-rollout")
    assert rollout["status"]["phase"] == "Promoted"
    assert rollout["status"]["stableVersion"] == rollout["status"]["canaryVersion"]  # it read "base"
    runs = [r for r in rollout["status"]["analysisRuns"] if r["phase"] == "Successful"]
    assert {r["metric"] for r in runs} == {"error-rate", "p95-latency"}  # both metrics of one step passed
    trial = get(environ, "--context", "hub", "-n", "team-a", "adapterrelease", "meter-lora-gpu-trial")
    assert trial["status"]["phase"] == "Aborted"
    promoted = rollout["status"]["canaryVersion"]
    assert trial["status"]["targetsByVersion"] == {promoted: 2}, trial["status"]  # back on the promoted one

    assert env.mlflow is not None
    from mlflow import MlflowClient  # noqa: PLC0415

    client = MlflowClient(env.mlflow.url)
    assert client.get_model_version_by_alias("meter-lora", "champion").version == promoted
    assert "REACHABLE" in text and "edge-factory" in text  # `kubectl get edgeclusters` printed the column


@pytest.mark.parametrize("name", ["trainingjob-npu.yaml", "trainingjob-gpu.yaml", "trainingjob-federated.yaml"])
def test_examples_outside_the_quickstart_reach_their_documented_state(
    local: tuple[LocalEnvironment, Path, dict[str, str]], name: str,
) -> None:  # fmt: skip
    """Applied as shipped (in a namespace of their own on the hub, after the quickstart has set up
    the fleet), each waits where its first lines say it will."""
    _, _, environ = local
    path = EXAMPLES / name
    want = expectation(path)
    namespace = "examples"
    kubectl(environ, "--context", "hub", "create", "namespace", namespace)
    done = kubectl(environ, "--context", "hub", "-n", namespace, "apply", "-f", str(path))
    assert done.returncode == 0, done.stderr
    obj_name = yaml.safe_load(path.read_text())["metadata"]["name"]
    phase, reasons = "", []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        status = get(environ, "--context", "hub", "-n", namespace, "edgetrainingjob", obj_name).get("status") or {}
        phase = status.get("phase", "")
        reasons = [f"{c['type']}/{c['reason']}" for c in status.get("conditions") or []]
        if want.split()[0] == phase and all(r in reasons for r in want.split()[1:]):
            return
        time.sleep(1)
    raise AssertionError(f"{name}: expected {want}, found phase {phase!r}, conditions {reasons}")
