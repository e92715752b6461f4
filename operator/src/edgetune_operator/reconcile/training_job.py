"""EdgeTrainingJob reconciliation logic, as pure functions: desired children from the spec, and
trainer status from observed children. No I/O here; the handlers fetch and apply.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import ValidationError

from edgetune_api.meta import API_VERSION, Condition, parse_duration
from edgetune_api.trainer_config import PROGRESS_ANNOTATION, TrainerConfig, TrainerProgress, TrainerRuntime, TrainerSpec
from edgetune_api.training_job import DataSource, EdgeTrainingJobSpec, TargetStatus
from edgetune_operator.settings import AcceleratorProfile, Settings

DATA_DIR = "/data"
EVAL_DATA_DIR = "/data-eval"
WORK_DIR = "/work"
BASE_DIR = "/base-model"
"""Where a base model already on the node (``baseModel.uri`` a path) is mounted, read-only."""
CONFIG_DIR = "/etc/edgetune"
TERMINATION_LOG = "/dev/termination-log"
CREDENTIALS_DIR = f"{CONFIG_DIR}/credentials"
CONFIG_FILE = "config.json"
"""One Secret per trainer, made by the operator: what that trainer alone may use (docs/security.md)."""
TRAINER_KEY = "key.pem"
SALT = "salt"
UPLOAD_POLICY = "upload.json"
BASE_FILES = "base.json"
MAX_URL_SECONDS = 7 * 24 * 3600
"""The longest an S3 SigV4 presigned URL or POST policy may live."""
TRAINER_UID = 10001
LABEL_JOB = "edgetune.io/training-job"
LABEL_TARGET = "edgetune.io/target"
LABEL_JOB_UID = "edgetune.io/training-job-uid"
ANNOTATION_CLUSTER = "edgetune.io/target-cluster"
ANNOTATION_NODE = "edgetune.io/target-node"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
"""Where the trainer container (only it, not its init container) gets its pod-bound token and CA."""
TOKEN_SECONDS = 3607


@dataclass(frozen=True)
class JobRef:
    """The EdgeTrainingJob a child belongs to."""

    name: str
    namespace: str
    uid: str
    generation: int = 1
    created: float = 0.0
    """When the job was created (Unix time; 0 when not known)."""


@dataclass(frozen=True)
class Target:
    """Where one trainer runs: a cluster, and with perNode a node of it."""

    cluster: str = "local"
    node: str | None = None

    @property
    def key(self) -> str:
        """A short, stable, DNS-safe id of the target (part of child names)."""
        raw = f"{self.cluster}/{self.node or '*'}"
        readable = re.sub(r"[^a-z0-9-]", "-", (self.node or self.cluster).lower()).strip("-")[:20].strip("-")
        return f"{readable}-{hashlib.sha256(raw.encode()).hexdigest()[:6]}"


def child_name(job: JobRef, target: Target) -> str:
    """``<job>-<target key>``, within the 63 characters a Job's pods may carry as a label."""
    return f"{job.name[: 63 - len(target.key) - 1]}-{target.key}"


def s3_prefix(spec: EdgeTrainingJobSpec, job: JobRef, target: Target) -> str:
    parts = [spec.output.s3.prefix.strip("/"), job.namespace, job.name, target.cluster, target.node or "any"]
    return "/".join(p for p in parts if p)


def trainer_config(spec: EdgeTrainingJobSpec, job: JobRef, target: Target, settings: Settings) -> TrainerConfig:
    """What the trainer pod reads from its Secret's ``config.json``: the spec as validated, plus its runtime."""
    return TrainerConfig(
        spec=TrainerSpec.of(spec),
        runtime=TrainerRuntime(
            data_dir=DATA_DIR,
            eval_data_dir=EVAL_DATA_DIR if spec.data.eval_source else None,
            work_dir=WORK_DIR,
            termination_log=TERMINATION_LOG,
            s3_endpoint=spec.output.s3.endpoint or settings.s3_endpoint,
            s3_bucket=spec.output.s3.bucket,
            s3_prefix=s3_prefix(spec, job, target),
            trainer_key_path=f"{CREDENTIALS_DIR}/{TRAINER_KEY}" if spec.output.signing_key_secret_ref else None,
            salt_path=f"{CREDENTIALS_DIR}/{SALT}" if spec.data.privacy.salt_secret_ref else None,
            upload_policy_path=f"{CREDENTIALS_DIR}/{UPLOAD_POLICY}",
            base_files_path=f"{CREDENTIALS_DIR}/{BASE_FILES}" if spec.base_model.remote else None,
            base_dir=BASE_DIR if spec.base_model.node_path else None,
            pushgateway_url=settings.pushgateway_url,
            progress_seconds=settings.progress_seconds if settings.trainer_service_account else 0.0,
            job_namespace=job.namespace,
            job_name=job.name,
            job_uid=job.uid,
            cluster=target.cluster,
            node=target.node,
        ),
    )


