"""The edge agent on a real control plane: pods run by the executor, adapters trained by the real
trainer and stored in the real S3 server, scraped by the real Prometheus.

One agent pod lives through the whole module (as an agent does): assigned, swapped, refused,
swapped back; a load generator runs throughout and every request must succeed.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from edgetune_api.assignment import ASSIGNMENT_ANNOTATION, READY_CONDITION, REPORT_ANNOTATION, AdapterReport
from edgetune_api.delta import SIGNATURE, sign
from edgetune_testenv import chart
from edgetune_testenv.cluster import ControlPlane
from edgetune_testenv.demo.data import inference_request
from edgetune_testenv.executor import PodExecutor
from edgetune_testenv.servers import MlflowServer, Prometheus, S3Server
from tests.agent_support import (
    BASE_HOST_PATH,
    CHANNELS,
    EXAMPLE,
    Trained,
    agent_pod,
    assignment,
    keypair,
    make_base,
    train,
    upload,
    variant,
)
from tests.support import eventually, new_namespace

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NODE = "factory-cpu-0"
BUCKET = "agent-adapters"


class Fleet:
    """What the module's tests share: the namespace, the agent pod, adapters and their URIs."""

    def __init__(self) -> None:
        self.ns = ""
        self.core: Any = None
        self.uris: dict[str, str] = {}
        self.trained: dict[str, Trained] = {}
        self.pod_ip = ""
        self.keys: dict[str, Path] = {}
        self.executor: PodExecutor | None = None

    def wait_serving(self, version: str, timeout: float = 60) -> None:
        try:
            eventually(lambda: serving(self, version), timeout=timeout, what=f"agent serving version {version}")
        except AssertionError as exc:
            logs = self.executor.logs(self.ns, "agent-0")[-3000:] if self.executor else ""
            raise AssertionError(f"{exc}\nreport: {report(self)}\nagent log:\n{logs}") from None


def _infer_body(x: np.ndarray) -> bytes:
    return json.dumps(inference_request(x)).encode()


