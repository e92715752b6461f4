"""Two operator replicas, one Lease: only the elected one reconciles; when it dies (SIGKILL, no
chance to release the Lease) the standby takes over after the Lease expires and finishes the work.

A control plane of its own (so the session's operator, which serves every EdgeCluster, is not a
third writer here), the session's S3 and MLflow, trainers run for real by the pod executor.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client as k8s

from edgetune_testenv.cluster import ControlPlane
from edgetune_testenv.executor import PodExecutor
from edgetune_testenv.nodes import default_fleet
from edgetune_testenv.operator_proc import OperatorProcess
from edgetune_testenv.servers import MlflowServer, S3Server
from tests.conftest import REPO, _executor
from tests.operator_support import DATA, POOL, create, get, job_manifest, plugin, s3_secret, wait_finished
from tests.support import TRAINER_IMAGE, eventually
from tests.trainer_support import sine_classes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NS = "op-ha"


@pytest.fixture(scope="module")
def ha_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ControlPlane, PodExecutor]]:
    plane = ControlPlane("ha-hub", tmp_path_factory.mktemp("ha-hub"))
    with plane:
        taint = ({"key": "edgetune.io/pool", "value": "operator-tests", "effect": "NoSchedule"},)
        plane.add_nodes([dataclasses.replace(n, labels={**n.labels, **POOL}, taints=taint)
                         for n in default_fleet("op")])  # fmt: skip
        for executor in _executor(plane):
            yield plane, executor


def _replica(plane: ControlPlane, name: str, workdir: Path, s3: S3Server, mlflow: MlflowServer) -> OperatorProcess:
    env = {
        "EDGETUNE_LEADER_ELECTION": "true", "EDGETUNE_LEADER_ELECTION_NAMESPACE": NS, "POD_NAME": name,
        "EDGETUNE_NAMESPACES": json.dumps([NS]), "EDGETUNE_MLFLOW_TRACKING_URI": mlflow.url,
        "EDGETUNE_S3_ENDPOINT": s3.endpoint,
        **{k: v for k, v in s3.env().items() if k.startswith("AWS_") and k != "AWS_ENDPOINT_URL_S3"},
    }  # fmt: skip
    return OperatorProcess(plane, workdir, env, TRAINER_IMAGE)


def _holder(core: k8s.CoordinationV1Api) -> tuple[str | None, int]:
    lease = core.read_namespaced_lease("edgetune-operator", NS)
    return lease.spec.holder_identity, lease.spec.lease_transitions or 0


def test_the_plugin_says_plainly_when_edgetune_is_not_installed(ha_hub: tuple[ControlPlane, PodExecutor]) -> None:
    plane, _ = ha_hub  # no CRDs yet
    bare = plugin(plane, "get")
    assert bare.returncode == 3 and "edgetune is not installed on this cluster" in bare.stderr, bare.stderr


def test_the_standby_takes_over_when_the_leader_dies(
    ha_hub: tuple[ControlPlane, PodExecutor], s3: S3Server, mlflow_server: MlflowServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:  # fmt: skip
    plane, executor = ha_hub
    plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    plane.kubectl("wait", "--for=condition=Established", "crd", "-l", "app.kubernetes.io/name=edgetune",
                  "--timeout=60s")  # fmt: skip
    for node in ("op-cpu-0", "op-cpu-1"):
        sine_classes(executor.node_root(node) / DATA.lstrip("/"), n=120)
    api = plane.api_client()
    core = k8s.CoreV1Api(api)
    leases = k8s.CoordinationV1Api(api)
    core.create_namespace({"metadata": {"name": NS}})
    s3_secret(core, NS, s3.env())
    s3.create_bucket("adapters")
    a = _replica(plane, "replica-a", tmp_path_factory.mktemp("replica-a"), s3, mlflow_server).start()
    eventually(lambda: _holder(leases)[0] == "replica-a", timeout=30, what="replica-a to hold the Lease")
    b = _replica(plane, "replica-b", tmp_path_factory.mktemp("replica-b"), s3, mlflow_server).start()  # healthy
    try:
        create(api, NS, job_manifest("first", placement={"accelerator": "cpu"}))
        assert wait_finished(api, NS, "first", timeout=240)["status"]["phase"] == "Succeeded"
        assert "became leader" not in b.log_tail(20_000) and "standby" in b.log_tail(20_000)
        assert "Creation is processed" not in b.log_tail(20_000)  # the standby reconciled nothing
        assert _holder(leases)[0] == "replica-a"

        a.kill()  # no release: the standby must wait for the Lease to expire
        killed = time.monotonic()
        create(api, NS, job_manifest("second", placement={"accelerator": "cpu"}))
        eventually(lambda: _holder(leases)[0] == "replica-b", timeout=60, what="replica-b to take the Lease over")
        took = time.monotonic() - killed
        assert 10 < took < 40, f"took over after {took:.1f} s (Lease 15 s)"
        assert wait_finished(api, NS, "second", timeout=240)["status"]["phase"] == "Succeeded"
        assert _holder(leases)[1] >= 1
        assert get(api, NS, "first")["status"]["phase"] == "Succeeded"

        b.stop()  # a clean stop releases the Lease at once
        holder, _ = _holder(leases)
        assert holder is None
    finally:
        a.stop()
        b.stop()
