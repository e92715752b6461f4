"""Benchmark the operator's cost per registered edge cluster, and one job spread over all of them.

Run with ``.venv/bin/python bench/bench_clusters.py [--clusters N]`` (default 20). Prints one JSON
line. ``--smoke``: 1 cluster, 5 s idle (checks the script; not the published figures).

What runs: a hub control plane and N edge control planes (each: etcd, kube-apiserver,
controller-manager, scheduler, kwok with 6 simulated nodes), every edge registered as an
EdgeCluster (heartbeat every 10 s) whose kubeconfig names a user of its own, ``edgetune-operator``,
so each edge's audit log counts exactly the operator's requests; a real S3 server; the operator as
a process. Trainer pods are completed by kwok without running, so each trainer ends Failed
(VerificationFailed: no package), a full life cycle on every cluster.

Phases and keys:
- idle with 0 clusters, then with N registered: ``operator_cpu_ms_per_s_idle_{0,N}``,
  ``operator_rss_mb_idle_{0,N}``, ``edge_requests_per_cluster_per_min_idle`` (heartbeat: version +
  node list; watches counted apart as ``watches_per_cluster``);
- with one job of N trainers in flight on the N clusters: ``all_trainers_created_s`` and
  ``all_trainers_bound_s`` from the job's creation, ``job_terminal_s``,
  ``edge_requests_per_cluster_job`` (the operator's requests to each edge for the job, watches
  excluded) and ``hub_requests_job``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

from edgetune_testenv.cluster import ControlPlane
from edgetune_testenv.nodes import default_fleet
from edgetune_testenv.operator_proc import OperatorProcess
from edgetune_testenv.procs import cpu_seconds, memory_mb, wait_for
from edgetune_testenv.servers import S3Server

REPO = Path(__file__).resolve().parents[1]
USER = "edgetune-operator"


def requests(plane: ControlPlane, since: float, until: float) -> tuple[int, int]:
    """(requests, watches) the operator's user made to ``plane`` between two wall-clock times."""
    events = plane.audit_events(USER, since, until)
    watches = sum(1 for e in events if e.get("verb") == "watch")
    return len(events) - watches, watches


def idle(pid: int, seconds: float) -> tuple[float, float]:
    """(CPU ms per second, RSS MB) of ``pid`` over ``seconds``."""
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return round(1000 * (cpu_seconds(pid) - before) / seconds, 1), round(memory_mb(pid), 1)


