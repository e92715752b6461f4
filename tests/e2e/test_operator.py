"""The operator end to end: a user applies an EdgeTrainingJob on the hub; trainers run for real on
simulated edge nodes (through the pod executor); the operator verifies the packages in S3 (a real
S3 server), registers them in a real MLflow, and reports everything in status, Events and
Prometheus."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import urllib3
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from kubernetes import client as k8s

from edgetune_api.delta import DeltaVerificationError, verify_signature
from edgetune_api.trainer_config import PROGRESS_ANNOTATION, TrainerProgress
from edgetune_testenv.cluster import ControlPlane
from edgetune_testenv.executor import PodExecutor
from edgetune_testenv.faults import SlowProxy, Throttle
from edgetune_testenv.operator_proc import OperatorProcess
from edgetune_testenv.servers import MlflowServer, Prometheus, S3Server
from tests.operator_support import (
    DATA,
    condition,
    create,
    dead_kubeconfig,
    events,
    get,
    job_manifest,
    point_kubeconfig,
    restore_kubeconfig,
    s3_secret,
    wait_finished,
    wait_unreachable,
)
from tests.support import eventually, new_namespace
from tests.trainer_support import sine_classes

pytestmark = pytest.mark.e2e


@dataclass
class Tenant:
    """A fresh namespace on the hub with the S3 credentials Secret jobs name."""

    api: Any
    core: Any
    namespace: str


@pytest.fixture
def tenant(hub_crds: ControlPlane, s3: S3Server) -> Iterator[Tenant]:
    api = hub_crds.api_client()
    core = k8s.CoreV1Api(api)
    ns = new_namespace(core, prefix="op")  # the test operator serves op-* namespaces only
    s3_secret(core, ns, s3.env())
    yield Tenant(api, core, ns)
    api.close()


def mlflow_versions(mlflow_server: MlflowServer, model: str) -> list[dict[str, Any]]:
    import httpx  # noqa: PLC0415

    response = httpx.get(f"{mlflow_server.url}/api/2.0/mlflow/model-versions/search",
                         params={"filter": f"name = '{model}'"}, timeout=10)  # fmt: skip
    response.raise_for_status()
    return list(response.json().get("model_versions") or [])


def test_gpu_job_trains_on_gpu_nodes_of_the_selected_edge_clusters(
    operator_proc: OperatorProcess, tenant: Tenant, hub_crds: ControlPlane, fleet: dict[str, ControlPlane],
    edge_a_executor: PodExecutor, edge_b_executor: PodExecutor, s3: S3Server, mlflow_server: MlflowServer,
    prometheus: Prometheus,
) -> None:  # fmt: skip
    for executor, prefix in ((edge_a_executor, "factory"), (edge_b_executor, "farm")):
        for i in range(2):
            sine_classes(executor.node_root(f"{prefix}-gpu-{i}") / DATA.lstrip("/"), n=120)
    api, ns = tenant.api, tenant.namespace
    hub_key = Ed25519PrivateKey.generate()
    hub_pem = hub_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())  # fmt: skip
    tenant.core.create_namespaced_secret(ns, {"metadata": {"name": "adapter-signing"},
                                              "data": {"key.pem": base64.b64encode(hub_pem).decode()}})  # fmt: skip
    manifest = job_manifest("gpu-lora", placement={"accelerator": "gpu", "allowCpuFallback": True, "clusterSelector": {
        "matchLabels": {"region": "eu"}}})  # fmt: skip
    manifest["spec"]["output"]["signingKeySecretRef"] = {"name": "adapter-signing", "key": "key.pem"}
    create(api, ns, manifest)
    # While a trainer runs, its cluster holds exactly one Secret for it, and nothing in it could
    # sign or upload for anyone else: no S3 keys, not the hub key, a POST policy for its own prefix.
    edge_core = k8s.CoreV1Api(fleet["edge-a"].api_client())
    try:
        # 120 s: the module's first job meets an operator that has just started (twice in CI the
        # Secret took longer than 60 s after test_lifecycle, never here); the failure now shows why.
        # 180 s: the operator's audit takes up a job its watch never delivered within 60-120 s.
        secrets = eventually(lambda: edge_core.list_namespaced_secret(ns).items, timeout=180,
                             what="the trainer's Secret on edge-a")  # fmt: skip
    except AssertionError as exc:
        seen = k8s.CustomObjectsApi(api)
        job = seen.get_namespaced_custom_object("edgetune.io", "v1alpha1", ns, "edgetrainingjobs", "gpu-lora")
        clusters = seen.list_cluster_custom_object("edgetune.io", "v1alpha1", "edgeclusters")["items"]
        raise AssertionError(f"{exc}\njob finalizers: {job['metadata'].get('finalizers')}, resourceVersion "
                             f"{job['metadata'].get('resourceVersion')}\njob status: "
                             f"{json.dumps(job.get('status'))[:3000]}\nclusters: "
                             f"{json.dumps([(c['metadata']['name'], c.get('status')) for c in clusters])[:2000]}"
                             ) from None
    assert len(secrets) == 1
    data = {k: base64.b64decode(v) for k, v in secrets[0].data.items()}
    assert set(data) == {"upload.json", "key.pem", "config.json"}  # its configuration travels in it too
    assert not any(tenant_key in blob for blob in data.values() for tenant_key in (
        s3.env()["AWS_SECRET_ACCESS_KEY"].encode(), hub_pem))  # fmt: skip
    trainer_key = serialization.load_pem_private_key(data["key.pem"], password=None)
    assert trainer_key.public_key().public_bytes_raw() != hub_key.public_key().public_bytes_raw()
    policy = json.loads(data["upload.json"])
    conditions = json.loads(base64.b64decode(policy["fields"]["policy"]))["conditions"]
    own_prefix = f"edgetune/{ns}/gpu-lora/edge-a/any"
    assert policy["prefix"] == own_prefix and ["starts-with", "$key", own_prefix + "/"] in conditions
    # and the S3 server holds it to that: the same policy cannot write next to another trainer's package.
    elsewhere = urllib3.request(
        "POST",
        policy["url"],
        fields={**policy["fields"], "key": f"edgetune/{ns}/gpu-lora/edge-b/any/manifest.json", "file": ("x", b"{}")},
    )
    assert elsewhere.status == 403, elsewhere.data

    job = wait_finished(api, ns, "gpu-lora")
    status = job["status"]
    assert status["phase"] == "Succeeded", ([(t["cluster"], t.get("message")) for t in status["targets"]],
                                            [c for c in status["conditions"] if c["status"] == "False"])  # fmt: skip
    assert condition(job, "Succeeded")["status"] == "True"
    assert status["progress"] == "2/2"
    assert {t["cluster"] for t in status["targets"]} == {"edge-a", "edge-b"}
    for target in status["targets"]:
        assert target["node"].split("-")[1] == "gpu", target  # factory-gpu-N / farm-gpu-N
        assert target["sha256"] and target["mlflowVersion"] and target["step"] == 4
        assert target["device"] == "cpu" and target["energyMethod"], target  # kwok's GPU nodes: never silently
    accelerated = condition(job, "Accelerated")
    assert accelerated["status"] == "False" and accelerated["reason"] == "CpuFallback", accelerated
    assert status["devices"] == "cpu" and status["energy"].endswith(")"), status  # e.g. "41 J (estimate)"
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
        assert tags["edgetune.cluster"] in ("edge-a", "edge-b") and tags["edgetune.device"] == "cpu"
        assert tags["edgetune.nodes"].split("-")[1] == "gpu"
        assert len(tags["edgetune.data_sha256"]) == 64 and tags["edgetune.trainer_version"]
        assert version["source"].startswith(f"s3://adapters/edgetune/{ns}/gpu-lora/")
        assert version["source"] == tags["edgetune.delta_uri"]
    reasons = {r for _, r, _ in events(hub_crds, ns, "gpu-lora")}
    assert {"Scheduled", "Verified", "Registered", "Succeeded", "CpuFallback"} <= reasons
    # What agents load is counter-signed by the hub key; the trainer's own signature is not the hub's.
    client = s3.client()
    for target in status["targets"]:
        bucket, _, prefix = target["deltaUri"].removeprefix("s3://").partition("/")
        files = {name: client.get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read()
                 for name in ("manifest.json", "manifest.sig", "trainer.sig")}  # fmt: skip
        hub_public = hub_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)  # fmt: skip
        verify_signature(files["manifest.json"], files["manifest.sig"], hub_public)  # raises when it does not
        with pytest.raises(DeltaVerificationError):
            verify_signature(files["manifest.json"], files["trainer.sig"], hub_public)
    # Verified trainers' Secrets are gone from the edges at once.
    for plane in fleet.values():
        edge_api = plane.api_client()
        assert not k8s.CoreV1Api(edge_api).list_namespaced_secret(ns).items
        edge_api.close()
    # Trainer metrics reached Prometheus (pushed), operator metrics are scraped.
    for metric in ("edgetune_trainer_loss", "edgetune_trainer_peak_memory_bytes", "edgetune_trainer_energy_joules"):
        eventually(lambda m=metric: prometheus.query(f'{m}{{namespace="{ns}"}}'), timeout=60, what=metric)
    eventually(lambda: prometheus.query('edgetune_operator_reconciles_total{kind="EdgeTrainingJob"}'), timeout=60,
               what="operator metrics in Prometheus")  # fmt: skip


def _hub_data(executor: PodExecutor, *nodes: str, n: int = 120) -> None:
    for node in nodes:
        sine_classes(executor.node_root(node) / DATA.lstrip("/"), n=n)


def test_npu_per_node_job_is_averaged_into_one_adapter(
    operator_proc: OperatorProcess, tenant: Tenant, hub_crds: ControlPlane, hub_executor: PodExecutor, s3: S3Server,
    mlflow_server: MlflowServer,
) -> None:  # fmt: skip
    _hub_data(hub_executor, "op-npu-0", "op-npu-1")
    api, core, ns = tenant.api, tenant.core, tenant.namespace
    create(api, ns, job_manifest("npu-fed", placement={"accelerator": "npu", "allowCpuFallback": True, "perNode": True},
                                 baseModel={"uri": "builtin:timeseries-cnn", "revision": "sensor-cnn@r7"},
                                 aggregation={"strategy": "fedavg", "minParticipants": 2}))  # fmt: skip
    job = wait_finished(api, ns, "npu-fed")
    status = job["status"]
    assert status["phase"] == "Succeeded", (status, operator_proc.log_tail())
    assert sorted(t["node"] for t in status["targets"]) == ["op-npu-0", "op-npu-1"]
    assert all(t["sha256"] and t["deltaUri"] for t in status["targets"])  # per-node adapters recorded
    result = status["result"]
    assert result["participants"] == 2 and result["deltaUri"].endswith("/npu-fed/fedavg")
    assert result["baseModelRevision"] == "sensor-cnn@r7"  # lineage: status, manifest, MLflow tag
    assert all(t["device"] == "cpu" for t in status["targets"])  # no NPU backend: the fallback it allowed
    pods = core.list_namespaced_pod(ns).items
    assert sorted(p.spec.node_name for p in pods) == ["op-npu-0", "op-npu-1"]
    assert all(p.spec.containers[0].resources.limits["rockchip.com/npu"] == "1" for p in pods)
    versions = mlflow_versions(mlflow_server, "npu-fed-adapter")
    assert len(versions) == 1  # one aggregated adapter, not one per node
    tags = {t["key"]: t["value"] for t in versions[0]["tags"]}
    assert tags["edgetune.aggregation"] == "fedavg" and tags["edgetune.nodes"] == "op-npu-0,op-npu-1"
    assert tags["edgetune.delta_sha256"] == result["sha256"]
    assert tags["edgetune.base_model_revision"] == "sensor-cnn@r7" and tags["edgetune.device"] == "cpu"


def test_a_tampered_package_is_refused_and_never_registered(
    operator_proc: OperatorProcess, tenant: Tenant, hub_crds: ControlPlane, hub_executor: PodExecutor, s3: S3Server,
    mlflow_server: MlflowServer,
) -> None:  # fmt: skip
    _hub_data(hub_executor, "op-gpu-0", "op-gpu-1")
    api, core, ns = tenant.api, tenant.core, tenant.namespace
    create(api, ns, job_manifest("tamper", output={
        "s3": {"bucket": "adapters", "credentialsSecretRef": "s3-credentials"},
        "mlflow": {"registeredModel": "tamper-adapter"}, "encoding": "fp16"}))  # fmt: skip
    # Stop the operator once the trainer runs; the trainer finishes and uploads on its own.
    eventually(lambda: [p for p in core.list_namespaced_pod(ns).items if p.status.phase == "Running"],
               timeout=120, what="the trainer pod to run")  # fmt: skip
    operator_proc.stop()
    try:
        client = s3.client()
        prefix = f"edgetune/{ns}/tamper/local/any/"
        key = prefix + "adapter.safetensors"
        eventually(lambda: client.list_objects_v2(Bucket="adapters", Prefix=key).get("KeyCount"), timeout=180,
                   what="the package in S3")  # fmt: skip
        eventually(lambda: client.list_objects_v2(Bucket="adapters", Prefix=prefix + "manifest.json").get("KeyCount"),
                   timeout=60, what="the manifest in S3")  # fmt: skip
        body = bytearray(client.get_object(Bucket="adapters", Key=key)["Body"].read())
        body[-1] ^= 0x01  # one bit in the last weight
        client.put_object(Bucket="adapters", Key=key, Body=bytes(body))
    finally:
        operator_proc.start()
    job = wait_finished(api, ns, "tamper")
    assert job["status"]["phase"] == "Failed", job["status"]
    verified = condition(job, "Verified")
    assert verified["status"] == "False" and verified["reason"] == "VerificationFailed"
    assert "adapter.safetensors has SHA-256" in verified["message"]
    assert condition(job, "Failed")["status"] == "True"
    assert ("Warning", "VerificationFailed") in {(t, r) for t, r, _ in events(hub_crds, ns, "tamper")}
    assert mlflow_versions(mlflow_server, "tamper-adapter") == []


def test_a_job_waits_for_data_then_starts_by_itself(
    operator_proc: OperatorProcess, tenant: Tenant, hub_crds: ControlPlane, hub_executor: PodExecutor, s3: S3Server,
) -> None:  # fmt: skip
    _hub_data(hub_executor, "op-cpu-0", "op-cpu-1")
    api, core, ns = tenant.api, tenant.core, tenant.namespace
    for node in ("op-cpu-0", "op-cpu-1"):
        hub_crds.kubectl("annotate", "--overwrite", "node", node, f'edgetune.io/samples={{"{DATA}": 40}}')
    manifest = job_manifest("wait-data", placement={"accelerator": "cpu"})
    manifest["spec"]["data"]["minSamples"] = 100
    create(api, ns, manifest)

    def waiting() -> dict[str, Any] | None:
        obj = get(api, ns, "wait-data")
        return obj if (obj.get("status") or {}).get("phase") == "WaitingForData" else None

    job = eventually(waiting, timeout=60, what="phase WaitingForData")
    sufficient = condition(job, "DataSufficient")
    assert sufficient["status"] == "False" and "op-cpu-0 has 40" in sufficient["message"]
    assert not k8s.BatchV1Api(api).list_namespaced_job(ns).items  # nothing started
    hub_crds.kubectl("annotate", "--overwrite", "node", "op-cpu-1", f'edgetune.io/samples={{"{DATA}": 120}}')
    job = wait_finished(api, ns, "wait-data")
    assert job["status"]["phase"] == "Succeeded", job["status"]
    assert [p.spec.node_name for p in core.list_namespaced_pod(ns).items] == ["op-cpu-1"]


def test_a_paused_edge_cluster_gets_no_trainer_until_it_is_resumed(
    operator_proc: OperatorProcess, tenant: Tenant, hub_crds: ControlPlane, fleet: dict[str, ControlPlane],
    edge_a_executor: PodExecutor, edge_b_executor: PodExecutor,
) -> None:  # fmt: skip
    _hub_data(edge_a_executor, "factory-gpu-0", "factory-gpu-1")
    _hub_data(edge_b_executor, "farm-gpu-0", "farm-gpu-1")
    api, ns = tenant.api, tenant.namespace
    edge_clusters = k8s.CustomObjectsApi(hub_crds.api_client())
    edge_clusters.patch_cluster_custom_object("edgetune.io", "v1alpha1", "edgeclusters", "edge-b",
                                              {"spec": {"paused": True}})  # fmt: skip
    try:
        paused = hub_crds.kubectl("get", "edgecluster", "edge-b").stdout
        assert "PAUSED" in paused.splitlines()[0] and "true" in paused.splitlines()[1], paused
        create(api, ns, job_manifest("paused-site", placement={"accelerator": "gpu", "allowCpuFallback": True,
                                                               "clusterSelector": {"matchLabels": {"region": "eu"}}}))
        job = eventually(lambda: (j := get(api, ns, "paused-site")) and {t["cluster"]: t["phase"] for t in (
            j.get("status") or {}).get("targets") or []}.get("edge-a") in ("Packaging", "Succeeded") and j,
            timeout=180, what="edge-a's trainer done while edge-b is paused")  # fmt: skip
        held = next(t for t in job["status"]["targets"] if t["cluster"] == "edge-b")
        assert held["phase"] == "Pending" and held["message"].startswith("ClusterPaused"), held
        scheduled = condition(job, "Scheduled")
        assert scheduled["reason"] == "ClusterPaused" and "edge-b" in scheduled["message"], scheduled
        assert job["status"]["phase"] != "Succeeded"  # it waits for edge-b
        edge_b = k8s.BatchV1Api(fleet["edge-b"].api_client())
        assert not edge_b.list_namespaced_job(ns).items  # nothing was started there
    finally:
        edge_clusters.patch_cluster_custom_object("edgetune.io", "v1alpha1", "edgeclusters", "edge-b",
                                                  {"spec": {"paused": False}})  # fmt: skip
    job = wait_finished(api, ns, "paused-site")
    assert job["status"]["phase"] == "Succeeded" and job["status"]["progress"] == "2/2", job["status"]


def test_an_unreachable_edge_cluster_fails_its_part_and_the_rest_finishes(
    operator_proc: OperatorProcess, tenant: Tenant, hub_crds: ControlPlane, fleet: dict[str, ControlPlane],
    edge_a_executor: PodExecutor, edge_b_executor: PodExecutor, s3: S3Server,
) -> None:  # fmt: skip
    _hub_data(edge_a_executor, "factory-gpu-0", "factory-gpu-1")
    _hub_data(edge_b_executor, "farm-gpu-0", "farm-gpu-1")
    api, ns = tenant.api, tenant.namespace
    manifest = job_manifest("partial", placement={"accelerator": "gpu", "allowCpuFallback": True, "clusterSelector": {
        "matchLabels": {"region": "eu"}}})  # fmt: skip
    manifest["spec"]["training"]["maxSteps"] = 40  # long enough to cut edge-b off mid-job
    create(api, ns, manifest)
    eventually(lambda: len([t for t in (get(api, ns, "partial").get("status") or {}).get("targets") or []
                            if t["phase"] == "Training"]) == 2, timeout=120, what="both trainers running")  # fmt: skip
    # Cut edge-b off: its kubeconfig now points at a port where nothing listens.
    saved = point_kubeconfig(hub_crds, "edge-b", dead_kubeconfig(fleet["edge-b"]))
    try:
        job = wait_finished(api, ns, "partial", timeout=300)
    finally:
        restore_kubeconfig(hub_crds, "edge-b", saved)
    status = job["status"]
    assert status["phase"] == "Succeeded", status
    by_cluster = {t["cluster"]: t for t in status["targets"]}
    assert by_cluster["edge-a"]["phase"] == "Succeeded"
    assert by_cluster["edge-b"]["phase"] == "Failed"
    assert by_cluster["edge-b"]["message"].startswith("ClusterUnreachable")
    succeeded = condition(job, "Succeeded")
    assert succeeded["reason"] == "PartiallySucceeded" and "edge-b" in succeeded["message"]
    assert condition(job, "ClustersReachable")["status"] == "False"


def test_bad_references_are_reported_on_the_job(
    operator_proc: OperatorProcess, tenant: Tenant, hub_crds: ControlPlane, s3: S3Server, hub_executor: PodExecutor,
) -> None:  # fmt: skip
    api, ns = tenant.api, tenant.namespace
    hub_crds.kubectl("apply", "-f", "-", input_text=json.dumps({
        "apiVersion": "edgetune.io/v1alpha1", "kind": "EdgeCluster",
        "metadata": {"name": "shop-7", "labels": {"site": "shop-7"}},
        "spec": {"kubeconfigSecretRef": {"name": "shop-7-kubeconfig", "namespace": "edgetune-system"}},
    }))  # fmt: skip
    create(api, ns, job_manifest("nowhere", placement={"clusterSelector": {"matchLabels": {"site": "moon"}}}))
    create(api, ns, job_manifest("no-secret", placement={"clusterSelector": {"matchLabels": {"site": "shop-7"}}}))
    create(api, ns, job_manifest("no-model", baseModel={"uri": "s3://adapters/no/such/model.safetensors",
                                                       "sha256": "0" * 64}))  # fmt: skip

    def message(name: str, kind: str, needle: str) -> dict[str, Any] | None:
        cond = condition(get(api, ns, name), kind)
        return cond if cond and needle in cond["message"] else None

    eventually(lambda: message("nowhere", "DataSufficient", "no EdgeCluster matches"), what="no matching cluster")
    cond = eventually(lambda: message("no-secret", "ClustersReachable", "shop-7-kubeconfig"), what="missing Secret")
    assert cond["status"] == "False"
    edge = eventually(lambda: (json.loads(hub_crds.kubectl("get", "edgecluster", "shop-7", "-o", "json").stdout)
                               .get("status") or {}).get("reachable") is False, what="shop-7 unreachable")  # fmt: skip
    assert edge
    # A base model that is not there is found on the hub, before any trainer starts: the operator
    # presigns the base model's objects for the trainers and finds none. Retried (it may be uploaded).
    cond = eventually(lambda: message("no-model", "Scheduled", "no/such/model.safetensors"), timeout=60,
                      what="the missing base model named")  # fmt: skip
    assert cond["status"] == "False" and cond["reason"] == "CredentialsUnavailable", cond
    assert get(api, ns, "no-model")["status"]["phase"] == "Pending"
    assert not k8s.BatchV1Api(api).list_namespaced_job(ns).items  # no trainer was started for it
    assert ("Warning", "CredentialsUnavailable") in {(t, r) for t, r, _ in events(hub_crds, ns, "no-model")}
    hub_crds.kubectl("delete", "edgecluster", "shop-7")


def test_suspend_holds_a_job_its_live_progress_reaches_status_and_deletion_cleans_up_edge_clusters(
    operator_proc: OperatorProcess, tenant: Tenant, hub_crds: ControlPlane, fleet: dict[str, ControlPlane],
    edge_a_executor: PodExecutor, s3: S3Server,
) -> None:  # fmt: skip
    _hub_data(edge_a_executor, "factory-cpu-0", "factory-cpu-1")
    api, ns = tenant.api, tenant.namespace
    manifest = job_manifest("held", placement={"accelerator": "cpu", "clusterSelector": {
        "matchLabels": {"site": "factory"}}}, suspend=True)  # fmt: skip
    manifest["spec"]["training"]["maxSteps"] = 4000  # still running when deleted
    create(api, ns, manifest)
    eventually(lambda: (get(api, ns, "held").get("status") or {}).get("phase") == "Suspended", what="Suspended")
    edge_api = fleet["edge-a"].api_client()
    edge_batch, edge_core = k8s.BatchV1Api(edge_api), k8s.CoreV1Api(edge_api)

    def edge_jobs() -> list[Any]:
        try:
            return list(edge_batch.list_namespaced_job(ns).items)
        except k8s.ApiException:
            return []

    assert edge_jobs() == []  # nothing started while suspended
    k8s.CustomObjectsApi(api).patch_namespaced_custom_object(
        "edgetune.io", "v1alpha1", ns, "edgetrainingjobs", "held", {"spec": {"suspend": False}}
    )
    eventually(edge_jobs, timeout=60, what="the trainer Job on edge-a")
    eventually(lambda: (get(api, ns, "held").get("status") or {}).get("phase") == "Training", timeout=120,
               what="Training")  # fmt: skip

    # Live progress: the trainer writes it on its own pod, the operator carries it into the status
    # while the trainer still trains (before, status.targets said nothing until it exited).
    def progressed() -> dict[str, Any] | None:
        status = get(api, ns, "held").get("status") or {}
        targets = status.get("targets") or []
        live = status.get("phase") == "Training" and targets and targets[0].get("step")
        return targets[0] if live and targets[0].get("loss") is not None else None

    target = eventually(progressed, timeout=120, what="a step and a loss in status.targets while training")
    assert target["device"] == "cpu" and target["energyMethod"] and target["peakMemoryBytes"] > 0, target
    pod = edge_core.list_namespaced_pod(ns, label_selector="edgetune.io/training-job=held").items[0]
    written = TrainerProgress.model_validate_json(pod.metadata.annotations[PROGRESS_ANNOTATION])
    assert written.step is not None and written.step >= target["step"]
    assert pod.spec.service_account_name == "edgetune-trainer"
    assert not [m for c in pod.spec.init_containers for m in c.volume_mounts or [] if m.name == "kube-api-access"]

    # The trainer's token (bound to its pod) may write that annotation of its own pod, nothing else.
    token = edge_core.create_namespaced_service_account_token("edgetune-trainer", ns, {"spec": {
        "audiences": [], "expirationSeconds": 600,
        "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod.metadata.name, "uid": pod.metadata.uid},
    }}).status.token  # fmt: skip
    config = k8s.Configuration()
    config.host, config.ssl_ca_cert = fleet["edge-a"].server, str(fleet["edge-a"]._pki.ca.cert)
    config.api_key = {"authorization": f"Bearer {token}"}
    trainer = k8s.CoreV1Api(k8s.ApiClient(config))
    other = edge_core.create_namespaced_pod(ns, {"metadata": {"name": "bystander"}, "spec": {
        "nodeSelector": {"edgetune.io/none": "x"}, "containers": [{"name": "c", "image": "none"}]}})  # fmt: skip

    def refused(call: Any) -> str:
        with pytest.raises(k8s.ApiException) as info:
            call()
        assert info.value.status == 403, info.value
        return str(info.value.body)

    name = pod.metadata.name
    trainer.patch_namespaced_pod(name, ns, {"metadata": {"annotations": {PROGRESS_ANNOTATION: '{"at": "now"}'}}})
    assert "trainer-progress annotation" in refused(lambda: trainer.patch_namespaced_pod(
        name, ns, {"metadata": {"annotations": {"edgetune.io/adapter": "{}"}}}))  # fmt: skip
    relabel = {"metadata": {"labels": {"edgetune.io/training-job": "other"}}}
    refused(lambda: trainer.patch_namespaced_pod(name, ns, relabel))
    assert "only update its own pod" in refused(lambda: trainer.patch_namespaced_pod(
        other.metadata.name, ns, {"metadata": {"annotations": {PROGRESS_ANNOTATION: '{"at": "now"}'}}}))  # fmt: skip
    refused(lambda: trainer.delete_namespaced_pod(name, ns))  # RBAC: patch pods, nothing more
    refused(lambda: trainer.list_namespaced_secret(ns))
    edge_core.delete_namespaced_pod("bystander", ns)

    k8s.CustomObjectsApi(api).delete_namespaced_custom_object("edgetune.io", "v1alpha1", ns, "edgetrainingjobs", "held")
    eventually(lambda: edge_jobs() == [], timeout=60, what="the edge trainer Job to be deleted")
    eventually(lambda: not k8s.CoreV1Api(edge_api).list_namespaced_secret(
        ns, label_selector="edgetune.io/training-job=held").items, what="the edge Secret to be deleted")  # fmt: skip
    edge_api.close()


def test_deleting_a_job_while_its_edge_cluster_is_unreachable_is_bounded_and_swept_when_it_returns(
    operator_proc: OperatorProcess, tenant: Tenant, hub_crds: ControlPlane, fleet: dict[str, ControlPlane],
    edge_b_executor: PodExecutor, s3: S3Server,
) -> None:  # fmt: skip
    _hub_data(edge_b_executor, "farm-cpu-0")
    api, ns = tenant.api, tenant.namespace
    manifest = job_manifest("orphan", placement={"accelerator": "cpu", "clusterSelector": {
        "matchLabels": {"site": "farm"}}})  # fmt: skip
    manifest["spec"]["training"]["maxSteps"] = 4000  # still running when deleted
    create(api, ns, manifest)
    uid = get(api, ns, "orphan")["metadata"]["uid"]
    eventually(lambda: (get(api, ns, "orphan").get("status") or {}).get("phase") == "Training", timeout=120,
               what="Training")  # fmt: skip
    edge_api = fleet["edge-b"].api_client()
    edge_batch = k8s.BatchV1Api(edge_api)
    assert edge_batch.list_namespaced_job(ns).items
    saved = point_kubeconfig(hub_crds, "edge-b", dead_kubeconfig(fleet["edge-b"]))

    def edge_b() -> dict[str, Any]:
        return dict(json.loads(hub_crds.kubectl("get", "edgecluster", "edge-b", "-o", "json").stdout))

    try:
        wait_unreachable(hub_crds, "edge-b")
        k8s.CustomObjectsApi(api).delete_namespaced_custom_object("edgetune.io", "v1alpha1", ns, "edgetrainingjobs",
                                                                  "orphan")  # fmt: skip

        # The finalizer waits out the cluster-lost period (20 s here), then lets the job go ...
        def gone() -> bool:
            try:
                get(api, ns, "orphan")
            except k8s.ApiException as exc:
                return exc.status == 404
            return False

        eventually(gone, timeout=120, what="the job to be released after the cluster-lost period")
        assert ("Warning", "CleanupDeferred") in {(t, r) for t, r, _ in events(hub_crds, ns, "orphan")}
        pending = json.loads(edge_b()["metadata"]["annotations"]["edgetune.io/pending-cleanup"])
        assert pending == {uid: {"namespace": ns, "job": "orphan"}}
        assert edge_batch.list_namespaced_job(ns).items  # ... its trainer is still there, unreachable
    finally:
        restore_kubeconfig(hub_crds, "edge-b", saved)
    # ... and once edge-b answers a heartbeat again, its orphaned trainer and config are deleted.
    labelled = f"edgetune.io/training-job-uid={uid}"
    eventually(lambda: not edge_batch.list_namespaced_job(ns).items and not k8s.CoreV1Api(
        edge_api).list_namespaced_secret(ns, label_selector=labelled).items, timeout=90,
        what="the orphaned trainer Job and its Secret deleted")  # fmt: skip
    eventually(lambda: "edgetune.io/pending-cleanup" not in (edge_b()["metadata"].get("annotations") or {}),
               timeout=30, what="the record cleared")  # fmt: skip
    swept = hub_crds.kubectl(
        "get",
        "events",
        "-n",
        "default",
        "--field-selector",
        "involvedObject.name=edge-b,reason=OrphansDeleted",
        "-o",
        "name",
    ).stdout.split()
    assert swept
    edge_api.close()


def _target_phase(api: Any, ns: str, name: str, cluster: str) -> str | None:
    targets = (get(api, ns, name).get("status") or {}).get("targets") or []
    return next((t["phase"] for t in targets if t["cluster"] == cluster), None)


def _watch_restarts(operator_proc: OperatorProcess, cluster: str) -> float:
    return sum(float(v) for v in re.findall(
        rf'^edgetune_operator_watch_restarts_total\{{cluster="{cluster}",[^}}]*\}} (\S+)$', operator_proc.metrics(),
        re.M))  # fmt: skip


def test_an_edge_apiserver_restart_mid_job_breaks_the_watch_and_the_status_catches_up_within_seconds(
    operator_proc: OperatorProcess, tenant: Tenant, fleet: dict[str, ControlPlane], edge_a_executor: PodExecutor,
    s3: S3Server,
) -> None:  # fmt: skip
    """Edge trainers are followed by watches, not polls (the safety-net resync is a minute): with the
    edge API server restarted under a running trainer, the hub job must still notice the trainer
    finish within seconds, which only a watch resumed after the restart can do."""
    _hub_data(edge_a_executor, "factory-cpu-0")
    api, ns = tenant.api, tenant.namespace
    manifest = job_manifest("restart", placement={"accelerator": "cpu", "clusterSelector": {
        "matchLabels": {"site": "factory"}}})  # fmt: skip
    manifest["spec"]["training"]["maxSteps"] = 60
    create(api, ns, manifest)
    eventually(lambda: _target_phase(api, ns, "restart", "edge-a") == "Training", timeout=120, what="Training")
    before = _watch_restarts(operator_proc, "edge-a")
    edge = fleet["edge-a"]
    apiserver = edge.process("kube-apiserver")
    apiserver.stop()
    try:
        time.sleep(4)
    finally:
        apiserver.start()
    apiserver.wait_until(lambda: edge.kubectl("get", "--raw", "/readyz", check=False).returncode == 0, 60, "ready")
    assert _watch_restarts(operator_proc, "edge-a") > before  # the watches broke and were started again
    edge_batch = k8s.BatchV1Api(edge.api_client())

    def edge_job_done() -> float | None:
        jobs = edge_batch.list_namespaced_job(ns, label_selector="edgetune.io/training-job=restart").items
        return time.monotonic() if jobs and (jobs[0].status.succeeded or jobs[0].status.failed) else None

    finished_at = eventually(edge_job_done, timeout=180, what="the edge trainer Job to finish")
    eventually(lambda: _target_phase(api, ns, "restart", "edge-a") not in ("Training", "Scheduled"), timeout=15,
               what="the hub status to catch up")  # fmt: skip
    lag = time.monotonic() - finished_at
    assert lag < 10, f"the hub noticed the finished trainer {lag:.1f} s late"
    job = wait_finished(api, ns, "restart", timeout=120)
    assert job["status"]["phase"] == "Succeeded", job["status"]


def test_an_mlflow_outage_is_retried_with_growing_delays_in_status_and_registers_once(
    operator_proc: OperatorProcess, tenant: Tenant, hub_executor: PodExecutor, s3: S3Server,
    mlflow_server: MlflowServer,
) -> None:  # fmt: skip
    _hub_data(hub_executor, "op-gpu-0", "op-gpu-1")
    api, ns = tenant.api, tenant.namespace
    manifest = job_manifest("outage")
    manifest["spec"]["training"]["maxSteps"] = 40  # MLflow goes down while it trains
    create(api, ns, manifest)
    eventually(lambda: (get(api, ns, "outage").get("status") or {}).get("phase") == "Training", timeout=120,
               what="the trainer running")  # fmt: skip
    server = mlflow_server.processes[0]
    server.stop()
    messages: list[str] = []
    try:

        def retried_three_times() -> bool:
            registered = condition(get(api, ns, "outage"), "Registered") or {}
            message = registered.get("message") or ""
            if "next retry" in message and message not in messages:
                messages.append(message)
            return len(messages) >= 3

        eventually(retried_three_times, timeout=120, what="three retries shown in status")
    finally:
        server.start()

    def healthy() -> bool:
        try:
            return httpx.get(f"{mlflow_server.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    server.wait_until(healthy, 90, "healthy")
    attempts = [int(re.search(r"attempt (\d+)", m).group(1)) for m in messages]  # type: ignore[union-attr]
    delays = [float(re.search(r"next retry in (\d+) s", m).group(1)) for m in messages]  # type: ignore[union-attr]
    assert attempts == sorted(attempts) and len(set(attempts)) == len(attempts), messages
    assert delays[-1] > delays[0], f"delays should grow: {messages}"
    assert condition(get(api, ns, "outage"), "Registered")["reason"] == "RegistryUnavailable"  # type: ignore[index]
    job = wait_finished(api, ns, "outage", timeout=400)
    assert job["status"]["phase"] == "Succeeded", job["status"]
    assert len(mlflow_versions(mlflow_server, "outage-adapter")) == 1  # registered exactly once


def _metric(operator_proc: OperatorProcess, name: str, cluster: str) -> float:
    return sum(float(v) for v in re.findall(rf'^{name}\{{cluster="{cluster}"[^}}]*\}} (\S+)$', operator_proc.metrics(),
                                            re.M))  # fmt: skip


def _reachable(hub: ControlPlane, cluster: str) -> dict[str, Any]:
    status = json.loads(hub.kubectl("get", "edgecluster", cluster, "-o", "json").stdout).get("status") or {}
    return next((c for c in status.get("conditions") or [] if c["type"] == "Reachable"), {})


def _trainer_jobs(plane: ControlPlane, namespace: str, job: str) -> list[Any]:
    edge_api = plane.api_client()
    try:
        return list(k8s.BatchV1Api(edge_api).list_namespaced_job(
            namespace, label_selector=f"edgetune.io/training-job={job}").items)  # fmt: skip
    finally:
        edge_api.close()


def test_an_edge_apiserver_answering_429_holds_its_part_of_the_job_and_loses_nothing(
    operator_proc: OperatorProcess, tenant: Tenant, hub_crds: ControlPlane, fleet: dict[str, ControlPlane],
    edge_a_executor: PodExecutor, edge_b_executor: PodExecutor, s3: S3Server, mlflow_server: MlflowServer,
) -> None:  # fmt: skip
    """edge-b's real API server turns every request of the operator away with 429 (API Priority
    and Fairness: testenv.faults.Throttle). Its heartbeat says Throttled, the 429s are counted,
    the job's part on edge-b waits (never given up: the cluster answers) while edge-a's finishes;
    once the server lets the operator in, edge-b's trainer starts, once, and registers, once."""
    _hub_data(edge_a_executor, "factory-gpu-0", "factory-gpu-1")
    _hub_data(edge_b_executor, "farm-gpu-0", "farm-gpu-1")
    api, ns = tenant.api, tenant.namespace
    throttle = Throttle(fleet["edge-b"])
    saved = point_kubeconfig(hub_crds, "edge-b", throttle.kubeconfig())
    try:
        with throttle:
            reachable = eventually(lambda: (c := _reachable(hub_crds, "edge-b")).get("reason") == "Throttled" and c,
                                   timeout=60, what="edge-b's heartbeat throttled")  # fmt: skip
            assert reachable["status"] == "False" and "429" in reachable["message"], reachable
            assert _metric(operator_proc, "edgetune_operator_kube_throttled_total", "edge-b") > 0
            create(api, ns, job_manifest("throttled", placement={"accelerator": "gpu", "allowCpuFallback": True,
                                                                         "clusterSelector": {
                "matchLabels": {"region": "eu"}}}))  # fmt: skip

            def held() -> dict[str, Any] | None:
                job = get(api, ns, "throttled")
                targets = {t["cluster"]: t for t in (job.get("status") or {}).get("targets") or []}
                a, b = targets.get("edge-a") or {}, targets.get("edge-b") or {}
                return job if a.get("phase") == "Succeeded" and b.get("phase") == "Pending" else None

            job = eventually(held, timeout=240, what="edge-a's part done while edge-b's is held")
            assert job["status"]["phase"] not in ("Succeeded", "Failed"), job["status"]
            held_target = next(t for t in job["status"]["targets"] if t["cluster"] == "edge-b")
            assert "429" in held_target["message"], held_target
            clusters = condition(job, "ClustersReachable")
            assert (clusters["status"], clusters["reason"]) == ("False", "ClusterThrottled"), clusters
            assert ("Warning", "ClusterThrottled") in {(t, r) for t, r, _ in events(hub_crds, ns, "throttled")}
            assert not _trainer_jobs(fleet["edge-b"], ns, "throttled")  # every request was refused
        job = wait_finished(api, ns, "throttled", timeout=300)
    finally:
        restore_kubeconfig(hub_crds, "edge-b", saved)
    assert job["status"]["phase"] == "Succeeded" and job["status"]["progress"] == "2/2", job["status"]
    assert condition(job, "ClustersReachable")["status"] == "True"
    for cluster in ("edge-a", "edge-b"):
        assert len(_trainer_jobs(fleet[cluster], ns, "throttled")) == 1, cluster  # never a second trainer
    assert len(mlflow_versions(mlflow_server, "throttled-adapter")) == 2  # one registration per cluster


