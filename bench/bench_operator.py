"""Benchmark the operator: EdgeTrainingJob applied -> trainer pod bound to a node, at one job and at
many jobs in flight; operator memory; reconcile throughput.

Run with ``.venv/bin/python bench/bench_operator.py [--quick]``. Prints one JSON line with
``pod_bound_p50_s_1job``, ``pod_bound_p99_s_1job``, ``pod_bound_p99_s_1000jobs``,
``operator_peak_rss_mb_1000jobs``, ``reconciles_per_s`` (plus the sizes used).

What runs: one real control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler)
with N kwok nodes, the CRDs, and the operator as a process (``python -m edgetune_operator``).
Trainer pods are not executed (kwok marks them Running), so the numbers are the control path:
operator reconcile -> Job -> controller-manager creates the pod -> scheduler binds it.
Single jobs are measured client-side: from the create call returning to the first watch event that
shows ``spec.nodeName``. The bursts (``*_1000*`` keys) are measured server-side: from the owner's
creationTimestamp (plain Job or EdgeTrainingJob) to the pod's PodScheduled transition, both whole
seconds, which a watch falling behind under load cannot distort (the client-side figures are kept
as ``*_watch_*``).
``--quick``: 100 nodes and 100 jobs (same keys; the 1000-job keys then describe 100 jobs, and
``jobs`` says so). ``--smoke``: 10 nodes, 5 jobs, 3 single jobs (checks the script).

Every job here takes the **failure path**: kwok completes the trainer pods without running them, so
no package is produced, verified or registered, and no ``Training`` status is written (``path`` in
the output says so). The figures are the control path's cost, not a successful job's.
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
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s

from edgetune_operator.clients.kube import PODS, Kube, KubeError, UnreachableError
from edgetune_testenv.cluster import ControlPlane
from edgetune_testenv.nodes import scale_fleet
from edgetune_testenv.operator_proc import OperatorProcess
from edgetune_testenv.procs import cpu_seconds, memory_mb
from edgetune_testenv.servers import S3Server

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
    """Records when each trainer pod (by job name) is first seen bound to a node. Plain JSON through
    the operator's small client, resumed from the last resourceVersion: the official client's watch
    turns every event into model objects, and under the burst that fell minutes behind the API
    server (and took CPU from it) — the burst keys are server-side for that reason."""

    def __init__(self, plane: ControlPlane) -> None:
        self.kube = Kube.from_kubeconfig_dict(yaml.safe_load(plane.kubeconfig.read_text()), "bench")
        self.bound: dict[str, float] = {}
        self.cond = threading.Condition()
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _saw(self, pod: dict[str, Any]) -> None:
        if (pod.get("spec") or {}).get("nodeName"):
            job = ((pod.get("metadata") or {}).get("labels") or {}).get(LABEL)
            with self.cond:
                self.bound.setdefault(job, time.monotonic())
                self.cond.notify_all()

    def _run(self) -> None:
        version = None
        while not self._stop:
            try:
                if version is None:
                    items, version = self.kube.list_versioned(PODS, selector=LABEL)
                    for pod in items:
                        self._saw(pod)
                for event in self.kube.watch(PODS, "bench", selector=LABEL, resource_version=version,
                                             timeout_seconds=240):  # fmt: skip
                    obj = event.get("object") or {}
                    version = (obj.get("metadata") or {}).get("resourceVersion") or version
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        self._saw(obj)
                    if self._stop:
                        return
            except (KubeError, UnreachableError) as exc:
                # An API server behind on its watch cache under the burst answers a resumed watch with
                # 504 "Too large resource version" (or 410 Gone): list and watch afresh, at once.
                print(f"bench watch restarted: {exc}"[:300], file=sys.stderr, flush=True)
                version = None

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


OPERATOR_USER = "edgetune-operator"


def api_requests(plane: ControlPlane, since: float, until: float) -> dict[str, Any]:
    """The operator's requests as the API server saw them (audit log), watches excluded, between two
    wall-clock times: total and by verb/resource."""
    tally: dict[str, int] = {}
    for event in plane.audit_events(OPERATOR_USER, since, until):
        if event.get("verb") == "watch":
            continue
        ref = event.get("objectRef") or {}
        resource = "/".join(x for x in (ref.get("resource", "?"), ref.get("subresource")) if x)
        key = f"{event['verb']} {resource}"
        tally[key] = tally.get(key, 0) + 1
    return {"total": sum(tally.values()), "by_call": dict(sorted(tally.items(), key=lambda kv: -kv[1]))}


def bare_job(template: dict[str, Any], name: str) -> dict[str, Any]:
    """A plain batch/v1 Job with the operator's trainer pod template: the baseline."""
    pod = json.loads(json.dumps(template["spec"]["template"]))
    pod["metadata"] = {"labels": {LABEL: name}}
    spec = {k: v for k, v in template["spec"].items() if k not in ("selector", "template", "suspend")}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": {**spec, "template": pod}}


