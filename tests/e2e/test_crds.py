"""The generated CRDs, installed in a real kube-apiserver, accept the examples and reject bad input
with messages that name the field and say what is expected."""

from __future__ import annotations

import copy
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from edgetune_api import GROUP, VERSION, AdapterRelease, EdgeCluster, EdgeTrainingJob, EdgeTrainingJobStatus
from edgetune_testenv import binaries
from edgetune_testenv.cluster import ControlPlane
from tests.support import new_namespace

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]

MINIMAL_JOB: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "EdgeTrainingJob",
    "metadata": {"name": "minimal"},
    "spec": {
        "baseModel": {"uri": "builtin:timeseries-cnn"},
        "data": {"source": {"hostPath": "/var/lib/edgetune/data"}, "format": "csv"},
        "budgets": {"memory": "1Gi"},
        "output": {"s3": {"bucket": "adapters"}, "mlflow": {"registeredModel": "sensor-lora"}},
    },
}
MINIMAL_RELEASE: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "AdapterRelease",
    "metadata": {"name": "minimal"},
    "spec": {
        "adapter": {"registeredModel": "sensor-lora", "version": "3"},
        "targets": {"workloadSelector": {"matchLabels": {"app": "inference"}}},
        "strategy": {"canary": {"steps": [{"setWeight": 50}, {"setWeight": 100}]}},
    },
}
MINIMAL_CLUSTER: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "EdgeCluster",
    "metadata": {"name": "minimal"},
    "spec": {"kubeconfigSecretRef": {"name": "kc", "namespace": "edgetune-system"}},
}
PLURALS = {"EdgeTrainingJob": "edgetrainingjobs", "AdapterRelease": "adapterreleases", "EdgeCluster": "edgeclusters"}


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(obj: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = obj
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value

    return mutate


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(obj: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = obj
        for key in parents:
            node = node[key]
        del node[last]

    return mutate


def _analysis(metrics: list[dict[str, Any]], steps: list[dict[str, Any]]) -> Callable[[dict[str, Any]], None]:
    def mutate(obj: dict[str, Any]) -> None:
        obj["spec"]["analysis"] = {"metrics": metrics}
        obj["spec"]["strategy"]["canary"]["steps"] = steps

    return mutate


METRIC = {"name": "error-rate", "query": "sum(rate(x[1m]))", "thresholdRange": {"max": 0.01}}

# (id, base manifest, mutation, substrings the apiserver's message must contain)
INVALID: list[tuple[str, dict[str, Any], Callable[[dict[str, Any]], None], tuple[str, ...]]] = [
    ("no-spec", MINIMAL_JOB, _drop("spec"), ("spec: Required value",)),
    ("no-data", MINIMAL_JOB, _drop("spec.data"), ("spec.data: Required value",)),
    ("no-memory-budget", MINIMAL_JOB, _drop("spec.budgets.memory"), ("spec.budgets.memory: Required value",)),
    ("rank-zero", MINIMAL_JOB, _set("spec.peft.r", 0), ("spec.peft.r", "greater than or equal to 1")),
    ("rank-not-a-number", MINIMAL_JOB, _set("spec.peft.r", "eight"), ("spec.peft.r", "must be of type integer")),
    ("dropout-one", MINIMAL_JOB, _set("spec.peft.dropout", 1.0), ("spec.peft.dropout", "less than 1")),
    ("peft-method", MINIMAL_JOB, _set("spec.peft.method", "prefix"), ('spec.peft.method: Unsupported value: "prefix"', '"lora"')),
    ("no-target-modules", MINIMAL_JOB, _set("spec.peft.targetModules", []), ("spec.peft.targetModules", "at least 1 items")),
    ("unknown-field", MINIMAL_JOB, _set("spec.peft.rank", 8), ('unknown field "spec.peft.rank"',)),
    ("memory-not-quantity", MINIMAL_JOB, _set("spec.budgets.memory", "lots"), ("spec.budgets.memory", "must be a Kubernetes quantity such as 512Mi")),
    ("memory-below-floor", MINIMAL_JOB, _set("spec.budgets.memory", "768Mi"), ("spec.budgets.memory", "at least 1Gi (the trainer cannot run in less)")),
    ("deadline-words", MINIMAL_JOB, _set("spec.budgets.deadline", "45 minutes"), ("spec.budgets.deadline", "must be a duration such as 90s, 15m or 1h30m")),
    ("battery-150", MINIMAL_JOB, _set("spec.budgets.minBatteryPercent", 150), ("spec.budgets.minBatteryPercent", "less than or equal to 100")),
    ("batch-zero", MINIMAL_JOB, _set("spec.training.batchSize", 0), ("spec.training.batchSize", "whole number from 1 to 65536, or the string auto")),
    ("batch-big", MINIMAL_JOB, _set("spec.training.batchSize", "big"), ("spec.training.batchSize", "or the string auto")),
    ("optimizer", MINIMAL_JOB, _set("spec.training.optimizer", "adam"), ('spec.training.optimizer: Unsupported value: "adam"', '"adamw"')),
    ("learning-rate-zero", MINIMAL_JOB, _set("spec.training.learningRate", 0), ("spec.training.learningRate", "greater than 0")),
    ("fedavg-without-per-node", MINIMAL_JOB, _set("spec.aggregation", {"strategy": "fedavg"}), ("spec.aggregation.strategy", "needs placement.perNode: true")),
    ("max-nodes-without-per-node", MINIMAL_JOB, _set("spec.placement", {"maxNodes": 3}), ("spec.placement.maxNodes", "needs placement.perNode: true")),
    ("accelerator-tpu", MINIMAL_JOB, _set("spec.placement", {"accelerator": "tpu"}), ('spec.placement.accelerator: Unsupported value: "tpu"',)),
    ("two-gpus", MINIMAL_JOB, _set("spec.placement", {"accelerator": "gpu", "acceleratorCount": 2}), ("spec.placement.acceleratorCount", "above 1 is not supported yet", "use perNode")),
    ("fallback-on-cpu", MINIMAL_JOB, _set("spec.placement", {"accelerator": "cpu", "allowCpuFallback": True}), ("spec.placement.allowCpuFallback", "gpu and npu placements only")),
    ("npu-without-fallback", MINIMAL_JOB, _set("spec.placement", {"accelerator": "npu"}), ("spec.placement.allowCpuFallback", "no NPU backend yet")),
    ("data-format", MINIMAL_JOB, _set("spec.data.format", "parquet"), ('spec.data.format: Unsupported value: "parquet"', '"jsonl"')),
    ("two-data-sources", MINIMAL_JOB, _set("spec.data.source.persistentVolumeClaim", {"claimName": "pvc"}), ("spec.data.source", "exactly one of hostPath or persistentVolumeClaim")),
    ("no-data-source", MINIMAL_JOB, _set("spec.data.source", {}), ("spec.data.source", "exactly one of hostPath or persistentVolumeClaim")),
    ("relative-host-path", MINIMAL_JOB, _set("spec.data.source.hostPath", "data/x"), ("spec.data.source.hostPath", "absolute path on the node")),
    ("http-base-model", MINIMAL_JOB, _set("spec.baseModel.uri", "http://example.com/model"), ("spec.baseModel.uri", "must start with models:/, runs:/, s3://")),
    ("s3-model-without-hash", MINIMAL_JOB, _set("spec.baseModel.uri", "s3://models/base"), ("spec.baseModel.sha256", "sha256 is required")),
    ("short-hash", MINIMAL_JOB, _set("spec.baseModel.sha256", "abc123"), ("spec.baseModel.sha256", "64 lowercase hex digits")),
    ("bucket-name", MINIMAL_JOB, _set("spec.output.s3.bucket", "Bad_Bucket"), ("spec.output.s3.bucket", "must be an S3 bucket name")),
    ("hash-without-salt", MINIMAL_JOB, _set("spec.data.privacy", {"hashFields": ["user"]}), ("spec.data.privacy", "needs privacy.saltSecretRef")),
    ("eval-fraction", MINIMAL_JOB, _set("spec.data.evalFraction", 0.9), ("spec.data.evalFraction", "less than or equal to 0.5")),
    ("version-and-alias", MINIMAL_RELEASE, _set("spec.adapter.alias", "champion"), ("spec.adapter", "exactly one of version, alias or trainingJobRef")),
    ("no-version", MINIMAL_RELEASE, _drop("spec.adapter.version"), ("spec.adapter", "exactly one of version, alias or trainingJobRef")),
    ("version-v3", MINIMAL_RELEASE, _set("spec.adapter.version", "v3"), ("spec.adapter.version", "model version number such as 3")),
    ("weights-decrease", MINIMAL_RELEASE, _set("spec.strategy.canary.steps", [{"setWeight": 50}, {"setWeight": 20}]), ("spec.strategy.canary.steps", "must increase strictly")),
    ("weights-repeat", MINIMAL_RELEASE, _set("spec.strategy.canary.steps", [{"setWeight": 50}, {"setWeight": 50}]), ("spec.strategy.canary.steps", "must increase strictly")),
    ("weight-over-100", MINIMAL_RELEASE, _set("spec.strategy.canary.steps", [{"setWeight": 120}]), ("setWeight", "less than or equal to 100")),
    ("step-two-actions", MINIMAL_RELEASE, _set("spec.strategy.canary.steps", [{"setWeight": 10, "pause": {}}]), ("steps[0]", "exactly one of setWeight, pause, analysis or shadow")),
    ("shadow-with-weight", MINIMAL_RELEASE, _set("spec.strategy.canary.steps", [{"setWeight": 10, "shadow": {}}]), ("steps[0]", "a shadow step has no weight")),
    ("shadow-after-weight", MINIMAL_RELEASE, _set("spec.strategy.canary.steps", [{"setWeight": 10}, {"shadow": {"duration": "5m"}}]), ("spec.strategy.canary.steps", "a shadow step must come before every setWeight step")),
    ("shadow-duration-words", MINIMAL_RELEASE, _set("spec.strategy.canary.steps", [{"shadow": {"duration": "a while"}}, {"setWeight": 10}]), ("shadow.duration", "must be a duration")),
    ("no-steps", MINIMAL_RELEASE, _set("spec.strategy.canary.steps", []), ("spec.strategy.canary.steps", "at least 1 items")),
    ("analysis-without-metrics", MINIMAL_RELEASE, _analysis([], [{"setWeight": 10}, {"analysis": {}}]), ("spec.analysis.metrics", "needs at least one entry")),
    ("analysis-unknown-metric", MINIMAL_RELEASE, _analysis([METRIC], [{"analysis": {"metrics": ["latency"]}}]), ("names a metric that spec.analysis.metrics does not define",)),
    ("empty-threshold", MINIMAL_RELEASE, _analysis([{**METRIC, "thresholdRange": {}}], [{"setWeight": 10}]), ("thresholdRange", "needs min, max or both")),
    ("min-above-max", MINIMAL_RELEASE, _analysis([{**METRIC, "thresholdRange": {"min": 2, "max": 1}}], [{"setWeight": 10}]), ("min must not exceed", "max")),
    ("failure-limit", MINIMAL_RELEASE, _analysis([{**METRIC, "count": 2, "failureLimit": 2}], [{"setWeight": 10}]), ("failureLimit", "smaller than count")),
    ("interval-words", MINIMAL_RELEASE, _analysis([{**METRIC, "interval": "soon"}], [{"setWeight": 10}]), ("interval", "must be a duration")),
    ("no-workload-selector", MINIMAL_RELEASE, _drop("spec.targets.workloadSelector"), ("spec.targets.workloadSelector: Required value",)),
    ("revocation-endpoint", MINIMAL_RELEASE, _set("spec.rollback.s3", {"endpoint": "minio:9000"}), ("spec.rollback.s3.endpoint", "must be an http:// or https:// URL")),
    ("progress-deadline-words", MINIMAL_RELEASE, _set("spec.strategy.canary.progressDeadline", "later"), ("progressDeadline", "must be a duration")),
    ("cluster-secret-namespace", MINIMAL_CLUSTER, _drop("spec.kubeconfigSecretRef.namespace"), ("spec.kubeconfigSecretRef.namespace: Required value",)),
    ("cluster-heartbeat", MINIMAL_CLUSTER, _set("spec.heartbeatInterval", "often"), ("spec.heartbeatInterval", "must be a duration")),
]  # fmt: skip


@pytest.fixture(scope="module")
def api(hub_crds: ControlPlane) -> Iterator[tuple[Any, str]]:
    client = hub_crds.api_client()
    namespace = new_namespace(k8s.CoreV1Api(client))
    yield k8s.CustomObjectsApi(client), namespace
    client.close()


def _create(api: tuple[Any, str], body: dict[str, Any]) -> dict[str, Any]:
    objects, namespace = api
    plural = PLURALS[body["kind"]]
    if body["kind"] == "EdgeCluster":
        return objects.create_cluster_custom_object(GROUP, VERSION, plural, body, field_validation="Strict")  # type: ignore[no-any-return]
    return objects.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body, field_validation="Strict")  # type: ignore[no-any-return]


def test_enough_distinct_invalid_cases() -> None:
    assert len({case[0] for case in INVALID}) == len(INVALID) >= 25


@pytest.mark.parametrize(("case", "base", "mutate", "expected"), INVALID, ids=[c[0] for c in INVALID])
def test_apiserver_rejects_invalid_manifest_with_a_clear_message(
    api: tuple[Any, str],
    case: str,
    base: dict[str, Any],
    mutate: Callable[[dict[str, Any]], None],
    expected: tuple[str, ...],
) -> None:
    body = copy.deepcopy(base)
    body["metadata"]["name"] = f"invalid-{case}"
    mutate(body)
    with pytest.raises(k8s.ApiException) as err:
        _create(api, body)
    assert err.value.status in (400, 422), err.value.body
    message = json.loads(err.value.body)["message"]
    for text in expected:
        assert text in message, f"{text!r} not in apiserver message: {message}"


@pytest.mark.parametrize("change", [{"training": {"maxSteps": 200}}, {"budgets": {"memory": "2Gi"}},
                                    {"placement": {"accelerator": "gpu"}}, {"peft": {"r": 16}}])  # fmt: skip
def test_a_jobs_spec_cannot_change_once_it_exists_except_suspend(api: tuple[Any, str], change: dict[str, Any]) -> None:
    """Edits were taken and then ignored (a running trainer kept the old config) or left a finished
    job in Packaging for good: the API server refuses them, saying what to do instead."""
    objects, namespace = api
    body = copy.deepcopy(MINIMAL_JOB)
    name = body["metadata"]["name"] = f"fixed-{next(iter(change))}"
    _create(api, body)
    with pytest.raises(k8s.ApiException) as err:
        objects.patch_namespaced_custom_object(GROUP, VERSION, namespace, "edgetrainingjobs", name, {"spec": change})
    assert err.value.status == 422, err.value.body
    message = json.loads(err.value.body)["message"]
    assert "spec cannot change once it exists, except suspend" in message and "create a new EdgeTrainingJob" in message
    objects.patch_namespaced_custom_object(GROUP, VERSION, namespace, "edgetrainingjobs", name,
                                           {"spec": {"suspend": True}})  # fmt: skip
    stored = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, "edgetrainingjobs", name)
    assert stored["spec"]["suspend"] is True


