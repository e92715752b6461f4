"""kubectl edgetune's rendering: what a person (or a script reading a pipe) sees for jobs and releases."""

from __future__ import annotations

from typing import Any

from edgetune_cli.view import plain, render, summary_condition

JOB: dict[str, Any] = {
    "kind": "EdgeTrainingJob", "metadata": {"name": "meters", "namespace": "demo"},
    "spec": {"placement": {"accelerator": "npu"}, "budgets": {"memory": "2Gi"}},
    "status": {"phase": "Training", "progress": "1/2", "targets": [
        {"cluster": "edge-farm", "node": "farm-npu-0", "phase": "Succeeded", "step": 120, "loss": 0.0123,
         "peakMemoryBytes": 880_000_000, "mlflowVersion": "3"},
        {"cluster": "edge-farm", "node": "farm-npu-1", "phase": "Failed", "message": "OOMKilled: over budgets.memory"},
    ]},
}  # fmt: skip
RELEASE: dict[str, Any] = {
    "kind": "AdapterRelease", "metadata": {"name": "rollout", "namespace": "demo"},
    "spec": {"adapter": {"registeredModel": "meters", "version": "5"},
             "strategy": {"canary": {"steps": [{"setWeight": 50}, {"analysis": {}}, {"setWeight": 100}]}}},
    "status": {"phase": "RolledBack", "currentStep": 1, "canaryWeight": 0, "canaryVersion": "5", "stableVersion": "4",
               "targetsByCluster": {"edge-a": {"4": 2}, "edge-b": {"4": 1, "base": 1}},
               "analysisRuns": [{"metric": "accuracy", "phase": "Failed", "values": [0.0481], "message": "outside"}],
               "conditions": [{"type": "Progressing", "status": "True", "reason": "StepDone", "message": "ok"},
                              {"type": "RolledBack", "status": "False", "reason": "AnalysisFailed",
                               "message": "accuracy 0.048 outside >= 0.8"}]},
}  # fmt: skip


def test_the_tree_shows_each_trainer_and_each_clusters_versions_in_plain_text() -> None:
    text = plain(render([JOB], [RELEASE], rich=False))
    assert "EdgeTrainingJob meters  Training  1/2  npu" in text
    assert "node farm-npu-0  Succeeded  step 120  loss 0.0123  peak 839 MiB / 2Gi  v3" in text
    assert "node farm-npu-1  Failed  OOMKilled: over budgets.memory" in text
    assert "AdapterRelease rollout  RolledBack  meters v5 (stable v4)  step 1/3  weight 0 %" in text
    assert "cluster edge-b: 1 on v4, 1 on base" in text
    assert "analysis accuracy Failed [0.0481] outside" in text
    assert "AnalysisFailed: accuracy 0.048 outside >= 0.8" in text
    assert "\x1b[" not in text and "[red]" not in text  # no colour codes or markup in a pipe


def test_the_summary_condition_prefers_a_false_one() -> None:
    assert summary_condition(RELEASE).startswith("AnalysisFailed")
    assert summary_condition({"status": {}}) == ""
    assert "no EdgeTrainingJobs or AdapterReleases" in plain(render([], [], rich=False))
