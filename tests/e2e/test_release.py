"""AdapterRelease end to end: the operator on the hub rolls adapters out to real agents on two edge
clusters (executor-run pods), gated on a real Prometheus query of the agents' own evaluation
metric, with versions resolved from and promoted in the real MLflow, packages in the real S3.

The agents hold the site's labelled data (`--eval-data-dir`): every candidate is scored before it
serves, and the analysis asks Prometheus for the worst score of the released version. A trained
adapter passes; a package of random weights fails and is rolled back everywhere.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kubernetes import client as k8s

from edgetune_api.assignment import REPORT_ANNOTATION, AdapterReport
from edgetune_testenv import chart
from edgetune_testenv.cluster import ControlPlane
from edgetune_testenv.demo.data import inference_request
from edgetune_testenv.executor import PodExecutor
from edgetune_testenv.operator_proc import OperatorProcess
from edgetune_testenv.servers import MlflowServer, Prometheus, S3Server
from tests.agent_support import BASE_HOST_PATH, agent_pod, keypair, make_base, make_package, train, upload
from tests.operator_support import dead_kubeconfig, plugin, point_kubeconfig, restore_kubeconfig, wait_unreachable
from tests.support import eventually
from tests.trainer_support import sine_classes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
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
        self.tmp = Path()
        self.base_sha = ""
        self.private = Path()
        self.s3: Any = None
        self.prometheus: Any = None
        self.fleet: dict[str, ControlPlane] = {}

    def register(self, name: str, *, quality: float, scale: float = 0.05,
                 tags: dict[str, str] | None = None) -> dict[str, str]:  # fmt: skip
        """A new signed package (random small weights), uploaded and registered as a new version,
        with the test's quality metric for it pushed to Prometheus (the analysis input that the
        test controls: 1 passes, 0 fails)."""
        sha = make_package(self.tmp / name, self.tmp / "base", self.base_sha, seed=len(self.versions) + 100,
                           scale=scale, key=self.private)  # fmt: skip
        uri = upload(self.s3, self.tmp / name, BUCKET, f"{self.ns}/{name}")
        tags = {"edgetune.delta_sha256": sha, "edgetune.base_model_sha256": self.base_sha, **(tags or {})}
        version = mlflow(self.mlflow_url, "POST", "model-versions/create", {
            "name": self.model, "source": uri, "tags": [{"key": k, "value": v} for k, v in tags.items()]})  # fmt: skip
        number = version["model_version"]["version"]
        self.prometheus.push("release-quality", f'edgetune_test_release_quality{{namespace="{self.ns}",'
                             f'version="{number}"}} {quality}\n', namespace=self.ns, version=number)  # fmt: skip
        self.versions[name] = {"version": number, "sha": sha}
        return self.versions[name]

    def champion(self) -> str:
        alias = mlflow(self.mlflow_url, "GET", f"registered-models/alias?name={self.model}&alias=champion")
        return str(alias["model_version"]["version"])

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
    w.tmp, w.s3, w.prometheus, w.fleet = tmp, s3.client(), prometheus, fleet
    executors = {"edge-a": edge_a_executor, "edge-b": edge_b_executor}
    manifests = chart.render("agent.yaml", f"agent.namespaces={{{w.ns}}}")
    hub_crds.kubectl("create", "namespace", w.ns)
    private, public = keypair(tmp / "keys", "signer")
    # Adapters: one trained on the sites' data (good), one of random weights (bad); both signed.
    base_sha = make_base(tmp / "base", seed=0)
    w.private, w.base_sha = private, base_sha
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
            container["args"] += ["--eval-data-dir=/data/eval", "--eval-format=npy", "--revocation-poll-seconds=1"]
            container["volumeMounts"].append({"name": "eval", "mountPath": "/data/eval", "readOnly": True})
            pod["spec"]["volumes"].append({"name": "eval", "hostPath": {"path": EVAL_HOST_PATH, "type": "Directory"}})
            core.create_namespaced_pod(w.ns, pod)
    for cluster, core in w.edges.items():
        for i in range(2):
            up = eventually(lambda c=core, n=f"agent-{i}": running(c, n, w.ns), timeout=120,
                            what=f"{cluster} agent-{i} running")  # fmt: skip
            prometheus.add_target(f"agents-{w.ns}", f"{up.status.pod_ip}:8080", namespace=w.ns, cluster=cluster)
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
    # Promoted: the released version is the stable one now (it read "base", the one it replaced).
    assert set(s["targetsByCluster"]) == {"edge-a", "edge-b"} and s["stableVersion"] == good
    run = next(r for r in s["analysisRuns"] if r["metric"] == "site-accuracy")
    assert run["phase"] == "Successful" and len(run["values"]) == 2 and min(run["values"]) >= 0.8
    alias = mlflow(w.mlflow_url, "GET", f"registered-models/alias?name={w.model}&alias=champion")
    assert alias["model_version"]["version"] == good
    tags = {t["key"]: t["value"] for t in alias["model_version"].get("tags") or []}
    assert tags["edgetune.outcome"] == "promoted" and tags["edgetune.release"] == f"{w.ns}/good"
    promoted = {c["type"]: c for c in s["conditions"]}["Promoted"]
    assert promoted["status"] == "True" and promoted["message"].endswith("alias champion moved from base")
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


# -- control by a person, guard rails, and faults -------------------------------------------------

QUALITY = {"metrics": [{
    "name": "quality", "interval": "1s", "count": 2, "failureLimit": 0, "noData": "inconclusive",
    "query": 'min(edgetune_test_release_quality{namespace="{{namespace}}",version="{{version}}"})',
    "thresholdRange": {"min": 0.5},
}]}  # fmt: skip


def steps(*items: dict[str, Any], deadline: str = "2m", waves: bool = False) -> dict[str, Any]:
    return {"canary": {"maxUnavailable": 4, "progressDeadline": deadline, "waves": waves, "steps": list(items)}}


def patch(w: World, name: str, spec: dict[str, Any]) -> None:
    w.releases().patch_namespaced_custom_object(GROUP, VERSION, w.ns, "adapterreleases", name, {"spec": spec})


def conditions(s: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in s.get("conditions") or []}


def revocation(w: World, sha: str) -> dict[str, Any] | None:
    try:
        body = w.s3.get_object(Bucket=BUCKET, Key=f".edgetune/revoked/{sha}.json")["Body"].read()
    except w.s3.exceptions.NoSuchKey:
        return None
    return dict(json.loads(body))


def test_waves_go_cluster_by_cluster_a_second_release_is_refused_and_abort_takes_all_back(world: World) -> None:
    w = world
    stable = w.champion()
    canary = w.register("waves", quality=1.0)
    create(w, "waves", canary["version"], analysis=QUALITY,
           strategy=steps({"setWeight": 50}, {"pause": {}}, {"setWeight": 100}, waves=True))  # fmt: skip
    s = wait_phase(w, "waves", "Paused", "Failed", "RolledBack", timeout=120)
    assert s["phase"] == "Paused" and s["currentStep"] == 1, json.dumps(s, indent=1)[:3000]
    # Waves: the first cluster entirely, the second not at all.
    assert s["targetsByCluster"] == {"edge-a": {canary["version"]: 2}, "edge-b": {stable: 2}}
    assert conditions(s)["Paused"]["reason"] == "PauseStep"
    # The step before says it is done: a finished step's reason (WaitingForAgents) does not linger.
    assert conditions(s)["Progressing"]["reason"] == "StepCompleted", conditions(s)["Progressing"]
    # Another release of the same pods while this one holds them: refused, nothing written.
    other = w.register("other", quality=1.0)
    create(w, "other", other["version"], analysis=QUALITY, strategy=steps({"setWeight": 100}))
    refused = wait_phase(w, "other", "Failed", "Progressing", "Promoted", timeout=60)
    progressing = conditions(refused)["Progressing"]
    assert refused["phase"] == "Failed" and progressing["reason"] == "TargetsInUse", json.dumps(refused)[:2000]
    assert "AdapterRelease waves (Paused)" in progressing["message"] and "4 target pods" in progressing["message"]
    assert other["version"] not in w.serving().values()
    # Abort: everyone back on the stable version at once, the canary revoked, in S3 too.
    patch(w, "waves", {"abort": True})
    s = wait_phase(w, "waves", "Aborted", timeout=120)
    assert set(w.serving().values()) == {stable}
    assert conditions(s)["RolledBack"]["reason"] == "Aborted"
    assert w.champion() == stable
    published = revocation(w, canary["sha"])
    assert published is not None and published["release"] == f"{w.ns}/waves" and published["reason"] == "Aborted"
    assert conditions(s)["RevocationPublished"]["status"] == "True"


def test_promote_skips_the_remaining_steps(world: World) -> None:
    w = world
    canary = w.register("promote", quality=1.0)
    create(w, "promote", canary["version"], analysis=QUALITY,
           strategy=steps({"setWeight": 50}, {"pause": {}}, {"analysis": {}}, {"setWeight": 75}))  # fmt: skip
    s = wait_phase(w, "promote", "Paused", timeout=120)
    assert s["canaryWeight"] == 50
    patch(w, "promote", {"promote": True})
    s = wait_phase(w, "promote", "Promoted", "RolledBack", timeout=120)
    assert s["phase"] == "Promoted" and set(w.serving().values()) == {canary["version"]}
    assert not [r for r in s.get("analysisRuns") or [] if r["step"] == 2]  # skipped
    assert w.champion() == canary["version"]


AGREEMENT = {"metrics": [{
    "name": "agreement", "interval": "2s", "count": 2, "failureLimit": 0, "noData": "inconclusive",
    "query": 'sum(edgetune_agent_shadow_agreements_total{namespace="{{namespace}}",version="{{version}}"}) / '
             'sum(edgetune_agent_shadow_requests_total{namespace="{{namespace}}",version="{{version}}"})',
    "thresholdRange": {"min": 0.0},
}]}  # fmt: skip


def traffic(w: World, stop: threading.Event) -> None:
    """Live requests to every agent until ``stop``: what a shadow compares on."""
    ips = [p.status.pod_ip for core in w.edges.values()
           for p in core.list_namespaced_pod(w.ns, label_selector="app=sensor-model").items]  # fmt: skip
    x = np.random.default_rng(0).normal(size=(1, 3, 48)).astype(np.float32)
    body = json.dumps(inference_request(x)).encode()
    while not stop.wait(0.2):
        for ip in ips:
            with contextlib.suppress(OSError):
                req = urllib.request.Request(f"http://{ip}:8080/v2/models/edgetune/infer", data=body,
                                             headers={"Content-Type": "application/json"})  # fmt: skip
                urllib.request.urlopen(req, timeout=5).close()  # noqa: S310 - the test's own agents


def test_a_shadow_step_runs_the_candidate_beside_stable_and_the_analysis_reads_agreement(world: World) -> None:
    w = world
    stable = w.champion()
    canary = w.register("shadowed", quality=1.0)
    stop = threading.Event()
    sender = threading.Thread(target=traffic, args=(w, stop), daemon=True)
    sender.start()
    try:
        create(w, "shadowed", canary["version"], analysis=AGREEMENT,
               strategy=steps({"shadow": {"duration": "4s"}}, {"analysis": {}}, {"setWeight": 100}))  # fmt: skip
        s = eventually(lambda: (st := status(w, "shadowed")).get("targetsShadowing") == 4 and st, timeout=120,
                       what="every agent shadowing the candidate")  # fmt: skip
        assert s["currentStep"] in (0, 1) and s["targetsByVersion"] == {stable: 4}, json.dumps(s)[:2000]
        reports = w.reports()
        assert all(r and r.shadow and r.shadow.version == canary["version"] and r.active
                   and r.active.version == stable for r in reports.values()), reports  # fmt: skip
        s = wait_phase(w, "shadowed", "Promoted", "RolledBack", "Paused", timeout=180)
    finally:
        stop.set()
        sender.join(timeout=10)
    assert s["phase"] == "Promoted", json.dumps(s)[:3000]
    run = next(r for r in s["analysisRuns"] if r["metric"] == "agreement")
    assert run["phase"] == "Successful" and len(run["values"]) == 2 and all(0 <= v <= 1 for v in run["values"])
    assert set(w.serving().values()) == {canary["version"]}
    assert all(r and r.shadow is None for r in w.reports().values())  # served now: the comparison is over


def pause_cluster(w: World, cluster: str, paused: bool) -> None:
    w.releases().patch_cluster_custom_object(GROUP, VERSION, "edgeclusters", cluster, {"spec": {"paused": paused}})


def test_a_paused_cluster_holds_its_targets_and_the_step_completes_once_it_is_resumed(world: World) -> None:
    w = world
    stable = w.champion()
    canary = w.register("paused-site", quality=1.0)
    pause_cluster(w, "edge-b", True)
    try:
        create(w, "paused-site", canary["version"], analysis=QUALITY, strategy=steps({"setWeight": 100}))
        s = eventually(lambda: (st := status(w, "paused-site")) and conditions(st).get("ClustersPaused", {}).get(
            "status") == "True" and (st.get("targetsByCluster") or {}).get("edge-a") == {canary["version"]: 2}
            and st, timeout=120, what="edge-a on the canary, edge-b held")  # fmt: skip
        assert "edge-b" in conditions(s)["ClustersPaused"]["message"], conditions(s)
        time.sleep(4)  # it stays so: the operator writes nothing to edge-b's agents
        s = status(w, "paused-site")
        assert s["phase"] == "Progressing" and s["currentStep"] == 0, json.dumps(s)[:2000]
        assert {k: v for k, v in w.serving().items() if k.startswith("edge-b/")} == {
            "edge-b/agent-0": stable, "edge-b/agent-1": stable}  # fmt: skip
    finally:
        pause_cluster(w, "edge-b", False)
    s = wait_phase(w, "paused-site", "Promoted", "RolledBack", timeout=120)
    assert s["phase"] == "Promoted" and set(w.serving().values()) == {canary["version"]}, json.dumps(s)[:2000]
    assert conditions(s)["ClustersPaused"]["status"] == "False"


def test_deleting_a_release_mid_rollout_says_what_it_left_behind(world: World) -> None:
    w = world
    stable = w.champion()
    canary = w.register("deleted", quality=1.0)
    create(w, "deleted", canary["version"], strategy=steps({"setWeight": 50}, {"pause": {}}, {"setWeight": 100}))
    s = wait_phase(w, "deleted", "Paused", timeout=120)
    assert s["targetsByVersion"] == {canary["version"]: 2, stable: 2}
    w.releases().delete_namespaced_custom_object(GROUP, VERSION, w.ns, "adapterreleases", "deleted")

    def warned() -> str | None:
        events = w.hub.kubectl("get", "events", "-n", w.ns, "--field-selector", "reason=DeletedMidRollout",
                               "-o", "jsonpath={.items[*].message}").stdout  # fmt: skip
        return events if "deleted" in events else None

    message = eventually(warned, timeout=60, what="a DeletedMidRollout Event")
    assert f"2 on {canary['version']}" in message and f"2 on {stable}" in message and "at step 1" in message, message
    # The fleet stays split as documented; a release of the stable version takes it back.
    create(w, "deleted-undo", stable, strategy=steps({"setWeight": 100}))
    assert wait_phase(w, "deleted-undo", "Promoted", "RolledBack", "Failed", timeout=120)["phase"] == "Promoted"
    assert set(w.serving().values()) == {stable}


def test_an_agent_that_never_confirms_hits_the_deadline_and_the_release_rolls_back(world: World) -> None:
    w = world
    stable = w.champion()
    core = w.edges["edge-a"]
    silent = {"apiVersion": "v1", "kind": "Pod",
              "metadata": {"name": "silent", "labels": {"app": "sensor-model"}},
              "spec": {"nodeName": NODES["edge-a"], "tolerations": [{"operator": "Exists"}],
                       "containers": [{"name": "agent", "image": "edgetune/agent:never-starts"}]}}  # fmt: skip
    core.create_namespaced_pod(w.ns, silent)
    try:
        canary = w.register("deadline", quality=1.0)
        create(w, "deadline", canary["version"], strategy=steps({"setWeight": 100}, deadline="8s"))
        s = wait_phase(w, "deadline", "RolledBack", "Promoted", "Failed", timeout=120)
        cond = conditions(s)
        assert s["phase"] == "RolledBack" and cond["RolledBack"]["reason"] == "ProgressDeadlineExceeded", s
        assert "3 of 5 targets" not in cond["RolledBack"]["message"]  # (the message gives the share confirming)
        # The silent pod cannot confirm the rollback either: named, not waited for forever.
        assert cond["Degraded"]["status"] == "True" and f"edge-a/{w.ns}/silent" in cond["Degraded"]["message"]
        serving = w.serving()
        assert {v for k, v in serving.items() if not k.endswith("/silent")} == {stable}
    finally:
        core.delete_namespaced_pod("silent", w.ns, grace_period_seconds=0)
        eventually(lambda: "edge-a/silent" not in w.serving(), timeout=60, what="silent pod gone")


def test_prometheus_down_pauses_the_analysis_and_it_resumes_once_back(world: World) -> None:
    w = world
    canary = w.register("prom-down", quality=1.0)
    with w.prometheus.outage():
        create(w, "prom-down", canary["version"], analysis=QUALITY,
               strategy=steps({"setWeight": 50}, {"analysis": {}}, {"setWeight": 100}))  # fmt: skip
        s = wait_phase(w, "prom-down", "Paused", "Promoted", "RolledBack", timeout=120)
    paused = conditions(s)["Paused"]
    assert s["phase"] == "Paused" and paused["reason"] == "AnalysisInconclusive", json.dumps(s)[:2000]
    assert "could not be taken" in paused["message"] and "Prometheus" in paused["message"]
    query = f'edgetune_test_release_quality{{namespace="{w.ns}",version="{canary["version"]}"}}'
    eventually(lambda: w.prometheus.query(query), timeout=60, what="Prometheus has the data again")
    patch(w, "prom-down", {"paused": False})
    s = wait_phase(w, "prom-down", "Promoted", "RolledBack", timeout=120)
    assert s["phase"] == "Promoted", json.dumps(s)[:2000]
    assert [r["phase"] for r in s["analysisRuns"]] == ["Inconclusive", "Successful"]


def test_an_adapter_for_another_base_is_refused_before_any_agent_loads_it(world: World) -> None:
    w = world
    before = w.serving()
    other = w.register("other-base", quality=1.0, tags={"edgetune.base_model_sha256": "f" * 64})
    create(w, "other-base", other["version"], strategy=steps({"setWeight": 100}))
    s = wait_phase(w, "other-base", "Failed", "Promoted", "RolledBack", timeout=60)
    resolved = conditions(s)["Resolved"]
    assert s["phase"] == "Failed" and resolved["reason"] == "IncompatibleBase", json.dumps(s)[:2000]
    assert "trained on base model ffffffffffff" in resolved["message"] and "4 target agents" in resolved["message"]
    assert w.serving() == before
    for core in w.edges.values():
        for pod in core.list_namespaced_pod(w.ns, label_selector="app=sensor-model").items:
            assert json.loads(pod.metadata.annotations["edgetune.io/adapter"])["version"] != other["version"]


def cut(w: World, cluster: str) -> dict[str, str]:
    """Point the hub's kubeconfig Secret for ``cluster`` at a port where nothing listens; returns
    the Secret's data as it was."""
    saved = point_kubeconfig(w.hub, cluster, dead_kubeconfig(w.fleet[cluster]))
    wait_unreachable(w.hub, cluster)  # cut once a heartbeat says so
    return saved