def _ts(value: Any) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def training_jobs_created(custom: Any, names: set[str]) -> dict[str, float]:
    """The named EdgeTrainingJobs' creationTimestamps (server-side, whole seconds)."""
    jobs = custom.list_namespaced_custom_object("edgetune.io", "v1alpha1", "bench", "edgetrainingjobs")["items"]
    return {
        j["metadata"]["name"]: _ts(j["metadata"]["creationTimestamp"]) for j in jobs if j["metadata"]["name"] in names
    }


def creation_lag(batch: Any, created: dict[str, float]) -> dict[str, float]:
    """Server-side: from each EdgeTrainingJob's creation to its trainer Job's creation (whole
    seconds, as creationTimestamp has them): the operator's share of the latency."""
    lags = []
    for child in batch.list_namespaced_job("bench", label_selector="edgetune.io/training-job-uid").items:
        name = (child.metadata.labels or {}).get(LABEL)
        if name in created:
            lags.append(_ts(child.metadata.creation_timestamp) - created[name])
    return {"trainer_job_created_p50_s": round(statistics.median(lags), 1), "trainer_job_created_p99_s": round(
        p(lags, 0.99), 1)}  # fmt: skip


def server_bound(core: Any, owners: dict[str, float]) -> tuple[float, float]:
    """Server-side create -> pod bound: from each owner's creationTimestamp (the plain Job, or the
    EdgeTrainingJob) to its pod's ``PodScheduled`` transition, both written by the API server in whole
    seconds. Independent of how late the benchmark's own watch hears of a binding under load."""
    lags = []
    for pod in core.list_namespaced_pod("bench", label_selector=LABEL).items:
        name = (pod.metadata.labels or {}).get(LABEL)
        scheduled = next((c for c in pod.status.conditions or [] if c.type == "PodScheduled" and c.status == "True"),
                         None)  # fmt: skip
        if name in owners and scheduled is not None:
            lags.append(_ts(scheduled.last_transition_time) - owners[name])
    return round(statistics.median(lags), 1), round(p(lags, 0.99), 1)


