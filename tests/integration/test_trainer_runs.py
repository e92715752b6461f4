"""Whole trainer runs on CPU with data made here: packaging, stop conditions, failures, crash safety."""

from __future__ import annotations

import errno
import json
import math
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from edgetune_api.delta import read_folder, verify_package
from edgetune_trainer import loop
from edgetune_trainer.__main__ import classify, main
from edgetune_trainer.checkpoint import load_latest
from edgetune_trainer.models import TimeSeriesCNN, save_builtin
from tests.trainer_support import config, events, sine_classes, spawn, termination, write_config

pytestmark = pytest.mark.slow


def run(
    tmp: Path, capsys: pytest.CaptureFixture[str], **overrides: object
) -> tuple[int, dict[str, object], list[dict[str, object]]]:
    data = tmp / "data" if (tmp / "data").exists() else sine_classes(tmp / "data")
    code = main(["--config", str(write_config(tmp, config(tmp, data, **overrides)))])  # type: ignore[arg-type]
    return code, termination(tmp), events(capsys.readouterr().out.splitlines())


def test_run_trains_and_packages_a_verifiable_delta(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, summary, log = run(tmp_path, capsys, output={"encoding": "int8-zstd"})
    assert code == 0, summary
    assert summary["status"] == "Succeeded" and summary["stopReason"] == "MaxSteps" and summary["steps"] == 12
    assert len((tmp_path / "termination-log").read_bytes()) <= 4096
    manifest = verify_package(read_folder(tmp_path / "work" / "package"), expected_digest=str(summary["sha256"]))
    assert manifest.encoding == "int8-zstd" and manifest.steps == 12
    assert (
        manifest.lineage.samples == 240
        and manifest.lineage.data_sha256 == next(e for e in log if e["event"] == "data")["sha256"]
    )
    metrics = summary["metrics"]
    assert isinstance(metrics, dict) and "eval_accuracy_encoded" in metrics  # measured after int8 round trip
    assert summary["energyMethod"] == "estimate"  # no counters on this machine, and it says so
    losses = [e["loss"] for e in log if e["event"] == "step"]
    assert len(losses) == 12 and losses[-1] < losses[0]


def test_a_gpu_placement_without_a_gpu_fails_unless_a_cpu_fallback_is_allowed_and_says_what_it_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the trainer would use it")
    code, summary, log = run(tmp_path / "strict", capsys, placement={"accelerator": "gpu"})
    assert code == 6 and summary["reason"] == "AcceleratorUnavailable", summary
    assert "allowCpuFallback" in str(summary["message"])
    code, summary, log = run(tmp_path / "fallback", capsys, placement={"accelerator": "gpu", "allowCpuFallback": True},
                             baseModel={"revision": "cnn@r3"})  # fmt: skip
    assert code == 0 and summary["device"] == "cpu" and summary["baseModelRevision"] == "cnn@r3", summary
    assert any("trained on the CPU" in w for w in summary["warnings"])  # type: ignore[attr-defined]
    assert {"event": "device", "device": "cpu", "requested": "gpu"}.items() <= next(
        e for e in log if e["event"] == "device").items()  # fmt: skip
    manifest = verify_package(read_folder(tmp_path / "fallback" / "work" / "package"))
    assert manifest.lineage.device == "cpu" and manifest.lineage.base_model_revision == "cnn@r3"


def test_auto_batch_size_is_measured_against_the_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, summary, log = run(tmp_path, capsys, training={"batchSize": "auto", "maxSteps": 2})
    assert code == 0, summary
    fitted = next(e for e in log if e["event"] == "batch_size_fitted")
    assert fitted["batch_size"] == summary["batchSize"] >= 1
    assert all(p["peak_bytes"] <= 4 * 2**30 * 0.9 for p in fitted["probes"] if p["batch"] <= fitted["batch_size"])
    assert summary["peakMemoryBytes"] <= 4 * 2**30


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"training": {"maxSteps": 500, "targetLoss": 5.0}}, "TargetLoss"),
        (
            {"training": {"maxSteps": 500, "learningRate": 1e-9, "earlyStopping": {"patience": 2, "minDelta": 0.5}}},
            "EarlyStopping",
        ),
        ({"training": {"maxSteps": 10_000}, "budgets": {"deadline": "3s"}}, "Deadline"),
        ({"training": {"maxSteps": 10_000}, "budgets": {"energyJoules": 20}}, "EnergyBudget"),
        ({"training": {"maxSteps": 10_000, "epochs": 1}}, "Epochs"),
    ],
    ids=["target-loss", "early-stopping", "deadline", "energy", "epochs"],
)
def test_stop_conditions_end_training_and_still_package(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: dict[str, object], reason: str
) -> None:
    code, summary, _ = run(tmp_path, capsys, **overrides)
    assert code == 0, summary
    assert summary["stopReason"] == reason
    assert (tmp_path / "work" / "package" / "manifest.json").exists()