def test_an_unreachable_cluster_holds_a_rollout_but_not_a_rollback_its_agents_fall_back_from_s3(
    world: World,
) -> None:
    w = world
    stable = w.champion()
    # A good release does not finish while a cluster cannot confirm.
    good = w.register("held", quality=1.0)
    saved = cut(w, "edge-b")
    try:
        create(w, "held", good["version"], analysis=QUALITY, strategy=steps({"setWeight": 50}, {"setWeight": 100}))
        s = eventually(lambda: (st := status(w, "held")) and conditions(st).get("ClustersReachable", {}).get(
            "status") == "False" and st, timeout=60, what="held sees edge-b unreachable")  # fmt: skip
        assert "edge-b" in conditions(s)["ClustersReachable"]["message"]
        time.sleep(6)
        s = status(w, "held")
        assert s["phase"] == "Progressing" and s["currentStep"] == 0, json.dumps(s)[:2000]
    finally:
        restore_kubeconfig(w.hub, "edge-b", saved)
    s = wait_phase(w, "held", "Promoted", "RolledBack", timeout=120)
    assert s["phase"] == "Promoted" and set(w.serving().values()) == {good["version"]}
    stable = good["version"]
    # A bad release fails while edge-b is cut off: edge-a is rolled back by the operator, edge-b's
    # agents fall back by themselves from the revocation published in S3, and the release ends
    # RolledBack naming edge-b as pending (it held the rest of the fleet in RollingBack before).
    bad = w.register("cut-off", quality=0.0)
    create(w, "cut-off", bad["version"], analysis=QUALITY,
           strategy=steps({"setWeight": 100}, {"pause": {}}, {"analysis": {}}))  # fmt: skip
    wait_phase(w, "cut-off", "Paused", timeout=120)
    assert set(w.serving().values()) == {bad["version"]}
    saved = cut(w, "edge-b")
    try:
        eventually(lambda: conditions(status(w, "cut-off")).get("ClustersReachable", {}).get("status") == "False",
                   timeout=60, what="edge-b unreachable")  # fmt: skip
        patch(w, "cut-off", {"paused": False})
        eventually(lambda: set(w.serving().values()) == {stable}, timeout=60, what="every agent back on stable")
        s = wait_phase(w, "cut-off", "RolledBack", timeout=60)
        degraded = conditions(s)["Degraded"]
        assert degraded["reason"] == "ClustersUnreachable" and "edge-b" in degraded["message"], json.dumps(s)[:2000]
        edge_b = {k: r for k, r in w.reports().items() if k.startswith("edge-b/")}
        assert all(r and r.error and r.error.reason == "Revoked" and "seen in S3" in r.error.message
                   for r in edge_b.values()), edge_b  # fmt: skip
        # The operator never wrote to edge-b: its agents' assignments still name the bad version.
        pods = w.edges["edge-b"].list_namespaced_pod(w.ns, label_selector="app=sensor-model").items
        assert {json.loads(p.metadata.annotations["edgetune.io/adapter"])["version"] for p in pods} == {bad["version"]}
    finally:
        restore_kubeconfig(w.hub, "edge-b", saved)
    s = status(w, "cut-off")
    assert conditions(s)["RolledBack"]["reason"] == "AnalysisFailed" and set(w.serving().values()) == {stable}
    assert w.champion() == stable