def credentials_seconds(spec: EdgeTrainingJobSpec, settings: Settings) -> int:
    """How long a trainer's upload policy and download URLs live: its deadline and the grace
    periods plus an hour, else (no deadline) the longest S3 allows."""
    if not spec.budgets.deadline:
        return MAX_URL_SECONDS
    return min(MAX_URL_SECONDS, int(parse_duration(spec.budgets.deadline)) + 2 * settings.termination_grace_seconds
               + 3600)  # fmt: skip


def trainer_key_context(job_uid: str, child: str) -> str:
    """What a trainer's signing key is derived for: one job, one trainer Job (``TargetStatus.jobName``)."""
    return f"{job_uid}/{child}"


def trainer_secret(
    spec: EdgeTrainingJobSpec, job: JobRef, target: Target, settings: Settings, credentials: dict[str, bytes]
) -> dict[str, Any]:
    """The trainer's one object besides its Job (same name): its configuration (``config.json``: the
    spec as validated plus its runtime) and its credentials. One object rather than a ConfigMap and
    a Secret: one request less per trainer, and the configuration is as private as the data paths
    in it. On the hub owned by the EdgeTrainingJob; on an edge cluster deleted by name once the
    package is verified or the job is deleted."""
    config = trainer_config(spec, job, target, settings)
    data = {**credentials, CONFIG_FILE: json.dumps(config.to_wire(), sort_keys=True, indent=1).encode()}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": child_name(job, target),
            "namespace": job.namespace,
            "labels": _labels(job, target, settings),
            **({"ownerReferences": [owner_reference(job)]} if target.cluster == "local" else {}),
        },
        "data": {k: base64.b64encode(v).decode() for k, v in sorted(data.items())},
    }


def _labels(job: JobRef, target: Target, settings: Settings) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "edgetune",
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/managed-by": "edgetune-operator",
        LABEL_JOB: job.name,
        LABEL_JOB_UID: job.uid,
        LABEL_TARGET: target.key,
        **settings.trainer_labels,
    }


def owner_reference(job: JobRef) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "EdgeTrainingJob",
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _data_volume(name: str, source: DataSource) -> dict[str, Any]:
    if source.host_path:
        return {"name": name, "hostPath": {"path": source.host_path, "type": "Directory"}}
    pvc = source.persistent_volume_claim
    if pvc is None:  # the CRD's CEL rule makes this unreachable for applied objects
        raise ValueError("a data source needs hostPath or persistentVolumeClaim")
    return {"name": name, "persistentVolumeClaim": {"claimName": pvc.claim_name, "readOnly": True}}


