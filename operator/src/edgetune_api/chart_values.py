"""The Helm chart's values, typed: the source of ``charts/edgetune/values.schema.json``.

``python -m edgetune_api write`` renders the schema; helm checks every install and upgrade against
it, so a typo (``operator.wrokers``) or a wrong type (``operator.workers=abc``) fails with the
field's path instead of rendering a broken Deployment. ``values.yaml`` keeps the comments a person
reads; a test checks that it validates and that its defaults are these.
"""

from __future__ import annotations

import copy
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

DnsLabel = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]
Url = Annotated[str, StringConstraints(pattern=r"^(https?://\S+)?$")]
PullPolicy = Literal["Always", "IfNotPresent", "Never"]


class Values(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              use_attribute_docstrings=True)  # fmt: skip


class Image(Values):
    repository: str = "edgetune/operator"
    tag: str = ""
    """Defaults to the chart's appVersion."""
    digest: Annotated[str, StringConstraints(pattern=r"^(sha256:[a-f0-9]{64})?$")] = ""
    """``sha256:…``: pull by digest (the tag is then ignored)."""
    pull_policy: PullPolicy = "IfNotPresent"


class ServiceMonitor(Values):
    enabled: bool = False
    """Create a Prometheus Operator ServiceMonitor for the operator's /metrics."""
    interval: Annotated[str, StringConstraints(pattern=r"^[0-9]+(ms|s|m|h)$")] = "30s"
    labels: dict[str, str] = Field(default_factory=dict)
    """Extra labels, e.g. the `release` label your Prometheus selects monitors by."""


Cidr = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F:.]+/[0-9]{1,3}$")]


class NetworkPolicy(Values):
    enabled: bool = True
    """A NetworkPolicy for the operator pod: ingress only to its metrics and health ports, egress
    to DNS and TCP anywhere except ``deniedCidrs`` (it must reach the hub and every edge apiserver,
    S3, MLflow and Prometheus, whose addresses the chart cannot know)."""
    metrics_from: list[dict[str, Any]] = Field(default_factory=list)
    """NetworkPolicyPeers allowed to scrape /metrics (e.g. Prometheus' namespace); empty: anyone."""
    denied_cidrs: list[Cidr] = Field(default_factory=lambda: ["169.254.0.0/16", "fe80::/10"])
    """Never reachable from the operator: link-local, where clouds serve instance metadata and
    credentials (a second fence behind the S3 endpoint allow-list)."""
    extra_denied_cidrs: list[Cidr] = Field(default_factory=list)
    """More networks the operator never needs (e.g. the pod CIDR of other tenants)."""


class Operator(Values):
    enabled: bool = True
    """Install the operator (the hub). False on a pure edge cluster (enable edgeAccess there)."""
    replicas: Annotated[int, Field(ge=1, le=5)] = 1
    """More than one: standby replicas take over within ~15 s when the leader dies; a Lease elects the
    one that reconciles (docs/operator.md)."""
    image: Image = Field(default_factory=Image)
    resources: dict[str, Any] = Field(
        default_factory=lambda: {"requests": {"cpu": "100m", "memory": "160Mi"}, "limits": {"memory": "256Mi"}}
    )
    workers: Annotated[int, Field(ge=1, le=256)] = 8
    """Threads running reconciles (Kubernetes, S3 and MLflow calls block)."""
    resync_seconds: Annotated[float, Field(gt=0)] = 10
    """Every unfinished job is reconciled at least this often; edge clusters are polled at this pace."""
    cluster_lost_after_seconds: Annotated[float, Field(gt=0)] = 300
    """An edge cluster silent for longer fails its unfinished trainers; the job's other clusters go on."""
    metrics_port: Annotated[int, Field(ge=1, le=65535)] = 8080
    health_port: Annotated[int, Field(ge=1, le=65535)] = 8081
    env: list[dict[str, Any]] = Field(default_factory=list)
    """Extra environment variables (Kubernetes EnvVar objects)."""
    pod_labels: dict[str, str] = Field(default_factory=dict)
    pod_annotations: dict[str, str] = Field(default_factory=dict)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    secret_namespaces: list[DnsLabel] = Field(default_factory=list)
    """Namespaces whose Secrets the operator may read by name (jobs' and releases' S3 credentials,
    signing keys, salts) and where it may create hub trainers' credentials Secrets. The release
    namespace is always included; they must exist before install."""
    service_monitor: ServiceMonitor = Field(default_factory=ServiceMonitor)
    network_policy: NetworkPolicy = Field(default_factory=NetworkPolicy)
    require_signed_adapters: bool = False
    """The API server refuses an EdgeTrainingJob without output.signingKeySecretRef (a
    ValidatingAdmissionPolicy), so no unsigned adapter is trained here."""


