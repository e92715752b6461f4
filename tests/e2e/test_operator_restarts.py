"""The operator is killed (SIGKILL) at random moments while ten jobs train, verify and register:
each job still ends Succeeded with exactly one MLflow registration (one run, one model version)."""

from __future__ import annotations

import os
import random
import time

import httpx
import pytest
from kubernetes import client as k8s

from edgetune_testenv.cluster import ControlPlane
from edgetune_testenv.executor import PodExecutor
from edgetune_testenv.operator_proc import OperatorProcess
from edgetune_testenv.servers import MlflowServer, S3Server
from tests.operator_support import DATA, create, get, job_manifest, s3_secret
from tests.trainer_support import sine_classes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

JOBS = 10
WAVE = 5  # trainers at once: each is a Python process with torch (~1 GB)


def test_jobs_survive_random_operator_kills_with_exactly_one_registration(
    operator_proc: OperatorProcess, hub_crds: ControlPlane, hub_executor: PodExecutor, s3: S3Server,
    mlflow_server: MlflowServer,
) -> None:  # fmt: skip
    seed = int(os.environ.get("EDGETUNE_KILL_SEED", time.time()))
    rng = random.Random(seed)
    for node in ("op-cpu-0", "op-cpu-1", "op-gpu-0", "op-gpu-1", "op-npu-0", "op-npu-1"):
        sine_classes(hub_executor.node_root(node) / DATA.lstrip("/"), n=120)
    api = hub_crds.api_client()
    core = k8s.CoreV1Api(api)
    ns = f"kill-{seed % 100000}"
    core.create_namespace({"metadata": {"name": ns}})
    time.sleep(1)
    s3_secret(core, ns, s3.env())
    names = [f"k{i}" for i in range(JOBS)]
    kills = 0
    for wave in range(0, JOBS, WAVE):
        for name in names[wave : wave + WAVE]:
            create(api, ns, job_manifest(name, placement={"accelerator": "any"}))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            phases = [(get(api, ns, n).get("status") or {}).get("phase") for n in names[wave : wave + WAVE]]
            if all(p in ("Succeeded", "Failed") for p in phases):
                break
            time.sleep(rng.uniform(0.2, 4.0))
            operator_proc.kill()
            kills += 1
            operator_proc.start()
    assert kills >= 10, f"only {kills} kills (seed {seed})"
    for name in names:
        status = get(api, ns, name)["status"]
        assert status["phase"] == "Succeeded", (name, seed, status)
        versions = httpx.get(
            f"{mlflow_server.url}/api/2.0/mlflow/model-versions/search",
            params={"filter": f"name = '{name}-adapter'"},
            timeout=10,
        ).json()["model_versions"]
        assert len(versions) == 1, (name, seed, versions)  # exactly one registration
        runs = httpx.post(
            f"{mlflow_server.url}/api/2.0/mlflow/runs/search",
            timeout=10,
            json={
                "experiment_ids": [versions[0]["run_id"] and _experiment(mlflow_server)],
                "filter": f"tags.`edgetune.job` = '{name}' and tags.`edgetune.namespace` = '{ns}'",
            },
        ).json()["runs"]
        assert len(runs) == 1 and runs[0]["info"]["run_id"] == versions[0]["run_id"], (name, seed)
        assert status["result"]["mlflowVersion"] == versions[0]["version"]
    api.close()


def _experiment(mlflow_server: MlflowServer) -> str:
    response = httpx.get(f"{mlflow_server.url}/api/2.0/mlflow/experiments/get-by-name",
                         params={"experiment_name": "edgetune"}, timeout=10)  # fmt: skip
    return str(response.json()["experiment"]["experiment_id"])