def _volumes(spec: EdgeTrainingJobSpec, job: JobRef, target: Target, settings: Settings) -> list[dict[str, Any]]:
    data = _data_volume("data", spec.data.source)
    work = f"{settings.work_host_path.rstrip('/')}/{job.namespace}/{job.name}-{job.uid[:8]}/{target.key}"
    volumes = [
        data,
        *([_data_volume("eval-data", spec.data.eval_source)] if spec.data.eval_source else []),
        {"name": "work", "hostPath": {"path": work, "type": "DirectoryOrCreate"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
    ]
    if (base := spec.base_model.node_path) is not None:
        volumes.append({"name": "base-model", "hostPath": {"path": base, "type": "Directory"}})
    keys = [UPLOAD_POLICY]  # under credentials/; config.json beside it
    if spec.output.signing_key_secret_ref:
        keys.append(TRAINER_KEY)
    if spec.data.privacy.salt_secret_ref:
        keys.append(SALT)
    if spec.base_model.remote:
        keys.append(BASE_FILES)
    items = [{"key": CONFIG_FILE, "path": CONFIG_FILE}, *({"key": k, "path": f"credentials/{k}"} for k in keys)]
    volumes.append({"name": "config", "secret": {"secretName": child_name(job, target), "defaultMode": 0o440,
                                                 "items": items}})  # fmt: skip
    return volumes


def _mounts(spec: EdgeTrainingJobSpec) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {
            "name": "data",
            "mountPath": DATA_DIR,
            "readOnly": True,
            **({"subPath": p.sub_path} if (p := spec.data.source.persistent_volume_claim) and p.sub_path else {}),
        },
        {"name": "work", "mountPath": WORK_DIR},
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - the container's own scratch space
    ]
    if spec.base_model.node_path is not None:
        mounts.append({"name": "base-model", "mountPath": BASE_DIR, "readOnly": True})
    if (held := spec.data.eval_source) is not None:
        pvc = held.persistent_volume_claim
        mounts.append({"name": "eval-data", "mountPath": EVAL_DATA_DIR, "readOnly": True,
                       **({"subPath": pvc.sub_path} if pvc and pvc.sub_path else {})})  # fmt: skip
    return mounts


def _args(spec: EdgeTrainingJobSpec) -> list[str]:
    """Every mounted path the trainer reads, on its command line (the config file holds the same
    paths; arguments are what ``kubectl describe`` shows and what a runtime may remap)."""
    args = ["--config", f"{CONFIG_DIR}/{CONFIG_FILE}", "--data-dir", DATA_DIR, "--work-dir", WORK_DIR,
            "--termination-log", TERMINATION_LOG]  # fmt: skip
    if spec.data.eval_source:
        args += ["--eval-data-dir", EVAL_DATA_DIR]
    args += ["--upload-policy", f"{CREDENTIALS_DIR}/{UPLOAD_POLICY}"]
    if spec.output.signing_key_secret_ref:
        args += ["--trainer-key", f"{CREDENTIALS_DIR}/{TRAINER_KEY}"]
    if spec.data.privacy.salt_secret_ref:
        args += ["--salt-file", f"{CREDENTIALS_DIR}/{SALT}"]
    if spec.base_model.remote:
        args += ["--base-files", f"{CREDENTIALS_DIR}/{BASE_FILES}"]
    if spec.base_model.node_path is not None:
        args += ["--base-dir", BASE_DIR]
    return args


def trainer_job(
    spec: EdgeTrainingJobSpec,
    job: JobRef,
    target: Target,
    settings: Settings,
    profile: AcceleratorProfile,
    *,
    candidates: list[str] | None = None,
    service_account: str | None = None,
) -> dict[str, Any]:
    """The batch/v1 Job that runs one trainer: budgets as resources and deadline, the accelerator
    profile as requests, node selector and tolerations, a locked-down pod, data mounted read-only.
    ``candidates`` (nodes holding enough data) become a required node affinity. With
    ``service_account`` the trainer container alone gets that account's token, bound to the pod,
    to write its progress on its pod; without, no token at all."""
    labels = _labels(job, target, settings)
    resources: dict[str, dict[str, str]] = {
        "requests": {"memory": spec.budgets.memory, "cpu": "500m"},
        "limits": {"memory": spec.budgets.memory},
    }
    if profile.resource:
        count = str(spec.placement.accelerator_count)
        resources["requests"][profile.resource] = count
        resources["limits"][profile.resource] = count
    node_selector = {**spec.placement.node_selector, **profile.node_labels}
    if target.node:
        node_selector["kubernetes.io/hostname"] = target.node
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": sorted(candidates)}]}
    ]}}} if candidates and not target.node else None  # fmt: skip
    tolerations = [t.to_wire() for t in spec.placement.tolerations] + list(profile.tolerations)
    env = [
        {"name": "HOME", "value": "/tmp"},  # noqa: S108 - read-only root: the pod's own emptyDir
        {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},  # noqa: S108
        {"name": "EDGETUNE_NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
    ]
    volumes, mounts = _volumes(spec, job, target, settings), _mounts(spec)
    if service_account:
        env += [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "EDGETUNE_TRAINER_SA_DIR", "value": SA_DIR},  # the default, spelled out for remapping runtimes
        ]
        volumes.append({"name": "kube-api-access", "projected": {"defaultMode": 0o440, "sources": [
            {"serviceAccountToken": {"path": "token", "expirationSeconds": TOKEN_SECONDS}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        ]}})  # fmt: skip
        mounts.append({"name": "kube-api-access", "mountPath": SA_DIR, "readOnly": True})
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        **({"serviceAccountName": service_account} if service_account else {}),
        # Not automounted: the token is mounted into the trainer container alone (volumes above),
        # never into the init container that runs as root.
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "nodeSelector": node_selector,
        **({"affinity": affinity} if affinity else {}),
        "tolerations": tolerations,
        # The checkpoint folder is a hostPath the kubelet creates as root:root 0755; the trainer is
        # not root. This init container hands it over, as root with CAP_CHOWN and nothing else.
        "initContainers": [
            {
                "name": "work-dir",
                "image": settings.trainer_image,
                "imagePullPolicy": settings.trainer_image_pull_policy,
                "args": ["prepare-work-dir", WORK_DIR, "--owner", f"{TRAINER_UID}:{TRAINER_UID}"],
                "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}},
                "securityContext": {
                    "runAsUser": 0,
                    "runAsNonRoot": False,
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]},
                },
                "volumeMounts": [{"name": "work", "mountPath": WORK_DIR}],
            }
        ],
        "containers": [
            {
                "name": "trainer",
                "image": settings.trainer_image,
                "imagePullPolicy": settings.trainer_image_pull_policy,
                "args": _args(spec),
                "env": env,
                "resources": resources,
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": mounts,
                "terminationMessagePath": TERMINATION_LOG,
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ],
        "volumes": volumes,
    }  # fmt: skip
    job_spec: dict[str, Any] = {
        "backoffLimit": settings.backoff_limit,
        "suspend": spec.suspend,
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    if spec.budgets.deadline:
        # The trainer stops itself at the deadline and packages; the grace covers that, then Kubernetes acts.
        job_spec["activeDeadlineSeconds"] = (
            int(parse_duration(spec.budgets.deadline)) + 2 * settings.termination_grace_seconds
        )
    annotations = {ANNOTATION_CLUSTER: target.cluster, **({ANNOTATION_NODE: target.node} if target.node else {})}
    metadata: dict[str, Any] = {
        "name": child_name(job, target),
        "namespace": job.namespace,
        "labels": labels,
        "annotations": annotations,
    }
    if target.cluster == "local":  # owner references cannot cross clusters
        metadata["ownerReferences"] = [owner_reference(job)]
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}


