"""The operator end to end: a user applies an EdgeTrainingJob on the hub; trainers run for real on
simulated edge nodes (through the pod executor); the operator verifies the packages in S3 (a real
S3 server), registers them in a real MLflow, and reports everything in status, Events and
Prometheus."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client as k8s

from edgetune_testenv.cluster import ControlPlane
from edgetune_testenv.executor import PodExecutor
from edgetune_testenv.operator_proc import OperatorProcess
from edgetune_testenv.servers import MlflowServer, Prometheus, S3Server
from tests.operator_support import DATA, condition, create, events, job_manifest, s3_secret, wait_finished
from tests.support import eventually, new_namespace
from tests.trainer_support import sine_classes

pytestmark = pytest.mark.e2e


def mlflow_versions(mlflow_server: MlflowServer, model: str) -> list[dict[str, Any]]:
    import httpx  # noqa: PLC0415

    response = httpx.get(f"{mlflow_server.url}/api/2.0/mlflow/model-versions/search",
                         params={"filter": f"name = '{model}'"}, timeout=10)  # fmt: skip
    response.raise_for_status()
    return list(response.json().get("model_versions") or [])


def test_gpu_job_trains_on_gpu_nodes_of_the_selected_edge_clusters(
    operator_proc: OperatorProcess, hub_crds: ControlPlane, fleet: dict[str, ControlPlane],
    edge_a_executor: PodExecutor, edge_b_executor: PodExecutor, s3: S3Server, mlflow_server: MlflowServer,
    prometheus: Prometheus,
) -> None:  # fmt: skip
    for executor, prefix in ((edge_a_executor, "factory"), (edge_b_executor, "farm")):
        for i in range(2):
            sine_classes(executor.node_root(f"{prefix}-gpu-{i}") / DATA.lstrip("/"), n=120)
    api = hub_crds.api_client()
    core = k8s.CoreV1Api(api)
    ns = new_namespace(core)
    s3_secret(core, ns, s3.env())
    manifest = job_manifest("gpu-lora", placement={"accelerator": "gpu", "clusterSelector": {
        "matchLabels": {"region": "eu"}}})  # fmt: skip
    create(api, ns, manifest)

    job = wait_finished(api, ns, "gpu-lora")
    status = job["status"]
    assert status["phase"] == "Succeeded", (status, operator_proc.log_tail())
    assert condition(job, "Succeeded")["status"] == "True"
    assert status["progress"] == "2/2"
    assert {t["cluster"] for t in status["targets"]} == {"edge-a", "edge-b"}
    for target in status["targets"]:
        assert target["node"].split("-")[1] == "gpu", target  # factory-gpu-N / farm-gpu-N
        assert target["sha256"] and target["mlflowVersion"] and target["step"] == 4
    # Trainer Jobs exist on the edges only, never on the hub.
    assert not k8s.BatchV1Api(api).list_namespaced_job(ns).items
    for plane in fleet.values():
        edge_api = plane.api_client()
        pods = k8s.CoreV1Api(edge_api).list_namespaced_pod(ns).items
        assert pods and all(p.spec.node_name.split("-")[1] == "gpu" for p in pods)
        edge_api.close()
    # MLflow: one version per cluster, with lineage tags and the S3 package as source.
    versions = mlflow_versions(mlflow_server, "gpu-lora-adapter")
    assert len(versions) == 2
    for version in versions:
        tags = {t["key"]: t["value"] for t in version.get("tags") or []}
        assert tags["edgetune.job"] == "gpu-lora" and tags["edgetune.namespace"] == ns
        assert tags["edgetune.cluster"] in ("edge-a", "edge-b")
        assert tags["edgetune.nodes"].split("-")[1] == "gpu"
        assert len(tags["edgetune.data_sha256"]) == 64 and tags["edgetune.trainer_version"]
        assert version["source"].startswith(f"s3://adapters/edgetune/{ns}/gpu-lora/")
        assert version["source"] == tags["edgetune.delta_uri"]
    reasons = {r for _, r, _ in events(hub_crds, ns, "gpu-lora")}
    assert {"DataSufficient", "Scheduled", "Verified", "Registered", "Succeeded"} <= reasons
    # Trainer metrics reached Prometheus (pushed), operator metrics are scraped.
    for metric in ("edgetune_trainer_loss", "edgetune_trainer_peak_memory_bytes", "edgetune_trainer_energy_joules"):
        eventually(lambda m=metric: prometheus.query(f'{m}{{namespace="{ns}"}}'), timeout=60, what=metric)
    eventually(lambda: prometheus.query('edgetune_operator_reconciles_total{kind="EdgeTrainingJob"}'), timeout=60,
               what="operator metrics in Prometheus")  # fmt: skip
    api.close()