def test_valid_minimal_manifests_are_accepted(api: tuple[Any, str]) -> None:
    # The same bases, unmutated, pass: every rejection above is caused by its mutation alone.
    for base in (MINIMAL_JOB, MINIMAL_RELEASE, MINIMAL_CLUSTER):
        body = copy.deepcopy(base)
        body["metadata"]["name"] = "valid-base"
        assert _create(api, body)["metadata"]["uid"]


@pytest.mark.parametrize(
    ("base", "model"),
    [(MINIMAL_JOB, EdgeTrainingJob), (MINIMAL_RELEASE, AdapterRelease), (MINIMAL_CLUSTER, EdgeCluster)],
)
def test_apiserver_defaults_equal_model_defaults(api: tuple[Any, str], base: dict[str, Any], model: type[Any]) -> None:
    body = copy.deepcopy(base)
    body["metadata"]["name"] = "defaults"
    stored = _create(api, body)
    expected = model.model_validate(base).to_wire()["spec"]
    assert stored["spec"] == expected
    assert model.model_validate(stored).to_wire()["spec"] == expected  # and the read-back object parses


def test_examples_apply_and_show_printer_columns(hub_crds: ControlPlane, api: tuple[Any, str]) -> None:
    _, namespace = api
    # Examples applied through envsubst name the base model's digest as ${BASE_SHA256}.
    examples = "\n---\n".join(p.read_text() for p in sorted((REPO / "examples").glob("*.yaml")))
    hub_crds.kubectl("apply", "-n", namespace, "-f", "-", input_text=examples.replace("${BASE_SHA256}", "ab" * 32))
    jobs = hub_crds.kubectl("get", "etj", "-n", namespace).stdout.splitlines()
    assert jobs[0].split() == ["NAME", "PHASE", "ACCELERATOR", "PROGRESS", "MODEL", "VERSION", "ENERGY", "AGE"]
    assert {line.split()[0] for line in jobs[1:]} >= {"vibration-lora-gpu", "demand-lora-npu", "soil-moisture-fedavg"}
    releases = hub_crds.kubectl("get", "ar", "-n", namespace).stdout.splitlines()
    assert releases[0].split() == ["NAME", "PHASE", "MODEL", "CANARY", "STABLE", "WEIGHT", "AGE"]
    rollout = next(line.split() for line in releases[1:] if line.startswith("meter-lora-rollout "))
    assert rollout[1] == "meter-lora"  # MODEL; PHASE and the versions are empty until the operator acts
    clusters = hub_crds.kubectl("get", "ec", "edge-factory").stdout.splitlines()
    assert clusters[0].split() == ["NAME", "REACHABLE", "PAUSED", "VERSION", "NODES", "AGE"]
    # The category lists every kind at once.
    everything = hub_crds.kubectl("get", "edgetune", "-n", namespace, "-o", "name").stdout
    assert "edgetrainingjob.edgetune.io/vibration-lora-gpu" in everything
    assert "adapterrelease.edgetune.io/meter-lora-rollout" in everything


