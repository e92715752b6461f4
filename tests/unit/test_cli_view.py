"""kubectl edgetune's rendering: what a person (or a script reading a pipe) sees for jobs and releases."""

from __future__ import annotations

from typing import Any

import pytest

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


class _Hub:
    """The hub as the plugin's controls see it: one paused release; records spec patches."""

    namespace = "demo"

    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []

    def get(self, plural: str, name: str) -> dict[str, Any]:
        return {"kind": "AdapterRelease", "spec": {"paused": True},
                "status": {"phase": "Paused", "canaryVersion": "5"}}  # fmt: skip

    def patch_spec(self, plural: str, name: str, patch: dict[str, Any]) -> None:
        self.patches.append(patch)


class _Out:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def line(self, text: str) -> None:
        self.lines.append(text)

    error = line


def test_abort_says_it_revokes_and_wants_a_confirmation(monkeypatch: Any, capsys: Any) -> None:
    """Abort revokes the version for good: the help says so, and it is not done by a slip."""
    import io  # noqa: PLC0415

    from edgetune_cli.__main__ import EXIT_USAGE, cmd_control, parser  # noqa: PLC0415

    with pytest.raises(SystemExit):
        parser().parse_args(["abort", "--help"])
    assert "revoke this version for good" in " ".join(capsys.readouterr().out.split())
    hub, out = _Hub(), _Out()
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a terminal
    assert cmd_control(hub, parser().parse_args(["abort", "rollout"]), out) == EXIT_USAGE  # type: ignore[arg-type]
    assert hub.patches == [] and "aborting revokes 5 for good; pass --yes" in out.lines[-1]
    assert cmd_control(hub, parser().parse_args(["abort", "rollout", "--yes"]), out) == 0  # type: ignore[arg-type]
    assert hub.patches == [{"abort": True}]


def test_every_flag_and_argument_of_every_command_has_help() -> None:
    import argparse  # noqa: PLC0415

    from edgetune_cli.__main__ import parser  # noqa: PLC0415

    top = parser()
    missing = [f"kubectl edgetune {a.dest}" for a in top._actions if a.help is None]
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        missing += [f"{name} {a.dest}" for a in command._actions if a.help is None]
    assert missing == []


def test_logs_are_text_and_a_job_without_trainers_is_not_found(monkeypatch: Any) -> None:
    from edgetune_cli.__main__ import EXIT_NOT_FOUND, main  # noqa: PLC0415
    from edgetune_cli.client import decode_log  # noqa: PLC0415

    assert decode_log(b'{"ts": 1}\n\xff') == '{"ts": 1}\n\ufffd'  # was printed as b'{"ts": 1}\n'

    class Hub(_Hub):
        def __init__(self, *args: Any) -> None:
            super().__init__()

        def require_crds(self) -> None:
            pass

        def get(self, plural: str, name: str) -> dict[str, Any]:
            return {"kind": "EdgeTrainingJob", "status": {"phase": "WaitingForData", "conditions": [
                {"type": "DataSufficient", "status": "False", "reason": "WaitingForData", "message": "no samples"}]}}

    monkeypatch.setattr("edgetune_cli.__main__.Hub", Hub)
    assert main(["logs", "job/meters"]) == EXIT_NOT_FOUND  # was 64, a usage error


def _c(kind: str, status: str, reason: str, message: str) -> dict[str, str]:
    return {"type": kind, "status": status, "reason": reason, "message": message}


STATUS_TEXTS = [
    # (what a person saw, the object's status, what `kubectl edgetune status` says now)
    ("an aborted release ended with 'Running: the release runs'",
     {"kind": "AdapterRelease", "status": {"phase": "Aborted", "conditions": [
         _c("Paused", "False", "Running", "the release runs"),
         _c("RolledBack", "True", "Aborted", "targets serve 2 again; cause: spec.abort is set"),
         _c("Progressing", "False", "Aborted", "the release ended")]}},
     "Aborted: targets serve 2 again; cause: spec.abort is set"),
    ("a succeeded job ended with 'Finished: 0 trainer(s) running'",
     {"kind": "EdgeTrainingJob", "status": {"phase": "Succeeded", "conditions": [
         _c("Training", "False", "Finished", "0 trainer(s) running"),
         _c("Succeeded", "True", "AdapterRegistered", "2/2 trainer(s) succeeded")]}},
     "AdapterRegistered: 2/2 trainer(s) succeeded"),
    ("a release waiting at a pause step for a person",
     {"kind": "AdapterRelease", "status": {"phase": "Paused", "conditions": [
         _c("Progressing", "True", "StepCompleted", "step 2 done: both metrics passed"),
         _c("Paused", "True", "PauseStep", "step 3: paused until spec.paused is false")]}},
     "PauseStep: step 3: paused until spec.paused is false"),
    ("a training job whose cluster stopped answering",
     {"kind": "EdgeTrainingJob", "status": {"phase": "Training", "conditions": [
         _c("Training", "True", "TrainersRunning", "1 trainer(s) running"),
         _c("ClustersReachable", "False", "ClusterUnreachable", "edge-b: connection refused")]}},
     "ClusterUnreachable: edge-b: connection refused"),
]  # fmt: skip


