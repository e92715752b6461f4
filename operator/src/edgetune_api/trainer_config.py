"""The trainer's configuration: the EdgeTrainingJob spec plus where things are inside the pod.

The operator writes it as JSON (a Secret mounted into the trainer pod); a person running the trainer
by hand writes it as JSON or YAML, or hands over an EdgeTrainingJob manifest. The trainer parses it
with these same models, so a field means the same on both sides; only what matters to the operator
alone (where the data is mounted from, S3 and MLflow) is optional here (``TrainerSpec``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StringConstraints

from edgetune_api.meta import ApiModel
from edgetune_api.training_job import (
    DataSource,
    DataSpec,
    EdgeTrainingJobSpec,
    MlflowOutput,
    OutputSpec,
    S3Output,
)

Baseline = Literal["head", "full"]
"""What a baseline run trains instead of an adapter (a run by hand): the output head alone (a linear
probe on frozen features) or every weight of the base (full fine-tuning)."""


class TrainerDataSpec(DataSpec):
    """``spec.data`` as the trainer reads it: ``source`` may be left out (runtime.dataDir says where)."""

    source: DataSource | None = None  # type: ignore[assignment]
    """Where the data lives on the node. Under the operator it is mounted at runtime.dataDir; a run by
    hand without runtime.dataDir (or --data-dir) reads the hostPath folder itself."""


class TrainerOutputSpec(OutputSpec):
    """``spec.output`` as the trainer reads it: S3 and MLflow are the operator's business (the
    trainer uploads with the policy it is handed; without one the package stays in workDir)."""

    s3: S3Output | None = None  # type: ignore[assignment]
    """Ignored by the trainer (the operator's upload policy, or runtime.s3Bucket by hand)."""
    mlflow: MlflowOutput | None = None  # type: ignore[assignment]
    """Ignored by the trainer (the operator registers the verified package)."""


class TrainerSpec(EdgeTrainingJobSpec):
    """The EdgeTrainingJob spec as the trainer reads it: the same fields and rules, except that those
    only the operator acts on may be left out, so a local run names what it uses and nothing else."""

    data: TrainerDataSpec
    """The node-local data."""
    output: TrainerOutputSpec = Field(default_factory=TrainerOutputSpec)
    """Encoding and its quality bound (S3, MLflow and signing are the operator's)."""

    @classmethod
    def of(cls, spec: EdgeTrainingJobSpec) -> TrainerSpec:
        """The trainer's view of a validated job spec (what the operator hands every trainer)."""
        return cls.model_validate(spec.model_dump(by_alias=True, exclude_unset=True))


class TrainerRuntime(ApiModel):
    """Paths, identities and endpoints of one trainer run."""

    data_dir: str | None = None
    """Where the node-local data is (mounted read-only under the operator, at /data). Left out in a run
    by hand, the trainer reads spec.data.source.hostPath."""
    eval_data_dir: str | None = None
    """Where spec.data.evalSource is mounted (none without one)."""
    work_dir: str | None = None
    """Checkpoints and the package under construction; survives pod retries (a hostPath at /work under
    the operator). Left out in a run by hand: ``edgetune-work`` in the current folder."""
    termination_log: str | None = None
    """Where the JSON summary is written on exit (Kubernetes reads at most 4 KiB). Left out: the
    container's /dev/termination-log when there is one, else standard output."""
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
    base_dir: str | None = None
    """Where a base model already on the node is mounted (read-only); read instead of the path in
    ``baseModel.uri``, which stays the lineage."""
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
    progress_seconds: Annotated[float, Field(ge=0)] = 10.0
    """While training, the trainer writes its progress (``TrainerProgress``) into its own pod's
    ``edgetune.io/trainer-progress`` annotation at most this often, when it runs in a pod with a
    service-account token (the operator's trainers); 0 turns it off."""
    baseline: Baseline | None = None
    """A baseline run by hand instead of an adapter: train the output head alone (``head``) or every
    weight of the base (``full``) with the same data, split, loop and budgets, and report its
    metrics; nothing is packaged. Shows what LoRA recovers against a linear probe and against full
    fine-tuning (docs/trainer.md)."""


Finite = Annotated[float, Field(allow_inf_nan=False)]
PROGRESS_ANNOTATION = "edgetune.io/trainer-progress"
"""The annotation a running trainer keeps its ``TrainerProgress`` in (JSON), on its own pod."""


class TrainerProgress(ApiModel):
    """How far a running trainer is: written on its own pod while it trains, read by the operator
    into the job's ``status.targets`` (the termination summary supersedes it when the trainer exits)."""

    model_config = ConfigDict(**{**ApiModel.model_config, "extra": "ignore"})  # a newer trainer may say more

    step: Annotated[int, Field(ge=0)] | None = None
    """Optimizer steps done."""
    loss: Finite | None = None
    """Latest training loss."""
    eval_loss: Finite | None = None
    """Latest evaluation loss."""
    samples: Annotated[int, Field(ge=0)] | None = None
    """Samples found on the node."""
    peak_memory_bytes: Annotated[int, Field(ge=0)] | None = None
    """Peak memory so far (the accelerator's, or the process's on the CPU)."""
    energy_joules: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    """Energy used so far."""
    energy_method: Annotated[str, StringConstraints(max_length=32)] | None = None
    """How energy is measured (nvml, rapl, jetson, estimate)."""
    device: Annotated[str, StringConstraints(max_length=32)] | None = None
    """The device it trains on (gpu or cpu)."""
    at: Annotated[str, StringConstraints(max_length=32)]
    """When this was written (RFC 3339, UTC)."""


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

    spec: TrainerSpec
    """The job's spec, as validated by the apiserver (by hand: what the trainer uses of it)."""
    runtime: TrainerRuntime = Field(default_factory=TrainerRuntime)
    """Where things are inside the pod."""