def test_kubectl_explain_teaches_the_api(hub_crds: ControlPlane) -> None:
    out = " ".join(hub_crds.kubectl("explain", "edgetrainingjob.spec.peft").stdout.split())  # kubectl wraps lines
    assert "The adapter to train." in out
    assert "r <integer> LoRA rank: the inner dimension of the low-rank update (1-256)." in out
    budgets = " ".join(hub_crds.kubectl("explain", "etj.spec.budgets.memory").stdout.split())
    assert "Memory the trainer may use (becomes the pod's memory limit), e.g. `2Gi`; at least 1Gi." in budgets


def test_status_is_written_only_through_the_status_subresource(hub_crds: ControlPlane, api: tuple[Any, str]) -> None:
    objects, namespace = api
    body = copy.deepcopy(MINIMAL_JOB)
    body["metadata"]["name"] = "status-owner"
    _create(api, body)
    status = {"status": {"phase": "Succeeded", "progress": "1/1"}}
    objects.patch_namespaced_custom_object(GROUP, VERSION, namespace, "edgetrainingjobs", "status-owner", status)
    main = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, "edgetrainingjobs", "status-owner")
    assert "status" not in main  # a write to the main resource ignores status
    objects.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, "edgetrainingjobs", "status-owner", status)
    after = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, "edgetrainingjobs", "status-owner")
    # Exactly what was written, plus the schema's defaults, which are the model's defaults.
    assert after["status"] == EdgeTrainingJobStatus.model_validate(status["status"]).to_wire()
    assert after["status"]["phase"] == "Succeeded"
    assert after["metadata"]["generation"] == main["metadata"]["generation"]  # status does not bump generation
    printed = hub_crds.kubectl("get", "etj", "status-owner", "-n", namespace, "--no-headers").stdout.split()
    assert printed[1:3] == ["Succeeded", "any"]


