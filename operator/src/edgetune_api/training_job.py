"""EdgeTrainingJob: fine-tune a frozen base model with PEFT on data that stays on edge nodes."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StringConstraints

from edgetune_api.meta import (
    SHA256_PATTERN,
    ApiModel,
    Condition,
    Duration,
    LabelSelector,
    Quantity,
    SecretKeyRef,
    Toleration,
    cel,
    nested,
    validations,
)

#: The least memory a trainer pod can run in, from measurement: the trainer's process takes 782 MiB
#: after importing torch (PyPI's build), peft and its own modules, before any data or model
#: (docs/trainer.md); with the 10 % headroom the trainer keeps, 1Gi is the smallest budget that can
#: train at all. Budgets below it are rejected by the apiserver instead of failing on the node; above
#: it the trainer measures its own runtime and refuses, saying so, when the budget cannot hold it.
TRAINER_MEMORY_FLOOR = "1Gi"

Phase = Literal[
    "Pending", "WaitingForData", "Scheduled", "Training", "Packaging", "Registering", "Succeeded", "Failed", "Suspended"
]
ShortString = Annotated[str, StringConstraints(max_length=253)]
REMOTE_SCHEMES = ("s3://", "models:/", "runs:/")
"""Base model URIs that name a store rather than a path on the node."""


class BaseModelSource(ApiModel):
    """Where the frozen base model comes from. It is verified against `sha256` before training."""

    uri: Annotated[
        str,
        StringConstraints(min_length=1, max_length=1024, pattern=r"^(models:/|runs:/|s3://|file://|/|builtin:).+"),
    ]
    """Location of the base model: an MLflow URI (`models:/name/version`, `runs:/id/path`), an S3 URI
    (`s3://bucket/key`), a path already on the node (`/models/base` or `file:///models/base`), or a
    built-in architecture (`builtin:timeseries-cnn`)."""
    sha256: Annotated[str, StringConstraints(pattern=SHA256_PATTERN)] | None = None
    """Expected SHA-256 (64 lowercase hex digits) of the base model's weights; the trainer refuses a
    model that does not match. Required for every URI except `builtin:`."""
    revision: ShortString | None = None
    """Free-form revision of the base model (e.g. its own version or commit), recorded in the
    package manifest's lineage, the MLflow version's tags and the job's status.result."""

    @property
    def remote(self) -> bool:
        """In S3 or MLflow (fetched, not read from the node): under the operator, presigned for the trainer."""
        return self.uri.startswith(REMOTE_SCHEMES)

    @property
    def node_path(self) -> str | None:
        """The folder on the node for a base model already there (`/…` or `file:///…`), else None."""
        if self.uri.startswith("file://"):
            return self.uri.removeprefix("file://")
        return self.uri if self.uri.startswith("/") else None

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.uri.startsWith('builtin:') || has(self.sha256)",
                "baseModel.sha256 is required: give the SHA-256 of the base model's weights "
                "so the trainer can verify it (only builtin: models may omit it)",
                field_path=".sha256",
            )
        )
    )


class PersistentVolumeClaimSource(ApiModel):
    """A PVC on the edge cluster that holds the data."""

    claim_name: Annotated[str, StringConstraints(min_length=1, max_length=253)]
    """Name of the PersistentVolumeClaim in the job's namespace (on each selected cluster)."""
    sub_path: Annotated[str, StringConstraints(max_length=1024)] | None = None
    """Folder inside the volume; the whole volume when empty."""


