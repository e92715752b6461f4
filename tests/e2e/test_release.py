"""AdapterRelease end to end: the operator on the hub rolls adapters out to real agents on two edge
clusters (executor-run pods), gated on a real Prometheus query of the agents' own evaluation
metric, with versions resolved from and promoted in the real MLflow, packages in the real S3.

The agents hold the site's labelled data (`--eval-data-dir`): every candidate is scored before it
serves, and the analysis asks Prometheus for the worst score of the released version. A trained
adapter passes; a package of random weights fails and is rolled back everywhere.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from edgetune_api.assignment import REPORT_ANNOTATION, AdapterReport
from edgetune_testenv import binaries
from edgetune_testenv.cluster import ControlPlane
from edgetune_testenv.executor import PodExecutor
from edgetune_testenv.operator_proc import OperatorProcess
from edgetune_testenv.servers import MlflowServer, Prometheus, S3Server
from tests.agent_support import BASE_HOST_PATH, agent_pod, keypair, make_base, make_package, train, upload
from tests.support import eventually
from tests.trainer_support import sine_classes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
GROUP, VERSION = "edgetune.io", "v1alpha1"
EVAL_HOST_PATH = "/var/lib/edgetune/eval"
BUCKET = "release-adapters"
NODES = {"edge-a": "factory-cpu-0", "edge-b": "farm-cpu-0"}


class World:
    def __init__(self) -> None:
        self.ns = ""
        self.model = ""
        self.hub: Any = None
        self.hub_api: Any = None
        self.edges: dict[str, Any] = {}
        self.versions: dict[str, dict[str, str]] = {}
        self.mlflow_url = ""

    def releases(self) -> Any:
        return k8s.CustomObjectsApi(self.hub_api)

    def reports(self) -> dict[str, AdapterReport | None]:
        out = {}
        for cluster, core in self.edges.items():
            for pod in core.list_namespaced_pod(self.ns, label_selector="app=sensor-model").items:
                raw = (pod.metadata.annotations or {}).get(REPORT_ANNOTATION)
                out[f"{cluster}/{pod.metadata.name}"] = AdapterReport.model_validate_json(raw) if raw else None
        return out

    def serving(self) -> dict[str, str]:
        return {k: (r.active.version if r and r.active else "base") for k, r in self.reports().items()}


def running(core: Any, name: str, namespace: str) -> Any:
    pod = core.read_namespaced_pod(name, namespace)
    return pod if pod.status.pod_ip and pod.status.phase == "Running" else None


def mlflow(url: str, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=data, method=method,  # noqa: S310
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - the local MLflow server
        return json.loads(resp.read())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def world(operator_proc: OperatorProcess, hub_crds: ControlPlane, fleet: dict[str, ControlPlane],
          edge_a_executor: PodExecutor, edge_b_executor: PodExecutor, s3: S3Server, mlflow_server: MlflowServer,
          prometheus: Prometheus, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:  # fmt: skip
    tmp = tmp_path_factory.mktemp("release")
    w = World()
    w.ns = f"op-rel-{uuid.uuid4().hex[:6]}"
    w.model = f"sensor-{w.ns}"
    w.mlflow_url = mlflow_server.url
    w.hub = hub_crds
    w.hub_api = hub_crds.api_client()
    executors = {"edge-a": edge_a_executor, "edge-b": edge_b_executor}
    helm = binaries.binary(binaries.HELM, "helm")
    manifests = subprocess.run([str(helm), "template", "edgetune", str(REPO / "charts/edgetune"), "--show-only",
                                "templates/agent.yaml", f"--set=agent.namespaces={{{w.ns}}}", "--kube-version=1.36.3"],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
    hub_crds.kubectl("create", "namespace", w.ns)
    private, public = keypair(tmp / "keys", "signer")
    # Adapters: one trained on the sites' data (good), one of random weights (bad); both signed.
    base_sha = make_base(tmp / "base", seed=0)
    good = train(tmp / "good", tmp / "base", base_sha, data_seed=4, gain=1.0, key=private, steps=60)
    bad_sha = make_package(tmp / "bad", tmp / "base", base_sha, seed=9, scale=25.0, key=private)
    third = train(tmp / "third", tmp / "base", base_sha, data_seed=5, gain=1.0, key=private, steps=60)
    s3.create_bucket(BUCKET)
    client = s3.client()
    mlflow(w.mlflow_url, "POST", "registered-models/create", {"name": w.model})
    packages = (("good", good.folder, good.sha256), ("bad", tmp / "bad", bad_sha),
                ("third", third.folder, third.sha256))  # fmt: skip
    for name, folder, sha in packages:
        uri = upload(client, folder, BUCKET, f"{w.ns}/{name}")
        version = mlflow(w.mlflow_url, "POST", "model-versions/create", {
            "name": w.model, "source": uri, "tags": [{"key": "edgetune.delta_sha256", "value": sha}]})  # fmt: skip
        w.versions[name] = {"version": version["model_version"]["version"], "sha": sha}
    s3_env = {k: v for k, v in s3.env().items() if k.startswith("AWS_")}
    for cluster, plane in fleet.items():
        plane.kubectl("create", "namespace", w.ns)
        plane.kubectl("apply", "-f", "-", input_text=manifests)
        core = k8s.CoreV1Api(plane.api_client())
        w.edges[cluster] = core
        core.create_namespaced_config_map(w.ns, {"metadata": {"name": "signers"},
                                                 "data": {"signer.pem": public.read_text()}})  # fmt: skip
        node = NODES[cluster]
        root = executors[cluster].node_root(node)
        make_base(root / BASE_HOST_PATH.lstrip("/"), seed=0)
        sine_classes(root / EVAL_HOST_PATH.lstrip("/"), n=240, channels=3, length=48, seed=4)
        for i in range(2):
            pod = agent_pod(f"agent-{i}", node=node, base_sha=base_sha, keys_configmap="signers", s3_env=s3_env)
            container = pod["spec"]["containers"][0]
            container["args"] += ["--eval-data-dir=/data/eval", "--eval-format=npy"]
            container["volumeMounts"].append({"name": "eval", "mountPath": "/data/eval", "readOnly": True})
            pod["spec"]["volumes"].append({"name": "eval", "hostPath": {"path": EVAL_HOST_PATH, "type": "Directory"}})
            core.create_namespaced_pod(w.ns, pod)
    for cluster, core in w.edges.items():
        for i in range(2):
            pod = eventually(lambda c=core, n=f"agent-{i}": running(c, n, w.ns), timeout=120,
                             what=f"{cluster} agent-{i} running")  # fmt: skip
            prometheus.add_target(f"agents-{w.ns}", f"{pod.status.pod_ip}:8080", namespace=w.ns, cluster=cluster)
    eventually(lambda: len([r for r in w.reports().values() if r is not None]) == 4, timeout=120,
               what="all four agents reporting")  # fmt: skip
    yield w
    for core in w.edges.values():
        core.delete_namespace(w.ns)


def release(name: str, version: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "adapter": {"registeredModel": "", "version": version},
        "targets": {"clusterSelector": {"matchLabels": {"region": "eu"}},
                    "workloadSelector": {"matchLabels": {"app": "sensor-model"}}},
        "strategy": {"canary": {"maxUnavailable": 2, "progressDeadline": "3m",
                                "steps": [{"setWeight": 50}, {"analysis": {}}, {"setWeight": 100}]}},
        "analysis": {"metrics": [{
            "name": "site-accuracy", "interval": "3s", "count": 2, "failureLimit": 0, "noData": "inconclusive",
            "query": 'min(edgetune_agent_eval_accuracy_ratio{namespace="{{namespace}}",version="{{version}}"})',
            "thresholdRange": {"min": 0.8},
        }]},
    }  # fmt: skip
    body.update(spec)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "AdapterRelease", "metadata": {"name": name}, "spec": body}


def create(w: World, name: str, version: str, **spec: Any) -> None:
    manifest = release(name, version, **spec)
    manifest["spec"]["adapter"]["registeredModel"] = w.model
    w.releases().create_namespaced_custom_object(GROUP, VERSION, w.ns, "adapterreleases", manifest)


def status(w: World, name: str) -> dict[str, Any]:
    obj = w.releases().get_namespaced_custom_object(GROUP, VERSION, w.ns, "adapterreleases", name)
    return dict(obj.get("status") or {})


def wait_phase(w: World, name: str, *phases: str, timeout: float) -> dict[str, Any]:
    try:
        return eventually(lambda: phase_is(w, name, *phases), timeout=timeout, what=f"{name} in {phases}")
    except AssertionError as exc:
        state = {"status": status(w, name), "serving": w.serving()}
        raise AssertionError(f"{exc}\n{json.dumps(state, indent=1, default=str)[:6000]}") from None


def phase_is(w: World, name: str, *phases: str) -> dict[str, Any] | None:
    s = status(w, name)
    return s if s.get("phase") in phases else None


def test_a_good_adapter_goes_50_then_100_percent_and_is_promoted(world: World) -> None:
    w = world
    create(w, "good", w.versions["good"]["version"])
    s = wait_phase(w, "good", "Promoted", "RolledBack", "Failed", timeout=240)
    assert s["phase"] == "Promoted", json.dumps(s, indent=1)[:3000]
    good = w.versions["good"]["version"]
    assert set(w.serving().values()) == {good}
    assert s["targetsTotal"] == 4 and s["targetsByVersion"] == {good: 4}
    assert set(s["targetsByCluster"]) == {"edge-a", "edge-b"} and s["stableVersion"] == "base"
    run = next(r for r in s["analysisRuns"] if r["metric"] == "site-accuracy")
    assert run["phase"] == "Successful" and len(run["values"]) == 2 and min(run["values"]) >= 0.8
    alias = mlflow(w.mlflow_url, "GET", f"registered-models/alias?name={w.model}&alias=champion")
    assert alias["model_version"]["version"] == good
    tags = {t["key"]: t["value"] for t in alias["model_version"].get("tags") or []}
    assert tags["edgetune.outcome"] == "promoted" and tags["edgetune.release"] == f"{w.ns}/good"
    conditions = {c["type"]: c for c in s["conditions"]}
    assert conditions["Promoted"]["status"] == "True"
    out = w.hub.kubectl("wait", "--for=condition=Promoted", "-n", w.ns, "adapterrelease/good", "--timeout=5s").stdout
    assert "condition met" in out


def test_a_bad_adapter_fails_analysis_and_is_rolled_back_everywhere(world: World) -> None:
    w = world
    create(w, "bad", w.versions["bad"]["version"])
    s = wait_phase(w, "bad", "Promoted", "RolledBack", "Failed", timeout=240)
    assert s["phase"] == "RolledBack", json.dumps(s, indent=1)[:3000]
    good, bad = w.versions["good"]["version"], w.versions["bad"]["version"]
    assert s["stableVersion"] == good
    assert set(w.serving().values()) == {good}  # every target, on both clusters, back on stable
    run = next(r for r in s["analysisRuns"] if r["metric"] == "site-accuracy")
    assert run["phase"] == "Failed" and "outside >= 0.8" in run["message"]
    rolled = {c["type"]: c for c in s["conditions"]}["RolledBack"]
    assert rolled["status"] == "True" and rolled["reason"] == "AnalysisFailed"
    alias = mlflow(w.mlflow_url, "GET", f"registered-models/alias?name={w.model}&alias=champion")
    assert alias["model_version"]["version"] == good  # the stable alias never moved
    version = mlflow(w.mlflow_url, "GET", f"model-versions/get?name={w.model}&version={bad}")["model_version"]
    assert {t["key"]: t["value"] for t in version["tags"]}["edgetune.outcome"] == "rolled-back"
    # The agents were told the bad package is revoked: a stale assignment could not bring it back.
    for core in w.edges.values():
        for pod in core.list_namespaced_pod(w.ns, label_selector="app=sensor-model").items:
            assignment = json.loads(pod.metadata.annotations["edgetune.io/adapter"])
            assert w.versions["bad"]["sha"] in assignment["revoked"]
    events = k8s.CoreV1Api(w.hub_api).list_namespaced_event(w.ns, field_selector="involvedObject.name=bad")
    assert any(e.reason == "AnalysisFailed" and e.type == "Warning" for e in events.items)


def test_a_release_of_a_missing_version_fails_with_a_clear_condition(world: World) -> None:
    w = world
    create(w, "missing", "999")
    s = wait_phase(w, "missing", "Failed", timeout=60)
    resolved = {c["type"]: c for c in s["conditions"]}["Resolved"]
    assert resolved["reason"] == "AdapterNotFound" and f"MLflow has no version 999 of {w.model}" in resolved["message"]


def test_a_revoked_version_named_again_is_refused_by_the_agents(world: World) -> None:
    w = world
    create(w, "bad-again", w.versions["bad"]["version"])
    s = wait_phase(w, "bad-again", "Promoted", "RolledBack", "Failed", timeout=120)
    rolled = {c["type"]: c for c in s["conditions"]}["RolledBack"]
    assert s["phase"] == "RolledBack" and rolled["reason"] == "AgentsRefused" and "Revoked" in rolled["message"]
    assert set(w.serving().values()) == {w.versions["good"]["version"]}


def test_no_data_pauses_the_release_until_a_person_resumes_it(world: World) -> None:
    w = world
    quiet = release("x", "1")["spec"]["analysis"]
    quiet["metrics"][0]["query"] = 'min(edgetune_agent_eval_accuracy_ratio{namespace="{{namespace}}",cluster="none"})'
    create(w, "third", w.versions["third"]["version"], analysis=quiet)
    s = wait_phase(w, "third", "Paused", "Promoted", "RolledBack", "Failed", timeout=120)
    assert s["phase"] == "Paused", json.dumps(s, indent=1)[:3000]
    paused = {c["type"]: c for c in s["conditions"]}["Paused"]
    assert paused["reason"] == "AnalysisInconclusive" and "returned no data" in paused["message"]
    obj = w.releases().get_namespaced_custom_object(GROUP, VERSION, w.ns, "adapterreleases", "third")
    assert obj["spec"]["paused"] is True  # held, never passed
    # The data is there once the query asks the right clusters; a person lets the release go on.
    fixed = release("x", "1")["spec"]["analysis"]
    w.releases().patch_namespaced_custom_object(GROUP, VERSION, w.ns, "adapterreleases", "third",
                                                {"spec": {"analysis": fixed, "paused": False}})  # fmt: skip
    s = wait_phase(w, "third", "Promoted", "RolledBack", "Failed", timeout=180)
    assert s["phase"] == "Promoted", json.dumps(s, indent=1)[:3000]
    assert set(w.serving().values()) == {w.versions["third"]["version"]}
    phases = [r["phase"] for r in s["analysisRuns"]]
    assert "Inconclusive" in phases and phases[-1] == "Successful"