def test_the_operator_killed_at_random_points_ends_every_release_right(
    world: World, operator_proc: OperatorProcess
) -> None:
    """Ten releases (every third one bad), the operator SIGKILLed at a random moment of each and
    started again: each ends in the right phase, the alias moves once per promotion and never to a
    bad version, and no target is left on a rolled-back version."""
    w = world
    rng = random.Random(20261129)  # a reproducible kill schedule
    moves: list[str] = [w.champion()]
    stop = threading.Event()

    def watch_alias() -> None:
        while not stop.wait(0.1):
            with contextlib.suppress(OSError, ValueError, KeyError):
                current = w.champion()
                if current != moves[-1]:
                    moves.append(current)

    watcher = threading.Thread(target=watch_alias, daemon=True)
    watcher.start()
    expected: list[str] = []
    kills = 0
    try:
        for run in range(10):
            good = run % 3 != 2
            name = f"kill-{run}"
            canary = w.register(name, quality=1.0 if good else 0.0)
            before = w.champion()
            create(w, name, canary["version"], analysis=QUALITY,
                   strategy=steps({"setWeight": 50}, {"analysis": {}}, {"setWeight": 100}))  # fmt: skip
            time.sleep(rng.uniform(0.0, 7.0))
            operator_proc.kill()
            kills += 1
            operator_proc.start()
            s = wait_phase(w, name, "Promoted", "RolledBack", "Failed", "Aborted", timeout=180)
            assert s["phase"] == ("Promoted" if good else "RolledBack"), json.dumps(s)[:3000]
            now = canary["version"] if good else before
            assert set(w.serving().values()) == {now}, (run, w.serving())
            assert w.champion() == now
            if good:
                expected.append(canary["version"])
    finally:
        stop.set()
        watcher.join(5)
    assert kills == 10
    assert moves[1:] == expected  # one move per promotion, in order; never a bad version