class DataSource(ApiModel):
    """Where the data lives on the node. It is mounted read-only and never leaves the node."""

    host_path: Annotated[str, StringConstraints(min_length=2, max_length=1024, pattern=r"^/.*")] | None = None
    """Absolute folder on the node (e.g. `/var/lib/edgetune/data`)."""
    persistent_volume_claim: PersistentVolumeClaimSource | None = None
    """A PVC instead of a host folder."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.hostPath) != has(self.persistentVolumeClaim)",
                "data.source needs exactly one of hostPath or persistentVolumeClaim",
            )
        )
    )


class PrivacyFilters(ApiModel):
    """Applied on the node before anything is logged, measured or stored."""

    drop_fields: Annotated[list[ShortString], Field(max_length=64)] = Field(default_factory=list)
    """Columns/keys (csv, jsonl) or arrays (npz) removed from every sample before it is read."""
    hash_fields: Annotated[list[ShortString], Field(max_length=64)] = Field(default_factory=list)
    """Columns/keys (csv, jsonl) or arrays (npz) replaced by a salted SHA-256: not reversible, never a
    feature, and usable as an id: samples sharing one are a group, kept on one side of the
    evaluation split (no meter or customer both trained on and evaluated on)."""
    salt_secret_ref: SecretKeyRef | None = None
    """Secret holding the salt for `hashFields`; required when `hashFields` is set."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "size(self.hashFields) == 0 || has(self.saltSecretRef)",
                "privacy.hashFields needs privacy.saltSecretRef (a Secret with the salt), "
                "otherwise hashed values could be reversed by guessing",
            )
        )
    )


class Augmentation(ApiModel):
    """On-the-fly augmentation of time-series samples (ignored for text)."""

    noise_std: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Standard deviation of Gaussian noise added to each (normalised) value."""
    jitter_steps: Annotated[int, Field(ge=0, le=1000)] = 0
    """Random time shift of up to this many steps."""
    crop_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Random crop removing up to this fraction of each series (then resized back)."""


class DataSpec(ApiModel):
    """The node-local training data."""

    source: DataSource
    """Where the data lives on the node."""
    format: Literal["csv", "jsonl", "npy", "text", "ts"]
    """File format: csv, jsonl, npy (also npz), text (one sample per line), or ts (UCR/UEA time series)."""
    min_samples: Annotated[int, Field(ge=1)] = 1
    """Training starts only once a node reports at least this many samples; until then the job waits."""
    label_field: ShortString | None = None
    """Column/key holding the label for classification (csv, jsonl)."""
    text_field: ShortString | None = None
    """Column/key holding the text (csv, jsonl) for language-model fine-tuning."""
    eval_fraction: Annotated[float, Field(gt=0, le=0.5)] = 0.1
    """Share of samples held out for evaluation (unless evalSource names a separate set)."""
    eval_source: DataSource | None = None
    """A separate labelled evaluation set on the node, in the same format: it is the held-out data
    (early stopping, targetLoss, reported metrics, the encoding gate), and every sample of source
    trains. Worth it when a hash split of a few node samples would be noise."""
    privacy: PrivacyFilters = nested(PrivacyFilters)
    """Fields dropped or hashed before anything else sees them."""
    augmentation: Augmentation = nested(Augmentation)
    """Time-series augmentation."""
    series_length: Annotated[int, Field(ge=2, le=1_000_000)] | None = None
    """Length (readings) every series is brought to before training; the longest series in the
    node's data when absent."""
    length_policy: Literal["resample", "padLast", "padZero"] = "resample"
    """How a series of another length is brought to seriesLength: `resample` (linear interpolation
    over the whole series: keeps its shape), `padLast` (repeat the last reading; longer series are
    cropped) or `padZero` (zeros; longer series are cropped)."""
    sequence_length: Annotated[int, Field(ge=8, le=131_072)] = 128
    """Text: tokens per training sequence (longer samples are truncated, unless packed)."""
    packing: bool = False
    """Text: concatenate the samples of a micro-batch (separated by the end-of-text token) and cut
    them into full sequences of sequenceLength tokens, instead of one padded sequence per sample."""


