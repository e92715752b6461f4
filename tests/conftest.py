"""Session fixtures: real local control planes, a pod executor, and real MLflow/S3/Prometheus servers.

Every fixture starts what it needs on loopback and stops it at the end of the session; nothing
here touches a cluster named by the user's own kubeconfig.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from edgetune_testenv import chart
from edgetune_testenv.cluster import ControlPlane
from edgetune_testenv.executor import LocalImage, PodExecutor
from edgetune_testenv.nodes import default_fleet
from edgetune_testenv.operator_proc import OperatorProcess
from edgetune_testenv.servers import MlflowServer, Prometheus, S3Server
from tests.operator_support import POOL
from tests.support import AGENT_IMAGE, TEST_IMAGE, TRAINER_IMAGE


@pytest.fixture(autouse=True, scope="session")
def _no_ambient_kubeconfig() -> Iterator[None]:
    """Guard: code under test must be handed a kubeconfig, never pick up the user's own."""
    saved = os.environ.pop("KUBECONFIG", None)
    os.environ["KUBECONFIG"] = str(Path("/nonexistent/edgetune-tests-must-not-use-ambient-kubeconfig"))
    yield
    if saved is None:
        os.environ.pop("KUBECONFIG", None)
    else:
        os.environ["KUBECONFIG"] = saved


def _cluster(name: str, tmp_path_factory: pytest.TempPathFactory, prefix: str) -> Iterator[ControlPlane]:
    plane = ControlPlane(name, tmp_path_factory.mktemp(name))
    with plane:
        plane.add_nodes(default_fleet(prefix))
        yield plane


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    yield from _cluster("hub", tmp_path_factory, "hub")


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def hub_crds(hub: ControlPlane) -> ControlPlane:
    """The hub with edgetune's CRDs (from crds/) installed and established."""
    hub.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    hub.kubectl("wait", "--for=condition=Established", "crd", "-l", "app.kubernetes.io/name=edgetune", "--timeout=60s")
    return hub


@pytest.fixture(scope="session")
def edge_a(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    yield from _cluster("edge-a", tmp_path_factory, "factory")


@pytest.fixture(scope="session")
def edge_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    yield from _cluster("edge-b", tmp_path_factory, "farm")


def _executor(plane: ControlPlane) -> Iterator[PodExecutor]:
    images = {
        TEST_IMAGE: LocalImage(entrypoint=(sys.executable,), env={"PYTHONUNBUFFERED": "1"}),
        TRAINER_IMAGE: LocalImage(entrypoint=(sys.executable, "-m", "edgetune_trainer"), env={"PYTHONUNBUFFERED": "1"}),
        AGENT_IMAGE: LocalImage(entrypoint=(sys.executable, "-m", "edgetune_agent"), env={"PYTHONUNBUFFERED": "1"}),
    }
    with PodExecutor(plane, images) as executor:
        yield executor


@pytest.fixture(scope="session")
def hub_executor(hub: ControlPlane) -> Iterator[PodExecutor]:
    yield from _executor(hub)


@pytest.fixture(scope="session")
def edge_a_executor(edge_a: ControlPlane) -> Iterator[PodExecutor]:
    yield from _executor(edge_a)


@pytest.fixture(scope="session")
def edge_b_executor(edge_b: ControlPlane) -> Iterator[PodExecutor]:
    yield from _executor(edge_b)


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with MlflowServer(s3, workdir=tmp_path_factory.mktemp("mlflow")) as server:
        yield server


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    with Prometheus(tmp_path_factory.mktemp("prometheus")) as server:
        yield server


@pytest.fixture(scope="session")
def fleet(hub_crds: ControlPlane, edge_a: ControlPlane, edge_b: ControlPlane) -> dict[str, ControlPlane]:
    """edge-a (site factory) and edge-b (site farm), both region eu, registered on the hub as EdgeClusters."""
    planes = {"edge-a": edge_a, "edge-b": edge_b}
    hub_crds.kubectl("create", "namespace", "edgetune-system")
    # What the chart installs on every cluster trainers run in: their ClusterRole and own-pod policy.
    trainers = chart.render("trainer.yaml", "edgeAccess.enabled=true")
    for plane in (hub_crds, edge_a, edge_b):
        plane.kubectl("apply", "-f", "-", input_text=trainers)
    for name, plane in planes.items():
        hub_crds.kubectl("-n", "edgetune-system", "create", "secret", "generic", f"{name}-kubeconfig",
                         f"--from-file=kubeconfig={plane.kubeconfig}")  # fmt: skip
        site = "factory" if name == "edge-a" else "farm"
        manifest = {
            "apiVersion": "edgetune.io/v1alpha1", "kind": "EdgeCluster",
            "metadata": {"name": name, "labels": {"region": "eu", "site": site}},
            "spec": {"kubeconfigSecretRef": {"name": f"{name}-kubeconfig", "namespace": "edgetune-system"},
                     "heartbeatInterval": "2s"},
        }  # fmt: skip
        hub_crds.kubectl("apply", "-f", "-", input_text=json.dumps(manifest))
    return planes


@pytest.fixture(scope="session")
def operator_proc(
    hub_crds: ControlPlane,
    fleet: dict[str, ControlPlane],
    s3: S3Server,
    mlflow_server: MlflowServer,
    prometheus: Prometheus,
    hub_executor: PodExecutor,
    edge_a_executor: PodExecutor,
    edge_b_executor: PodExecutor,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    """The operator, as a process, wired to the hub, both edges, MLflow, S3 and the Pushgateway."""
    s3.create_bucket("adapters")
    taint = ({"key": "edgetune.io/pool", "value": "operator-tests", "effect": "NoSchedule"},)
    hub_crds.add_nodes([dataclasses.replace(n, labels={**n.labels, **POOL}, taints=taint) for n in default_fleet("op")])
    env = {
        "EDGETUNE_NAMESPACES": json.dumps(["op-*", "kill-*"]),
        "EDGETUNE_MLFLOW_TRACKING_URI": mlflow_server.url,
        "EDGETUNE_S3_ENDPOINT": s3.endpoint,
        "EDGETUNE_PUSHGATEWAY_URL": prometheus.pushgateway_url,
        "EDGETUNE_CLUSTER_LOST_AFTER_SECONDS": "20",
        "EDGETUNE_PROMETHEUS_URL": prometheus.url,
        "EDGETUNE_RELEASE_RESYNC_SECONDS": "1",
        **{k: v for k, v in s3.env().items() if k.startswith("AWS_") and k != "AWS_ENDPOINT_URL_S3"},
    }
    proc = OperatorProcess(hub_crds, tmp_path_factory.mktemp("operator"), env, TRAINER_IMAGE)
    with proc:
        prometheus.add_target("edgetune-operator", f"127.0.0.1:{proc.metrics_port}")
        yield proc


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing test that ran against the operator process gets the operator's last log lines in its
    report, with every thread's stack (a CI log then says what the operator was doing, or waiting on)."""
    report = yield
    operator = getattr(item, "funcargs", {}).get("operator_proc")
    if call.when == "call" and report.failed and isinstance(operator, OperatorProcess):
        # The log first: a stack dump of two dozen threads would otherwise fill the whole tail.
        before = operator.log_tail(12000)
        report.sections.append(("operator log (tail)", before))
        operator.dump_stacks()
        after, mark = operator.log_tail(40000), before[-200:]
        cut = after.rfind(mark) if mark else -1
        report.sections.append(("operator threads", after[cut + len(mark) :] if cut >= 0 else after))
    return report