def test_status_schema_keeps_everything_the_operator_writes(api: tuple[Any, str]) -> None:
    """A status field the schema would prune makes kopf retry forever (kopf #308): nothing may be dropped."""
    objects, namespace = api
    body = copy.deepcopy(MINIMAL_JOB)
    body["metadata"]["name"] = "full-status"
    _create(api, body)
    status = yaml.safe_load(
        """
        phase: Training
        observedGeneration: 1
        progress: 1/2
        startTime: "2026-11-22T10:00:00Z"
        conditions:
        - {type: Scheduled, status: "True", reason: PodsBound, message: 2 of 2 trainers bound,
           lastTransitionTime: "2026-11-22T10:00:01Z", observedGeneration: 1}
        targets:
        - {cluster: local, node: hub-gpu-0, phase: Training, jobName: full-status-0, samples: 120, step: 40,
           loss: 0.52, evalLoss: 0.61, peakMemoryBytes: 734003200, energyJoules: 512.5, energyMethod: estimate}
        result: {deltaUri: "s3://adapters/x/delta", sha256: "%s", bytes: 131072, encoding: fp16,
                 mlflowModel: sensor-lora, mlflowVersion: "4", mlflowRunId: abc123}
        """
        % ("a" * 64)
    )
    objects.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "edgetrainingjobs", "full-status", {"status": status}
    )
    stored = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, "edgetrainingjobs", "full-status")
    assert stored["status"] == status
    EdgeTrainingJob.model_validate(stored)  # and the operator can parse what it wrote


