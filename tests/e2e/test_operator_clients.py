"""The operator's clients against the real servers: idempotent MLflow registration, and errors that
say what happened (not found, unreachable) for MLflow and Kubernetes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

from edgetune_operator.clients.kube import NAMESPACES, Kube, KubeError, NotFoundError, Resource, UnreachableError
from edgetune_operator.clients.mlflow import Mlflow, MlflowUnavailableError
from edgetune_operator.clients.prometheus import Prometheus as PrometheusClient
from edgetune_operator.controllers.informers import Informer
from edgetune_operator.reconcile.analysis import Measurement
from edgetune_testenv.cluster import ControlPlane
from edgetune_testenv.procs import free_port
from edgetune_testenv.servers import MlflowServer, Prometheus
from tests.support import eventually

pytestmark = pytest.mark.e2e


def test_registration_is_idempotent_by_package_digest(mlflow_server: MlflowServer) -> None:
    client = Mlflow(mlflow_server.url)
    args = {
        "experiment": "clients-test", "model": "idem-adapter", "alias": "candidate", "source": "s3://b/p",
        "run_name": "r", "params": {"peft.r": "8"}, "metrics_": {"eval_loss": 0.5}, "tags": {"edgetune.job": "j"},
    }  # fmt: skip
    first = client.register(digest="1" * 64, **args)  # type: ignore[arg-type]
    again = client.register(digest="1" * 64, **args)  # type: ignore[arg-type]
    assert first.created and not again.created
    assert (again.version, again.run_id) == (first.version, first.run_id)
    other = client.register(digest="2" * 64, **args)  # type: ignore[arg-type]
    assert other.version != first.version and other.run_id != first.run_id
    assert len(client.versions("idem-adapter")) == 2
    alias = client.call("GET", "registered-models/alias", query={"name": "idem-adapter", "alias": "candidate"})
    assert alias["model_version"]["version"] == other.version


def test_mlflow_down_is_a_retryable_error() -> None:
    with pytest.raises(MlflowUnavailableError, match="did not answer"):
        Mlflow(f"http://127.0.0.1:{free_port()}").experiment_id("x")


def test_kube_errors_name_the_problem(hub: ControlPlane) -> None:
    kube = Kube.from_kubeconfig_dict(yaml.safe_load(hub.kubeconfig.read_text()), "hub")
    assert kube.version().startswith("v1.36")
    with pytest.raises(NotFoundError):
        kube.get(NAMESPACES, "no-such-namespace")
    assert kube.get_or_none(NAMESPACES, "no-such-namespace") is None
    config = yaml.safe_load(hub.kubeconfig.read_text().replace(hub.server, f"https://127.0.0.1:{free_port()}"))
    with pytest.raises(UnreachableError, match="cluster dead"):
        Kube.from_kubeconfig_dict(config, "dead").version()


def test_a_watch_from_a_version_the_server_no_longer_has_is_410_and_the_informer_lists_afresh(
    tmp_path: Path,
) -> None:
    """The real API server's answer to a watch resumed from a resourceVersion it no longer keeps (a
    restarted server's watch cache starts at the current version; compaction does the same), and
    the informer's: list afresh, follow on. A control plane of its own: its API server restarts."""
    with ControlPlane("gone", tmp_path) as plane:
        kube = Kube.from_kubeconfig_dict(yaml.safe_load(plane.kubeconfig.read_text()), "gone")
        _, old = kube.list_versioned(NAMESPACES, selector=None)
        plane.kubectl("create", "namespace", "before-restart")
        apiserver = plane.process("kube-apiserver")
        apiserver.stop()
        apiserver.start()
        apiserver.wait_until(lambda: plane.kubectl("get", "--raw", "/readyz", check=False).returncode == 0, 60, "ready")
        with pytest.raises(KubeError) as refused:
            next(iter(kube.watch(NAMESPACES, resource_version=old, timeout_seconds=5)))
        assert refused.value.status == 410, refused.value
        real_list = kube.list_versioned
        lists: list[str] = []

        def first_list_stale(resource: Resource, *, selector: str | None) -> tuple[list[dict[str, Any]], str]:
            items, version = real_list(resource, selector=selector)
            lists.append(version)
            return items, old if len(lists) == 1 else version  # its first watch resumes from before the restart

        kube.list_versioned = first_list_stale  # type: ignore[method-assign]
        seen: list[str] = []
        informer = Informer("gone", kube, NAMESPACES, None, lambda _c, _ns, name: seen.append(name)).start()
        try:
            eventually(lambda: len(lists) >= 2, timeout=30, what="the informer to list again after the 410")
            plane.kubectl("create", "namespace", "after-410")
            eventually(lambda: "after-410" in seen, timeout=30, what="the informer following changes after the 410")
        finally:
            informer.stop()
        gone = REGISTRY.get_sample_value("edgetune_operator_watch_restarts_total",
                                         {"cluster": "gone", "kind": "namespaces", "reason": "gone"})  # fmt: skip
        assert gone == 1.0


def test_prometheus_measurements_value_nodata_and_errors_quoting_prometheus(prometheus: Prometheus) -> None:
    client = PrometheusClient(prometheus.url)
    assert client.measure("vector(0.25)") == Measurement("value", 0.25)
    assert client.measure("scalar(vector(2))") == Measurement("value", 2.0)
    assert client.measure('up{job="no-such-job"}').kind == "nodata"
    assert client.measure("vector(0) / 0").kind == "nodata"  # NaN is no data, never a pass
    rejected = client.measure("sum(rate(edgetune_agent_requests_total[1m]")
    assert rejected.kind == "error" and "rejected the query (bad_data)" in rejected.message
    assert "unclosed left parenthesis" in rejected.message  # Prometheus' own words
    several = client.measure('label_replace(vector(1), "x", "a", "", "") or label_replace(vector(2), "x", "b", "", "")')
    assert several.kind == "error" and "returns 2 series" in several.message
    down = PrometheusClient(f"http://127.0.0.1:{free_port()}").measure("vector(1)")
    assert down.kind == "error" and "unreachable" in down.message
