"""Benchmark the local test environment: warm start of a control plane and of the servers.

Run with ``.venv/bin/python bench/bench_testenv.py [--runs N] [--cold]``. Prints one JSON line.
``--smoke``: one run, no spread (checks the script).

- ``control_plane_to_kubectl_s``: ``ControlPlane.start()`` (etcd, apiserver, controller-manager,
  scheduler, kwok; certificates generated) until the first successful ``kubectl get nodes``,
  binaries already cached; median of ``--runs``.
- ``nodes_ready_s``: the default 6-node fleet created and Ready after that.
- ``s3_s``, ``mlflow_s``, ``prometheus_s``: each server from launch to healthy.
- ``--scale-nodes N``: also create N simulated nodes (1:1:2 GPU/NPU/CPU) in one control plane and
  time until all are Ready (``scale_nodes_ready_s``).
- ``--cold``: also time building every binary into an empty cache (``XDG_CACHE_HOME``, ``GOCACHE``
  and ``GOMODCACHE`` in a temp dir, so modules are downloaded and compiled from scratch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from edgetune_testenv import binaries
from edgetune_testenv.cluster import ControlPlane
from edgetune_testenv.nodes import default_fleet, scale_fleet
from edgetune_testenv.servers import MlflowServer, Prometheus, S3Server


def _cold_build_s() -> float:
    with tempfile.TemporaryDirectory(prefix="edgetune-cold-") as tmp:
        env = {
            **os.environ,
            "XDG_CACHE_HOME": f"{tmp}/cache",
            "GOCACHE": f"{tmp}/gocache",
            "GOMODCACHE": f"{tmp}/gomod",
            "GOPATH": f"{tmp}/gopath",
        }
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "edgetune_testenv", "binaries"], env=env, check=True)
        elapsed = time.monotonic() - started
        subprocess.run(["chmod", "-R", "u+w", tmp], check=False)  # the module cache is read-only
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3, help="control planes started one after another (default 3)")
    parser.add_argument("--cold", action="store_true", help="also measure a from-scratch build")
    parser.add_argument("--scale-nodes", type=int, default=0, help="also time N nodes becoming Ready")
    parser.add_argument("--smoke", action="store_true", help="one run: checks the script")
    args = parser.parse_args()
    if args.smoke:
        args.runs, args.cold, args.scale_nodes = 1, False, 0

    result: dict[str, float | int | str | bool] = {"machine_cores": os.cpu_count() or 0, "smoke": args.smoke}
    if args.cold:
        result["cold_build_s"] = round(_cold_build_s(), 1)
    binaries.ensure_all()  # warm cache for what follows

    starts, nodes = [], []
    for i in range(args.runs):
        t0 = time.monotonic()
        with ControlPlane(f"bench-{i}") as plane:
            plane.kubectl("get", "nodes")
            starts.append(time.monotonic() - t0)
            t1 = time.monotonic()
            plane.add_nodes(default_fleet())
            nodes.append(time.monotonic() - t1)
    result["control_plane_to_kubectl_s"] = round(statistics.median(starts), 2)
    if args.scale_nodes:
        with ControlPlane("bench-scale") as plane:
            t0 = time.monotonic()
            plane.add_nodes(scale_fleet(args.scale_nodes), timeout=600)
            result["scale_nodes"] = args.scale_nodes
            result["scale_nodes_ready_s"] = round(time.monotonic() - t0, 1)
    result["nodes_ready_s"] = round(statistics.median(nodes), 2)

    t0 = time.monotonic()
    with S3Server() as s3:
        result["s3_s"] = round(time.monotonic() - t0, 2)
        t1 = time.monotonic()
        with MlflowServer(s3):
            result["mlflow_s"] = round(time.monotonic() - t1, 2)
    t0 = time.monotonic()
    with Prometheus():
        result["prometheus_s"] = round(time.monotonic() - t0, 2)
    result["kubernetes"] = binaries.KUBERNETES_VERSION
    print(json.dumps(result))


if __name__ == "__main__":
    main()
