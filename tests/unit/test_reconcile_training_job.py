"""Pure reconciliation logic for EdgeTrainingJob: desired children and observed status."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgetune_api import EdgeTrainingJob
from edgetune_api.trainer_config import PROGRESS_ANNOTATION, TrainerConfig
from edgetune_api.training_job import EdgeTrainingJobSpec
from edgetune_operator.reconcile.training_job import (
    MAX_URL_SECONDS,
    SA_DIR,
    JobRef,
    Target,
    child_name,
    credentials_seconds,
    observe_trainer,
    set_condition,
    trainer_job,
    trainer_secret,
)
from edgetune_operator.settings import Settings, default_profiles

REPO = Path(__file__).resolve().parents[2]
JOB = JobRef(name="vibration-lora-gpu", namespace="plant", uid="0d9c5a1e-0000-4000-8000-000000000001")


def _spec(example: str) -> Any:
    return EdgeTrainingJob.model_validate(yaml.safe_load((REPO / "examples" / example).read_text())).spec


def test_gpu_trainer_job_requests_the_gpu_and_is_locked_down() -> None:
    spec = _spec("trainingjob-gpu.yaml")
    job = trainer_job(spec, JOB, Target("local"), Settings(), default_profiles()["gpu"][0])
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"memory": "4Gi", "nvidia.com/gpu": "1"}
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"] == {
        "type": "RuntimeDefault"
    }
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
    }  # fmt: skip
    assert pod["automountServiceAccountToken"] is False
    # The one root process: the init container handing the root-owned hostPath checkpoint folder to
    # the trainer's user, with CAP_CHOWN only (and the trainer image, so nothing more is pulled).
    (init,) = pod["initContainers"]
    assert init["image"] == container["image"] and init["args"] == ["prepare-work-dir", "/work", "--owner",
                                                                    "10001:10001"]  # fmt: skip
    assert init["securityContext"]["runAsUser"] == 0 and init["securityContext"]["capabilities"] == {
        "drop": ["ALL"], "add": ["CHOWN"]}  # fmt: skip
    assert init["securityContext"]["readOnlyRootFilesystem"] and not init["securityContext"]["allowPrivilegeEscalation"]
    assert init["volumeMounts"] == [{"name": "work", "mountPath": "/work"}]
    data_mount = next(m for m in container["volumeMounts"] if m["name"] == "data")
    assert data_mount == {"name": "data", "mountPath": "/data", "readOnly": True}
    assert next(v for v in pod["volumes"] if v["name"] == "data")["hostPath"]["path"] == "/var/lib/edgetune/vibration"
    assert job["spec"]["activeDeadlineSeconds"] == 45 * 60 + 120  # deadline + 2 x termination grace
    assert job["metadata"]["ownerReferences"][0]["kind"] == "EdgeTrainingJob"
    assert job["metadata"]["name"] == child_name(JOB, Target("local")) and len(job["metadata"]["name"]) <= 63


def test_npu_per_node_job_pins_the_node_and_remote_children_have_no_owner() -> None:
    spec = _spec("trainingjob-npu.yaml")
    target = Target("edge-shop-12", "rk3588-a")
    job = trainer_job(spec, JOB, target, Settings(), default_profiles()["npu"][0])
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["kubernetes.io/hostname"] == "rk3588-a"
    assert pod["containers"][0]["resources"]["limits"]["rockchip.com/npu"] == "1"
    assert next(v for v in pod["volumes"] if v["name"] == "data")["persistentVolumeClaim"] == {
        "claimName": "pos-history", "readOnly": True,
    }  # fmt: skip
    assert next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "data")["subPath"] == "daily"
    assert "ownerReferences" not in job["metadata"]  # owner references cannot cross clusters
    # Everything secret comes from the trainer's own Secret (same name as the Job), nothing else.
    secrets = [v["secret"] for v in pod["volumes"] if "secret" in v]
    assert secrets == [
        {
            "secretName": job["metadata"]["name"],
            "defaultMode": 0o440,
            "items": [
                {"key": "config.json", "path": "config.json"},
                *({"key": k, "path": f"credentials/{k}"} for k in ("upload.json", "salt", "base.json")),
            ],
        }
    ]
    assert not [v for v in pod["volumes"] if "configMap" in v]  # the configuration travels in the Secret
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "config")
    assert mount == {"name": "config", "mountPath": "/etc/edgetune", "readOnly": True}  # fmt: skip
    env = pod["containers"][0]["env"]
    assert not [e for e in env if "secretKeyRef" in (e.get("valueFrom") or {})], "no S3 keys in the environment"
    args = pod["containers"][0]["args"]
    for flag, path in (("--upload-policy", "upload.json"), ("--salt-file", "salt"), ("--base-files", "base.json")):
        assert args[args.index(flag) + 1] == f"/etc/edgetune/credentials/{path}"
    assert "--signing-key" not in args and "--trainer-key" not in args  # this job signs nothing


def test_a_trainers_secret_holds_only_its_own_credentials() -> None:
    target = Target("edge-shop-12", "rk3588-a")
    spec = _spec("trainingjob-npu.yaml")
    secret = trainer_secret(spec, JOB, target, Settings(), {"upload.json": b"{}", "key.pem": b"PEM"})
    assert secret["metadata"]["name"] == child_name(JOB, target)
    assert secret["metadata"]["labels"]["edgetune.io/training-job-uid"] == JOB.uid
    assert "ownerReferences" not in secret["metadata"]  # on an edge cluster: deleted by name
    assert base64.b64decode(secret["data"]["key.pem"]) == b"PEM"
    local = trainer_secret(spec, JOB, Target("local"), Settings(), {})
    assert local["metadata"]["ownerReferences"][0]["uid"] == JOB.uid  # on the hub: collected with the job


def test_upload_policies_and_urls_live_as_long_as_the_trainer_may() -> None:
    spec = _spec("trainingjob-npu.yaml")
    assert credentials_seconds(spec.model_copy(update={"budgets": spec.budgets.model_copy(
        update={"deadline": None})}), Settings()) == MAX_URL_SECONDS  # fmt: skip
    short = spec.model_copy(update={"budgets": spec.budgets.model_copy(update={"deadline": "2h"})})
    assert credentials_seconds(short, Settings(termination_grace_seconds=30)) == 7200 + 60 + 3600
    long = spec.model_copy(update={"budgets": spec.budgets.model_copy(update={"deadline": "800h"})})
    assert credentials_seconds(long, Settings()) == MAX_URL_SECONDS
    assert spec.base_model.model_copy(update={"uri": "models:/base@prod"}).remote


def _config_json(spec: EdgeTrainingJobSpec, settings: Settings) -> str:
    secret = trainer_secret(spec, JOB, Target("local"), settings, {"upload.json": b"{}"})
    return base64.b64decode(secret["data"]["config.json"]).decode()


def test_the_trainer_secret_carries_the_validated_spec_and_runtime_beside_the_credentials() -> None:
    spec = _spec("trainingjob-gpu.yaml")
    secret = trainer_secret(spec, JOB, Target("local"), Settings(s3_endpoint="http://s3.local:9000"),
                            {"upload.json": b"{}", "key.pem": b"k"})  # fmt: skip
    assert set(secret["data"]) == {"config.json", "upload.json", "key.pem"}
    config = TrainerConfig.model_validate(json.loads(base64.b64decode(secret["data"]["config.json"])))
    assert config.spec.to_wire() == spec.to_wire()  # every field, as the trainer's view of the spec
    assert config.runtime.s3_bucket == "edge-adapters"
    assert config.runtime.s3_prefix == "vibration/plant/vibration-lora-gpu/local/any"
    assert config.runtime.s3_endpoint == "http://s3.local:9000"
    assert config.runtime.signing_key_path is None  # the hub key never leaves the hub
    assert config.runtime.trainer_key_path == "/etc/edgetune/credentials/key.pem"
    assert config.runtime.upload_policy_path == "/etc/edgetune/credentials/upload.json"


def test_a_separate_evaluation_set_is_mounted_read_only_and_named_to_the_trainer() -> None:
    spec = _spec("trainingjob-gpu.yaml")
    assert spec.data.eval_source is None
    assert _config_json(spec, Settings()).count("evalDataDir") == 0
    spec = spec.model_copy(
        update={
            "data": spec.data.model_copy(
                update={
                    "eval_source": spec.data.source.model_copy(
                        update={"host_path": "/var/lib/edgetune/vibration-labelled"}
                    )
                }
            )
        }
    )
    pod = trainer_job(spec, JOB, Target("local"), Settings(), default_profiles()["gpu"][0])["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "eval-data")
    assert volume["hostPath"] == {"path": "/var/lib/edgetune/vibration-labelled", "type": "Directory"}
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "eval-data")
    assert mount == {"name": "eval-data", "mountPath": "/data-eval", "readOnly": True}
    config = TrainerConfig.model_validate(json.loads(_config_json(spec, Settings())))
    assert config.runtime.eval_data_dir == "/data-eval"


@pytest.mark.parametrize("uri", ["/models/base", "file:///models/base"])
def test_a_base_model_already_on_the_node_is_mounted_read_only(uri: str) -> None:
    """It was documented and failed: "base model folder … has no config.json" (nothing mounted it)."""
    spec = _spec("trainingjob-gpu.yaml")
    spec = spec.model_copy(update={"base_model": spec.base_model.model_copy(update={"uri": uri})})
    pod = trainer_job(spec, JOB, Target("local"), Settings(), default_profiles()["gpu"][0])["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "base-model")["hostPath"] == {
        "path": "/models/base", "type": "Directory"}  # fmt: skip
    container = pod["containers"][0]
    assert {"name": "base-model", "mountPath": "/base-model", "readOnly": True} in container["volumeMounts"]
    assert container["args"][-2:] == ["--base-dir", "/base-model"]  # the path a test executor rewrites
    config = TrainerConfig.model_validate(json.loads(_config_json(spec, Settings())))
    assert config.runtime.base_dir == "/base-model" and config.runtime.base_files_path is None
    remote = _spec("trainingjob-npu.yaml")
    remote_pod = trainer_job(remote, JOB, Target("local"), Settings(), default_profiles()["npu"][0])
    assert "--base-dir" not in remote_pod["spec"]["template"]["spec"]["containers"][0]["args"]


def test_settings_from_environment() -> None:
    settings = Settings.from_env({
        "EDGETUNE_TRAINER_IMAGE": "registry.local/edgetune/trainer:1.2",
        "EDGETUNE_TRAINER_LABELS": '{"edgetune.io/executor": "local"}',
        "EDGETUNE_BACKOFF_LIMIT": "5",
    })  # fmt: skip
    assert settings.trainer_image == "registry.local/edgetune/trainer:1.2"
    assert settings.trainer_labels == {"edgetune.io/executor": "local"}
    assert settings.backoff_limit == 5


def test_condition_transition_time_moves_only_on_change() -> None:
    t0, t1 = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)
    conds = set_condition([], "Training", True, reason="Started", message="1 trainer", generation=1, now=t0)
    conds = set_condition(conds, "Training", True, reason="Progress", message="step 5", generation=2, now=t1)
    assert (conds[0].last_transition_time, conds[0].reason, conds[0].observed_generation) == (t0, "Progress", 2)
    conds = set_condition(conds, "Training", False, reason="Done", message="", generation=2, now=t1)
    assert conds[0].last_transition_time == t1 and conds[0].status == "False"


def test_setting_one_condition_keeps_the_others() -> None:
    conds = []
    for kind in ("A", "B", "C"):
        conds = set_condition(conds, kind, True, reason="Set", message="", generation=1)
    conds = set_condition(conds, "A", False, reason="Changed", message="", generation=2)
    assert [(c.type, c.status) for c in conds] == [("A", "False"), ("B", "True"), ("C", "True")]


def _pod(message: str, node: str = "n1") -> dict[str, Any]:
    terminated = {"exitCode": 0, "finishedAt": "2026-11-22T10:00:00Z", "message": message}
    return {"spec": {"nodeName": node}, "status": {"containerStatuses": [{"state": {"terminated": terminated}}]}}


def test_observe_succeeded_and_failed_trainers() -> None:
    done = {"metadata": {"name": "j"}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    summary = {"status": "Succeeded", "reason": "Succeeded", "steps": 12, "deltaUri": "s3://b/p", "samples": 240,
               "metrics": {"train_loss": 0.1, "eval_loss": 0.2}, "energyJoules": 5.0, "energyMethod": "estimate",
               "peakMemoryBytes": 123}  # fmt: skip
    status = observe_trainer(Target(), done, [_pod(json.dumps(summary))])
    assert (status.phase, status.step, status.delta_uri, status.node, status.eval_loss) == (
        "Packaging",
        12,
        "s3://b/p",
        "n1",
        0.2,
    )

    limit = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "backoff limit reached"}
    failed = {"metadata": {"name": "j"}, "status": {"conditions": [limit]}}
    message = json.dumps(
        {
            "status": "Failed",
            "reason": "InsufficientData",
            "message": "12 samples on this node, the job needs at least 200",
        }
    )
    status = observe_trainer(Target(), failed, [_pod(message)])
    assert status.phase == "Failed"
    assert (
        status.message == "BackoffLimitExceeded: InsufficientData: 12 samples on this node, the job needs at least 200"
    )

    crashed = observe_trainer(Target(), failed, [_pod("Traceback (most recent call last): ... MemoryError")])
    assert crashed.message is not None and crashed.message.endswith("MemoryError")
    assert observe_trainer(Target(), None, []).phase == "Pending"


def test_observe_trusts_the_pods_before_the_job_controller_catches_up() -> None:
    """Under load the Job controller records a pod's start or success late: the trainer's phase
    follows the pods, so the job does not pass through states that only the lag produced."""
    created = {"metadata": {"name": "j"}, "status": {}}  # the Job controller has written nothing yet
    summary = json.dumps({"status": "Succeeded", "steps": 3, "deltaUri": "s3://b/p"})
    succeeded = {**_pod(summary), "metadata": {"name": "p"}}
    succeeded["status"]["phase"] = "Succeeded"
    status = observe_trainer(Target(), created, [succeeded])
    assert (status.phase, status.step, status.node) == ("Packaging", 3, "n1")

    running = {"metadata": {"name": "p"}, "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}}
    assert observe_trainer(Target(), created, [running]).phase == "Training"
    pending = {"metadata": {"name": "p"}, "spec": {}, "status": {"phase": "Pending"}}
    assert observe_trainer(Target(), created, [pending]).phase == "Scheduled"
    # A pod on its way out (the Job was suspended) is no longer training.
    leaving = {**running, "metadata": {"name": "p", "deletionTimestamp": "2026-11-29T10:00:00Z"}}
    suspended = {"metadata": {"name": "j"}, "spec": {"suspend": True}, "status": {}}
    assert observe_trainer(Target(), suspended, [leaving]).phase == "Suspended"
    # A failed attempt with retries left is not the trainer's outcome.
    failed = {"metadata": {"name": "p"}, "spec": {"nodeName": "n1"}, "status": {"phase": "Failed"}}
    assert (
        observe_trainer(Target(), {"metadata": {"name": "j"}, "status": {"active": 1}}, [failed]).phase == "Scheduled"
    )


def test_a_retrying_trainer_says_why_its_last_attempt_failed() -> None:
    """It flipped between Training and Scheduled with "1 trainer(s) running" for minutes; the cause
    was only in the trainer's log."""
    from edgetune_api.training_job import EdgeTrainingJobStatus  # noqa: PLC0415
    from edgetune_operator.reconcile.status import Observation, summarize  # noqa: PLC0415

    why = json.dumps({"status": "Failed", "reason": "StorageError", "message": "S3 upload refused: 403"})
    failed = {**_pod(why), "metadata": {"name": "p1"}}
    failed["status"]["phase"] = "Failed"
    again = {"metadata": {"name": "p2"}, "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}}
    job = {"metadata": {"name": "j"}, "status": {"active": 1}}
    status = observe_trainer(Target(), job, [failed, again])
    assert status.phase == "Training"
    assert status.message == "Retrying: 1 attempt(s) failed, the last with StorageError: S3 upload refused: 403"
    # The same container restarted in place (lastState) counts as well.
    last = {"terminated": {"exitCode": 1, "finishedAt": "2026-11-22T10:00:00Z", "message": why}}
    restarted = {"metadata": {"name": "p"}, "spec": {"nodeName": "n1"}, "status": {"phase": "Running",
                 "containerStatuses": [{"state": {"running": {}}, "lastState": last}]}}  # fmt: skip
    assert (observe_trainer(Target(), job, [restarted]).message or "").startswith("Retrying: 1 attempt(s) failed")
    assert observe_trainer(Target(), job, [again]).message is None  # a first attempt has nothing to say
    summary = summarize(_spec("trainingjob-gpu.yaml"), 1, EdgeTrainingJobStatus(), Observation(targets=[status]))
    training = next(c for c in summary.conditions if c.type == "Training")
    assert training.reason == "TrainerRetrying" and "StorageError: S3 upload refused: 403" in (training.message or "")


def test_a_running_trainers_progress_on_its_pod_reaches_its_target_status() -> None:
    """Before, a target's step, loss, memory and energy appeared only when the trainer exited."""
    progress = {"step": 40, "loss": 0.31, "evalLoss": 0.4, "peakMemoryBytes": 9000, "energyJoules": 12.5,
                "energyMethod": "estimate", "device": "cpu", "samples": 600, "at": "2026-12-07T10:00:10Z"}  # fmt: skip
    older = {**progress, "step": 20, "at": "2026-12-07T10:00:00Z"}

    def pod(name: str, value: dict[str, Any] | str, phase: str = "Running") -> dict[str, Any]:
        raw = value if isinstance(value, str) else json.dumps(value)
        return {"metadata": {"name": name, "annotations": {PROGRESS_ANNOTATION: raw}}, "spec": {"nodeName": "n1"},
                "status": {"phase": phase}}  # fmt: skip

    job = {"metadata": {"name": "j"}, "status": {"active": 1}}
    status = observe_trainer(Target(), job, [pod("p1", older, "Failed"), pod("p2", progress)])
    assert (status.phase, status.step, status.loss, status.eval_loss) == ("Training", 40, 0.31, 0.4)
    assert (status.peak_memory_bytes, status.energy_joules, status.energy_method, status.device, status.samples) == (
        9000, 12.5, "estimate", "cpu", 600)  # fmt: skip
    # The newest of two running attempts; a malformed or out-of-range annotation changes nothing.
    assert observe_trainer(Target(), job, [pod("a", progress), pod("b", older)]).step == 40
    for bad in ("not json", json.dumps({**progress, "energyJoules": -1}), json.dumps({"step": 3})):
        assert observe_trainer(Target(), job, [pod("p", bad)]).step is None
    # Once the trainer exits, its summary is the word: the annotation is not read.
    summary = json.dumps({"status": "Succeeded", "steps": 50, "deltaUri": "s3://b/p"})
    done = {**pod("p", progress, "Succeeded"), **{"spec": {"nodeName": "n1"}}}
    done["status"]["containerStatuses"] = _pod(summary)["status"]["containerStatuses"]
    assert observe_trainer(Target(), {"metadata": {"name": "j"}, "status": {}}, [done]).step == 50


def test_progress_alone_is_told_apart_from_changes_that_are_written_at_once() -> None:
    from edgetune_api.training_job import EdgeTrainingJobStatus, TargetStatus  # noqa: PLC0415
    from edgetune_operator.reconcile.status import progress_only  # noqa: PLC0415

    old = EdgeTrainingJobStatus(phase="Training", targets=[TargetStatus(cluster="a", phase="Training", step=10)])
    further = TargetStatus(cluster="a", phase="Training", step=20, loss=0.5, energy_joules=3.0)
    moved = old.model_copy(update={"targets": [further], "energy": "3 J (estimate)"})
    assert progress_only(old, moved)
    finished = old.model_copy(update={"targets": [TargetStatus(cluster="a", phase="Packaging", step=20)]})
    assert not progress_only(old, finished)
    assert not progress_only(old, old.model_copy(update={"phase": "Packaging"}))
    assert not progress_only(old, old.model_copy(update={"targets": [*old.targets, TargetStatus(cluster="b")]}))


def test_trainers_get_a_pod_bound_token_in_the_trainer_container_only_when_given_an_account() -> None:
    spec = _spec("trainingjob-gpu.yaml")
    plain = trainer_job(spec, JOB, Target("local"), Settings(), default_profiles()["gpu"][0])["spec"]["template"]
    assert "serviceAccountName" not in plain["spec"]
    assert not [v for v in plain["spec"]["volumes"] if "projected" in v]
    pod = trainer_job(spec, JOB, Target("local"), Settings(), default_profiles()["gpu"][0],
                      service_account="edgetune-trainer")["spec"]["template"]["spec"]  # fmt: skip
    assert pod["serviceAccountName"] == "edgetune-trainer" and pod["automountServiceAccountToken"] is False
    (volume,) = [v for v in pod["volumes"] if "projected" in v]
    sources = volume["projected"]["sources"]
    assert sources[0]["serviceAccountToken"]["expirationSeconds"] <= 3607
    assert sources[1]["configMap"]["name"] == "kube-root-ca.crt"
    (trainer,) = pod["containers"]
    assert {"name": volume["name"], "mountPath": SA_DIR, "readOnly": True} in trainer["volumeMounts"]
    assert not [m for m in pod["initContainers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    env = {e["name"]: e for e in trainer["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
