"""The trainer Job the operator's reconcile logic produces runs for real: the real scheduler puts it
on a GPU node, the pod executor runs the real trainer with the node's own data, the Job completes,
and the observed status carries the trainer's summary. (The kopf handlers come next.)"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from kubernetes import client as k8s

from edgetune_api import EdgeTrainingJob
from edgetune_operator.reconcile.training_job import (
    JobRef,
    Target,
    observe_trainer,
    trainer_job,
    trainer_secret,
)
from edgetune_operator.settings import Settings, default_profiles
from edgetune_testenv.cluster import EXECUTOR_LABEL, ControlPlane
from edgetune_testenv.executor import PodExecutor
from tests.support import TRAINER_IMAGE, eventually, new_namespace
from tests.trainer_support import sine_classes

pytestmark = pytest.mark.e2e


def test_generated_trainer_job_trains_on_a_gpu_node(hub: ControlPlane, hub_executor: PodExecutor) -> None:
    for node in ("hub-gpu-0", "hub-gpu-1"):  # node-local data on every GPU node
        sine_classes(hub_executor.node_root(node) / "var/lib/edgetune/sensors", n=120)
    resource = EdgeTrainingJob.model_validate({
        "metadata": {"name": "sensor-lora"},
        "spec": {
            "baseModel": {"uri": "builtin:timeseries-cnn"},
            "data": {"source": {"hostPath": "/var/lib/edgetune/sensors"}, "format": "npy", "minSamples": 100},
            "training": {"maxSteps": 6, "batchSize": 16, "evalEvery": 3, "checkpointEvery": 3},
            "budgets": {"memory": "4Gi", "deadline": "10m"},
            "placement": {"accelerator": "gpu", "allowCpuFallback": True},  # kwok's GPU nodes, this CPU
            "output": {"s3": {"bucket": "adapters"}, "mlflow": {"registeredModel": "sensor-lora"}},
        },
    })  # fmt: skip
    api = hub.api_client()
    core, batch = k8s.CoreV1Api(api), k8s.BatchV1Api(api)
    ns = new_namespace(core)
    ref = JobRef(name="sensor-lora", namespace=ns, uid="00000000-0000-4000-8000-00000000beef")
    target = Target("local")
    settings = Settings(trainer_image=TRAINER_IMAGE, trainer_labels={EXECUTOR_LABEL: "local"})
    manifest = trainer_job(resource.spec, ref, target, settings, default_profiles()["gpu"][0])
    manifest["metadata"].pop("ownerReferences")  # no EdgeTrainingJob object exists in this test
    # The trainer's own Secret (configuration and credentials), as the operator creates it. No bucket
    # upload here: the package stays in the trainer's work folder (the upload policy goes unused).
    secret = trainer_secret(resource.spec, ref, target, settings, {"upload.json": b"{}"})
    secret["metadata"].pop("ownerReferences")
    config = json.loads(base64.b64decode(secret["data"]["config.json"]))
    config["runtime"].pop("s3Bucket")
    secret["data"]["config.json"] = base64.b64encode(json.dumps(config).encode()).decode()
    core.create_namespaced_secret(ns, secret)
    batch.create_namespaced_job(ns, manifest)

    name = manifest["metadata"]["name"]

    def observed() -> Any:
        job = api.sanitize_for_serialization(batch.read_namespaced_job(name, ns))
        pods = [
            api.sanitize_for_serialization(p)
            for p in core.list_namespaced_pod(ns, label_selector=f"job-name={name}").items
        ]
        status = observe_trainer(target, job, pods)
        return status if status.phase in ("Packaging", "Failed") else None

    status = eventually(observed, timeout=240, what="the trainer Job to finish")
    assert status.phase == "Packaging", status.message
    assert status.node in ("hub-gpu-0", "hub-gpu-1")
    assert (status.step, status.samples, status.energy_method) == (6, 120, "estimate")
    assert status.delta_uri is not None and status.delta_uri.endswith("/package")
    api.close()