def test_an_edge_cluster_answering_seconds_late_slows_only_itself(
    operator_proc: OperatorProcess, tenant: Tenant, hub_crds: ControlPlane, fleet: dict[str, ControlPlane],
    edge_a_executor: PodExecutor, edge_b_executor: PodExecutor, s3: S3Server, mlflow_server: MlflowServer,
) -> None:  # fmt: skip
    """edge-b's real API server behind a proxy that holds every request 1.5 s
    (testenv.faults.SlowProxy): its heartbeat says how slow it is (condition and metric), edge-a's
    heartbeat stays fast, and jobs on both clusters finish, each trainer started and registered once."""
    _hub_data(edge_a_executor, "factory-cpu-0")
    _hub_data(edge_b_executor, "farm-cpu-0")
    api, ns = tenant.api, tenant.namespace
    edge = fleet["edge-b"]
    with SlowProxy(("127.0.0.1", edge.api_port), delay=1.5) as proxy:
        saved = point_kubeconfig(hub_crds, "edge-b", edge.kubeconfig.read_text().replace(edge.server, proxy.server))
        try:
            eventually(lambda: _metric(operator_proc, "edgetune_operator_cluster_heartbeat_seconds", "edge-b") >= 1.5,
                       timeout=60, what="edge-b's heartbeat through the slow proxy")  # fmt: skip
            reachable = _reachable(hub_crds, "edge-b")
            took = float(re.search(r"answered in ([\d.]+) s", reachable["message"]).group(1))  # type: ignore[union-attr]
            assert reachable["status"] == "True" and took >= 1.5, reachable  # slow, not unreachable
            assert _metric(operator_proc, "edgetune_operator_cluster_heartbeat_seconds", "edge-a") < 1.5  # unaffected
            for name, site in (("slow-b", "farm"), ("fast-a", "factory")):
                create(api, ns, job_manifest(name, placement={"accelerator": "cpu", "clusterSelector": {
                    "matchLabels": {"site": site}}}))  # fmt: skip
            jobs = {name: wait_finished(api, ns, name, timeout=300) for name in ("fast-a", "slow-b")}
        finally:
            restore_kubeconfig(hub_crds, "edge-b", saved)
        # the proxy stays up until the operator's client for edge-b goes straight to it again
        eventually(lambda: _metric(operator_proc, "edgetune_operator_cluster_heartbeat_seconds", "edge-b") < 1.5,
                   timeout=60, what="edge-b's heartbeat fast again")  # fmt: skip
    for name, cluster in (("fast-a", "edge-a"), ("slow-b", "edge-b")):
        assert jobs[name]["status"]["phase"] == "Succeeded", jobs[name]["status"]
        assert len(_trainer_jobs(fleet[cluster], ns, name)) == 1, name
        assert len(mlflow_versions(mlflow_server, f"{name}-adapter")) == 1, name