def test_the_kubectl_plugin_shows_waits_for_and_steers_a_release(world: World) -> None:
    w = world
    canary = w.register("plugin", quality=1.0)
    create(w, "plugin", canary["version"], analysis=QUALITY,
           strategy=steps({"setWeight": 50}, {"pause": {}}, {"setWeight": 100}))  # fmt: skip
    waiting = plugin(w.hub, "-n", w.ns, "status", "release/plugin", "--timeout=2s", "-o", "json")
    assert waiting.returncode == 2 and json.loads(waiting.stdout)["phase"] != "Promoted", waiting.stdout
    wait_phase(w, "plugin", "Paused", timeout=120)
    tree = plugin(w.hub, "-n", w.ns, "get", "plugin", kubectl=True)  # found by kubectl on PATH
    assert tree.returncode == 0, tree.stderr
    assert f"AdapterRelease plugin  Paused  {w.model} v{canary['version']}" in tree.stdout, tree.stdout
    assert "cluster edge-a: " in tree.stdout and "cluster edge-b: " in tree.stdout and "\x1b[" not in tree.stdout
    listed = json.loads(plugin(w.hub, "-n", w.ns, "get", "-o", "json").stdout)
    assert "plugin" in {r["metadata"]["name"] for r in listed["adapterReleases"]}
    resumed = plugin(w.hub, "-n", w.ns, "promote", "plugin")  # past the pause, not every step
    assert resumed.returncode == 0 and "spec.paused=false" in resumed.stdout, resumed.stdout + resumed.stderr
    done = plugin(w.hub, "-n", w.ns, "status", "release/plugin", "--timeout=120s")
    assert done.returncode == 0 and "Promoted" in done.stdout, done.stdout + done.stderr
    assert set(w.serving().values()) == {canary["version"]}
    again = plugin(w.hub, "-n", w.ns, "abort", "plugin")
    assert again.returncode == 1 and "already Promoted" in again.stderr
    pod = next(iter(w.reports())).split("/", 1)[1]
    logs = plugin(w.hub, "-n", w.ns, "logs", "release/plugin", pod, "--cluster=edge-a", "--tail=20")
    assert logs.returncode == 0 and logs.stdout.strip(), logs.stderr
    # Plain errors and exit codes for scripts.
    missing = plugin(w.hub, "-n", w.ns, "status", "release/nope")
    assert missing.returncode == 3 and f"AdapterRelease {w.ns}/nope not found" in missing.stderr