def test_the_encoding_gate_never_ships_weights_worse_than_the_bound(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """int4 asked for with no loss allowed at all: whatever ships scores exactly as the adapter
    trained did on the held-out split, and every coarser encoding refused on the way is reported."""
    code, summary, log = run(tmp_path, capsys, output={"encoding": "int4-zstd", "maxMetricDrop": 0.0},
                             training={"maxSteps": 30, "evalEvery": 30, "checkpointEvery": 30})  # fmt: skip
    assert code == 0, summary
    attempts = summary["encodingAttempts"]
    assert isinstance(attempts, list) and summary["encodingRequested"] == "int4-zstd"
    assert attempts[-1]["ok"] and attempts[-1]["encoding"] == summary["encoding"]
    assert not any(a["ok"] for a in attempts[:-1])
    assert [a["encoding"] for a in attempts] == ["int4-zstd", "int8-zstd", "fp16", "fp32"][: len(attempts)]
    metrics = summary["metrics"]
    assert isinstance(metrics, dict)
    if summary["encoding"] != "fp32":
        assert metrics["eval_accuracy_encoded"] >= metrics["eval_accuracy"]
    refused = [e for e in log if e["event"] == "encoding_refused"]
    assert [e["encoding"] for e in refused] == [a["encoding"] for a in attempts[:-1]]
    manifest = verify_package(read_folder(tmp_path / "work" / "package"), expected_digest=str(summary["sha256"]))
    assert manifest.encoding == summary["encoding"]


def test_another_runs_checkpoints_are_set_aside_not_resumed(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """A work dir holding another job's checkpoints (other data): resuming would ship that adapter
    with this job's lineage. The run starts from step 0 and says why."""
    first = tmp_path / "first"
    sine_classes(first / "data", seed=1)
    code, summary, _ = run(first, capsys, runtime={"workDir": str(tmp_path / "work")})
    assert code == 0 and summary["resumedFrom"] is None
    # Same work dir, same settings, the same data: resumes (nothing left to do but package).
    code, summary, log = run(first, capsys, runtime={"workDir": str(tmp_path / "work")})
    assert code == 0 and summary["resumedFrom"] == 12, summary
    second = tmp_path / "second"
    sine_classes(second / "data", seed=2)
    code, summary, log = run(second, capsys, runtime={"workDir": str(tmp_path / "work")})
    assert code == 0 and summary["resumedFrom"] is None, summary
    aside = next(e for e in log if e["event"] == "checkpoints_set_aside")
    assert aside["differ"] == ["data"] and aside["step"] == 12 and Path(str(aside["moved_to"])).is_dir()
    data_event = next(e for e in log if e["event"] == "data")
    manifest = verify_package(read_folder(tmp_path / "work" / "package"), expected_digest=str(summary["sha256"]))
    assert manifest.lineage.data_sha256 == data_event["sha256"] and manifest.steps == 12


def test_failures_exit_non_zero_with_a_clear_termination_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        (
            {"data": {"minSamples": 10_000}},
            3,
            "InsufficientData",
            "240 samples on this node, the job needs at least 10000",
        ),
        ({"runtime": {"dataDir": str(tmp_path / "missing")}}, 2, "InvalidInput", "does not exist on this node"),
        (
            {"budgets": {"memory": "256Mi"}, "training": {"batchSize": "auto"}},
            4,
            "BudgetTooSmall",
            "the trainer's runtime alone (Python, torch, peft and the base model) takes",
        ),
        (
            {"baseModel": {"uri": str(tmp_path / "no-model"), "sha256": "0" * 64}},
            2,
            "InvalidInput",
            "has no config.json",
        ),
    ]
    sine_classes(tmp_path / "data")
    for overrides, code, reason, text in cases:
        got, summary, _ = run(tmp_path, capsys, **overrides)
        assert (got, summary["reason"], summary["status"]) == (code, reason, "Failed"), summary
        assert text in str(summary["message"])


def test_a_fixed_batch_size_is_held_to_the_memory_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A fixed batchSize whose pass does not fit is refused up front, saying what takes the memory
    (it used to train on regardless, past the budget a real pod would be killed at)."""
    from edgetune_trainer.energy import current_rss_bytes  # noqa: PLC0415

    budget_mib = int(current_rss_bytes() / 0.9 / 2**20) + 48  # room for the runtime, not for 4096 samples at once
    code, summary, _ = run(tmp_path, capsys, budgets={"memory": f"{budget_mib}Mi"}, training={"batchSize": 4096})
    assert (code, summary["reason"]) == (4, "BudgetTooSmall"), summary
    message = str(summary["message"])
    assert message.startswith("batchSize 4096 needs ")
    assert "of it is the trainer's runtime before any training" in message
    assert "use batchSize: auto" in message
    # The same budget with a batch that fits trains, and the summary's peak covers packaging too.
    code, summary, log = run(tmp_path, capsys, budgets={"memory": f"{budget_mib + 512}Mi"}, training={"batchSize": 8})
    assert code == 0, summary
    checked = next(e for e in log if e["event"] == "batch_size_checked")
    assert checked["peak_bytes"] <= (budget_mib + 512) * 2**20 * 0.9
    assert int(summary["peakMemoryBytes"]) >= checked["peak_bytes"]  # type: ignore[call-overload]


def test_a_held_out_split_too_small_to_decide_anything_is_said_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, summary, log = run(tmp_path, capsys, data={"evalFraction": 0.05})
    assert code == 0, summary
    warning = next(e for e in log if e["event"] == "held_out_split_small")
    assert 0 < warning["eval"] < 30 and warning["recommended"] == 30
    assert summary["warnings"] and "decide on that few" in str(summary["warnings"])
    code, summary, log = run(tmp_path / "more", capsys, data={"evalFraction": 0.3})
    assert code == 0 and summary["warnings"] == [] and not [e for e in log if e["event"] == "held_out_split_small"]


def test_a_separate_evaluation_set_is_the_held_out_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sine_classes(tmp_path / "data", n=240, seed=3)
    sine_classes(tmp_path / "labelled", n=90, seed=4)
    code, summary, log = run(tmp_path, capsys, runtime={"evalDataDir": str(tmp_path / "labelled")})
    assert code == 0, summary
    data = next(e for e in log if e["event"] == "data")
    assert (data["train"], data["eval"], data["samples"]) == (240, 90, 330)  # every node sample trains
    assert data["eval_source_sha256"] != data["sha256"]
    manifest = verify_package(read_folder(tmp_path / "work" / "package"), expected_digest=str(summary["sha256"]))
    assert manifest.lineage.data_sha256 == data["sha256"]  # lineage: the node's training data
    assert summary["warnings"] == []


def test_wrong_base_model_hash_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    digest = save_builtin(TimeSeriesCNN(3, 3), tmp_path / "base", ["0", "1", "2"])
    code, summary, _ = run(tmp_path, capsys, baseModel={"uri": str(tmp_path / "base"), "sha256": "a" * 64})
    assert code == 2
    assert f"have SHA-256 {digest}, the job expects {'a' * 64}" in str(summary["message"])
    code, summary, _ = run(tmp_path, capsys, baseModel={"uri": f"file://{tmp_path / 'base'}", "sha256": digest})
    assert code == 0, summary


def test_unreachable_s3_fails_as_storage_error_and_keeps_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, summary, _ = run(
        tmp_path, capsys, runtime={"s3Endpoint": "http://127.0.0.1:9", "s3Bucket": "adapters", "s3Prefix": "x"},
    )  # fmt: skip
    assert (code, summary["reason"]) == (5, "StorageError"), summary
    assert "s3://adapters/x" in str(summary["message"])
    loaded, skipped = load_latest(tmp_path / "work" / "checkpoints")
    assert loaded is not None and loaded.state.step == 12 and skipped == []


def test_disk_full_is_a_storage_error() -> None:
    assert classify(OSError(errno.ENOSPC, "No space left on device")) == "StorageError"


def test_low_battery_pauses_then_resumes_when_charged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    supply = tmp_path / "power"
    (supply / "BAT0").mkdir(parents=True)
    (supply / "BAT0" / "type").write_text("Battery\n")
    (supply / "BAT0" / "capacity").write_text("12\n")

    def charge() -> None:
        time.sleep(3)
        (supply / "BAT0" / "capacity").write_text("85\n")

    threading.Thread(target=charge, daemon=True).start()
    code, summary, log = run(
        tmp_path,
        capsys,
        budgets={"minBatteryPercent": 30},
        training={"maxSteps": 4},
        runtime={"powerSupplyRoot": str(supply)},
    )
    assert code == 0, summary
    kinds = [e["event"] for e in log]
    assert kinds.index("paused") < kinds.index("resumed_after_pause")
    assert next(e for e in log if e["event"] == "paused")["battery_percent"] == 12


def test_low_battery_with_stop_policy_stops_and_packages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    supply = tmp_path / "power" / "BAT0"
    supply.mkdir(parents=True)
    (supply / "type").write_text("Battery\n")
    (supply / "capacity").write_text("5\n")
    code, summary, _ = run(
        tmp_path, capsys, budgets={"minBatteryPercent": 30, "batteryPolicy": "stop"}, training={"maxSteps": 50},
        runtime={"powerSupplyRoot": str(supply.parent)},
    )  # fmt: skip
    assert code == 0, summary
    assert (summary["stopReason"], summary["steps"]) == ("LowBattery", 1)


def _steps(lines: list[str]) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in events(lines) if e["event"] == "step"]


def _run_to_end(tmp: Path, cfg_path: Path) -> list[str]:
    proc = spawn(cfg_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    return out.splitlines()


def _kill_at(cfg_path: Path, step: int, signal_name: str) -> tuple[list[str], int]:
    proc = spawn(cfg_path)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if '"event": "step"' in line and json.loads(line)["step"] == step:
            proc.send_signal(getattr(signal, signal_name))
            break
    rest, _ = proc.communicate(timeout=120)
    return lines + rest.splitlines(), proc.returncode


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_interrupted_run_resumes_and_reproduces_the_uninterrupted_curve(tmp_path: Path, signal_name: str) -> None:
    data = sine_classes(tmp_path / "data")
    overrides = {"training": {"maxSteps": 14, "checkpointEvery": 1, "evalEvery": 7}}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = _steps(
        _run_to_end(tmp_path / "a", write_config(tmp_path / "a", config(tmp_path / "a", data, **overrides)))
    )
    cfg_b = write_config(tmp_path / "b", config(tmp_path / "b", data, **overrides))
    kill_step = random.Random(signal_name).randint(3, 11)
    first, code = _kill_at(cfg_b, kill_step, signal_name)
    assert code == (143 if signal_name == "SIGTERM" else -9)
    if signal_name == "SIGTERM":
        assert termination(tmp_path / "b")["reason"] == "Interrupted"
    second = _run_to_end(tmp_path / "b", cfg_b)
    resumed = next(e for e in events(second) if e["event"] == "resumed")
    assert resumed["step"] >= kill_step - 1  # at most one optimizer step of progress lost
    curve = dict(_steps(first))
    curve.update(dict(_steps(second)))
    assert sorted(curve) == list(range(1, 15))
    for step, loss in straight:
        assert curve[step] == pytest.approx(loss, rel=1e-5, abs=1e-7), f"step {step} differs after resume"


@pytest.mark.parametrize(
    ("training", "event"),
    [
        ({"optimizer": "sgd", "gradientCheckpointing": True}, None),
        ({"optimizer": "adamw8bit"}, "optimizer_fallback"),  # no CUDA here: falls back, and says so
        ({"precision": "bf16", "gradientAccumulation": 3}, None),
        ({"precision": "fp16"}, "precision_fallback"),  # fp16 autocast is for GPUs: bf16 on CPU
    ],
    ids=["sgd-checkpointing", "adamw8bit", "bf16-accumulation", "fp16-on-cpu"],
)
def test_memory_and_precision_options_train(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], training: dict[str, object], event: str | None
) -> None:
    code, summary, log = run(tmp_path, capsys, training={"maxSteps": 4, **training})
    assert code == 0, summary
    losses = [e["loss"] for e in log if e["event"] == "step"]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    if event is not None:
        assert any(e["event"] == event for e in log), f"expected a {event} event"


def test_evaluate_scores_a_package_or_the_base_on_a_data_set(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from tests.agent_support import make_base, train  # noqa: PLC0415

    base_sha = make_base(tmp_path / "base", seed=0)
    trained = train(tmp_path / "run", tmp_path / "base", base_sha, data_seed=4, gain=1.0, key=None, steps=60)
    data = tmp_path / "run" / "data"
    common = ["evaluate", "--base", str(tmp_path / "base"), "--base-sha256", base_sha, "--data", str(data),
              "--format", "npy"]  # fmt: skip
    capsys.readouterr()
    assert main(common) == 0
    alone = json.loads(capsys.readouterr().out)
    assert main([*common, "--package", str(trained.folder)]) == 0
    adapted = json.loads(capsys.readouterr().out)
    assert alone["samples"] == adapted["samples"] == 240 and "package_sha256" not in alone
    assert adapted["package_sha256"] == trained.sha256 and adapted["encoding"] == "int8-zstd"
    assert adapted["eval_accuracy"] > alone["eval_accuracy"] + 0.2
    # The trainer's own held-out split gives the figure the summary reported.
    assert main([*common, "--package", str(trained.folder), "--split", "eval", "--eval-fraction", "0.2"]) == 0
    held_out = json.loads(capsys.readouterr().out)
    assert held_out["eval_accuracy"] == pytest.approx(trained.metrics["eval_accuracy_encoded"], abs=1e-6)
    # A package that does not verify is refused with the reason.
    weights = next(p for p in trained.folder.iterdir() if p.name.startswith("adapter"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    assert main([*common, "--package", str(trained.folder)]) == 2
    assert "SHA-256" in capsys.readouterr().err


def test_pretrain_builds_a_pinned_base_that_a_job_then_adapts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No internals needed to make a base: `pretrain` on one site's data, then a normal run adapts
    that base (pinned by the digest pretrain printed) to another site's data."""
    site_a = sine_classes(tmp_path / "site-a", seed=1)
    capsys.readouterr()
    argv = ["pretrain", "--data", str(site_a), "--format", "npy", "--out", str(tmp_path / "base"), "--steps", "150"]
    assert main(argv) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["labels"] == ["0", "1", "2"] and built["channels"] == 3 and built["length"] == 48
    assert built["eval_accuracy"] > 0.8  # it learned site A
    base = {"uri": str(tmp_path / "base"), "sha256": built["sha256"]}
    sine_classes(tmp_path / "site-b" / "data", seed=2, gain=1.7)
    code, summary, log = run(tmp_path / "site-b", capsys, baseModel=base, training={"maxSteps": 30, "evalEvery": 30})
    assert code == 0, summary
    assert next(e for e in log if e["event"] == "base_model")["sha256"] == built["sha256"]
    assert main(["pretrain", "--data", str(tmp_path / "nothing"), "--format", "npy", "--out", str(tmp_path / "x")]) == 2
    assert "pretrain:" in capsys.readouterr().err

    # A base "already on the node": the job names its node path, the pod mounts it elsewhere
    # (read-only) and says where with --base-dir; the lineage keeps the job's URI.
    site_c = tmp_path / "site-c"
    sine_classes(site_c / "data", seed=3, gain=1.7)
    on_node = {"uri": "/models/base", "sha256": built["sha256"]}
    cfg = write_config(site_c, config(site_c, site_c / "data", baseModel=on_node,  # type: ignore[arg-type]
                                      training={"maxSteps": 10, "evalEvery": 10}))  # fmt: skip
    assert main(["--config", str(cfg), "--base-dir", str(tmp_path / "base")]) == 0
    used = next(e for e in events(capsys.readouterr().out.splitlines()) if e["event"] == "base_model")
    assert (used["uri"], used["sha256"]) == ("/models/base", built["sha256"])


def test_on_a_laptop_an_edgetrainingjob_manifest_runs_as_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest a user would apply, without S3, MLflow or runtime paths: the data is read at its
    hostPath, the work goes to ./edgetune-work, the summary to stdout (no /dev/termination-log here)."""
    data = sine_classes(tmp_path / "site-data")
    manifest = tmp_path / "job.yaml"
    manifest.write_text(f"""
apiVersion: edgetune.io/v1alpha1
kind: EdgeTrainingJob
metadata: {{name: try-it, namespace: factory}}
spec:
  baseModel: {{uri: "builtin:timeseries-cnn"}}
  data: {{source: {{hostPath: "{data}"}}, format: npy}}
  training: {{maxSteps: 4, batchSize: 16}}
  budgets: {{memory: 4Gi}}
""")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EDGETUNE_TERMINATION_LOG", raising=False)
    assert main(["--config", str(manifest)]) == 0
    out = capsys.readouterr().out.splitlines()
    summary = json.loads(out[-1])
    assert summary["status"] == "Succeeded" and summary["deltaUri"] == str(tmp_path / "edgetune-work" / "package")
    manifest_read = verify_package(
        read_folder(tmp_path / "edgetune-work" / "package"), expected_digest=summary["sha256"]
    )
    assert (manifest_read.lineage.job_name, manifest_read.lineage.job_namespace) == ("try-it", "factory")
    assert next(e for e in events(out) if e["event"] == "data")["samples"] == 240


def test_a_local_run_says_where_the_data_must_be_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config(tmp_path, tmp_path, runtime={"dataDir": None})
    cfg["spec"]["data"]["source"] = {"persistentVolumeClaim": {"claimName": "site-data"}}
    assert main(["--config", str(write_config(tmp_path, cfg))]) == 2
    summary = termination(tmp_path)
    assert summary["reason"] == "InvalidInput"
    assert "where is the data? data.source names a PersistentVolumeClaim" in summary["message"]
    assert "--data-dir FOLDER" in summary["message"]


def test_baselines_train_the_head_or_every_weight_and_package_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What LoRA recovers, measured against a linear probe and full fine-tuning on the same data,
    split and loop; a later adapter run never resumes from a baseline's checkpoints."""
    data = sine_classes(tmp_path / "data")
    whole = sum(p.numel() for p in TimeSeriesCNN(3, 3).parameters())
    head = TimeSeriesCNN(3, 3).head
    for baseline, trainable in (("head", head.weight.numel() + head.bias.numel()), ("full", whole)):
        path = write_config(tmp_path, config(tmp_path, data))
        assert main(["--config", str(path), "--baseline", baseline]) == 0
        summary = termination(tmp_path)
        assert summary["baseline"] == baseline and summary["trainableParameters"] == trainable, summary
        assert summary["steps"] == 12 and 0 <= summary["metrics"]["eval_accuracy"] <= 1
        assert "deltaUri" not in summary and not (tmp_path / "work" / "package").exists()
        log = events(capsys.readouterr().out.splitlines())
        assert next(e for e in log if e["event"] == "baseline")["trainable_parameters"] == trainable
    code, summary, log = run(tmp_path, capsys)  # the adapter, in the same work folder
    assert code == 0 and summary["sha256"]
    assert next(e for e in log if e["event"] == "checkpoints_set_aside")["differ"] == ["baseline"]


def test_auto_batch_size_turns_gradient_checkpointing_on_when_it_fits_twice_the_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With gradientCheckpointing left unset, ``batchSize: auto`` measures both ways and trains with
    checkpointing when a micro-batch at least twice as large fits; set to false, it never does. The
    probe is replaced by a fixed memory model (100 MB per sample, 40 with checkpointing, over 3000 MB)
    so the decision is exact; the saving itself is measured in test_trainer_parts."""

    def probe(model: torch.nn.Module, task: object, samples: object, size: int, **_: object) -> int:
        checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
        return (3000 + size * (40 if checkpointing else 100)) * 10**6

    monkeypatch.setattr(loop, "probe_peak", probe)  # budget 4 GiB: 90 % is 3865 MB
    code, summary, log = run(tmp_path, capsys, training={"batchSize": "auto", "maxSteps": 2})
    assert code == 0, summary
    auto = next(e for e in log if e["event"] == "gradient_checkpointing_auto")
    assert (auto["enabled"], auto["without"], auto["with_checkpointing"], summary["batchSize"]) == (True, 8, 16, 16)
    assert next(e for e in log if e["event"] == "batch_size_fitted")["gradient_checkpointing"] is True
    explicit = {"batchSize": "auto", "maxSteps": 2, "gradientCheckpointing": False}
    code, summary, log = run(tmp_path, capsys, training=explicit)
    assert code == 0 and summary["batchSize"] == 8, summary
    assert not any(e["event"] == "gradient_checkpointing_auto" for e in log)
    # Not even one sample fits without checkpointing, two do with it: it trains instead of failing.
    monkeypatch.setattr(
        loop, "probe_peak", lambda model, task, samples, size, **_: probe(model, task, samples, size * 9)
    )
    code, summary, log = run(tmp_path, capsys, training={"batchSize": "auto", "maxSteps": 2})
    assert code == 0 and summary["batchSize"] == 2, summary