def wait_complete(batch: Any, names: set[str], timeout: float) -> None:
    """Until every named batch/v1 Job has its Complete condition."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = {j.metadata.name for j in batch.list_namespaced_job("bench").items
                if any(c.type == "Complete" and c.status == "True" for c in j.status.conditions or [])}  # fmt: skip
        if names <= done:
            return
        time.sleep(2)
    raise TimeoutError(f"{len(names - done)} plain Jobs not complete after {timeout} s")


def wait_terminal(custom: Any, names: set[str], timeout: float) -> float:
    """Until every named EdgeTrainingJob has a terminal phase; returns when (monotonic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = custom.list_namespaced_custom_object("edgetune.io", "v1alpha1", "bench", "edgetrainingjobs")["items"]
        done = {i["metadata"]["name"] for i in items if (i.get("status") or {}).get("phase") in ("Succeeded", "Failed")}
        if names <= done:
            return time.monotonic()
        time.sleep(2)
    raise TimeoutError(f"{len(names - done)} jobs not finished after {timeout} s")


def main() -> None:  # noqa: PLR0915 - one linear script
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="100 nodes and 100 jobs")
    parser.add_argument("--smoke", action="store_true", help="10 nodes, 5 jobs, 3 single jobs: checks the script")
    parser.add_argument("--nodes", type=int, default=None, help="kwok nodes (default 1000)")
    parser.add_argument("--jobs", type=int, default=None, help="jobs in the burst (default 1000)")
    parser.add_argument("--single", type=int, default=None, help="single-job samples for p50/p99")
    parser.add_argument("--log", type=Path, default=None, help="copy the operator log here")
    args = parser.parse_args()
    nodes = args.nodes or (10 if args.smoke else 100 if args.quick else 1000)
    jobs = args.jobs or (5 if args.smoke else 100 if args.quick else 1000)
    single = args.single or (3 if args.smoke else 10 if args.quick else 30)
    result: dict[str, Any] = {"nodes": nodes, "jobs": jobs, "single_samples": single, "smoke": args.smoke,
                              "path": "failure: kwok completes trainer pods without running them (no package, "
                                      "verification, MLflow registration or Training status)"}  # fmt: skip

    with (
        tempfile.TemporaryDirectory(prefix="edgetune-bench-") as tmp,
        ControlPlane("bench", Path(tmp), audit_users=(OPERATOR_USER,)) as plane,
        S3Server(Path(tmp) / "s3") as s3,
    ):
        plane.add_nodes(scale_fleet(nodes), timeout=600)
        plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        plane.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        s3.create_bucket("adapters")
        api = plane.api_client()
        api.configuration.connection_pool_maxsize = 16
        core, custom, batch = k8s.CoreV1Api(api), k8s.CustomObjectsApi(api), k8s.BatchV1Api(api)
        core.create_namespace({"metadata": {"name": "bench"}})
        time.sleep(1)
        operator = OperatorProcess(
            plane,
            Path(tmp),
            # A real S3 server: trainer pods are completed by kwok without running, so each job ends
            # Failed (VerificationFailed: no package) — a full life cycle, create to terminal phase.
            {
                "KUBECONFIG": str(plane.user_kubeconfig(OPERATOR_USER, ("system:masters",))),
                "EDGETUNE_TRAINER_LABELS": "{}",
                "EDGETUNE_RESYNC_SECONDS": "10",
                "EDGETUNE_S3_ENDPOINT": s3.endpoint,
                **{k: v for k, v in s3.env().items() if k.startswith("AWS_")},
            },
            "edgetune/trainer:bench",
        )
        with operator:
            pods = BoundWatch(plane)

            def create(name: str) -> float:
                custom.create_namespaced_custom_object("edgetune.io", "v1alpha1", "bench", "edgetrainingjobs",
                                                       manifest(name))  # fmt: skip
                return time.monotonic()

            # One job at a time, after a first one that pays every cold start (the operator's first
            # reconcile, the controller-manager's and scheduler's first Job and pod), reported apart.
            first = create("first")
            pods.wait({"first"}, 60)
            result["pod_bound_s_first_job"] = round(pods.bound["first"] - first, 3)
            latencies = []
            for i in range(single):
                name = f"one-{i}"
                created = create(name)
                pods.wait({name}, 60)
                latencies.append(pods.bound[name] - created)
            result["pod_bound_p50_s_1job"] = round(statistics.median(latencies), 3)
            result["pod_bound_p99_s_1job"] = round(p(latencies, 0.99), 3)
            result["pod_bound_s_1job_samples"] = [round(x, 2) for x in latencies]
            wait_terminal(custom, {"first", *(f"one-{i}" for i in range(single))}, 120)

            # The baseline: as many plain batch/v1 Jobs with the same pod template, same client and
            # threads, same cluster, before the operator's burst (the operator idles meanwhile).
            template = batch.list_namespaced_job("bench", label_selector=f"{LABEL}=one-0").items[0]
            template = api.sanitize_for_serialization(template)
            bare = [f"bare-{i}" for i in range(jobs)]

            def create_bare(name: str) -> float:
                batch.create_namespaced_job("bench", bare_job(template, name))
                return time.monotonic()

            with ThreadPoolExecutor(8) as pool:
                bare_at = dict(zip(bare, pool.map(create_bare, bare), strict=True))
            pods.wait(set(bare), 900)
            plain = [pods.bound[n] - bare_at[n] for n in bare]
            result["bare_job_pod_bound_watch_p50_s_1000"] = round(statistics.median(plain), 3)
            result["bare_job_pod_bound_watch_p99_s_1000"] = round(p(plain, 0.99), 3)
            # The Job controller (20 QPS) is still completing them: the operator's burst starts once
            # it is idle again, or it would pay for the baseline's leftovers.
            wait_complete(batch, set(bare), 900)
            bare_names = set(bare)
            bare_created = {
                j.metadata.name: _ts(j.metadata.creation_timestamp)
                for j in batch.list_namespaced_job("bench").items
                if j.metadata.name in bare_names
            }
            result["bare_job_pod_bound_p50_s_1000"], result["bare_job_pod_bound_p99_s_1000"] = server_bound(
                core, bare_created
            )
            time.sleep(2)

            # Many jobs in flight at once.
            before = reconciles(operator.metrics())
            cpu_before = cpu_seconds(operator.proc.pid) if operator.proc is not None else 0.0
            started, wall_started = time.monotonic(), time.time()
            names = [f"many-{i}" for i in range(jobs)]
            with ThreadPoolExecutor(8) as pool:
                created_at = dict(zip(names, pool.map(create, names), strict=True))
            result["create_all_s"] = round(time.monotonic() - started, 1)
            pods.wait(set(names), 900)
            many = [pods.bound[n] - created_at[n] for n in names]
            result["pod_bound_watch_p50_s_1000jobs"] = round(statistics.median(many), 3)
            result["pod_bound_watch_p99_s_1000jobs"] = round(p(many, 0.99), 3)
            result["all_bound_s"] = round(max(pods.bound[n] for n in names) - started, 1)
            etj_created = training_jobs_created(custom, set(names))
            result.update(creation_lag(batch, etj_created))
            result["pod_bound_p50_s_1000jobs"], result["pod_bound_p99_s_1000jobs"] = server_bound(core, etj_created)
            result["operator_vs_bare_p99_ratio_1000jobs"] = round(
                result["pod_bound_p99_s_1000jobs"] / max(result["bare_job_pod_bound_p99_s_1000"], 1.0), 2
            )
            result["operator_vs_bare_p99_ratio_watch"] = round(
                result["pod_bound_watch_p99_s_1000jobs"] / result["bare_job_pod_bound_watch_p99_s_1000"], 2
            )
            result["all_terminal_s"] = round(wait_terminal(custom, set(names), 900) - started, 1)
            elapsed = time.monotonic() - started
            result["reconciles_per_s"] = round((reconciles(operator.metrics()) - before) / elapsed, 1)
            if operator.proc is not None:
                result["operator_peak_rss_mb_1000jobs"] = round(memory_mb(operator.proc.pid, "VmHWM"), 1)
                # CPU is what the operator takes from the control plane on a small machine.
                result["operator_cpu_s_1000jobs"] = round(cpu_seconds(operator.proc.pid) - cpu_before, 1)
            time.sleep(20)  # two resync periods with every job finished: what idling costs
            calls = api_requests(plane, wall_started, time.time())
            result["api_requests_per_job"] = round(calls["total"] / jobs, 2)
            result["api_requests_by_call"] = calls["by_call"]
            result.update(call_stats(operator.metrics()))
            pods.stop()
        if args.log:
            args.log.write_text((Path(tmp) / "operator.log").read_text())
        api.close()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