class Trainer(Values):
    image: str = "edgetune/trainer:0.1.0-cpu"
    pull_policy: PullPolicy = "IfNotPresent"
    work_host_path: Annotated[str, StringConstraints(pattern=r"^/")] = "/var/lib/edgetune/work"
    """Node folder for checkpoints, so a retried trainer pod resumes where it stopped."""
    backoff_limit: Annotated[int, Field(ge=0, le=100)] = 3
    termination_grace_seconds: Annotated[int, Field(ge=1, le=3600)] = 60
    accelerator_profiles: str = ""
    """Accelerator profiles as JSON; empty keeps the defaults (docs/operator.md)."""
    pod_labels: dict[str, str] = Field(default_factory=dict)
    """Extra labels on trainer pods (e.g. for a service mesh or a policy engine)."""


class Mlflow(Values):
    tracking_uri: Url = ""


class S3(Values):
    endpoint: Url = ""
    """Empty: AWS."""
    allowed_endpoints: list[str] = Field(default_factory=list)
    """Other S3 endpoints (glob patterns) that jobs and releases may name for the operator to call;
    any other is refused (the operator is no proxy into the cluster network or a metadata service)."""


class Prometheus(Values):
    pushgateway_url: Url = ""
    """Where trainers push their metrics (Prometheus cannot scrape pods on remote edge clusters)."""
    url: Url = ""
    """What AdapterRelease analyses query."""


class EdgeAccess(Values):
    enabled: bool = False
    pod_logs: bool = True
    """Let the hub's identity read pod logs on this cluster (`kubectl edgetune logs` reads trainers'
    and agents' logs through it). False keeps logs on site; use the cluster's own credentials then."""


class Agent(Values):
    namespaces: list[DnsLabel] = Field(default_factory=list)
    """Namespaces where edge agents run: each gets the agent's ServiceAccount and Role."""
    service_account: DnsLabel = "edgetune-agent"
    pod_monitor: ServiceMonitor = Field(default_factory=ServiceMonitor)
    """A PodMonitor for the agents' /metrics in those namespaces."""


class Rules(Values):
    enabled: bool = False
    """Create a PrometheusRule with edgetune's alerts (docs/observability.md)."""
    labels: dict[str, str] = Field(default_factory=dict)


class Dashboards(Values):
    enabled: bool = False
    """ConfigMaps holding the Grafana dashboards, labelled for kube-prometheus-stack's sidecar."""
    label: str = "grafana_dashboard"
    label_value: str = "1"
    namespace: str = ""
    """Where the ConfigMaps go (the sidecar's namespace); empty: the release namespace."""


class ChartValues(Values):
    operator: Operator = Field(default_factory=Operator)
    trainer: Trainer = Field(default_factory=Trainer)
    mlflow: Mlflow = Field(default_factory=Mlflow)
    s3: S3 = Field(default_factory=S3)
    prometheus: Prometheus = Field(default_factory=Prometheus)
    edge_access: EdgeAccess = Field(default_factory=EdgeAccess)
    """On an edge cluster: a ServiceAccount + least-privilege role for the hub operator's kubeconfig."""
    agent: Agent = Field(default_factory=Agent)
    prometheus_rule: Rules = Field(default_factory=Rules)
    dashboards: Dashboards = Field(default_factory=Dashboards)


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
            target.update({k: v for k, v in node.items() if k != "$ref"})
            return _inline(target, defs)
        return {k: " ".join(v.split()) if k == "description" else _inline(v, defs)
                for k, v in node.items() if k not in ("title", "$defs")}  # fmt: skip
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12, every reference inlined) of the chart's values."""
    raw = ChartValues.model_json_schema(by_alias=True)
    out: dict[str, Any] = _inline(raw, raw.get("$defs", {}))
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "edgetune Helm chart values", **out}


def render() -> str:
    return json.dumps(schema(), indent=2) + "\n"