class PeftSpec(ApiModel):
    """The adapter trained on top of the frozen base model."""

    method: Literal["lora"] = "lora"
    """PEFT method. LoRA today; the field leaves room for others."""
    r: Annotated[int, Field(ge=1, le=256)] = 8
    """LoRA rank: the inner dimension of the low-rank update (1-256)."""
    alpha: Annotated[int, Field(ge=1, le=4096)] = 16
    """LoRA scaling numerator; the update is scaled by alpha / r."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    """Dropout applied to the LoRA input, in [0, 1)."""
    target_modules: Annotated[
        list[Annotated[str, StringConstraints(min_length=1, max_length=128)]], Field(min_length=1, max_length=64)
    ] = Field(default_factory=lambda: ["all-linear"])
    """Names (or name suffixes) of the modules to adapt, e.g. `[q_proj, v_proj]`; `all-linear` adapts
    every linear layer except the output head."""


class EarlyStopping(ApiModel):
    """Stop when the evaluation loss stops improving."""

    patience: Annotated[int, Field(ge=1, le=1000)] = 3
    """Evaluations without improvement before stopping."""
    min_delta: Annotated[float, Field(ge=0)] = 0.0
    """Smallest decrease of the evaluation loss that counts as an improvement."""


class TrainingSpec(ApiModel):
    """The training loop's settings."""

    max_steps: Annotated[int, Field(ge=1, le=10_000_000)] = 1000
    """Optimizer steps at most."""
    epochs: Annotated[int, Field(ge=1, le=10_000)] | None = None
    """Passes over the data at most; whichever of maxSteps and epochs comes first ends training."""
    batch_size: Annotated[int | Literal["auto"], Field(json_schema_extra={"x-kubernetes-int-or-string": True})] = "auto"
    """Micro-batch size, or `auto` to use the largest one that fits the memory budget (measured on the node)."""
    gradient_accumulation: Annotated[int, Field(ge=1, le=1024)] = 1
    """Micro-batches accumulated per optimizer step."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in the backward pass: less memory, more compute. Unset: off, except with
    `batchSize: auto`, where the trainer measures both and turns it on when a micro-batch at least
    twice as large then fits the memory budget."""
    optimizer: Literal["sgd", "adamw", "adamw8bit"] = "adamw"
    """Optimizer; adamw8bit falls back to adamw (with a warning) where bitsandbytes does not support the device."""
    learning_rate: Annotated[float, Field(gt=0, le=10)] = 1e-3
    """Peak learning rate."""
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    """Numeric precision of the forward/backward pass."""
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    """Random seed: a resumed run reproduces an uninterrupted one on the same device."""
    checkpoint_every: Annotated[int, Field(ge=1)] = 50
    """Optimizer steps between checkpoints (also taken on SIGTERM)."""
    eval_every: Annotated[int, Field(ge=1)] = 50
    """Optimizer steps between evaluations."""
    target_loss: Annotated[float, Field(gt=0)] | None = None
    """Stop as soon as the evaluation loss reaches this value."""
    early_stopping: EarlyStopping | None = None
    """Stop when the evaluation loss stops improving."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "type(self.batchSize) == int ? self.batchSize >= 1 && self.batchSize <= 65536 "
                ": self.batchSize == 'auto'",
                "training.batchSize must be a whole number from 1 to 65536, or the string auto",
                field_path=".batchSize",
            )
        )
    )


class Budgets(ApiModel):
    """Limits the trainer must respect on the node."""

    memory: Quantity
    """Memory the trainer may use (becomes the pod's memory limit), e.g. `2Gi`; at least 1Gi."""
    energy_joules: Annotated[float, Field(gt=0)] | None = None
    """Stop training (and package what was learned) once this much energy has been used."""
    deadline: Duration | None = None
    """Wall-clock limit for one trainer run (e.g. `45m`); becomes the pod's activeDeadlineSeconds."""
    min_battery_percent: Annotated[int, Field(ge=0, le=100)] | None = None
    """Below this battery charge the trainer pauses (or stops, see batteryPolicy)."""
    battery_policy: Literal["pause", "stop"] = "pause"
    """What to do below minBatteryPercent: pause until charged, or stop and package."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                f"isQuantity(self.memory) && quantity(self.memory).compareTo(quantity('{TRAINER_MEMORY_FLOOR}')) >= 0",
                f"budgets.memory must be a memory quantity of at least {TRAINER_MEMORY_FLOOR} "
                "(the trainer cannot run in less), e.g. 2Gi",
                field_path=".memory",
            )
        )
    )


class Placement(ApiModel):
    """Which clusters and nodes train."""

    cluster_selector: LabelSelector | None = None
    """EdgeClusters (by label) to train on; when absent, the cluster the job lives in."""
    node_selector: dict[str, Annotated[str, StringConstraints(max_length=63)]] = Field(default_factory=dict)
    """Node labels a trainer node must carry (in addition to the accelerator's)."""
    accelerator: Literal["gpu", "npu", "cpu", "any"] = "any"
    """Kind of node: gpu and npu map to the operator's accelerator profiles (resource names and labels).
    A gpu trainer that finds no usable GPU fails its target (`AcceleratorUnavailable`) unless
    allowCpuFallback is true. The trainer has no NPU backend yet: an npu placement reserves the NPU
    node and trains on its CPU, so it needs allowCpuFallback: true. Each target's status says the
    device it trained on."""
    accelerator_count: Annotated[int, Field(ge=1, le=16)] = 1
    """Accelerators (GPUs or NPUs) per trainer pod. Only 1 today: a trainer trains on one device
    (data-parallel training across a node's GPUs is not built yet), so a larger count is rejected
    rather than reserving GPUs it would leave idle."""
    allow_cpu_fallback: bool = False
    """gpu and npu placements: train on the node's CPU when the trainer cannot use the accelerator
    (the target's status then says device cpu, and the job's Accelerated condition says why)
    instead of failing the target."""
    per_node: bool = False
    """Train one adapter on every matching node (personalisation, or a federated round) instead of one per cluster."""
    max_nodes: Annotated[int, Field(ge=1, le=10_000)] | None = None
    """With perNode: use at most this many nodes."""
    tolerations: Annotated[list[Toleration], Field(max_length=32)] = Field(default_factory=list)
    """Tolerations for trainer pods (e.g. for tainted accelerator nodes)."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.acceleratorCount <= 1",
                "placement.acceleratorCount above 1 is not supported yet: a trainer trains on one GPU or NPU "
                "(data-parallel training across a node's accelerators is not built), and reserving more would "
                "leave them idle; use perNode to train on more nodes",
                field_path=".acceleratorCount",
            ),
            cel(
                "!self.allowCpuFallback || self.accelerator in ['gpu', 'npu']",
                "placement.allowCpuFallback applies to gpu and npu placements only (cpu and any placements "
                "train on whatever the node has)",
                field_path=".allowCpuFallback",
            ),
            cel(
                "self.accelerator != 'npu' || self.allowCpuFallback",
                "placement.accelerator npu needs placement.allowCpuFallback: true: the trainer has no NPU "
                "backend yet, so it reserves the NPU node and trains on its CPU",
                field_path=".allowCpuFallback",
            ),
        )
    )


class AggregationSpec(ApiModel):
    """How per-node adapters are combined."""

    strategy: Literal["none", "fedavg"] = "none"
    """none keeps one adapter per node; fedavg averages them, weighted by sample count, into one adapter."""
    min_participants: Annotated[int, Field(ge=1)] = 1
    """fedavg needs at least this many successful nodes."""


class S3Output(ApiModel):
    """Where the adapter package is stored."""

    bucket: Annotated[str, StringConstraints(min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$")]
    """S3 bucket name."""
    prefix: Annotated[str, StringConstraints(max_length=512)] = "edgetune"
    """Key prefix; packages go to `<prefix>/<namespace>/<job>/<cluster>/<node>/`."""
    endpoint: Annotated[str, StringConstraints(max_length=512, pattern=r"^https?://.+")] | None = None
    """S3 endpoint URL for S3-compatible stores; AWS when empty."""
    credentials_secret_ref: Annotated[str, StringConstraints(min_length=1, max_length=253)] | None = None
    """Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for the operator (on the hub); trainers get
    presigned URLs for their own package prefix instead, never these keys."""


class MlflowOutput(ApiModel):
    """How the adapter is registered in MLflow."""

    registered_model: Annotated[
        str, StringConstraints(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    ]
    """MLflow registered model name."""
    alias: Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[a-z][a-z0-9_-]*$")] = "candidate"
    """Alias moved to the new version once it is verified and registered."""
    experiment: Annotated[str, StringConstraints(min_length=1, max_length=256)] = "edgetune"
    """Experiment that holds the training runs."""


class OutputSpec(ApiModel):
    """Where the result goes and how it is encoded and signed."""

    s3: S3Output
    """Object store for the adapter package."""
    mlflow: MlflowOutput
    """Model registry entry."""
    encoding: Literal["fp32", "fp16", "int8-zstd", "int4-zstd"] = "fp16"
    """Encoding of the adapter weights in the package: fp32, fp16, or int8/int4 blockwise quantised and
    zstd-compressed (the trainer reports the evaluation metric of the decoded adapter)."""
    max_metric_drop: Annotated[float, Field(ge=0, le=1)] = 0.02
    """How much worse the decoded adapter may score on the held-out split than the adapter as trained:
    accuracy by this much (absolute), or loss up by this fraction when the task has no accuracy. An
    encoding that exceeds it falls back to the next finer one (int4-zstd, int8-zstd, fp16, fp32),
    and the result says so; without held-out data, decoded weights may differ by at most 5 %."""
    signing_key_secret_ref: SecretKeyRef | None = None
    """Ed25519 private key (PEM) that signs released package manifests (on the hub, after verification);
    each trainer signs with a key derived from it for that trainer alone. Unsigned when empty."""


IMMUTABLE_SPEC = ("baseModel", "data", "peft", "training", "budgets", "placement", "aggregation", "output")
"""Every spec field but ``suspend`` (a CEL rule of the spec): what a job trains with is fixed at
creation, as a Kubernetes Job's pod template is."""


class EdgeTrainingJobSpec(ApiModel):
    """Desired state of an EdgeTrainingJob."""

    base_model: BaseModelSource
    """The frozen base model."""
    data: DataSpec
    """The node-local data."""
    peft: PeftSpec = nested(PeftSpec)
    """The adapter to train."""
    training: TrainingSpec = nested(TrainingSpec)
    """Training loop settings."""
    budgets: Budgets
    """Memory, energy, time and battery limits."""
    placement: Placement = nested(Placement)
    """Clusters and nodes to train on."""
    aggregation: AggregationSpec = nested(AggregationSpec)
    """Combining per-node adapters."""
    output: OutputSpec
    """Storage, registry, encoding and signing of the result."""
    suspend: bool = False
    """Stop trainer pods (they checkpoint first) and hold the job until set back to false."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.aggregation.strategy != 'fedavg' || self.placement.perNode",
                "aggregation.strategy fedavg averages one adapter per node: it needs placement.perNode: true",
                field_path=".aggregation.strategy",
            ),
            cel(
                "!has(self.placement.maxNodes) || self.placement.perNode",
                "placement.maxNodes limits per-node training: it needs placement.perNode: true",
                field_path=".placement.maxNodes",
            ),
            cel(
                " && ".join(f"self.{f} == oldSelf.{f}" for f in IMMUTABLE_SPEC),
                "an EdgeTrainingJob's spec cannot change once it exists, except suspend (its trainers would "
                "go on with the old settings, and a finished job would have nothing to redo): create a new "
                "EdgeTrainingJob, under another name, to train with other settings",
                reason="FieldValueForbidden",
            ),
        )
    )


class TargetStatus(ApiModel):
    """Progress of one trainer (one cluster, or one node with perNode)."""

    cluster: ShortString
    """EdgeCluster name (`local` for the job's own cluster)."""
    node: ShortString | None = None
    """Node the trainer runs on, once scheduled."""
    phase: Phase = "Pending"
    """Phase of this trainer."""
    job_name: ShortString | None = None
    """The batch/v1 Job running this trainer."""
    samples: Annotated[int, Field(ge=0)] | None = None
    """Samples the node reported."""
    step: Annotated[int, Field(ge=0)] | None = None
    """Optimizer steps done."""
    loss: float | None = None
    """Latest training loss."""
    eval_loss: float | None = None
    """Latest evaluation loss."""
    peak_memory_bytes: Annotated[int, Field(ge=0)] | None = None
    """Peak memory measured by the trainer."""
    energy_joules: Annotated[float, Field(ge=0)] | None = None
    """Energy used so far."""
    energy_method: ShortString | None = None
    """How energy was measured: nvml, rapl, jetson, or estimate (docs/trainer.md, "Energy")."""
    device: ShortString | None = None
    """The device the trainer trained on: gpu or cpu (cpu under a gpu or npu placement only with
    placement.allowCpuFallback)."""
    delta_uri: Annotated[str, StringConstraints(max_length=2048)] | None = None
    """This trainer's adapter package."""
    sha256: Annotated[str, StringConstraints(max_length=64)] | None = None
    """SHA-256 of this trainer's package manifest, once the operator verified the package."""
    mlflow_version: ShortString | None = None
    """Model version registered for this trainer's adapter (without aggregation)."""
    message: Annotated[str, StringConstraints(max_length=4096)] | None = None
    """Why this trainer is in its phase."""


class TrainingResult(ApiModel):
    """The verified, registered adapter."""

    delta_uri: Annotated[str, StringConstraints(max_length=2048)] | None = None
    """S3 URI of the adapter package."""
    sha256: Annotated[str, StringConstraints(pattern=SHA256_PATTERN)] | None = None
    """SHA-256 of the package manifest."""
    bytes: Annotated[int, Field(ge=0)] | None = None
    """Size of the adapter weights in the package."""
    encoding: ShortString | None = None
    """Encoding of the weights."""
    mlflow_model: ShortString | None = None
    """Registered model name."""
    mlflow_version: ShortString | None = None
    """Registered model version."""
    mlflow_run_id: ShortString | None = None
    """MLflow run holding params, metrics and lineage."""
    participants: Annotated[int, Field(ge=0)] | None = None
    """Per-node adapters averaged into this one (fedavg)."""
    base_model_revision: ShortString | None = None
    """The baseModel.revision the adapter was trained from (as its package manifest's lineage records it)."""


class EdgeTrainingJobStatus(ApiModel):
    """Observed state of an EdgeTrainingJob, written by the operator only."""

    phase: Phase | None = None
    """Summary for humans and printer columns; automation should read conditions."""
    conditions: Annotated[list[Condition], Field(max_length=32)] = Field(default_factory=list)
    """DataSufficient, Scheduled, Training, Verified, Registered, Succeeded …"""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The generation of the spec this status describes."""
    progress: ShortString | None = None
    """Finished trainers out of all, e.g. `2/4`."""
    start_time: datetime | None = None
    """When the first trainer started."""
    completion_time: datetime | None = None
    """When the job succeeded or failed."""
    targets: Annotated[list[TargetStatus], Field(max_length=10_000)] = Field(default_factory=list)
    """One entry per trainer."""
    result: TrainingResult | None = None
    """The registered adapter."""
    energy: ShortString | None = None
    """Energy the trainers reported, summed, with how it was measured, e.g. `3.2 kJ (rapl)`: nvml,
    jetson or rapl are counters; estimate is CPU seconds times runtime.wattsEstimate (docs/trainer.md, "Energy")."""
    devices: ShortString | None = None
    """Devices the trainers trained on (gpu, cpu), comma-separated."""


class EdgeTrainingJob(ApiModel):
    """Fine-tune a frozen base model with PEFT/LoRA on data that never leaves the edge node, within
    memory, energy and time budgets; package, sign, store and register the adapter delta."""

    api_version: Literal["edgetune.io/v1alpha1"] = "edgetune.io/v1alpha1"
    kind: Literal["EdgeTrainingJob"] = "EdgeTrainingJob"
    metadata: dict[str, object] = Field(default_factory=dict)
    spec: EdgeTrainingJobSpec
    status: EdgeTrainingJobStatus | None = None
