"""The operator's Prometheus metrics: every name is defined here and nowhere else.

Served on ``/metrics`` (``Settings.metrics_port``). Trainer metrics are the trainer's own
(``edgetune_trainer.metrics``) and reach Prometheus by scrape or the Pushgateway.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PREFIX = "edgetune_operator"

RECONCILES = Counter(
    f"{PREFIX}_reconciles", "Reconciles run, by resource kind and result (ok, error).", ["kind", "result"]
)
RECONCILE_SECONDS = Histogram(
    f"{PREFIX}_reconcile_duration_seconds", "Time one reconcile took, by resource kind.", ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)  # fmt: skip
JOBS_BY_PHASE = Gauge(f"{PREFIX}_training_jobs", "EdgeTrainingJobs by phase, as last reconciled.", ["phase"])
CALL_SECONDS = Histogram(
    f"{PREFIX}_external_call_duration_seconds",
    "Latency of calls to external systems (kubernetes, mlflow, s3), by operation.", ["system", "operation"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)  # fmt: skip
CALL_ERRORS = Counter(
    f"{PREFIX}_external_call_errors", "Failed calls to external systems, by operation and outcome.",
    ["system", "operation", "outcome"],
)  # fmt: skip
CLUSTER_REACHABLE = Gauge(f"{PREFIX}_cluster_reachable", "1 when the edge cluster answered its last heartbeat.",
                          ["cluster"])  # fmt: skip
CLUSTER_HEARTBEAT_SECONDS = Gauge(
    f"{PREFIX}_cluster_heartbeat_seconds", "How long the edge cluster took to answer its last heartbeat (version and "
    "node list).", ["cluster"],
)  # fmt: skip
CLUSTER_NODES = Gauge(f"{PREFIX}_cluster_nodes", "Nodes of an edge cluster by accelerator, from its last heartbeat.",
                      ["cluster", "accelerator"])  # fmt: skip
REGISTRATIONS = Counter(f"{PREFIX}_registrations", "Adapter versions registered in MLflow.", ["model"])
VERIFICATION_FAILURES = Counter(
    f"{PREFIX}_verification_failures", "Adapter packages refused by verification.", ["namespace"]
)
KUBE_THROTTLED = Counter(
    f"{PREFIX}_kube_throttled",
    "Requests an API server turned away with 429 Too Many Requests, by cluster.",
    ["cluster"],
)
WATCH_RESTARTS = Counter(
    f"{PREFIX}_watch_restarts", "Watches of trainer Jobs and pods started again, by cluster, kind and reason "
    "(gone: listed afresh after 410; error; unreachable).", ["cluster", "kind", "reason"],
)  # fmt: skip
QUEUE_DEPTH = Gauge(f"{PREFIX}_work_queue_depth", "EdgeTrainingJobs waiting for a reconcile.")
RETRY_DELAY = Gauge(
    f"{PREFIX}_retry_delay_seconds", "Current backoff before the next call to a failing external system, by "
    "system (s3, mlflow, kubernetes) and target (the job it holds up; the series goes once it answers).",
    ["system", "target"],
)  # fmt: skip


RELEASES_BY_PHASE = Gauge(f"{PREFIX}_adapter_releases", "AdapterReleases by phase, as last reconciled.", ["phase"])
RELEASE_STEPS = Counter(f"{PREFIX}_release_steps", "Canary steps completed, by release.", ["release"])
RELEASE_TARGETS = Gauge(
    f"{PREFIX}_release_targets",
    "Targets of a release by the adapter version their agents report.",
    ["release", "version"],
)
ANALYSIS_MEASUREMENTS = Counter(
    f"{PREFIX}_analysis_measurements", "Analysis measurements, by metric and kind (value, nodata, error).",
    ["metric", "kind"],
)  # fmt: skip
ROLLBACKS = Counter(f"{PREFIX}_rollbacks", "Releases rolled back, by reason.", ["reason"])
ROLLBACK_REASONS = ("AnalysisFailed", "AgentsRefused", "ProgressDeadlineExceeded", "Aborted")
ROLLBACK_SECONDS = Histogram(
    f"{PREFIX}_rollback_duration_seconds", "From the decision to roll back to every target confirming stable.",
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
)  # fmt: skip


# Counters an alert takes increase() of exist at 0 from the start: a series born at 1 would hide its
# first increment (increase() needs two samples), and the first rollback would never alert.
for _kind in ("EdgeTrainingJob", "AdapterRelease"):
    for _result in ("ok", "error"):
        RECONCILES.labels(_kind, _result)
for _reason in ROLLBACK_REASONS:
    ROLLBACKS.labels(_reason)


def observe_call(system: str, operation: str, outcome: str, seconds: float) -> None:
    CALL_SECONDS.labels(system, operation).observe(seconds)
    if outcome != "ok":
        CALL_ERRORS.labels(system, operation, outcome).inc()


def serve(port: int, registry: CollectorRegistry = REGISTRY) -> None:
    """Serve ``/metrics`` on ``port`` (0: not at all)."""
    if port:
        start_http_server(port, registry=registry)