# -- observed state -> status --------------------------------------------------------------------


def set_condition(
    conditions: list[Condition], kind: str, status: bool, *, reason: str, message: str, generation: int,
    now: datetime | None = None,
) -> list[Condition]:  # fmt: skip
    """Conditions with ``kind`` set; ``lastTransitionTime`` moves only when the status changes."""
    value: Literal["True", "False"] = "True" if status else "False"
    now = now or datetime.now(UTC).replace(microsecond=0)
    out = []
    found = False
    for cond in conditions:
        if cond.type != kind:
            out.append(cond)
            continue
        found = True
        changed = cond.status != value
        out.append(cond.model_copy(update={
            "status": value, "reason": reason, "message": message, "observed_generation": generation,
            "last_transition_time": now if changed else cond.last_transition_time,
        }))  # fmt: skip
    if found:
        return out
    out.append(Condition(type=kind, status=value, reason=reason, message=message, last_transition_time=now,
                         observed_generation=generation))  # fmt: skip
    return out


RETRYING = "Retrying"
"""How a trainer that is retrying after a failed attempt starts its message."""


def _termination(pods: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str | None]:
    """The newest trainer termination message (parsed when it is the trainer's JSON) and its node."""
    finished = []
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            for state in (status.get("state") or {}, status.get("lastState") or {}):  # a restart keeps the last
                terminated = state.get("terminated")
                if terminated:
                    finished.append((terminated.get("finishedAt") or "", terminated.get("message") or "", pod))
    if not finished:
        return None, None
    _, message, pod = max(finished, key=lambda item: item[0])
    node = (pod.get("spec") or {}).get("nodeName")
    try:
        parsed = json.loads(message)
    except json.JSONDecodeError:
        return {"reason": "Failed", "message": message.strip()[-1000:]}, node
    return (parsed if isinstance(parsed, dict) else {"message": str(parsed)}), node


def _pod_phase(pod: dict[str, Any]) -> str | None:
    phase: str | None = (pod.get("status") or {}).get("phase")
    return phase