def infer(ip: str, body: bytes) -> dict[str, Any]:
    req = urllib.request.Request(f"http://{ip}:8080/v2/models/edgetune/infer", data=body,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - the pod's loopback address
        return json.loads(resp.read())  # type: ignore[no-any-return]


def report(fleet: Fleet, pod: str = "agent-0") -> AdapterReport | None:
    raw = (fleet.core.read_namespaced_pod(pod, fleet.ns).metadata.annotations or {}).get(REPORT_ANNOTATION)
    return AdapterReport.model_validate_json(raw) if raw else None


def condition(fleet: Fleet, pod: str = "agent-0") -> Any:
    status = fleet.core.read_namespaced_pod_status(pod, fleet.ns).status
    return next((c for c in status.conditions or [] if c.type == READY_CONDITION), None)


def serving(fleet: Fleet, version: str) -> bool:
    r = report(fleet)
    return r is not None and r.state == "Serving" and r.active is not None and r.active.version == version


def assign(fleet: Fleet, value: str, pod: str = "agent-0") -> None:
    fleet.core.patch_namespaced_pod(pod, fleet.ns, {"metadata": {"annotations": {ASSIGNMENT_ANNOTATION: value}}})


def metric(ip: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://{ip}:8080/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        named = line.startswith((name + "{", name + " "))
        if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def fleet(edge_a: ControlPlane, edge_a_executor: PodExecutor, s3: S3Server, prometheus: Prometheus,
          mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:  # fmt: skip
    tmp = tmp_path_factory.mktemp("agent")
    f = Fleet()
    f.core = k8s.CoreV1Api(edge_a.api_client())
    f.executor = edge_a_executor
    f.ns = new_namespace(f.core, "agent")
    # The agent's RBAC and admission policy, from the chart.
    edge_a.kubectl("apply", "-f", "-", input_text=chart.render("agent.yaml", f"agent.namespaces={{{f.ns}}}"))
    # Base models on the node's disk, and adapters trained for real.
    base_dir = edge_a_executor.node_root(NODE) / BASE_HOST_PATH.lstrip("/")
    base_sha = make_base(base_dir, seed=0)
    other_sha = make_base(tmp / "other-base", seed=1)
    f.keys["trusted"], public = keypair(tmp / "keys", "trusted")
    f.keys["stranger"], _ = keypair(tmp / "keys", "stranger")
    f.trained["1"] = train(tmp / "v1", base_dir, base_sha, data_seed=1, gain=1.0, key=f.keys["trusted"])
    f.trained["2"] = train(
        tmp / "v2", base_dir, base_sha, data_seed=2, gain=2.5, key=f.keys["trusted"], encoding="fp16"
    )
    f.trained["other"] = train(tmp / "vo", tmp / "other-base", other_sha, data_seed=1, gain=1.0, key=f.keys["trusted"])
    s3.create_bucket(BUCKET)
    client = s3.client()
    for name, t in f.trained.items():
        f.uris[name] = upload(client, t.folder, BUCKET, f"{f.ns}/{name}")
    # Bad variants of an adapter the agent has never loaded (a digest it holds would be served from memory).
    f.trained["3"] = train(tmp / "v3", base_dir, base_sha, data_seed=3, gain=1.5, key=f.keys["trusted"])
    v3 = f.trained["3"].folder
    f.uris["3"] = upload(client, v3, BUCKET, f"{f.ns}/3")

    def flip_weights(d: Path) -> None:
        weights = next(p for p in d.iterdir() if p.name.startswith("adapter.safetensors"))
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))

    def resign(d: Path) -> None:
        (d / SIGNATURE).write_bytes(sign((d / "manifest.json").read_bytes(), f.keys["stranger"].read_bytes()))

    for name, mutate in {"tampered": flip_weights, "stranger": resign,
                         "unsigned": lambda d: (d / SIGNATURE).unlink()}.items():  # fmt: skip
        f.uris[name] = upload(client, variant(v3, tmp / name, mutate), BUCKET, f"{f.ns}/{name}")
    f.core.create_namespaced_config_map(f.ns, {"metadata": {"name": "trusted-keys"},
                                               "data": {"release-signer.pem": public.read_text()}})  # fmt: skip
    s3_env = {k: v for k, v in s3.env().items() if k.startswith("AWS_")}
    s3_env["MLFLOW_TRACKING_URI"] = mlflow_server.url
    for pod in ("agent-0", "agent-1"):
        f.core.create_namespaced_pod(f.ns, agent_pod(pod, node=NODE, base_sha=base_sha,
                                                     keys_configmap="trusted-keys", s3_env=s3_env))  # fmt: skip
    for pod in ("agent-0", "agent-1"):
        eventually(lambda p=pod: (c := condition(f, p)) is not None and c.status == "True", timeout=120,
                   what=f"{pod} reports {READY_CONDITION}")  # fmt: skip
    f.pod_ip = f.core.read_namespaced_pod("agent-0", f.ns).status.pod_ip
    prometheus.add_target("edgetune-agent", f"{f.pod_ip}:8080", namespace=f.ns, pod="agent-0")
    yield f
    f.core.delete_namespace(f.ns)


class LoadGenerator:
    """Sends requests back to back from a thread; records every outcome."""

    def __init__(self, ip: str, body: bytes) -> None:
        self.ip, self.body = ip, body
        self.results: list[tuple[str, str, Any]] = []  # (outcome, model_version, labels)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = infer(self.ip, self.body)
                self.results.append(("ok", out["model_version"], out["outputs"][1]["data"]))
            except Exception as exc:
                self.results.append(("error", "", repr(exc)))

    def __enter__(self) -> LoadGenerator:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def test_the_example_deployment_is_valid_for_the_apiserver(fleet: Fleet, edge_a: ControlPlane) -> None:
    out = edge_a.kubectl("apply", "--dry-run=server", "-n", fleet.ns, "-f", str(EXAMPLE)).stdout
    assert "deployment.apps/sensor-model created (server dry run)" in out


def test_kubectl_logs_shows_what_the_agent_printed(fleet: Fleet, edge_a: ControlPlane) -> None:
    logs = edge_a.kubectl("logs", "-n", fleet.ns, "agent-0", "-c", "agent").stdout
    assert '"event": "serving"' in logs and '"reporting": true' in logs


def test_pod_is_ready_only_through_its_gate_and_reports_no_assignment(fleet: Fleet) -> None:
    pod = fleet.core.read_namespaced_pod("agent-0", fleet.ns)
    conditions = {c.type: c for c in pod.status.conditions}
    assert conditions[READY_CONDITION].reason == "NoAssignment"
    assert conditions["Ready"].status == "True"
    rep = report(fleet)
    assert rep is not None and rep.state == "NoAssignment" and rep.active is None
    assert infer(fleet.pod_ip, _infer_body(np.zeros((1, CHANNELS, 48), np.float32)))["model_version"] == "base"


def test_swaps_under_load_fail_no_request_and_change_predictions(fleet: Fleet) -> None:
    x = np.random.default_rng(0).normal(size=(4, CHANNELS, 48)).astype(np.float32)
    body = _infer_body(x)
    with LoadGenerator(fleet.pod_ip, body) as load:
        time.sleep(1.0)
        for version in ("1", "2"):
            assign(fleet, assignment(version, fleet.uris[version], fleet.trained[version].sha256))
            fleet.wait_serving(version)
            time.sleep(1.0)
    failed = [r for r in load.results if r[0] != "ok"]
    assert not failed, failed[:3]
    seen = {r[1]: r[2] for r in load.results}
    assert {"base", "1", "2"} <= set(seen), sorted(seen)
    assert seen["1"] != seen["base"] and seen["2"] != seen["1"]  # the adapters change what the model answers
    cond = condition(fleet)
    assert (cond.status, cond.reason) == ("True", "Serving")
    events = fleet.core.list_namespaced_event(fleet.ns, field_selector="involvedObject.name=agent-0").items
    assert any(e.reason == "AdapterSwapped" and "version 2" in e.message for e in events)


def test_swap_back_to_a_resident_version_needs_no_download(fleet: Fleet) -> None:
    downloads = metric(fleet.pod_ip, "edgetune_agent_downloads_total")
    resident_swaps = metric(fleet.pod_ip, "edgetune_agent_swaps_total", source="resident")
    assign(fleet, assignment("1", fleet.uris["1"], fleet.trained["1"].sha256))
    fleet.wait_serving("1", timeout=30)
    assert metric(fleet.pod_ip, "edgetune_agent_downloads_total") == downloads
    assert metric(fleet.pod_ip, "edgetune_agent_swaps_total", source="resident") == resident_swaps + 1


@pytest.mark.parametrize(
    ("variant_name", "reason"),
    [("tampered", "HashMismatch"), ("stranger", "SignatureInvalid"), ("unsigned", "Unsigned"),
     ("other", "IncompatibleBase")],
)  # fmt: skip
def test_bad_packages_are_refused_and_the_previous_adapter_keeps_serving(
    fleet: Fleet, variant_name: str, reason: str
) -> None:
    sha = fleet.trained["other" if variant_name == "other" else "3"].sha256
    before = metric(fleet.pod_ip, "edgetune_agent_swap_failures_total", reason=reason)
    assign(fleet, assignment(f"bad-{variant_name}", fleet.uris[variant_name], sha))

    def refused() -> AdapterReport | None:
        r = report(fleet)
        ok = r is not None and r.state == "Refused" and r.desired and r.desired.version == f"bad-{variant_name}"
        return r if ok else None

    rep = eventually(refused, timeout=60, what=f"{reason} refusal")
    assert rep.error is not None and rep.error.reason == reason
    assert rep.active is not None and rep.active.version == "1"
    cond = condition(fleet)
    assert cond.status == "True" and cond.reason == "Refused" and "still serving 1" in cond.message
    assert metric(fleet.pod_ip, "edgetune_agent_swap_failures_total", reason=reason) == before + 1
    events = fleet.core.list_namespaced_event(fleet.ns, field_selector="involvedObject.name=agent-0").items
    assert any(e.reason == "AdapterRefused" and reason in e.message and f"bad-{variant_name}" in e.message
               for e in events)  # fmt: skip
    x = np.zeros((1, CHANNELS, 48), np.float32)
    assert infer(fleet.pod_ip, _infer_body(x))["model_version"] == "1"


def test_malformed_assignment_is_refused_with_a_readable_reason(fleet: Fleet) -> None:
    assign(fleet, '{"version": "9", "uri": "ftp://nowhere"}')
    rep = eventually(lambda: (r := report(fleet)) and r.error and r.error.reason == "InvalidAssignment" and r,
                     timeout=30, what="InvalidAssignment")  # fmt: skip
    assert "uri must start with s3://" in rep.error.message and rep.active is not None and rep.active.version == "1"


def test_an_mlflow_model_version_is_resolved_and_fetched(fleet: Fleet, mlflow_server: MlflowServer) -> None:
    name = f"agent-{fleet.ns}"

    def call(path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{mlflow_server.url}/api/2.0/mlflow/{path}"
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})  # noqa: S310
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - the local MLflow server
            return json.loads(resp.read())  # type: ignore[no-any-return]

    call("registered-models/create", {"name": name})
    version = call("model-versions/create", {"name": name, "source": fleet.uris["3"]})["model_version"]["version"]
    downloads = metric(fleet.pod_ip, "edgetune_agent_downloads_total")
    assign(fleet, assignment("3", f"models:/{name}/{version}", fleet.trained["3"].sha256))
    fleet.wait_serving("3")
    assert metric(fleet.pod_ip, "edgetune_agent_downloads_total") == downloads + 1
    assign(fleet, assignment("4", f"models:/{name}/99", "f" * 64))  # no such version
    rep = eventually(lambda: (r := report(fleet)) and r.error and r.error.reason == "NotFound" and r, timeout=30,
                     what="NotFound for a missing MLflow version")  # fmt: skip
    assert "MLflow has no" in rep.error.message and rep.active.version == "3"
    assign(fleet, assignment("1", fleet.uris["1"], fleet.trained["1"].sha256))  # back to 1 for the tests below
    fleet.wait_serving("1")


