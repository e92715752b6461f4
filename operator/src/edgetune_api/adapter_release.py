"""AdapterRelease: roll a registered adapter out to edge inference workloads, canary by canary."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StringConstraints

from edgetune_api.meta import ApiModel, Condition, Duration, LabelSelector, Name, cel, nested, validations

Phase = Literal[
    "Pending", "Progressing", "Paused", "Analyzing", "RollingBack", "Promoted", "RolledBack", "Failed", "Aborted"
]
ShortString = Annotated[str, StringConstraints(max_length=253)]


class TrainingJobRef(ApiModel):
    """An EdgeTrainingJob in the release's namespace whose registered result is released."""

    name: Name
    """Name of the EdgeTrainingJob."""


class AdapterSource(ApiModel):
    """Which registered adapter to release: exactly one of version, alias or trainingJobRef."""

    registered_model: Annotated[
        str, StringConstraints(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    ]
    """MLflow registered model name."""
    version: Annotated[str, StringConstraints(pattern=r"^[1-9][0-9]*$", max_length=12)] | None = None
    """A model version number."""
    alias: Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[a-z][a-z0-9_-]*$")] | None = None
    """A model alias such as `candidate`, resolved once when the release starts."""
    training_job_ref: TrainingJobRef | None = None
    """The version registered by an EdgeTrainingJob."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "(has(self.version) ? 1 : 0) + (has(self.alias) ? 1 : 0) + (has(self.trainingJobRef) ? 1 : 0) == 1",
                "adapter must name exactly one of version, alias or trainingJobRef",
            )
        )
    )


class ReleaseTargets(ApiModel):
    """Edge inference workloads that receive the adapter."""

    cluster_selector: LabelSelector | None = None
    """EdgeClusters (by label); when absent, the release's own cluster."""
    namespace: Name | None = None
    """Namespace of the agents' pods on each selected cluster; the release's own namespace when
    absent. On an edge cluster the hub reaches only the namespaces its admin opened to it (the
    chart's `agent.namespaces`)."""
    workload_selector: LabelSelector
    """Labels of the pods (Deployments/DaemonSets) running the edgetune agent."""


class PauseStep(ApiModel):
    """Wait before the next step."""

    duration: Duration | None = None
    """How long to wait; without it the release waits until resumed (spec.paused set back to false)."""


class AnalysisStep(ApiModel):
    """Run the release's analysis now and continue only if it passes."""

    metrics: Annotated[list[Name], Field(max_length=16)] = Field(default_factory=list)
    """Names of analysis metrics to run; all of them when empty."""


class ShadowStep(ApiModel):
    """Run the candidate in shadow on every target: each agent keeps serving what it serves and also
    runs the candidate on live requests, counting how often their answers agree
    (`edgetune_agent_shadow_agreements_total` / `edgetune_agent_shadow_requests_total`, labelled
    with the candidate's version), which a later analysis step can query. The step ends once every
    target confirms the shadow and `duration` has passed; the shadows stay until the next setWeight
    step (or a rollback) replaces them."""

    duration: Duration = "5m"
    """How long the candidate shadows every target (counted from when all of them run it)."""


class CanaryStep(ApiModel):
    """One canary step: exactly one of setWeight, pause, analysis or shadow."""

    set_weight: Annotated[int, Field(ge=1, le=100)] | None = None
    """Percentage of targets (1-100) that run the new adapter after this step."""
    pause: PauseStep | None = None
    """Wait, for a duration or until resumed."""
    analysis: AnalysisStep | None = None
    """Check metrics before going on."""
    shadow: ShadowStep | None = None
    """Run the candidate beside the serving version on every target, serving nothing from it."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "(has(self.setWeight) ? 1 : 0) + (has(self.pause) ? 1 : 0) + (has(self.analysis) ? 1 : 0) "
                "+ (has(self.shadow) ? 1 : 0) == 1",
                "each canary step must set exactly one of setWeight, pause, analysis or shadow (a shadow step "
                "has no weight: it runs the candidate beside the serving version on every target)",
            )
        )
    )


class CanaryStrategy(ApiModel):
    """Progressive rollout in steps."""

    steps: Annotated[list[CanaryStep], Field(min_length=1, max_length=32)]
    """Steps run in order; setWeight values must increase strictly and end at most at 100."""
    max_unavailable: Annotated[int, Field(ge=1, le=10_000)] = 1
    """Targets that may be switching at the same time (told a version, the canary or the stable one,
    that their agent does not confirm yet), for every write of a step; a rollback is exempt and
    takes every target back at once."""
    waves: bool = False
    """Go cluster by cluster (each step fills the first clusters first) instead of taking the same
    share of every cluster at each step."""
    progress_deadline: Duration = "10m"
    """How long a setWeight or shadow step may wait for the agents to confirm; then the release rolls back."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.steps.filter(s, has(s.setWeight)).map(s, s.setWeight).isSorted() && "
                "self.steps.filter(s, has(s.setWeight)).all(s, "
                "self.steps.filter(t, has(t.setWeight) && t.setWeight == s.setWeight).size() == 1)",
                "canary setWeight values must increase strictly from step to step (e.g. 10, 50, 100)",
                field_path=".steps",
            ),
            cel(
                "self.steps.map(s, has(s.shadow) ? 1 : (has(s.setWeight) ? 2 : 0)).filter(k, k != 0).isSorted()",
                "a shadow step must come before every setWeight step: once targets serve the candidate there is "
                "nothing left to compare it with",
                field_path=".steps",
            ),
        )
    )


