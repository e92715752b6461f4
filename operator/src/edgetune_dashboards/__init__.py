"""edgetune's Grafana dashboards, as code (grafana-foundation-sdk): fleet, training, releases, operator.

``python -m edgetune_dashboards write|check`` renders them to ``charts/edgetune/files/dashboards/``
(the chart ships them as ConfigMaps for Grafana's sidecar). Every panel's query is listed by
``queries()`` so a test can run each one against a real Prometheus after a real scenario.
A development tool: the operator, trainer and agent never import it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
NS = 'namespace=~"$namespace"'


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class PanelSpec:
    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    kind: str = "timeseries"  # or "stat"
    width: int = 12


@dataclass(frozen=True)
class Board:
    uid: str
    title: str
    description: str
    rows: tuple[tuple[str, tuple[PanelSpec, ...]], ...]


def q(expr: str, legend: str = "") -> Query:
    return Query(" ".join(expr.split()), legend)


FLEET = Board("edgetune-fleet", "edgetune / Fleet", "Edge clusters, their nodes, and what runs on them.", (
    ("Clusters", (
        PanelSpec("Edge clusters reachable", "1 while the cluster answers the hub's heartbeat.", "none",
                  (q("edgetune_operator_cluster_reachable", "{{cluster}}"),), kind="stat", width=8),
        PanelSpec("Nodes by accelerator", "Ready nodes per cluster and accelerator, from the heartbeat.", "none",
                  (q("sum by (cluster, accelerator) (edgetune_operator_cluster_nodes)",
                     "{{cluster}} {{accelerator}}"),),
                  width=16),
    )),
    ("Work", (
        PanelSpec("EdgeTrainingJobs by phase", "As last reconciled.", "none",
                  (q("sum by (phase) (edgetune_operator_training_jobs)", "{{phase}}"),), width=8),
        PanelSpec("AdapterReleases by phase", "As last reconciled.", "none",
                  (q("sum by (phase) (edgetune_operator_adapter_releases)", "{{phase}}"),), width=8),
        PanelSpec("Adapter versions registered", "In MLflow, by registered model.", "none",
                  (q("sum by (model) (edgetune_operator_registrations_total)", "{{model}}"),), width=8),
    )),
))  # fmt: skip

TRAINING = Board("edgetune-training", "edgetune / Training", "Every edge trainer, per node (pushed to the "
                 "Pushgateway: trainers on remote clusters cannot be scraped).", (
    ("Learning", (
        PanelSpec("Training loss", "Mean loss of the last optimizer step.", "none",
                  (q(f"edgetune_trainer_loss{{{NS}}}", "{{job}} {{cluster}}/{{node}}"),)),
        PanelSpec("Held-out loss and accuracy", "At the last evaluation.", "none",
                  (q(f"edgetune_trainer_eval_loss{{{NS}}}", "loss {{job}} {{node}}"),
                   q(f"edgetune_trainer_eval_accuracy_ratio{{{NS}}}", "accuracy {{job}} {{node}}"))),
        PanelSpec("Step rate", "Optimizer steps per second.", "none",
                  (q(f"deriv(edgetune_trainer_step{{{NS}}}[1m])", "{{job}} {{node}}"),)),
        PanelSpec("Throughput", "Training samples per second.", "none",
                  (q(f"edgetune_trainer_samples_per_second{{{NS}}}", "{{job}} {{node}}"),)),
    )),
    ("Budgets", (
        PanelSpec("Peak memory vs budget", "The trainer's peak (RSS on CPU, allocator peak on GPU) against "
                  "budgets.memory.", "bytes",
                  (q(f"max without (device) (edgetune_trainer_peak_memory_bytes{{{NS}}})", "peak {{node}}"),
                   q(f"edgetune_trainer_memory_budget_bytes{{{NS}}}", "budget {{node}}"))),
        PanelSpec("Energy by method", "Joules so far; the method says how it was measured (rapl, jetson, "
                  "nvml, estimate).", "joule",
                  (q(f"edgetune_trainer_energy_joules{{{NS}}}", "{{node}} ({{method}})"),)),
    )),
))  # fmt: skip

RELEASES = Board("edgetune-releases", "edgetune / Releases", "AdapterRelease rollouts and the edge agents "
                 "serving them.", (
    ("Rollout", (
        PanelSpec("Targets by version", "Agents reporting each adapter version, per release (the canary weight "
                  "as it happens).", "none",
                  (q("sum by (release, version) (edgetune_operator_release_targets)", "{{release}} v{{version}}"),)),
        PanelSpec("Analysis measurements", "Per metric and kind (value, nodata, error), over 5 minutes.", "none",
                  (q("sum by (metric, kind) (increase(edgetune_operator_analysis_measurements_total[5m]))",
                     "{{metric}} {{kind}}"),)),
        PanelSpec("Rollbacks", "Releases rolled back in the last hour, by reason.", "none",
                  (q("sum by (reason) (increase(edgetune_operator_rollbacks_total[1h]))", "{{reason}}"),),
                  kind="stat"),
        PanelSpec("Site accuracy by version", "The agents' eval gate on each node's labelled data: what an "
                  "analysis usually gates on.", "percentunit",
                  (q(f"min by (version) (edgetune_agent_eval_accuracy_ratio{{{NS}}})", "v{{version}}"),)),
    )),
    ("Serving", (
        PanelSpec("Requests by version", "Inference requests per second.", "reqps",
                  (q(f"sum by (version) (rate(edgetune_agent_requests_total{{{NS}}}[1m]))", "v{{version}}"),),
                  width=8),
        PanelSpec("Error ratio by version", "Failed requests over all requests (0 while none fail).",
                  "percentunit",
                  (q(f"(sum by (version) (rate(edgetune_agent_request_errors_total{{{NS}}}[1m])) or sum by (version) "
                     f"(rate(edgetune_agent_requests_total{{{NS}}}[1m])) * 0) / sum by (version) "
                     f"(rate(edgetune_agent_requests_total{{{NS}}}[1m]))", "v{{version}}"),), width=8),
        PanelSpec("p95 latency by version", "Receive to response.", "s",
                  (q(f"histogram_quantile(0.95, sum by (le, version) "
                     f"(rate(edgetune_agent_request_duration_seconds_bucket{{{NS}}}[1m])))", "v{{version}}"),),
                  width=8),
    )),
))  # fmt: skip

OPERATOR = Board("edgetune-operator", "edgetune / Operator", "The operator's own health.", (
    ("Reconciles", (
        PanelSpec("Reconcile rate", "By resource kind and result.", "ops",
                  (q("sum by (kind, result) (rate(edgetune_operator_reconciles_total[5m]))", "{{kind}} {{result}}"),)),
        PanelSpec("Reconcile latency p95", "By resource kind.", "s",
                  (q("histogram_quantile(0.95, sum by (le, kind) "
                     "(rate(edgetune_operator_reconcile_duration_seconds_bucket[5m])))", "{{kind}}"),)),
    )),
    ("Dependencies", (
        PanelSpec("External call latency p95", "Kubernetes (hub and edges), MLflow, S3, Prometheus.", "s",
                  (q("histogram_quantile(0.95, sum by (le, system) "
                     "(rate(edgetune_operator_external_call_duration_seconds_bucket[5m])))", "{{system}}"),)),
        PanelSpec("Operator memory", "Resident set size of the operator process.", "bytes",
                  (q('process_resident_memory_bytes{job=~".*edgetune-operator.*"}', "{{instance}}"),)),
    )),
))  # fmt: skip

BOARDS = (FLEET, TRAINING, RELEASES, OPERATOR)


def _panel(spec: PanelSpec) -> timeseries.Panel | stat.Panel:
    panel = stat.Panel() if spec.kind == "stat" else timeseries.Panel()
    panel.title(spec.title).description(spec.description).unit(spec.unit).datasource(DATASOURCE)
    panel.span(spec.width).height(8)
    for i, query in enumerate(spec.queries):
        panel.with_target(prometheus.Dataquery().expr(query.expr).legend_format(query.legend).ref_id(chr(65 + i)))
    return panel


def build(board: Board) -> dict[str, Any]:
    builder = (
        dashboard.Dashboard(board.title).uid(board.uid).description(board.description)
        .tags(["edgetune"]).refresh("30s").time("now-1h", "now").editable()
        .with_variable(dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
    )  # fmt: skip
    if any("$namespace" in qq.expr for _, panels in board.rows for p in panels for qq in p.queries):
        builder.with_variable(
            dashboard.QueryVariable("namespace").label("Namespace").datasource(DATASOURCE)
            .query("label_values(namespace)").multi(True).include_all(True).all_value(".*")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        )  # fmt: skip
    for title, panels in board.rows:
        builder.with_row(dashboard.Row(title))
        for spec in panels:
            builder.with_panel(_panel(spec))
    data: dict[str, Any] = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
    for number, panel in enumerate(data["panels"], start=1):  # Grafana wants every panel id unique
        panel["id"] = number
        for key in [k for k, v in panel.items() if v is None]:
            del panel[key]
    return data


def rendered() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {f"{b.uid.removeprefix('edgetune-')}.json": json.dumps(build(b), indent=2, sort_keys=True) + "\n"
            for b in BOARDS}  # fmt: skip


def queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel, PromQL) for every query, with the dashboard variables at their defaults."""
    return [
        (b.title, p.title, qq.expr.replace("$namespace", ".*"))
        for b in BOARDS for _, panels in b.rows for p in panels for qq in p.queries
    ]  # fmt: skip