def test_an_agent_token_can_only_touch_its_own_pod(fleet: Fleet, edge_a: ControlPlane) -> None:
    admin = fleet.core
    token = admin.create_namespaced_service_account_token(
        "edgetune-agent", fleet.ns,
        {"spec": {"audiences": [], "expirationSeconds": 600,
                  "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "agent-0",
                                     "uid": admin.read_namespaced_pod("agent-0", fleet.ns).metadata.uid}}},
    ).status.token  # fmt: skip
    cfg = k8s.Configuration()
    cfg.host = edge_a.server
    cfg.ssl_ca_cert = str(edge_a._pki.ca.cert)  # the test cluster's CA
    cfg.api_key = {"authorization": f"Bearer {token}"}
    agent = k8s.CoreV1Api(k8s.ApiClient(cfg))

    def refused(call: Any) -> str:
        with pytest.raises(ApiException) as info:
            call()
        assert info.value.status in (403, 422), info.value
        return str(info.value.body)

    own = {"metadata": {"annotations": {REPORT_ANNOTATION: '{"state":"Loading","observedAt":"x"}'}}}
    agent.patch_namespaced_pod("agent-0", fleet.ns, own)  # allowed: its own report
    assert "only update its own pod" in refused(lambda: agent.patch_namespaced_pod("agent-1", fleet.ns, own))
    desired = {"metadata": {"annotations": {ASSIGNMENT_ANNOTATION: "{}"}}}
    assert "adapter-status annotation" in refused(lambda: agent.patch_namespaced_pod("agent-0", fleet.ns, desired))
    labels = {"metadata": {"labels": {"app": "something-else"}}}
    refused(lambda: agent.patch_namespaced_pod("agent-0", fleet.ns, labels))
    other_status = {"status": {"conditions": [{"type": READY_CONDITION, "status": "False", "reason": "Forged"}]}}
    refused(lambda: agent.patch_namespaced_pod_status("agent-1", fleet.ns, other_status))
    event = {"metadata": {"generateName": "x-"}, "involvedObject": {"kind": "Pod", "name": "agent-1",
             "namespace": fleet.ns}, "reason": "Forged", "message": "m", "type": "Normal"}  # fmt: skip
    assert "Events about its own pod" in refused(lambda: agent.create_namespaced_event(fleet.ns, event))
    refused(lambda: agent.read_namespaced_secret("default-token", fleet.ns))  # RBAC: no reads at all
    refused(lambda: agent.delete_namespaced_pod("agent-1", fleet.ns))