PROGRESS_FIELDS = tuple(name for name in TrainerProgress.model_fields if name != "at")
"""What a running trainer's progress annotation carries into its ``TargetStatus`` (same names)."""


def live_progress(pods: list[dict[str, Any]]) -> TrainerProgress | None:
    """The newest progress a running trainer wrote on its pod; a malformed one is ignored (it is the
    trainer's word: it can make the status no worse than the trainer's own summary would)."""
    newest: TrainerProgress | None = None
    for pod in pods:
        raw = ((pod.get("metadata") or {}).get("annotations") or {}).get(PROGRESS_ANNOTATION)
        if not raw or _pod_phase(pod) != "Running":
            continue
        try:
            progress = TrainerProgress.model_validate_json(raw)
        except ValidationError:
            continue
        if newest is None or progress.at > newest.at:
            newest = progress
    return newest


def observe_trainer(target: Target, job: dict[str, Any] | None, pods: list[dict[str, Any]]) -> TargetStatus:
    """One trainer's status from its Job and the Job's pods (as the apiserver returns them)."""
    status = TargetStatus(cluster=target.cluster, node=target.node)
    if job is None:
        return status
    status.job_name = job["metadata"]["name"]
    job_conditions = {
        c["type"]: c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"
    }
    summary, node = _termination(pods)
    status.node = (
        status.node
        or node
        or next(((p.get("spec") or {}).get("nodeName") for p in pods if (p.get("spec") or {}).get("nodeName")), None)
    )
    if summary:
        status.step = summary.get("steps")
        status.samples = summary.get("samples")
        status.peak_memory_bytes = summary.get("peakMemoryBytes")
        status.energy_joules = summary.get("energyJoules")
        status.energy_method = summary.get("energyMethod")
        status.device = summary.get("device")
        status.delta_uri = summary.get("deltaUri")
        metrics = summary.get("metrics") or {}
        status.loss = metrics.get("train_loss")
        status.eval_loss = metrics.get("eval_loss")
    # The pods say first what the Job's status says later: under load the Job controller records a
    # pod's start or success seconds to minutes after the kubelet did, and each state seen on the way
    # would cost the EdgeTrainingJob a status write. One pod succeeding completes the Job (one
    # completion), so its summary is the trainer's outcome whether or not the Job says so yet.
    live = [
        p
        for p in pods
        if _pod_phase(p) in ("Pending", "Running") and not (p.get("metadata") or {}).get("deletionTimestamp")
    ]
    if "Complete" in job_conditions or any(_pod_phase(p) == "Succeeded" for p in pods):
        status.phase = "Packaging" if summary and summary.get("status") == "Succeeded" else "Failed"
        if status.phase == "Failed":
            status.message = "the trainer exited 0 but left no success summary"
    elif "Failed" in job_conditions or "FailureTarget" in job_conditions:
        cond = job_conditions.get("Failed") or job_conditions["FailureTarget"]
        status.phase = "Failed"
        detail = f"{summary.get('reason')}: {summary.get('message')}" if summary else cond.get("message", "")
        status.message = f"{cond.get('reason', 'Failed')}: {detail}"[:4096]
    elif live or (job.get("status") or {}).get("active"):
        status.phase = "Training" if any(_pod_phase(p) == "Running" for p in live) else "Scheduled"
        # A trainer retrying (the Job's backoff) says why the last attempt failed, not only that
        # "1 trainer(s) running": the cause was in the pod logs alone.
        attempts = sum(_pod_phase(p) == "Failed" for p in pods) + sum(
            int(((c.get("lastState") or {}).get("terminated") or {}).get("exitCode", 0) != 0)
            for p in live for c in (p.get("status") or {}).get("containerStatuses") or [])  # fmt: skip
        if attempts and summary and summary.get("status") != "Succeeded":
            status.message = (f"{RETRYING}: {attempts} attempt(s) failed, the last with {summary.get('reason')}: "
                              f"{summary.get('message')}")[:4096]  # fmt: skip
        # While it trains, the trainer's own word on its pod (a retried one's supersedes the last summary).
        if status.phase == "Training" and (progress := live_progress(live)) is not None:
            for name in PROGRESS_FIELDS:
                if (value := getattr(progress, name)) is not None:
                    setattr(status, name, value)
    elif (job.get("spec") or {}).get("suspend"):
        status.phase = "Suspended"
    return status
