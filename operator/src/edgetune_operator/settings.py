"""Operator settings: what differs between installations (images, accelerator profiles, endpoints).

Read once at start-up from environment variables (the Helm chart sets them); pure data afterwards.
"""

from __future__ import annotations

import fnmatch
import json
import os
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class AcceleratorProfile(BaseModel):
    """How one kind of accelerator appears on nodes: the extended resource a trainer requests, and
    the labels and taints of nodes that have it."""

    model_config = ConfigDict(extra="forbid")

    resource: str | None = None
    """Extended resource requested per accelerator (None for CPU-only)."""
    node_labels: dict[str, str] = Field(default_factory=dict)
    """Labels a node of this kind carries; become the trainer pod's node selector."""
    tolerations: list[dict[str, str]] = Field(default_factory=list)
    """Tolerations for taints such nodes usually carry."""


def default_profiles() -> dict[str, list[AcceleratorProfile]]:
    """Profiles per `placement.accelerator`; an NPU can be any of several vendors' devices."""
    return {
        "gpu": [
            AcceleratorProfile(
                resource="nvidia.com/gpu",
                tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            )
        ],
        "npu": [
            AcceleratorProfile(resource="rockchip.com/npu"),
            AcceleratorProfile(resource="hailo.ai/h8"),
            AcceleratorProfile(resource="huawei.com/Ascend310P"),
            AcceleratorProfile(resource="npu.intel.com/accel"),
        ],
        "cpu": [AcceleratorProfile()],
    }


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    trainer_image: str = "edgetune/trainer:0.1.0"
    """Image of trainer pods."""
    trainer_image_pull_policy: str = "IfNotPresent"
    """imagePullPolicy of trainer pods."""
    accelerator_profiles: dict[str, list[AcceleratorProfile]] = Field(default_factory=default_profiles)
    """Resource names, node labels and tolerations per placement.accelerator kind (JSON; docs/operator.md)."""
    trainer_labels: dict[str, str] = Field(default_factory=dict)
    """Extra labels on trainer pods (e.g. for a service mesh, or the test environment's executor)."""
    work_host_path: str = "/var/lib/edgetune/work"
    """Node folder under which each trainer keeps its checkpoints, so a retried pod on the same node resumes."""
    backoff_limit: Annotated[int, Field(ge=0)] = 3
    """Retries of a trainer pod (each resumes from its last checkpoint)."""
    termination_grace_seconds: Annotated[int, Field(ge=1)] = 60
    """Time a trainer gets after SIGTERM to write its checkpoint."""
    trainer_service_account: str = "edgetune-trainer"
    """ServiceAccount of trainer pods, created with a RoleBinding to the ClusterRole of the same name
    in each namespace trainers run in (on every cluster); its token only lets a trainer write its
    progress annotation on its own pod (the chart's edgetune-trainer-own-pod policy). Empty: trainers
    get no token, and a job's status shows progress only when each trainer exits."""
    progress_seconds: Annotated[float, Field(ge=0)] = 10.0
    """How often a running trainer writes its progress on its pod, and how often progress alone
    (step, loss, memory, energy) may cause a job's status write (other changes are written at once)."""
    mlflow_tracking_uri: str | None = None
    """MLflow tracking server the operator registers adapters in (and trainers may read base models from)."""
    s3_endpoint: str | None = None
    """Default S3 endpoint for jobs that name none (AWS when empty too)."""
    s3_endpoints_allowed: list[str] = Field(default_factory=list)
    """Other S3 endpoints (glob patterns, JSON list) jobs and releases may name for the operator to
    call; any other is refused with a clear condition."""
    pushgateway_url: str | None = None
    """Where trainers push their metrics (Prometheus cannot scrape pods on remote edge clusters)."""
    crd_wait_seconds: Annotated[float, Field(ge=0)] = 120.0
    """At start-up, how long to wait for the API server to serve edgetune's CRDs before stopping
    with an error that says to install them (``discovery``)."""
    resync_seconds: Annotated[float, Field(gt=0)] = 10.0
    """How often an unfinished job waiting for what no watch reports (an unreachable cluster, data,
    nodes) is reconciled again."""
    local_resync_seconds: Annotated[float, Field(gt=0)] = 60.0
    """Safety-net resync of every other unfinished job (the watches of its trainer Jobs and pods wake it)."""
    batch_seconds: Annotated[float, Field(ge=0)] = 1.0
    """Changes of a job's trainer Jobs and pods are collected this long before the job is reconciled
    (one status write for a burst; the status lags by as much)."""
    retry_first_seconds: Annotated[float, Field(gt=0)] = 2.0
    """First delay before a job held up by S3 or MLflow is retried; doubled per attempt (with jitter)."""
    retry_max_seconds: Annotated[float, Field(gt=0)] = 300.0
    """Cap of that delay."""
    cluster_lost_after_seconds: Annotated[float, Field(gt=0)] = 300.0
    """An edge cluster silent for longer fails its unfinished trainers (the job's other clusters go on)."""
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 8080
    """Port of the operator's /metrics; 0 disables it."""
    health_port: Annotated[int, Field(ge=0, le=65535)] = 8081
    """Port of the liveness endpoint (/healthz); 0 disables it."""
    node_cache_seconds: Annotated[float, Field(ge=0)] = 5.0
    """Nodes of a cluster are listed at most this often (placement and sample counts may lag by as much)."""
    namespaces: list[str] = Field(default_factory=list)
    """Serve EdgeTrainingJobs only in namespaces matching these glob patterns (JSON list, e.g.
    ``["team-*"]``); empty: every namespace. EdgeClusters are cluster-scoped and always served."""
    workers: Annotated[int, Field(ge=1, le=256)] = 8
    """Threads running reconciles of EdgeTrainingJobs and kopf's handlers (calls to Kubernetes, S3
    and MLflow block); a de-duplicating queue feeds them, so a backlog is a list of names, not threads."""
    prometheus_url: str | None = None
    """Prometheus that AdapterRelease analyses query (e.g. http://prometheus.monitoring:9090)."""
    leader_election: bool = False
    """Take part in leader election over a Lease before reconciling (more than one replica: the chart
    turns it on); standbys wait, answering their liveness probe."""
    leader_election_namespace: str | None = None
    """Namespace of the Lease ``edgetune-operator`` (default: the pod's own namespace)."""
    release_resync_seconds: Annotated[float, Field(gt=0)] = 2.0
    """Every running AdapterRelease is reconciled at least this often (analysis intervals, agents'
    confirmations on edge clusters, pause durations)."""

    def serves(self, namespace: str) -> bool:
        """Whether ``namespace`` is one this operator serves (``namespaces`` patterns; all when empty)."""
        return not self.namespaces or any(fnmatch.fnmatchcase(namespace, p) for p in self.namespaces)

    @classmethod
    def describe(cls) -> str:
        """Every setting as its environment variable, its meaning and its default (``--help``)."""
        lines = ["settings (environment variables; JSON for lists and maps):"]
        for name, field in cls.model_fields.items():
            default = field.get_default(call_default_factory=True)
            if name == "accelerator_profiles":
                shown: object = "gpu and npu profiles (settings.default_profiles)"
            else:
                shown = json.dumps(default) if isinstance(default, list | dict) else default
                shown = "none" if shown in (None, "[]", "{}") else shown
            doc = " ".join((field.description or "").split())
            lines.append(f"  EDGETUNE_{name.upper()}\n      {doc} (default: {shown})")
        return "\n".join(lines)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        """``EDGETUNE_<FIELD>`` variables; JSON for the structured ones."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name, field in cls.model_fields.items():
            raw = env.get(f"EDGETUNE_{name.upper()}")
            if raw is None:
                continue
            structured = field.annotation not in (str, int, float, str | None)
            values[name] = json.loads(raw) if structured else raw
        return cls.model_validate(values)
