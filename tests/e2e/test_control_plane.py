"""The local control plane is real: the real scheduler places pods by extended resources,
the real job controller drives Jobs whose pods the executor runs, clusters are isolated."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client as k8s

from edgetune_testenv.cluster import EXECUTOR_LABEL, ControlPlane
from edgetune_testenv.executor import PodExecutor
from edgetune_testenv.nodes import ACCELERATOR_LABEL, GPU_RESOURCE, NPU_RESOURCE
from tests.support import TEST_IMAGE, eventually, new_namespace

pytestmark = pytest.mark.e2e


@pytest.fixture
def core(hub: ControlPlane) -> Any:
    api = hub.api_client()
    yield k8s.CoreV1Api(api)
    api.close()


def _pod(name: str, resources: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": "registry.example/edge-app:1",
                    "resources": {"requests": resources, "limits": resources},
                }
            ]
        },
    }


def test_scheduler_places_pods_by_accelerator(hub: ControlPlane, core: Any) -> None:
    ns = new_namespace(core)
    core.create_namespaced_pod(ns, _pod("wants-gpu", {GPU_RESOURCE: "1"}))
    core.create_namespaced_pod(ns, _pod("wants-npu", {NPU_RESOURCE: "1"}))
    core.create_namespaced_pod(ns, _pod("wants-8-gpus", {GPU_RESOURCE: "8"}))

    def node_of(pod: str) -> str | None:
        return core.read_namespaced_pod(pod, ns).spec.node_name  # type: ignore[no-any-return]

    gpu_node = eventually(lambda: node_of("wants-gpu"), what="GPU pod bound")
    npu_node = eventually(lambda: node_of("wants-npu"), what="NPU pod bound")
    assert core.read_node(gpu_node).metadata.labels[ACCELERATOR_LABEL] == "gpu"
    assert core.read_node(npu_node).metadata.labels[ACCELERATOR_LABEL] == "npu"
    # kwok (not the executor) fakes these pods' lifecycle: they become Running.
    eventually(lambda: core.read_namespaced_pod("wants-gpu", ns).status.phase == "Running", what="GPU pod Running")

    def unschedulable() -> Any:
        pod = core.read_namespaced_pod("wants-8-gpus", ns)
        conds = [c for c in pod.status.conditions or [] if c.type == "PodScheduled" and c.status == "False"]
        return conds[0] if conds else None

    cond = eventually(unschedulable, what="PodScheduled=False on the 8-GPU pod")
    assert cond.reason == "Unschedulable"
    assert f"Insufficient {GPU_RESOURCE}" in cond.message
    assert core.read_namespaced_pod("wants-8-gpus", ns).spec.node_name is None


def _job(name: str, script: str, backoff_limit: int = 0) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": backoff_limit,
            "template": {
                "metadata": {"labels": {EXECUTOR_LABEL: "local"}},
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": {ACCELERATOR_LABEL: "gpu"},
                    "containers": [
                        {
                            "name": "trainer",
                            "image": TEST_IMAGE,
                            "args": ["-c", script],
                            "env": [{"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                            "resources": {"limits": {GPU_RESOURCE: "1", "memory": "512Mi"}},
                        }
                    ],
                },
            },
        },
    }


def _job_condition(batch: Any, ns: str, name: str, kind: str) -> Any:
    job = batch.read_namespaced_job(name, ns)
    found = [c for c in job.status.conditions or [] if c.type == kind and c.status == "True"]
    return found[0] if found else None


def test_job_run_by_executor_completes_with_termination_message(
    hub: ControlPlane, hub_executor: PodExecutor, core: Any
) -> None:
    ns = new_namespace(core)
    api = hub.api_client()
    batch = k8s.BatchV1Api(api)
    script = (
        "import json, os\n"
        "print('training on', os.environ['NODE'])\n"
        "open('/dev/termination-log', 'w').write(json.dumps({'node': os.environ['NODE'], 'loss': 0.125}))\n"
    )
    batch.create_namespaced_job(ns, _job("ok", script))
    eventually(lambda: _job_condition(batch, ns, "ok", "Complete"), what="Job Complete")

    (pod,) = core.list_namespaced_pod(ns, label_selector="job-name=ok").items
    assert pod.status.phase == "Succeeded"
    terminated = pod.status.container_statuses[0].state.terminated
    assert terminated.exit_code == 0
    assert terminated.reason == "Completed"
    assert terminated.message == f'{{"node": "{pod.spec.node_name}", "loss": 0.125}}'
    assert pod.spec.node_name.startswith("hub-gpu-")
    assert f"training on {pod.spec.node_name}" in hub_executor.logs(ns, pod.metadata.name)
    api.close()


def test_failing_job_fails_after_backoff_limit(hub: ControlPlane, hub_executor: PodExecutor, core: Any) -> None:
    ns = new_namespace(core)
    api = hub.api_client()
    batch = k8s.BatchV1Api(api)
    script = "import sys\nopen('/dev/termination-log', 'w').write('data file missing: /data/x.csv')\nsys.exit(3)\n"
    batch.create_namespaced_job(ns, _job("bad", script, backoff_limit=1))
    cond = eventually(lambda: _job_condition(batch, ns, "bad", "Failed"), timeout=120, what="Job Failed")
    assert cond.reason == "BackoffLimitExceeded"
    pods = core.list_namespaced_pod(ns, label_selector="job-name=bad").items
    assert len(pods) == 2  # the first try and one retry (backoffLimit: 1)
    for pod in pods:
        assert pod.status.phase == "Failed"
        terminated = pod.status.container_statuses[0].state.terminated
        assert terminated.exit_code == 3
        assert terminated.reason == "Error"
        assert terminated.message == "data file missing: /data/x.csv"
    api.close()


def test_executor_enforces_memory_limit_as_oomkilled(hub: ControlPlane, hub_executor: PodExecutor, core: Any) -> None:
    ns = new_namespace(core)
    pod = {
        "metadata": {"name": "hog", "labels": {EXECUTOR_LABEL: "local"}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": TEST_IMAGE,
                    "args": ["-c", "import time\nblob = bytearray(400 * 2**20)\ntime.sleep(30)"],
                    "resources": {"limits": {"memory": "128Mi"}},
                }
            ],
        },
    }
    core.create_namespaced_pod(ns, pod)
    eventually(lambda: core.read_namespaced_pod("hog", ns).status.phase == "Failed", what="pod Failed")
    terminated = core.read_namespaced_pod("hog", ns).status.container_statuses[0].state.terminated
    assert terminated.reason == "OOMKilled"
    assert terminated.exit_code == 137


def test_executor_gives_each_node_its_own_disk_and_resolves_config(
    hub: ControlPlane, hub_executor: PodExecutor, core: Any
) -> None:
    ns = new_namespace(core)
    core.create_namespaced_config_map(ns, {"metadata": {"name": "cfg"}, "data": {"job.json": '{"r": 8}'}})
    for node in ("hub-cpu-0", "hub-cpu-1"):
        data = hub_executor.node_root(node) / "var/lib/edge-data"
        data.mkdir(parents=True, exist_ok=True)
        (data / "samples.txt").write_text(f"{node}\n")
    script = (
        "import os, pathlib\n"
        "cfg = pathlib.Path('/etc/edgetune/job.json').read_text()\n"
        "data = pathlib.Path(os.environ['DATA_DIR'], 'samples.txt').read_text().strip()\n"
        "pathlib.Path('/dev/termination-log').write_text(f'{data} {cfg} {os.environ[\"POD\"]}')\n"
    )
    for node in ("hub-cpu-0", "hub-cpu-1"):
        core.create_namespaced_pod(
            ns,
            {
                "metadata": {"name": f"reader-{node}", "labels": {EXECUTOR_LABEL: "local"}},
                "spec": {
                    "restartPolicy": "Never",
                    "nodeName": node,
                    "containers": [
                        {
                            "name": "main",
                            "image": TEST_IMAGE,
                            "args": ["-c", script],
                            "env": [
                                {"name": "DATA_DIR", "value": "/data"},
                                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            ],
                            "volumeMounts": [
                                {"name": "data", "mountPath": "/data", "readOnly": True},
                                {"name": "cfg", "mountPath": "/etc/edgetune"},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "data", "hostPath": {"path": "/var/lib/edge-data", "type": "Directory"}},
                        {"name": "cfg", "configMap": {"name": "cfg"}},
                    ],
                },
            },
        )
    for node in ("hub-cpu-0", "hub-cpu-1"):
        name = f"reader-{node}"
        eventually(lambda name=name: core.read_namespaced_pod(name, ns).status.phase == "Succeeded", what=name)
        message = core.read_namespaced_pod(name, ns).status.container_statuses[0].state.terminated.message
        assert message == f'{node} {{"r": 8}} {name}'


def test_two_control_planes_are_isolated(edge_a: ControlPlane, edge_b: ControlPlane) -> None:
    assert edge_a.server != edge_b.server
    a, b = edge_a.api_client(), edge_b.api_client()
    core_a, core_b = k8s.CoreV1Api(a), k8s.CoreV1Api(b)
    core_a.create_namespace({"metadata": {"name": "only-in-a"}})
    assert core_a.read_namespace("only-in-a").metadata.name == "only-in-a"
    with pytest.raises(k8s.ApiException) as err:
        core_b.read_namespace("only-in-a")
    assert err.value.status == 404
    nodes_a = {n.metadata.name for n in core_a.list_node().items}
    nodes_b = {n.metadata.name for n in core_b.list_node().items}
    assert nodes_a and nodes_b and not nodes_a & nodes_b
    # Each cluster's credentials are its own: A's client certificate means nothing to B.
    out = edge_b.kubectl("get", "nodes", "-o", "name", check=False)
    assert out.returncode == 0 and "factory-" not in out.stdout
    a.close()
    b.close()


def test_kubectl_reports_pinned_version_and_simulated_fleet(hub: ControlPlane) -> None:
    out = hub.kubectl("version", "-o", "json").stdout
    assert '"gitVersion": "v1.36.3"' in out
    nodes = hub.kubectl("get", "nodes", "-L", ACCELERATOR_LABEL, "--no-headers").stdout.splitlines()
    by_kind = sorted(line.split()[-1] for line in nodes)
    assert by_kind == ["cpu", "cpu", "gpu", "gpu", "npu", "npu"]
    assert all(" Ready " in line for line in nodes)