@pytest.mark.parametrize(("seen", "obj", "says"), STATUS_TEXTS, ids=[s for s, _, _ in STATUS_TEXTS])
def test_status_texts_say_what_is_true_now(seen: str, obj: dict[str, Any], says: str) -> None:
    assert summary_condition(obj) == says


def test_printer_columns_say_what_is_true() -> None:
    """PROGRESS of a failed job read 1/1; a selector matching nothing read 0/0; the wide DELTA
    column was a 70-character URI (now BYTES)."""
    from datetime import UTC, datetime  # noqa: PLC0415

    from edgetune_api.crd import RESOURCES  # noqa: PLC0415
    from edgetune_api.training_job import EdgeTrainingJobSpec, EdgeTrainingJobStatus, TargetStatus  # noqa: PLC0415
    from edgetune_operator.reconcile.status import Observation, summarize  # noqa: PLC0415

    spec = EdgeTrainingJobSpec.model_validate({
        "baseModel": {"uri": "builtin:timeseries-cnn"}, "data": {"source": {"hostPath": "/d"}, "format": "npy"},
        "budgets": {"memory": "1Gi"},
        "output": {"s3": {"bucket": "bucket"}, "mlflow": {"registeredModel": "m"}}})  # fmt: skip
    now = datetime(2026, 12, 7, tzinfo=UTC)
    failed = TargetStatus(cluster="a", phase="Failed", message="OOMKilled")
    ok = TargetStatus(cluster="b", phase="Succeeded")
    rows = [
        (Observation(targets=[failed]), "0/1 (1 failed)"),
        (Observation(targets=[ok, failed]), "1/2 (1 failed)"),
        (Observation(targets=[ok]), "1/1"),
        (Observation(no_clusters=True), "NoClusters"),
    ]
    for obs, progress in rows:
        assert summarize(spec, 1, EdgeTrainingJobStatus(), obs, now).progress == progress
    jobs = next(c for c in RESOURCES if c.kind == "EdgeTrainingJob")
    assert [c["name"] for c in jobs.printer_columns if c.get("priority")] == ["Bytes", "Device"]
    assert "Energy" in [c["name"] for c in jobs.printer_columns if not c.get("priority")]
    clusters = next(c for c in RESOURCES if c.kind == "EdgeCluster")
    assert {"name": "Paused", "type": "boolean", "jsonPath": ".spec.paused"} in clusters.printer_columns


def test_deleting_an_unfinished_release_warns_that_the_fleet_stays_split(monkeypatch: Any) -> None:
    import io  # noqa: PLC0415

    from edgetune_cli.__main__ import EXIT_USAGE, cmd_delete, parser  # noqa: PLC0415

    class Hub(_Hub):
        deleted: list[str] = []  # noqa: RUF012 - one test

        def get(self, plural: str, name: str) -> dict[str, Any]:
            return {"kind": "AdapterRelease", "status": {"phase": "Paused", "canary": {"version": "5"},
                                                         "targetsByVersion": {"5": 2, "4": 2}}}  # fmt: skip

        def delete(self, plural: str, name: str) -> None:
            self.deleted.append(name)

    hub, out = Hub(), _Out()
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert cmd_delete(hub, parser().parse_args(["delete", "release/rollout"]), out) == EXIT_USAGE  # type: ignore[arg-type]
    assert hub.deleted == [] and "leaves every target on what it was told (2 on 4, 2 on 5)" in out.lines[0]
    assert cmd_delete(hub, parser().parse_args(["delete", "release/rollout", "--yes"]), out) == 0  # type: ignore[arg-type]
    assert hub.deleted == ["rollout"]
