"""The cluster registry: the local cluster (implicit) and every EdgeCluster, reached through the
kubeconfig in its Secret. Clients are cached per cluster and rebuilt when the Secret changes.
"""

from __future__ import annotations

import base64
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import yaml

from edgetune_api.edge_cluster import EdgeClusterSpec, EdgeClusterStatus, NodeCounts
from edgetune_api.meta import LabelSelector, parse_duration
from edgetune_operator import metrics
from edgetune_operator.clients.kube import EDGE_CLUSTERS, NODES, SECRETS, Kube, KubeError, UnreachableError
from edgetune_operator.reconcile.placement import Node, accelerator_resources
from edgetune_operator.reconcile.training_job import set_condition
from edgetune_operator.settings import Settings

LOCAL = "local"


class ClusterUnavailableError(RuntimeError):
    """The cluster cannot be used: no such EdgeCluster, its Secret is missing or invalid, or paused."""


@dataclass
class _Entry:
    version: str
    kube: Kube


class Clusters:
    def __init__(self, local: Kube, settings: Settings) -> None:
        self.local = local
        self.settings = settings
        self._cache: dict[str, _Entry] = {}
        self._probed: dict[tuple[str, Any], float] = {}
        self._nodes: dict[str, tuple[float, list[Node]]] = {}
        self._node_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def select(self, selector: LabelSelector | None) -> list[str]:
        """Names of the clusters a job's clusterSelector picks; the local cluster when it has none."""
        if selector is None:
            return [LOCAL]
        names = []
        for obj in self.local.list(EDGE_CLUSTERS):
            labels = dict(obj["metadata"].get("labels") or {})
            if selector.matches(labels):
                names.append(obj["metadata"]["name"])
        return sorted(names)

    def edge_cluster(self, name: str) -> dict[str, Any]:
        obj = self.local.get_or_none(EDGE_CLUSTERS, name)
        if obj is None:
            raise ClusterUnavailableError(f"EdgeCluster {name} does not exist")
        return obj

    def get(self, name: str) -> Kube:
        if name == LOCAL:
            return self.local
        return self.client_for(self.edge_cluster(name))

    def client_for(self, edge_cluster: dict[str, Any]) -> Kube:
        name = edge_cluster["metadata"]["name"]
        spec = EdgeClusterSpec.model_validate(edge_cluster["spec"])
        ref = spec.kubeconfig_secret_ref
        secret = self.local.get_or_none(SECRETS, ref.name, ref.namespace)
        if secret is None:
            raise ClusterUnavailableError(f"Secret {ref.namespace}/{ref.name} (kubeconfig of {name}) does not exist")
        version = secret["metadata"].get("resourceVersion", "")
        with self._lock:
            entry = self._cache.get(name)
            if entry and entry.version == version:
                return entry.kube
        encoded = (secret.get("data") or {}).get(ref.key)
        if not encoded:
            raise ClusterUnavailableError(f"Secret {ref.namespace}/{ref.name} has no key {ref.key!r}")
        try:
            kubeconfig = yaml.safe_load(base64.b64decode(encoded))
            kube = Kube.from_kubeconfig_dict(kubeconfig, name)
        except Exception as exc:
            raise ClusterUnavailableError(
                f"Secret {ref.namespace}/{ref.name} key {ref.key!r} is not a usable kubeconfig: {exc}"
            ) from None
        with self._lock:
            old = self._cache.pop(name, None)
            self._cache[name] = _Entry(version, kube)
        if old:
            old.kube.close()
        return kube

    def nodes(self, cluster: str, kube: Kube) -> list[Node]:
        """The cluster's nodes, listed at most every ``node_cache_seconds`` (a list of 1000 nodes is
        megabytes; every job of the cluster shares one), one lister at a time per cluster."""
        with self._lock:
            lock = self._node_locks.setdefault(cluster, threading.Lock())
        with lock:
            cached = self._nodes.get(cluster)
            if cached and time.monotonic() - cached[0] < self.settings.node_cache_seconds:
                return cached[1]
            nodes = [Node.from_wire(n) for n in kube.list(NODES)]
            self._nodes[cluster] = (time.monotonic(), nodes)
            return nodes

    def forget(self, name: str) -> None:
        with self._lock:
            entry = self._cache.pop(name, None)
        if entry:
            entry.kube.close()
        with suppress(KeyError):  # a deleted EdgeCluster leaves no stale series behind
            metrics.CLUSTER_REACHABLE.remove(name)
        for accelerator in NodeCounts.model_fields:
            with suppress(KeyError):
                metrics.CLUSTER_NODES.remove(name, accelerator)

    # -- EdgeCluster heartbeat ----------------------------------------------------------------------

    def heartbeat_if_due(self, edge_cluster: dict[str, Any]) -> EdgeClusterStatus | None:
        """A heartbeat when ``spec.heartbeatInterval`` has passed since the last probe (or the spec
        changed), else None."""
        meta = edge_cluster["metadata"]
        interval = parse_duration(EdgeClusterSpec.model_validate(edge_cluster["spec"]).heartbeat_interval)
        key = (meta["name"], meta.get("generation"))
        now = time.monotonic()
        with self._lock:
            if now - self._probed.get(key, float("-inf")) < interval:
                return None
            self._probed[key] = now
        return self.heartbeat(edge_cluster)

    def heartbeat(self, edge_cluster: dict[str, Any], now: datetime | None = None) -> EdgeClusterStatus:
        """Probe the cluster: version, nodes by accelerator. The new status (not yet written)."""
        now = now or datetime.now(UTC).replace(microsecond=0)
        name = edge_cluster["metadata"]["name"]
        generation = int(edge_cluster["metadata"].get("generation", 1))
        old = EdgeClusterStatus.model_validate(edge_cluster.get("status") or {})
        status = old.model_copy(update={"observed_generation": generation})
        try:
            kube = self.client_for(edge_cluster)
            version = kube.version()
            nodes = [Node.from_wire(n) for n in kube.list(NODES)]
        except (ClusterUnavailableError, UnreachableError, KubeError) as exc:
            metrics.CLUSTER_REACHABLE.labels(name).set(0)
            status.reachable = False
            status.conditions = set_condition(old.conditions, "Reachable", False, reason=type(exc).__name__.replace(
                "Error", ""), message=str(exc)[:1000], generation=generation, now=now)  # fmt: skip
            return status
        metrics.CLUSTER_REACHABLE.labels(name).set(1)
        counts = count_nodes(nodes, self.settings)
        for accelerator, count in counts.model_dump().items():
            metrics.CLUSTER_NODES.labels(name, accelerator).set(count)
        status.reachable = True
        status.kubernetes_version = version
        status.nodes = len(nodes)
        status.nodes_by_accelerator = counts
        status.last_heartbeat_time = now
        status.conditions = set_condition(
            old.conditions, "Reachable", True, reason="HeartbeatSucceeded",
            message=f"{version}, {len(nodes)} node(s): {counts.gpu} gpu, {counts.npu} npu, {counts.cpu} cpu",
            generation=generation, now=now,
        )  # fmt: skip
        return status


def count_nodes(nodes: list[Node], settings: Settings) -> NodeCounts:
    profiles = settings.accelerator_profiles
    gpu = {p.resource for p in profiles.get("gpu", []) if p.resource}
    npu = {p.resource for p in profiles.get("npu", []) if p.resource}
    any_accel = accelerator_resources(profiles)
    counts = NodeCounts()
    for node in nodes:
        if not node.ready:
            continue
        if any(node.has_resource(r) for r in gpu):
            counts.gpu += 1
        elif any(node.has_resource(r) for r in npu):
            counts.npu += 1
        elif not any(node.has_resource(r) for r in any_accel):
            counts.cpu += 1
    return counts