def test_prometheus_answers_per_version_queries(fleet: Fleet, prometheus: Prometheus) -> None:
    ns = fleet.ns
    by_version = eventually(
        lambda: {s["metric"]["version"]: float(s["value"][1]) for s in prometheus.query(
            f'sum by (version) (edgetune_agent_requests_total{{namespace="{ns}"}})')} or None,
        timeout=60, what="per-version request counts in Prometheus",
    )  # fmt: skip
    assert {"1", "2"} <= set(by_version), by_version
    buckets = f'edgetune_agent_request_duration_seconds_bucket{{namespace="{ns}"}}'
    p99 = eventually(
        lambda: {s["metric"]["version"]: float(s["value"][1])
                 for s in prometheus.query(f"histogram_quantile(0.99, sum by (le, version) ({buckets}))")} or None,
        timeout=30, what="per-version p99 latency",
    )  # fmt: skip
    assert {"1", "2"} <= set(p99) and all(0 < v < 10 for v in p99.values()), p99
    errors = prometheus.query(f'sum(edgetune_agent_request_errors_total{{namespace="{ns}"}}) or vector(0)')
    assert float(errors[0]["value"][1]) == 0
    active = f'edgetune_agent_adapter_info{{namespace="{ns}",role="active"}}'
    eventually(lambda: [s["metric"]["version"] for s in prometheus.query(active)] == ["1"], timeout=30,
               what="Prometheus sees version 1 as the one active adapter")  # fmt: skip