def main() -> None:  # noqa: PLR0915 - one linear script
    parser = argparse.ArgumentParser()
    parser.add_argument("--clusters", type=int, default=20, help="edge clusters (default 20)")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="length of each idle window (default 60)")
    parser.add_argument("--smoke", action="store_true", help="1 cluster, 5 s idle: checks the script")
    args = parser.parse_args()
    if args.smoke:
        args.clusters, args.idle_seconds = 1, 5.0
    n = args.clusters
    result: dict[str, Any] = {"clusters": n, "smoke": args.smoke}
    with tempfile.TemporaryDirectory(prefix="edgetune-clusters-") as tmp:
        root = Path(tmp)
        hub = ControlPlane("hub", root / "hub", audit_users=(USER,))
        edges = [ControlPlane(f"edge-{i:02d}", root / f"edge-{i:02d}", audit_users=(USER,)) for i in range(n)]
        s3 = S3Server(root / "s3")
        try:
            started = time.monotonic()
            hub.start()
            s3.start()
            # One after another, from this thread: the test environment's processes die with the
            # thread that started them (PR_SET_PDEATHSIG), so a thread pool's would not outlive it.
            for edge in edges:
                edge.start()
                edge.add_nodes(default_fleet(edge.name))
            result["control_planes_up_s"] = round(time.monotonic() - started, 1)
            hub.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
            hub.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
            hub.kubectl("create", "namespace", "edgetune-system")
            hub.kubectl("create", "namespace", "bench")
            s3.create_bucket("adapters")
            operator = OperatorProcess(hub, root, {
                "KUBECONFIG": str(hub.user_kubeconfig(USER, ("system:masters",))),
                "EDGETUNE_TRAINER_LABELS": "{}", "EDGETUNE_RESYNC_SECONDS": "10",
                "EDGETUNE_S3_ENDPOINT": s3.endpoint, **{k: v for k, v in s3.env().items() if k.startswith("AWS_")},
            }, "edgetune/trainer:bench")  # fmt: skip
            with operator:
                if operator.proc is None:
                    raise RuntimeError("the operator did not start")
                pid = operator.proc.pid
                time.sleep(10)
                result["operator_cpu_ms_per_s_idle_0"], result["operator_rss_mb_idle_0"] = idle(pid, args.idle_seconds)
                for edge in edges:
                    kubeconfig = edge.user_kubeconfig(USER, ("system:masters",))
                    hub.kubectl("-n", "edgetune-system", "create", "secret", "generic", f"{edge.name}-kubeconfig",
                                f"--from-file=kubeconfig={kubeconfig}")  # fmt: skip
                    hub.kubectl("apply", "-f", "-", input_text=json.dumps({
                        "apiVersion": "edgetune.io/v1alpha1", "kind": "EdgeCluster",
                        "metadata": {"name": edge.name, "labels": {"fleet": "bench"}},
                        "spec": {"kubeconfigSecretRef": {"name": f"{edge.name}-kubeconfig",
                                                         "namespace": "edgetune-system"}, "heartbeatInterval": "10s"},
                    }))  # fmt: skip
                custom = k8s.CustomObjectsApi(hub.api_client())

                def reachable() -> bool:
                    items = custom.list_cluster_custom_object("edgetune.io", "v1alpha1", "edgeclusters")["items"]
                    return sum(1 for i in items if (i.get("status") or {}).get("reachable")) == n

                wait_for("every edge cluster reachable", reachable, 120)
                time.sleep(10)
                since = time.time()
                cpu, rss = idle(pid, args.idle_seconds)
                until = time.time()
                result[f"operator_cpu_ms_per_s_idle_{n}"], result[f"operator_rss_mb_idle_{n}"] = cpu, rss
                per = [requests(e, since, until) for e in edges]
                minutes = (until - since) / 60
                result["edge_requests_per_cluster_per_min_idle"] = round(
                    statistics.mean(c for c, _ in per) / minutes, 2
                )

                # One job, one trainer on a CPU node of every cluster.
                since = time.time()
                custom.create_namespaced_custom_object("edgetune.io", "v1alpha1", "bench", "edgetrainingjobs", {
                    "apiVersion": "edgetune.io/v1alpha1", "kind": "EdgeTrainingJob", "metadata": {"name": "spread"},
                    "spec": {
                        "baseModel": {"uri": "builtin:timeseries-cnn"},
                        "data": {"source": {"hostPath": "/var/lib/edgetune/data"}, "format": "npy"},
                        "budgets": {"memory": "1Gi"},
                        "placement": {"accelerator": "cpu", "clusterSelector": {"matchLabels": {"fleet": "bench"}}},
                        "output": {"s3": {"bucket": "adapters"}, "mlflow": {"registeredModel": "bench"}},
                    },
                })  # fmt: skip
                created = time.monotonic()
                marks: dict[str, float] = {}
                lock = threading.Lock()

                def follow(edge: ControlPlane) -> None:
                    core = k8s.CoreV1Api(edge.api_client())
                    while time.monotonic() - created < 300:
                        pods = core.list_namespaced_pod("bench").items if _has_ns(core) else []
                        now = time.monotonic() - created
                        with lock:
                            if pods:
                                marks.setdefault(f"{edge.name}/created", now)
                            if any(p.spec.node_name for p in pods):
                                marks[f"{edge.name}/bound"] = now
                                return
                        time.sleep(0.2)

                with ThreadPoolExecutor(n) as pool:
                    list(pool.map(follow, edges))
                result["all_trainers_created_s"] = round(max(v for k, v in marks.items() if k.endswith("/created")), 1)
                result["all_trainers_bound_s"] = round(max(v for k, v in marks.items() if k.endswith("/bound")), 1)

                def terminal() -> bool:
                    job = custom.get_namespaced_custom_object("edgetune.io", "v1alpha1", "bench", "edgetrainingjobs",
                                                              "spread")  # fmt: skip
                    return (job.get("status") or {}).get("phase") in ("Succeeded", "Failed")

                wait_for("the job to finish", terminal, 300)
                result["job_terminal_s"] = round(time.monotonic() - created, 1)
                time.sleep(5)
                until = time.time()
                heartbeats = result["edge_requests_per_cluster_per_min_idle"] * (until - since) / 60
                per = [requests(e, since, until) for e in edges]
                result["edge_requests_per_cluster_job"] = round(statistics.mean(c for c, _ in per) - heartbeats, 1)
                result["watches_per_cluster"] = round(statistics.mean(w for _, w in per), 1)
                result["hub_requests_job"] = requests(hub, since, until)[0]
                result["operator_peak_rss_mb"] = round(memory_mb(pid, "VmHWM"), 1)
        finally:
            for plane in (*edges, hub, s3):
                plane.stop()
    per_cluster_cpu = (result[f"operator_cpu_ms_per_s_idle_{n}"] - result["operator_cpu_ms_per_s_idle_0"]) / n
    result["operator_cpu_ms_per_s_per_cluster"] = round(per_cluster_cpu, 2)
    result["operator_rss_mb_per_cluster"] = round(
        (result[f"operator_rss_mb_idle_{n}"] - result["operator_rss_mb_idle_0"]) / n, 2
    )
    print(json.dumps(result), flush=True)


def _has_ns(core: Any) -> bool:
    try:
        core.read_namespace("bench")
    except k8s.ApiException:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
