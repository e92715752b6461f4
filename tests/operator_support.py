"""Helpers for tests that drive the operator through the API server, as a user would."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

from edgetune_testenv import binaries
from edgetune_testenv.cluster import ControlPlane
from edgetune_testenv.procs import free_port
from tests.support import eventually

GROUP, VERSION, PLURAL = "edgetune.io", "v1alpha1", "edgetrainingjobs"
DATA = "/var/lib/edgetune/sensors"
#: Hub nodes reserved for the operator tests (labelled and tainted), so pods other test modules
#: leave running on the default fleet never take an accelerator these jobs need.
POOL = {"edgetune.io/pool": "operator-tests"}
POOL_TOLERATION = {"key": "edgetune.io/pool", "operator": "Equal", "value": "operator-tests", "effect": "NoSchedule"}


def job_manifest(name: str, **spec: Any) -> dict[str, Any]:
    """A small, fast EdgeTrainingJob (built-in time-series CNN, a few steps); ``spec`` keys replace
    top-level spec fields."""
    base: dict[str, Any] = {
        "baseModel": {"uri": "builtin:timeseries-cnn"},
        "data": {"source": {"hostPath": DATA}, "format": "npy"},
        "training": {"maxSteps": 4, "batchSize": 16, "evalEvery": 2, "checkpointEvery": 2},
        "budgets": {"memory": "4Gi", "deadline": "10m"},
        # The test environments' GPU nodes are kwok's (or this machine's CPU): a trainer there finds no
        # CUDA device, so it trains on the CPU only because the job allows it (and says so).
        "placement": {"accelerator": "gpu", "allowCpuFallback": True},
        "output": {"s3": {"bucket": "adapters", "credentialsSecretRef": "s3-credentials"},
                   "mlflow": {"registeredModel": f"{name}-adapter"}, "encoding": "int8-zstd"},
    }  # fmt: skip
    base.update(copy.deepcopy(spec))
    if "clusterSelector" not in base["placement"]:  # on the hub: the operator tests' own nodes
        base["placement"] = {**base["placement"], "nodeSelector": POOL, "tolerations": [POOL_TOLERATION]}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "EdgeTrainingJob", "metadata": {"name": name}, "spec": base}


def s3_secret(core: Any, namespace: str, env: dict[str, str]) -> None:
    core.create_namespaced_secret(namespace, {
        "metadata": {"name": "s3-credentials"},
        "stringData": {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
    })  # fmt: skip


def create(api: Any, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = k8s.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, manifest
    )
    return result


def get(api: Any, namespace: str, name: str) -> dict[str, Any]:
    result: dict[str, Any] = k8s.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name
    )
    return result


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == kind), None)


def wait_finished(api: Any, namespace: str, name: str, timeout: float = 300) -> dict[str, Any]:
    """Until the job is Succeeded or Failed; returns the object."""

    def finished() -> dict[str, Any] | None:
        obj = get(api, namespace, name)
        return obj if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed") else None

    return eventually(finished, timeout=timeout, what=f"EdgeTrainingJob {namespace}/{name} to finish")


def point_kubeconfig(hub: ControlPlane, cluster: str, kubeconfig: str) -> dict[str, str]:
    """The EdgeCluster's kubeconfig Secret on the hub now holds ``kubeconfig`` (the operator reads it
    again within SECRET_TTL_SECONDS); returns the Secret's data before, for ``restore_kubeconfig``."""
    secret = f"{cluster}-kubeconfig"
    saved = json.loads(hub.kubectl("-n", "edgetune-system", "get", "secret", secret, "-o", "json").stdout)["data"]
    hub.kubectl("-n", "edgetune-system", "patch", "secret", secret, "--type=merge",
                "-p", json.dumps({"stringData": {"kubeconfig": kubeconfig}}))  # fmt: skip
    return dict(saved)


def restore_kubeconfig(hub: ControlPlane, cluster: str, saved: dict[str, str]) -> None:
    hub.kubectl("-n", "edgetune-system", "patch", "secret", f"{cluster}-kubeconfig", "--type=merge",
                "-p", json.dumps({"data": saved}))  # fmt: skip


def dead_kubeconfig(plane: ControlPlane) -> str:
    """``plane``'s kubeconfig pointing at a port where nothing listens."""
    return plane.kubeconfig.read_text().replace(plane.server, f"https://127.0.0.1:{free_port()}")


def wait_unreachable(hub: ControlPlane, cluster: str, timeout: float = 60) -> None:
    """Until a heartbeat reports the EdgeCluster unreachable: after its kubeconfig Secret was pointed
    elsewhere, the operator reads the Secret again within SECRET_TTL_SECONDS."""

    def unreachable() -> bool:
        status = json.loads(hub.kubectl("get", "edgecluster", cluster, "-o", "json").stdout).get("status") or {}
        return status.get("reachable") is False

    eventually(unreachable, timeout=timeout, what=f"{cluster} unreachable")


def events(plane: ControlPlane, namespace: str, name: str) -> list[tuple[str, str, str]]:
    out = plane.kubectl("-n", namespace, "get", "events", "-o", "json",
                        f"--field-selector=involvedObject.name={name}").stdout  # fmt: skip
    return [(e["type"], e["reason"], e.get("message", "")) for e in json.loads(out)["items"]]


def plugin(plane: ControlPlane, *args: str, kubectl: bool = False) -> subprocess.CompletedProcess[str]:
    """``kubectl edgetune …`` as a user runs it: through kubectl's plugin lookup on PATH, or directly."""
    venv_bin = str(Path(sys.executable).parent)
    if kubectl:
        command = [str(binaries.binary(binaries.KUBE, "kubectl")), "edgetune", f"--kubeconfig={plane.kubeconfig}"]
    else:
        command = [f"{venv_bin}/kubectl-edgetune", f"--kubeconfig={plane.kubeconfig}"]
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}"}
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=180, check=False, env=env)
