"""The trainer's configuration: the EdgeTrainingJob spec plus where things are inside the pod.

The operator writes it as JSON (a ConfigMap mounted into the trainer pod, or a file on the
command line); the trainer parses it with these same models, so a field means the same on
both sides.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from edgetune_api.meta import ApiModel
from edgetune_api.training_job import EdgeTrainingJobSpec


class TrainerRuntime(ApiModel):
    """Paths, identities and endpoints of one trainer run."""

    data_dir: str = "/data"
    """Where the node-local data is mounted (read-only)."""
    eval_data_dir: str | None = None
    """Where spec.data.evalSource is mounted (none without one)."""
    work_dir: str = "/work"
    """Checkpoints and the package under construction; survives pod retries (a PVC or hostPath)."""
    termination_log: str = "/dev/termination-log"
    """Where the JSON summary is written on exit (Kubernetes reads at most 4 KiB)."""
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 0
    """Serve Prometheus metrics on this port; 0 disables the server."""
    pushgateway_url: str | None = None
    """Push metrics here (every evaluation and at exit) when scraping the pod is not possible."""
    s3_endpoint: str | None = None
    """S3 endpoint URL; AWS when empty."""
    s3_bucket: str | None = None
    """Bucket for the package; no upload when empty (the package stays in work_dir)."""
    s3_prefix: str = ""
    """Key prefix of this trainer's package (the operator makes it unique per job/cluster/node)."""
    signing_key_path: str | None = None
    """Ed25519 private key (PEM) that signs the manifest as manifest.sig (a trainer run by hand; under
    the operator trainers get ``trainer_key_path`` and the hub signs after verifying)."""
    trainer_key_path: str | None = None
    """Ed25519 private key (PEM) the operator derived for this trainer only: signs trainer.sig."""
    upload_policy_path: str | None = None
    """An ``UploadPolicy`` (JSON): upload the package with it instead of S3 credentials."""
    base_files_path: str | None = None
    """A ``BaseFiles`` (JSON): download a remote base model from these URLs instead of with S3 or
    MLflow access of its own."""
    salt_path: str | None = None
    """File with the salt for privacy.hashFields."""
    job_namespace: str | None = None
    """Namespace of the EdgeTrainingJob (lineage)."""
    job_name: str | None = None
    """Name of the EdgeTrainingJob (lineage)."""
    job_uid: str | None = None
    """UID of the EdgeTrainingJob (lineage)."""
    cluster: str = "local"
    """Cluster the trainer runs in (lineage)."""
    node: str | None = None
    """Node the trainer runs on (lineage, metric labels)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: auto picks CUDA when present."""
    power_supply_root: str = "/sys/class/power_supply"
    """Where battery state is read (the kernel's sysfs layout)."""
    powercap_root: str = "/sys/class/powercap"
    """Where RAPL energy counters are read (the kernel's sysfs layout)."""
    watts_estimate: Annotated[float, Field(gt=0)] = 15.0
    """Power assumed per busy CPU core when no meter is readable; results are labelled estimate."""
    threads: Annotated[int, Field(ge=0)] = 0
    """torch CPU threads; 0 keeps torch's default."""


class UploadPolicy(ApiModel):
    """A presigned S3 POST policy the operator hands one trainer: it may store objects under its own
    package prefix (at most ``maxBytes`` each) until ``expires``, and nothing else. No S3
    credentials leave the hub."""

    url: str
    """Where to POST (the bucket's URL)."""
    bucket: str
    """The bucket (the package's URI is ``s3://<bucket>/<prefix>``)."""
    fields: dict[str, str]
    """Form fields S3 checks (policy, signature, credential scope); ``key`` is set per file."""
    prefix: str
    """The key prefix the policy allows (``<prefix>/<file name>``)."""
    expires: str
    """When the policy stops working (RFC 3339)."""


class BaseFiles(ApiModel):
    """A remote base model resolved on the hub (``models:/…`` through MLflow, ``s3://…`` listed)
    and presigned object by object, so the trainer needs neither S3 nor MLflow credentials."""

    uri: str
    """The base model as the job names it."""
    source: str
    """Where it resolved to (``s3://bucket/prefix``)."""
    files: dict[str, str]
    """Relative path in the model folder -> presigned GET URL."""
    expires: str
    """When the URLs stop working (RFC 3339)."""


class TrainerConfig(ApiModel):
    """Everything one trainer run needs."""

    spec: EdgeTrainingJobSpec
    """The job's spec, as validated by the apiserver."""
    runtime: TrainerRuntime = Field(default_factory=TrainerRuntime)
    """Where things are inside the pod."""
