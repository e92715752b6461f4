"""Benchmark AdapterRelease rollouts at fleet size: 1000 targets on 3 clusters.

Run with ``.venv/bin/python bench/bench_release.py [--quick | --smoke]``; the last line printed is JSON with
``release_wall_over_pauses_ratio``, ``rollback_all_targets_s``, ``operator_peak_rss_mb_release_1000``
and ``api_calls_per_target_step`` (plus the sizes and the raw times behind them).

What runs: three real control planes (the hub, registered as an EdgeCluster too, and two edge
clusters), a real MLflow (with its S3 store) holding two versions, a real Prometheus, and the
operator as a process. The targets are pods whose agents are **simulated**: one thread per cluster
watches its pods and answers every new assignment annotation with the report a real agent writes
after a swap from memory (``state: Serving`` with the assigned digest), through the same
apiserver, after ``--swap-ms``. The pods sit on one kwok node per cluster (nothing runs them),
which the operator does not look at: it only reads assignments and reports.

1. Release A (no stable version before it): setWeight 10, pause 10s, setWeight 50, analysis
   (2 x 5 s, ``vector(1)``), setWeight 100 -> Promoted. ``release_wall_over_pauses_ratio`` is its
   wall time (create -> Promoted) over its pauses and analysis windows (20 s).
2. Release B: setWeight 100, analysis (``vector(0)`` >= 0.5, fails at its first measurement) ->
   rollback, in the default configuration (``rollback.publishRevocation: true``: the revocation is
   written to the S3 bucket beside the package, with the operator's own S3 credentials).
   ``rollback_all_targets_s``: from the failing measurement (its recorded time, whole seconds) to
   the last simulated agent reporting the stable version again. The run fails unless every target
   serves the stable version afterwards and the revocation is in S3.

``api_calls_per_target_step``: Kubernetes calls the operator made during release A (its own
``edgetune_operator_external_call_duration_seconds_count``), per target and setWeight step.
``--quick``: 100 targets (same keys; ``targets`` says so). ``--smoke``: 6 targets, 1 s pauses and
analysis intervals: the same code path and the same keys in about a minute (checks the script;
its figures are not the published ones).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import watch

from edgetune_api.assignment import (
    ASSIGNMENT_ANNOTATION,
    REPORT_ANNOTATION,
    AdapterReport,
    ServedAdapter,
    dumps,
    parse_assignment,
)
from edgetune_testenv.cluster import ControlPlane
from edgetune_testenv.nodes import cpu_node
from edgetune_testenv.operator_proc import OperatorProcess
from edgetune_testenv.servers import MlflowServer, Prometheus, S3Server

REPO = Path(__file__).resolve().parents[1]
NS = "bench"
MODEL = "bench-sensor"
SELECTOR = {"app": "sensor-model"}
NODE = "site-node"  # one kwok node per cluster holds the pods (a pod bound to no node is garbage-collected)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class SimulatedAgents:
    """The agents of one cluster: answer each assignment with a Serving report after ``delay``."""

    def __init__(self, plane: ControlPlane, cluster: str, delay: float) -> None:
        self.api = plane.api_client()
        self.api.configuration.connection_pool_maxsize = 16
        self.core = k8s.CoreV1Api(self.api)
        self.cluster, self.delay = cluster, delay
        self.serving: dict[str, str] = {}  # pod -> version reported
        self.last_report = 0.0
        self.pool = ThreadPoolExecutor(8)
        self.lock = threading.Lock()
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def create_pods(self, count: int) -> None:
        def make(i: int) -> None:
            report = AdapterReport(state="Serving", observed_at=now())
            self.core.create_namespaced_pod(NS, {
                "metadata": {"name": f"agent-{i}", "labels": SELECTOR,
                             "annotations": {REPORT_ANNOTATION: dumps(report)}},
                "spec": {"nodeName": NODE, "containers": [{"name": "agent", "image": "edgetune/agent"}]},
            })  # fmt: skip

        list(self.pool.map(make, range(count)))
        self.thread.start()

    def _answer(self, name: str, raw: str) -> None:
        time.sleep(self.delay)
        a = parse_assignment(raw)
        active = None if a.base else ServedAdapter(version=a.version, sha256=a.sha256, release=a.release)
        desired = ServedAdapter(version=a.version, sha256=a.sha256 or None, release=a.release)
        report = AdapterReport(state="Serving", active=active, desired=desired, observed_at=now())
        self.core.patch_namespaced_pod(name, NS, {"metadata": {"annotations": {REPORT_ANNOTATION: dumps(report)}}})
        with self.lock:
            self.serving[name] = a.version
            self.last_report = time.time()

    def _run(self) -> None:
        seen: dict[str, str] = {}
        while not self.stop:
            w = watch.Watch()
            with contextlib.suppress(Exception):
                for event in w.stream(self.core.list_namespaced_pod, NS, timeout_seconds=30):
                    pod = event["object"]
                    raw = (pod.metadata.annotations or {}).get(ASSIGNMENT_ANNOTATION)
                    if raw and seen.get(pod.metadata.name) != raw:
                        seen[pod.metadata.name] = raw
                        self.pool.submit(self._answer, pod.metadata.name, raw)
                    if self.stop:
                        w.stop()

    def count(self, version: str) -> int:
        with self.lock:
            return sum(1 for v in self.serving.values() if v == version)


def mlflow(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(), method="POST",  # noqa: S310
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - the local MLflow server
        return dict(json.loads(resp.read()))


def release(name: str, version: str, steps: list[dict[str, Any]], query: str,
            interval: str = "5s") -> dict[str, Any]:  # fmt: skip
    return {
        "apiVersion": "edgetune.io/v1alpha1", "kind": "AdapterRelease", "metadata": {"name": name},
        "spec": {
            "adapter": {"registeredModel": MODEL, "version": version},
            "targets": {"clusterSelector": {"matchLabels": {"bench": "yes"}},
                        "workloadSelector": {"matchLabels": SELECTOR}},
            "strategy": {"canary": {"maxUnavailable": 10_000, "steps": steps}},
            "analysis": {"metrics": [{"name": "m", "query": query, "interval": interval, "count": 2,
                                      "failureLimit": 0, "thresholdRange": {"min": 0.5}}]},
        },
    }  # fmt: skip


def kube_calls(metrics_text: str) -> float:
    pattern = r'^edgetune_operator_external_call_duration_seconds_count\{[^}]*system="kubernetes"[^}]*\} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, metrics_text, re.M))


def reconcile_stats(metrics_text: str) -> dict[str, Any]:
    """Release reconciles so far: how many and their mean duration (the operator's own histogram)."""

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf'^{name}\{{kind="AdapterRelease"\}} (\S+)$', metrics_text, re.M))

    count = total("edgetune_operator_reconcile_duration_seconds_count")
    mean_ms = 1000 * total("edgetune_operator_reconcile_duration_seconds_sum") / max(count, 1)
    calls: dict[str, list[float]] = {}
    for suffix, slot in (("sum", 0), ("count", 1)):
        pattern = rf"^edgetune_operator_external_call_duration_seconds_{suffix}\{{([^}}]*)\}} (\S+)$"
        for labels, v in re.findall(pattern, metrics_text, re.M):
            verb = re.search(r'operation="(\w+)"', labels)
            if 'system="kubernetes"' in labels and verb:
                calls.setdefault(verb.group(1), [0.0, 0.0])[slot] += float(v)
    return {
        "reconciles": count,
        "reconcile_mean_ms": round(mean_ms, 1),
        "kube_call_mean_ms_and_count": {k: [round(1000 * t / max(n, 1), 1), int(n)] for k, (t, n) in calls.items()},
    }


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_phase(custom: Any, name: str, phases: tuple[str, ...], timeout: float) -> tuple[dict[str, Any], float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        obj = custom.get_namespaced_custom_object("edgetune.io", "v1alpha1", NS, "adapterreleases", name)
        status = obj.get("status") or {}
        if status.get("phase") in phases:
            return status, time.monotonic()
        time.sleep(0.1)
    raise TimeoutError(f"{name} not in {phases} within {timeout} s: {json.dumps(status)[:2000]}")


def main() -> None:  # noqa: PLR0915 - one linear script
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="100 targets")
    parser.add_argument("--smoke", action="store_true", help="6 targets, 1 s pauses: checks the script (a minute)")
    parser.add_argument("--targets", type=int, default=None, help="targets across the 3 clusters (default 1000)")
    parser.add_argument("--swap-ms", type=float, default=20.0, help="simulated swap time of an agent")
    parser.add_argument("--log", type=Path, default=None, help="copy the operator log here")
    args = parser.parse_args()
    total = args.targets or (6 if args.smoke else 100 if args.quick else 1000)
    wait = 1 if args.smoke else 5  # analysis interval; the pause step is twice as long
    result: dict[str, Any] = {"targets": total, "clusters": 3, "swap_ms": args.swap_ms, "smoke": args.smoke}
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgetune-bench-release-")))
        planes = {name: stack.enter_context(ControlPlane(f"rel-{name}", tmp / name)) for name in ("hub", "e1", "e2")}
        s3 = stack.enter_context(S3Server(tmp / "s3"))
        registry = stack.enter_context(MlflowServer(s3, workdir=tmp / "mlflow"))
        prometheus = stack.enter_context(Prometheus(tmp / "prometheus"))
        hub = planes["hub"]
        hub.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        hub.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        hub.kubectl("create", "namespace", "edgetune-system")
        agents: dict[str, SimulatedAgents] = {}
        for index, (name, plane) in enumerate(planes.items()):
            hub.kubectl("-n", "edgetune-system", "create", "secret", "generic", f"{name}-kubeconfig",
                        f"--from-file=kubeconfig={plane.kubeconfig}")  # fmt: skip
            hub.kubectl("apply", "-f", "-", input_text=json.dumps({
                "apiVersion": "edgetune.io/v1alpha1", "kind": "EdgeCluster",
                "metadata": {"name": f"site-{name}", "labels": {"bench": "yes"}},
                "spec": {"kubeconfigSecretRef": {"name": f"{name}-kubeconfig", "namespace": "edgetune-system"}},
            }))  # fmt: skip
            plane.add_nodes([cpu_node(NODE)])
            plane.kubectl("create", "namespace", NS)
            time.sleep(0.5)  # the namespace's default ServiceAccount
            agents[name] = SimulatedAgents(plane, name, args.swap_ms / 1000)
            agents[name].create_pods(total // 3 + (1 if index < total % 3 else 0))
        mlflow(registry.url, "registered-models/create", {"name": MODEL})
        versions = []
        s3.create_bucket("adapters")  # where the packages would be, and so the revocation
        for i in range(2):
            body = {"name": MODEL, "source": f"s3://adapters/bench/v{i}",
                    "tags": [{"key": "edgetune.delta_sha256", "value": f"{i + 1:x}" * 64}]}  # fmt: skip
            versions.append(mlflow(registry.url, "model-versions/create", body)["model_version"]["version"])
        result["setup_s"] = round(time.monotonic() - started, 1)

        operator = OperatorProcess(hub, tmp / "operator", {
            "EDGETUNE_NAMESPACES": json.dumps([NS]), "EDGETUNE_MLFLOW_TRACKING_URI": registry.url,
            "EDGETUNE_PROMETHEUS_URL": prometheus.url, "EDGETUNE_TRAINER_LABELS": "{}",
            "EDGETUNE_S3_ENDPOINT": s3.endpoint, **s3.env(),  # its own S3 credentials: the revocation
        }, "edgetune/trainer:bench")  # fmt: skip
        (tmp / "operator").mkdir(exist_ok=True)
        with operator:
            api = hub.api_client()
            custom = k8s.CustomObjectsApi(api)
            pauses = 2 * wait + 2 * wait
            steps = [{"setWeight": 10}, {"pause": {"duration": f"{2 * wait}s"}}, {"setWeight": 50}, {"analysis": {}},
                     {"setWeight": 100}]  # fmt: skip
            calls_before = kube_calls(operator.metrics())
            created = time.monotonic()
            good = release("good", versions[0], steps, "vector(1)", f"{wait}s")
            custom.create_namespaced_custom_object("edgetune.io", "v1alpha1", NS, "adapterreleases", good)
            status, done = wait_phase(custom, "good", ("Promoted", "RolledBack", "Failed"), 900)
            if status["phase"] != "Promoted":
                raise SystemExit(f"release A ended {status['phase']}: {json.dumps(status)[:2000]}")
            wall = done - created
            calls = kube_calls(operator.metrics()) - calls_before
            result["release_wall_s"] = round(wall, 1)
            result["release_pauses_s"] = pauses
            result["release_wall_over_pauses_ratio"] = round(wall / pauses, 3)
            result["api_calls_per_target_step"] = round(calls / (total * 3), 2)
            result["serving_after_release"] = sum(a.count(versions[0]) for a in agents.values())
            result["release_reconciles"] = reconcile_stats(operator.metrics())

            # Release B: fails its analysis with every target on it, rolls back.
            custom.create_namespaced_custom_object("edgetune.io", "v1alpha1", NS, "adapterreleases",
                                                   release("bad", versions[1], [{"setWeight": 100}, {"analysis": {}}],
                                                           "vector(0)", f"{wait}s"))  # fmt: skip
            status, _ = wait_phase(custom, "bad", ("RolledBack",), 600)
            # The breach: the failing measurement's time (whole seconds, rounded down: conservative).
            breach = datetime.fromisoformat(status["analysisRuns"][-1]["lastMeasuredAt"]).timestamp()
            back = max(a.last_report for a in agents.values())
            result["rollback_all_targets_s"] = round(back - breach, 2)
            result["serving_stable_after_rollback"] = sum(a.count(versions[0]) for a in agents.values())
            result["status_targets_after_rollback"] = status.get("targetsByVersion")
            published = {c["type"]: c for c in status.get("conditions") or []}.get("RevocationPublished", {})
            result["revocation_published"] = published.get("status") == "True"
            if result["serving_stable_after_rollback"] != total or not result["revocation_published"]:
                raise SystemExit(f"after the rollback {result['serving_stable_after_rollback']} of {total} "
                                 f"targets serve the stable version {versions[0]}; RevocationPublished: "
                                 f"{published}")  # fmt: skip
            if operator.proc is not None:
                result["operator_peak_rss_mb_release_1000"] = round(peak_rss_mb(operator.proc.pid), 1)
            api.close()
        for a in agents.values():
            a.stop = True
        if args.log:
            args.log.write_text((tmp / "operator" / "operator.log").read_text())
    result["total_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