def test_helm_chart_installs_the_crds(edge_b: ControlPlane) -> None:
    helm = str(binaries.binary(binaries.HELM, "helm"))
    chart = str(REPO / "charts" / "edgetune")
    lint = subprocess.run([helm, "lint", chart], capture_output=True, text=True, check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    for namespace in ("team-a", "team-b"):
        edge_b.kubectl("create", "namespace", namespace)
    install = subprocess.run(
        [helm, "install", "edgetune", chart, f"--kubeconfig={edge_b.kubeconfig}", "--namespace=edgetune-system",
         "--create-namespace", "--wait", "--timeout=60s", "--set=operator.secretNamespaces={team-a}",
         "--set=edgeAccess.enabled=true"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    # Least privilege, asked of the apiserver: the operator reads Secrets by name where jobs and
    # EdgeClusters name them, nowhere else, and can list or write none.
    operator = "--as=system:serviceaccount:edgetune-system:edgetune-operator"

    def can(*args: str, who: str = operator) -> str:
        done = edge_b.kubectl("auth", "can-i", who, *args, check=False)
        return str(done.stdout).strip()

    assert can("get", "secrets", "-n", "edgetune-system") == "yes"
    assert can("get", "secrets", "-n", "team-a") == "yes"
    assert can("get", "secrets", "-n", "team-b") == "no"
    assert can("get", "secrets", "-n", "kube-system") == "no"
    assert can("list", "secrets", "-n", "team-a") == "no"
    assert can("list", "secrets", "--all-namespaces") == "no"
    assert can("create", "secrets", "-n", "team-a") == "yes"  # hub trainers' own credentials
    assert can("create", "secrets", "-n", "team-b") == "no"
    for verb in ("update", "patch", "delete", "watch"):
        assert can(verb, "secrets", "-n", "team-a") == "no", verb
    assert can("get", "pods", "-n", "team-b") == "yes"  # what it needs elsewhere still works
    assert can("bind", "clusterroles/edgetune-trainer") == "yes"  # hub trainers' identity
    assert can("bind", "clusterroles/cluster-admin") == "no"
    # The hub's identity on an edge cluster writes trainers' credentials by name and reads no Secret,
    # cannot exec into, attach to or port-forward pods, and touches RBAC only to bind one role.
    hub = "--as=system:serviceaccount:edgetune-system:edgetune-hub"
    for verb in ("get", "list", "watch", "update", "patch"):
        assert can(verb, "secrets", "-n", "team-b", who=hub) == "no", verb
    assert can("create", "secrets", "-n", "team-b", who=hub) == "yes"
    assert can("delete", "secrets", "-n", "team-b", who=hub) == "yes"
    for sub in ("exec", "attach", "portforward"):  # `pods/exec` would ask about a pod named exec
        assert can("create", "pods", f"--subresource={sub}", "-n", "team-b", who=hub) == "no", sub
    assert can("get", "pods", "--subresource=log", "-n", "team-b", who=hub) == "yes"  # edgeAccess.podLogs
    # RBAC: RoleBindings for the trainers' identity, to the ClusterRole edgetune-trainer and no other
    # (a binding to a role it may not bind is refused by the apiserver's escalation check).
    assert can("create", "rolebindings", "-n", "team-b", who=hub) == "yes"
    assert can("bind", "clusterroles/edgetune-trainer", who=hub) == "yes"
    for role in ("clusterroles/cluster-admin", "clusterroles/edit", "roles/anything"):
        assert can("bind", role, "-n", "team-b", who=hub) == "no", role
    for verb in ("create", "update", "escalate"):
        assert can(verb, "roles", "-n", "team-b", who=hub) == "no", verb
    assert can("create", "clusterrolebindings", who=hub) == "no"
    assert can("create", "serviceaccounts", "-n", "team-b", who=hub) == "yes"
    assert can("create", "serviceaccounts", "--subresource=token", "-n", "team-b", who=hub) == "no"
    assert can("create", "jobs.batch", "-n", "team-b", who=hub) == "yes"
    crds = edge_b.kubectl("get", "crd", "-l", "app.kubernetes.io/name=edgetune", "-o", "name").stdout.split()
    assert sorted(crds) == [
        "customresourcedefinition.apiextensions.k8s.io/adapterreleases.edgetune.io",
        "customresourcedefinition.apiextensions.k8s.io/edgeclusters.edgetune.io",
        "customresourcedefinition.apiextensions.k8s.io/edgetrainingjobs.edgetune.io",
    ]
    # Its NetworkPolicy, accepted by the apiserver, selects its pod and fences off cloud metadata.
    policy = json.loads(edge_b.kubectl("-n", "edgetune-system", "get", "networkpolicy", "edgetune-operator",
                                       "-o", "json").stdout)["spec"]  # fmt: skip
    blocks = [peer["ipBlock"] for rule in policy["egress"] for peer in rule.get("to", [])]
    assert {"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16"]} in blocks
    assert [rule["ports"][0]["port"] for rule in policy["ingress"]] == ["metrics", "health"]
    # The operator's Deployment comes up (kwok runs its pod), locked down as a pod must be.
    edge_b.kubectl("-n", "edgetune-system", "rollout", "status", "deploy/edgetune-operator", "--timeout=60s")
    pod = json.loads(edge_b.kubectl("-n", "edgetune-system", "get", "pods", "-l",
                                    "app.kubernetes.io/component=operator", "-o", "json").stdout)["items"][0]  # fmt: skip
    assert policy["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_plain_manifests_are_the_rendered_chart_and_apply(edge_a: ControlPlane) -> None:
    from edgetune_testenv.__main__ import render_manifests  # noqa: PLC0415

    committed = (REPO / "deploy" / "edgetune.yaml").read_text()
    assert committed == render_manifests(), "deploy/edgetune.yaml is stale: run `make manifests`"
    edge_a.kubectl("apply", "--server-side", "-f", str(REPO / "deploy" / "edgetune.yaml"))
    role = json.loads(edge_a.kubectl("get", "clusterrole", "edgetune-operator", "-o", "json").stdout)
    assert not [r for r in role["rules"] if "secrets" in r["resources"]]  # Secrets: per namespace only
    secrets = json.loads(edge_a.kubectl("-n", "edgetune-system", "get", "role", "edgetune-operator-secrets",
                                        "-o", "json").stdout)["rules"]  # fmt: skip
    assert secrets == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create"]}]
    edge_a.kubectl("-n", "edgetune-system", "rollout", "status", "deploy/edgetune-operator", "--timeout=60s")


def test_helm_upgrade_with_changed_crds_follows_the_documented_path(edge_b: ControlPlane) -> None:
    """docs/operator.md: helm never upgrades CRDs, so they are applied first, then `helm upgrade`.
    A cluster whose AdapterRelease CRD lacks a field (as from an older chart) gets it back, and the
    release's new values reach the Deployment."""
    helm = str(binaries.binary(binaries.HELM, "helm"))
    chart = str(REPO / "charts" / "edgetune")
    kubeconfig = f"--kubeconfig={edge_b.kubeconfig}"
    if subprocess.run([helm, "status", "edgetune", kubeconfig, "-n", "edgetune-system"], capture_output=True,
                      check=False).returncode != 0:  # fmt: skip
        edge_b.kubectl("create", "namespace", "team-a", check=False)
        subprocess.run([helm, "install", "edgetune", chart, kubeconfig, "-n", "edgetune-system", "--create-namespace",
                        "--set=operator.secretNamespaces={team-a}", "--wait", "--timeout=60s"], check=True)  # fmt: skip
    crd = json.loads(edge_b.kubectl("get", "crd", "adapterreleases.edgetune.io", "-o", "json").stdout)
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    del spec["promote"]  # an older chart's CRD
    for key in ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields"):
        crd["metadata"].pop(key, None)
    crd.pop("status", None)
    edge_b.kubectl("replace", "-f", "-", input_text=json.dumps(crd))
    assert edge_b.kubectl("explain", "adapterrelease.spec.promote", check=False).returncode != 0

    edge_b.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "charts/edgetune/crds"))
    upgrade = subprocess.run([helm, "upgrade", "edgetune", chart, kubeconfig, "-n", "edgetune-system", "--reuse-values",
                              "--set=operator.workers=4", "--wait", "--timeout=60s"],
                             capture_output=True, text=True, check=False)  # fmt: skip
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    assert "Skip the remaining steps" in edge_b.kubectl("explain", "adapterrelease.spec.promote").stdout
    deployment = json.loads(edge_b.kubectl("-n", "edgetune-system", "get", "deploy", "edgetune-operator", "-o",
                                           "json").stdout)  # fmt: skip
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["EDGETUNE_WORKERS"] == "4"
    bad = subprocess.run([helm, "upgrade", "edgetune", chart, kubeconfig, "-n", "edgetune-system", "--reuse-values",
                          "--set=operator.workers=many"], capture_output=True, text=True, check=False)  # fmt: skip
    assert bad.returncode != 0 and "at '/operator/workers': got string, want integer" in bad.stderr


def test_a_cluster_that_requires_signed_adapters_refuses_an_unsigned_job(edge_b: ControlPlane) -> None:
    """operator.requireSignedAdapters: the API server itself refuses a job without a signing key."""
    helm = str(binaries.binary(binaries.HELM, "helm"))
    chart = str(REPO / "charts" / "edgetune")
    kubeconfig = f"--kubeconfig={edge_b.kubeconfig}"
    upgrade = subprocess.run([helm, "upgrade", "--install", "edgetune", chart, kubeconfig, "-n", "edgetune-system",
                              "--create-namespace", "--reuse-values", "--set=operator.requireSignedAdapters=true"],
                             capture_output=True, text=True, check=False)  # fmt: skip
    assert upgrade.returncode == 0, upgrade.stderr
    edge_b.kubectl("create", "namespace", "signed-only", check=False)
    unsigned = copy.deepcopy(MINIMAL_JOB) | {"metadata": {"name": "unsigned", "namespace": "signed-only"}}
    signed = copy.deepcopy(unsigned) | {"metadata": {"name": "signed", "namespace": "signed-only"}}
    signed["spec"]["output"]["signingKeySecretRef"] = {"name": "adapter-signing", "key": "key.pem"}

    def apply(manifest: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return edge_b.kubectl("apply", "-f", "-", input_text=json.dumps(manifest), check=False)

    deadline = time.monotonic() + 30  # the policy takes effect once the apiserver has loaded it
    refused = apply(unsigned)
    while refused.returncode == 0 and time.monotonic() < deadline:
        edge_b.kubectl("-n", "signed-only", "delete", "edgetrainingjob", "unsigned", check=False)
        time.sleep(1)
        refused = apply(unsigned)
    assert refused.returncode != 0
    assert "this cluster requires signed adapters" in refused.stderr and "signingKeySecretRef" in refused.stderr
    accepted = apply(signed)
    assert accepted.returncode == 0, accepted.stderr
    subprocess.run([helm, "upgrade", "edgetune", chart, kubeconfig, "-n", "edgetune-system", "--reuse-values",
                    "--set=operator.requireSignedAdapters=false"], capture_output=True, check=True)  # fmt: skip


def test_the_operator_pod_is_admitted_under_the_restricted_pod_security_standard(edge_b: ControlPlane) -> None:
    """The chart's operator pod, as rendered, passes `pod-security.kubernetes.io/enforce: restricted`
    on the real apiserver (server-side dry run: admission runs, nothing is stored)."""
    helm = str(binaries.binary(binaries.HELM, "helm"))
    rendered = subprocess.run([helm, "template", "edgetune", str(REPO / "charts" / "edgetune"), "--kube-version=1.36.3",
                               "--namespace=psa-restricted", "--show-only=templates/operator.yaml"],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
    deployment = next(o for o in yaml.safe_load_all(rendered) if o and o["kind"] == "Deployment")
    edge_b.kubectl("create", "namespace", "psa-restricted")
    edge_b.kubectl("label", "namespace", "psa-restricted", "pod-security.kubernetes.io/enforce=restricted")
    template = deployment["spec"]["template"]
    template["spec"]["serviceAccountName"] = "default"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "operator", "namespace": "psa-restricted",
                                                            "labels": template["metadata"]["labels"]},
           "spec": template["spec"]}  # fmt: skip
    admitted = edge_b.kubectl("apply", "--dry-run=server", "-f", "-", input_text=json.dumps(pod), check=False)
    assert admitted.returncode == 0 and "violate" not in admitted.stderr, admitted.stderr
    # and the standard is really enforced there: a root pod is refused
    pod["spec"] = {"containers": [{"name": "root", "image": "busybox", "securityContext": {"runAsUser": 0}}]}
    refused = edge_b.kubectl("apply", "--dry-run=server", "-f", "-", input_text=json.dumps(pod), check=False)
    assert refused.returncode != 0 and "restricted" in refused.stderr
