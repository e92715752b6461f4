"""Benchmark the operator: EdgeTrainingJob applied -> trainer pod bound to a node, at one job and at
many jobs in flight; operator memory; reconcile throughput.

Run with ``.venv/bin/python bench/bench_operator.py [--quick]``. Prints one JSON line with
``pod_bound_p50_s_1job``, ``pod_bound_p99_s_1job``, ``pod_bound_p99_s_1000jobs``,
``operator_peak_rss_mb_1000jobs``, ``reconciles_per_s`` (plus the sizes used).

What runs: one real control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler)
with N kwok nodes, the CRDs, and the operator as a process (``python -m edgetune_operator``).
Trainer pods are not executed (kwok marks them Running), so the numbers are the control path:
operator reconcile -> Job -> controller-manager creates the pod -> scheduler binds it.
Latency is measured client-side: from the create call returning to the first watch event that
shows ``spec.nodeName``. ``--quick``: 100 nodes and 100 jobs (same keys; the 1000-job keys then
describe 100 jobs, and ``jobs`` says so).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import watch

from edgetune_testenv.cluster import ControlPlane
from edgetune_testenv.nodes import scale_fleet
from edgetune_testenv.operator_proc import OperatorProcess

REPO = Path(__file__).resolve().parents[1]
LABEL = "edgetune.io/training-job"


def manifest(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "edgetune.io/v1alpha1", "kind": "EdgeTrainingJob", "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "builtin:timeseries-cnn"},
            "data": {"source": {"hostPath": "/var/lib/edgetune/data"}, "format": "npy"},
            "budgets": {"memory": "1Gi"},
            "placement": {"accelerator": "any"},
            "output": {"s3": {"bucket": "adapters"}, "mlflow": {"registeredModel": "bench"}},
        },
    }  # fmt: skip


class BoundWatch:
    """Records when each trainer pod (by job name) is first seen bound to a node."""

    def __init__(self, api: Any, namespace: str) -> None:
        self.core = k8s.CoreV1Api(api)
        self.namespace = namespace
        self.bound: dict[str, float] = {}
        self.cond = threading.Condition()
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            w = watch.Watch()
            for event in w.stream(self.core.list_namespaced_pod, self.namespace, label_selector=LABEL,
                                  timeout_seconds=30):  # fmt: skip
                pod = event["object"]
                if pod.spec.node_name:
                    job = pod.metadata.labels.get(LABEL)
                    with self.cond:
                        self.bound.setdefault(job, time.monotonic())
                        self.cond.notify_all()
                if self._stop:
                    w.stop()

    def wait(self, names: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not names <= set(self.bound):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(names - set(self.bound))
                    raise TimeoutError(f"{len(missing)} pods never bound, e.g. {missing[:5]}")
                self.cond.wait(left)

    def stop(self) -> None:
        self._stop = True


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def reconciles(metrics_text: str) -> float:
    return sum(float(m) for m in re.findall(r"^edgetune_operator_reconciles_total\{[^}]*\} (\S+)$", metrics_text, re.M))


def _series(text: str, name: str) -> list[tuple[str, float]]:
    return [(labels, float(v)) for labels, v in re.findall(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M)]


def call_stats(text: str) -> dict[str, Any]:
    """Mean reconcile time, and mean latency and count of Kubernetes API calls by verb."""
    total = sum(v for _, v in _series(text, "edgetune_operator_reconcile_duration_seconds_sum"))
    count = sum(v for _, v in _series(text, "edgetune_operator_reconcile_duration_seconds_count"))
    calls: dict[str, list[float]] = {}
    for suffix, slot in (("sum", 0), ("count", 1)):
        for labels, v in _series(text, f"edgetune_operator_external_call_duration_seconds_{suffix}"):
            if 'system="kubernetes"' in labels:
                verb = re.search(r'operation="(\w+)"', labels)
                calls.setdefault(verb.group(1) if verb else "?", [0.0, 0.0])[slot] += v
    return {
        "reconcile_mean_ms": round(1000 * total / max(count, 1), 1),
        "kube_call_mean_ms_and_count": {k: [round(1000 * s / max(c, 1), 1), int(c)] for k, (s, c) in calls.items()},
    }


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:  # noqa: PLR0915 - one linear script
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="100 nodes and 100 jobs")
    parser.add_argument("--nodes", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--single", type=int, default=None, help="single-job samples for p50/p99")
    parser.add_argument("--log", type=Path, default=None, help="copy the operator log here")
    args = parser.parse_args()
    nodes = args.nodes or (100 if args.quick else 1000)
    jobs = args.jobs or (100 if args.quick else 1000)
    single = args.single or (10 if args.quick else 30)
    result: dict[str, Any] = {"nodes": nodes, "jobs": jobs, "single_samples": single}

    with tempfile.TemporaryDirectory(prefix="edgetune-bench-") as tmp, ControlPlane("bench", Path(tmp)) as plane:
        plane.add_nodes(scale_fleet(nodes), timeout=600)
        plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        plane.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        api = plane.api_client()
        api.configuration.connection_pool_maxsize = 16
        core, custom = k8s.CoreV1Api(api), k8s.CustomObjectsApi(api)
        core.create_namespace({"metadata": {"name": "bench"}})
        time.sleep(1)
        operator = OperatorProcess(
            plane,
            Path(tmp),
            # Credentials only to presign trainers' uploads (signing needs no network; nothing uploads).
            {
                "EDGETUNE_TRAINER_LABELS": "{}",
                "EDGETUNE_RESYNC_SECONDS": "10",
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_DEFAULT_REGION": "us-east-1",
            },
            "edgetune/trainer:bench",
        )
        with operator:
            pods = BoundWatch(api, "bench")

            def create(name: str) -> float:
                custom.create_namespaced_custom_object("edgetune.io", "v1alpha1", "bench", "edgetrainingjobs",
                                                       manifest(name))  # fmt: skip
                return time.monotonic()

            # One job at a time.
            latencies = []
            for i in range(single):
                name = f"one-{i}"
                created = create(name)
                pods.wait({name}, 60)
                latencies.append(pods.bound[name] - created)
            result["pod_bound_p50_s_1job"] = round(statistics.median(latencies), 3)
            result["pod_bound_p99_s_1job"] = round(p(latencies, 0.99), 3)

            # Many jobs in flight at once.
            before = reconciles(operator.metrics())
            started = time.monotonic()
            names = [f"many-{i}" for i in range(jobs)]
            with ThreadPoolExecutor(8) as pool:
                created_at = dict(zip(names, pool.map(create, names), strict=True))
            result["create_all_s"] = round(time.monotonic() - started, 1)
            pods.wait(set(names), 900)
            many = [pods.bound[n] - created_at[n] for n in names]
            result["pod_bound_p50_s_1000jobs"] = round(statistics.median(many), 3)
            result["pod_bound_p99_s_1000jobs"] = round(p(many, 0.99), 3)
            result["all_bound_s"] = round(max(pods.bound[n] for n in names) - started, 1)
            # Keep the jobs in flight for two resync periods, then read memory and throughput.
            time.sleep(20)
            elapsed = time.monotonic() - started
            result["reconciles_per_s"] = round((reconciles(operator.metrics()) - before) / elapsed, 1)
            result.update(call_stats(operator.metrics()))
            if operator.proc is not None:
                result["operator_peak_rss_mb_1000jobs"] = round(peak_rss_mb(operator.proc.pid), 1)
            pods.stop()
        if args.log:
            args.log.write_text((Path(tmp) / "operator.log").read_text())
        api.close()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