class ReleaseStrategy(ApiModel):
    """How the adapter is rolled out."""

    canary: CanaryStrategy
    """Canary steps."""


class ThresholdRange(ApiModel):
    """Bounds a metric value must stay within; at least one of min and max."""

    min: float | None = None
    """Lowest passing value."""
    max: float | None = None
    """Highest passing value."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("has(self.min) || has(self.max)", "thresholdRange needs min, max or both"),
            cel(
                "!has(self.min) || !has(self.max) || self.min <= self.max",
                "thresholdRange.min must not exceed thresholdRange.max",
            ),
        )
    )


class AnalysisMetric(ApiModel):
    """One PromQL check of the canary."""

    name: Name
    """Metric name, referenced by analysis steps."""
    query: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    """PromQL returning one value; `{{release}}` (namespace/name of the release), `{{namespace}}` (the
    targets' namespace), `{{version}}`, `{{stableVersion}}` and `{{cluster}}` are replaced before it runs."""
    threshold_range: ThresholdRange
    """The value passes when it is inside this range."""
    interval: Duration = "30s"
    """Time between measurements."""
    count: Annotated[int, Field(ge=1, le=100)] = 3
    """Measurements per analysis."""
    failure_limit: Annotated[int, Field(ge=0, le=100)] = 1
    """Failed measurements tolerated; one more fails the analysis."""
    no_data: Literal["fail", "pass", "inconclusive"] = "fail"
    """What a query that returns no data counts as."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.failureLimit < self.count",
                "failureLimit must be smaller than count, otherwise the analysis could never fail",
                field_path=".failureLimit",
            )
        )
    )


class AnalysisSpec(ApiModel):
    """Metric analysis against Prometheus."""

    metrics: Annotated[list[AnalysisMetric], Field(max_length=16)] = Field(default_factory=list)
    """The metrics checked by analysis steps."""


class RevocationStore(ApiModel):
    """Credentials for publishing revocations next to the packages (S3)."""

    endpoint: Annotated[str, StringConstraints(max_length=2048, pattern=r"^https?://.+")] | None = None
    """S3 endpoint; the operator's default (EDGETUNE_S3_ENDPOINT) when absent."""
    credentials_secret_ref: Annotated[str, StringConstraints(min_length=1, max_length=253)] | None = None
    """Secret in the release's namespace with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY allowed to
    write `<bucket>/.edgetune/revoked/`; the operator's own credentials when absent."""


class RollbackSpec(ApiModel):
    """What happens when analysis fails."""

    automatic: bool = True
    """Roll every canary back to the stable version as soon as analysis fails; when false, a failed
    analysis pauses the release (spec.paused) for a person to abort or resume it."""
    publish_revocation: bool = True
    """On rollback, also write `s3://<package bucket>/.edgetune/revoked/<sha256>.json`: agents poll
    it for the adapter they serve, so those in a cluster the operator cannot reach fall back by
    themselves."""
    s3: RevocationStore = nested(RevocationStore)
    """Where and with which credentials revocations are published."""


class PromotionSpec(ApiModel):
    """What a successful release changes in the registry."""

    alias: Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[a-z][a-z0-9_-]*$")] = "champion"
    """MLflow alias that names the stable version: read at the start (the version to fall back to)
    and moved to the released version on promotion."""


class AdapterReleaseSpec(ApiModel):
    """Desired state of an AdapterRelease."""

    adapter: AdapterSource
    """The adapter to release."""
    targets: ReleaseTargets
    """Where it goes."""
    strategy: ReleaseStrategy
    """How it is rolled out."""
    analysis: AnalysisSpec = nested(AnalysisSpec)
    """Metric checks."""
    rollback: RollbackSpec = nested(RollbackSpec)
    """Rollback behaviour."""
    promotion: PromotionSpec = nested(PromotionSpec)
    """Registry changes on promotion."""
    paused: bool = False
    """Hold the rollout at the current step; set back to false to resume (also after the operator
    paused it because an analysis was inconclusive)."""
    promote: bool = False
    """Skip the remaining steps: move every target to the new version and promote it."""
    abort: bool = False
    """Stop now and roll every target back to the stable version."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.strategy.canary.steps.all(s, !has(s.analysis) || size(self.analysis.metrics) > 0)",
                "a canary analysis step needs at least one entry in spec.analysis.metrics",
                field_path=".analysis.metrics",
            ),
            cel(
                "self.strategy.canary.steps.all(s, !has(s.analysis) || "
                "s.analysis.metrics.all(m, self.analysis.metrics.exists(d, d.name == m)))",
                "a canary analysis step names a metric that spec.analysis.metrics does not define",
                field_path=".strategy.canary.steps",
            ),
        )
    )


class ResolvedAdapter(ApiModel):
    """A registered adapter as the release resolved it (once, at the start)."""

    version: ShortString
    """MLflow model version (`base` for the bare base model)."""
    uri: Annotated[str, StringConstraints(max_length=2048)] = ""
    """Where the package is (the model version's source)."""
    sha256: Annotated[str, StringConstraints(max_length=64)] = ""
    """Package digest the agents verify."""
    base_sha256: Annotated[str, StringConstraints(max_length=64)] | None = None
    """Digest of the base model it was trained on (the version's `edgetune.base_model_sha256` tag)."""


class AnalysisRun(ApiModel):
    """The outcome of one analysis step."""

    step: Annotated[int, Field(ge=0)]
    """Index of the canary step."""
    metric: ShortString
    """Metric name."""
    phase: Literal["Running", "Successful", "Failed", "Inconclusive"]
    """Outcome."""
    values: Annotated[list[float], Field(max_length=100)] = Field(default_factory=list)
    """Measured values."""
    failures: Annotated[int, Field(ge=0)] = 0
    """Measurements outside the threshold range."""
    message: Annotated[str, StringConstraints(max_length=4096)] | None = None
    """Details."""
    measured: Annotated[int, Field(ge=0)] = 0
    """Measurements taken (values plus no-data ones)."""
    no_data: Annotated[int, Field(ge=0)] = 0
    """Measurements that returned no data."""
    started_at: datetime | None = None
    """When the analysis began."""
    last_measured_at: datetime | None = None
    """When the last measurement was taken."""
    finished_at: datetime | None = None
    """When the analysis ended."""


def served(targets_by_version: dict[str, int] | None) -> str:
    """How a release's targets are split between versions, for people: ``2 on 4, 2 on 5``."""
    return ", ".join(f"{n} on {v}" for v, n in sorted((targets_by_version or {}).items())) or "none observed"


class AdapterReleaseStatus(ApiModel):
    """Observed state of an AdapterRelease, written by the operator only."""

    phase: Phase | None = None
    """Summary for humans and printer columns; automation should read conditions."""
    conditions: Annotated[list[Condition], Field(max_length=32)] = Field(default_factory=list)
    """Progressing, Analyzing, Promoted, RolledBack …"""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The generation of the spec this status describes."""
    current_step: Annotated[int, Field(ge=0)] | None = None
    """Index of the step in progress."""
    canary_weight: Annotated[int, Field(ge=0, le=100)] | None = None
    """Percentage of targets on the canary version."""
    canary_version: ShortString | None = None
    """The version being released."""
    stable_version: ShortString | None = None
    """The version targets fall back to on rollback; once promoted, the released version."""
    canary: ResolvedAdapter | None = None
    """The released adapter, resolved from the registry."""
    stable: ResolvedAdapter | None = None
    """The adapter targets fall back to (`base` when no version held the alias)."""
    targets_total: Annotated[int, Field(ge=0)] | None = None
    """Targets selected."""
    targets_by_version: dict[str, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    """How many targets report running each adapter version."""
    targets_by_cluster: dict[str, dict[str, Annotated[int, Field(ge=0)]]] = Field(default_factory=dict)
    """Per cluster, how many targets report running each adapter version."""
    step_started_at: datetime | None = None
    """When the current step began (progress deadline, pause durations)."""
    analysis_runs: Annotated[list[AnalysisRun], Field(max_length=256)] = Field(default_factory=list)
    """History of analysis outcomes."""
    pause_started_at: datetime | None = None
    """When the current pause step began."""
    shadowing_since: datetime | None = None
    """When every target of the current shadow step first ran the candidate in shadow."""
    targets_shadowing: Annotated[int, Field(ge=0)] | None = None
    """Targets whose agents report running the candidate in shadow."""
    revocation_published_at: datetime | None = None
    """When the rolled-back package's revocation was written to S3 (spec.rollback.publishRevocation)."""


class AdapterRelease(ApiModel):
    """Roll a registered adapter out to edge inference workloads progressively: canary steps, metric
    analysis against Prometheus, automatic promotion or rollback."""

    api_version: Literal["edgetune.io/v1alpha1"] = "edgetune.io/v1alpha1"
    kind: Literal["AdapterRelease"] = "AdapterRelease"
    metadata: dict[str, object] = Field(default_factory=dict)
    spec: AdapterReleaseSpec
    status: AdapterReleaseStatus | None = None
