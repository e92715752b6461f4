"""The cluster registry: the local cluster (implicit) and every EdgeCluster, reached through the
kubeconfig in its Secret. Clients are cached per cluster and rebuilt when the Secret changes.

EdgeClusters are read from a watch of our own (``Informer``: listed once, then watched), so
selecting clusters for a job, or reading one's status, costs no request; the kubeconfig Secret is
read again at most every ``SECRET_TTL_SECONDS``. ``Heartbeats`` probes every cluster when its
``heartbeatInterval`` is due from one loop and a small pool of threads, rather than a kopf timer per
EdgeCluster (an asyncio task and a thread hand-off per cluster every second, whether due or not).
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import yaml

from edgetune_api.edge_cluster import EdgeClusterSpec, EdgeClusterStatus, NodeCounts
from edgetune_api.meta import LabelSelector, parse_duration
from edgetune_operator import metrics
from edgetune_operator.clients.kube import (
    EDGE_CLUSTERS,
    NODES,
    Kube,
    KubeError,
    NotFoundError,
    ThrottledError,
    UnreachableError,
)
from edgetune_operator.controllers.credentials import ConfigurationError, read_secret
from edgetune_operator.controllers.informers import Informer
from edgetune_operator.reconcile.placement import Node, accelerator_resources
from edgetune_operator.reconcile.training_job import set_condition
from edgetune_operator.settings import Settings

LOCAL = "local"
log = logging.getLogger("edgetune.clusters")
SPEC_KEYS = tuple(field.alias or name for name, field in EdgeClusterSpec.model_fields.items())


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
        self._beats: dict[str, tuple[Any, float, float]] = {}
        """name -> (generation, its heartbeat interval in seconds, when last probed)."""
        self._nodes: dict[str, tuple[float, list[Node]]] = {}
        self._node_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self.watched: Informer | None = None
        """EdgeClusters as last seen (``watch``); until it is in sync, reads go to the API server."""

    def watch(self, on_change: Callable[[str], None] | None = None) -> Informer:
        """Start following EdgeClusters; ``on_change`` hears each change (or deletion) by name."""

        def changed(_cluster: str, _namespace: str, name: str) -> None:
            if on_change is not None:
                on_change(name)

        self.watched = Informer(LOCAL, self.local, EDGE_CLUSTERS, None, changed, spec_keys=SPEC_KEYS).start()
        return self.watched

    def _synced(self) -> Informer | None:
        watched = self.watched
        return watched if watched is not None and watched.synced.is_set() else None

    def edge_clusters(self) -> list[dict[str, Any]]:
        watched = self._synced()
        return watched.objects() if watched is not None else self.local.list(EDGE_CLUSTERS)

    def select(self, selector: LabelSelector | None) -> list[str]:
        """Names of the clusters a job's clusterSelector picks; the local cluster when it has none."""
        if selector is None:
            return [LOCAL]
        names = []
        for obj in self.edge_clusters():
            labels = dict(obj["metadata"].get("labels") or {})
            if selector.matches(labels):
                names.append(obj["metadata"]["name"])
        return sorted(names)

    def edge_cluster(self, name: str, *, fresh: bool = False) -> dict[str, Any]:
        """The EdgeCluster as last watched; ``fresh``: read from the API server (for a write that
        must carry its current resourceVersion)."""
        watched = None if fresh else self._synced()
        obj = watched.get("", name) if watched is not None else self.local.get_or_none(EDGE_CLUSTERS, name)
        if obj is None:
            raise ClusterUnavailableError(f"EdgeCluster {name} does not exist")
        return obj

    def paused(self, name: str) -> bool:
        """The EdgeCluster's spec.paused: no new work is placed on it (the local cluster never is)."""
        if name == LOCAL:
            return False
        try:
            return bool((self.edge_cluster(name).get("spec") or {}).get("paused"))
        except ClusterUnavailableError:  # deleted meanwhile: reported as unavailable where it is used
            return False

    def remember(self, edge_cluster: dict[str, Any]) -> None:
        """An EdgeCluster as the operator just wrote it, before its watch event arrives."""
        if self.watched is not None:
            self.watched.remember(edge_cluster)

    def get(self, name: str) -> Kube:
        if name == LOCAL:
            return self.local
        return self.client_for(self.edge_cluster(name))

    def client_for(self, edge_cluster: dict[str, Any]) -> Kube:
        name = edge_cluster["metadata"]["name"]
        spec = EdgeClusterSpec.model_validate(edge_cluster["spec"])
        ref = spec.kubeconfig_secret_ref
        try:
            secret = read_secret(self.local, ref.namespace, ref.name)
        except ConfigurationError as exc:  # the operator may not read it
            raise ClusterUnavailableError(str(exc)) from None
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
            self._beats.pop(name, None)
        if entry:
            entry.kube.close()
        with suppress(KeyError):  # a deleted EdgeCluster leaves no stale series behind
            metrics.CLUSTER_REACHABLE.remove(name)
        with suppress(KeyError):
            metrics.KUBE_THROTTLED.remove(name)
        with suppress(KeyError):
            metrics.CLUSTER_HEARTBEAT_SECONDS.remove(name)
        for accelerator in NodeCounts.model_fields:
            with suppress(KeyError):
                metrics.CLUSTER_NODES.remove(name, accelerator)

    # -- EdgeCluster heartbeat ----------------------------------------------------------------------

    def due(self, edge_cluster: dict[str, Any], now: float) -> bool:
        """Whether ``spec.heartbeatInterval`` has passed since the cluster's last probe (a new
        generation is probed at once); marks it probed when so."""
        meta = edge_cluster["metadata"]
        name, generation = meta["name"], meta.get("generation")
        with self._lock:
            seen = self._beats.get(name)
            if seen is not None and seen[0] == generation:
                interval, probed = seen[1], seen[2]
            else:  # a new cluster or generation: its interval parsed once, not on every tick
                spec = EdgeClusterSpec.model_validate(edge_cluster["spec"])
                interval, probed = parse_duration(spec.heartbeat_interval), float("-inf")
            if now - probed < interval:
                return False
            self._beats[name] = (generation, interval, now)
            return True

    def heartbeat(self, edge_cluster: dict[str, Any], now: datetime | None = None) -> EdgeClusterStatus:
        """Probe the cluster: version, nodes by accelerator. The new status (not yet written)."""
        now = now or datetime.now(UTC).replace(microsecond=0)
        name = edge_cluster["metadata"]["name"]
        generation = int(edge_cluster["metadata"].get("generation", 1))
        old = EdgeClusterStatus.model_validate(edge_cluster.get("status") or {})
        status = old.model_copy(update={"observed_generation": generation})
        started = time.monotonic()
        try:
            kube = self.client_for(edge_cluster)
            version = kube.version()
            nodes = [Node.from_wire(n) for n in kube.list(NODES)]
        except (ClusterUnavailableError, UnreachableError, KubeError) as exc:
            metrics.CLUSTER_REACHABLE.labels(name).set(0)
            status.reachable = False
            status.conditions = set_condition(old.conditions, "Reachable", False, reason=type(exc).__name__.replace(
                "Error", ""), message=describe(exc)[:1000], generation=generation, now=now)  # fmt: skip
            return status
        took = time.monotonic() - started
        metrics.CLUSTER_REACHABLE.labels(name).set(1)
        metrics.CLUSTER_HEARTBEAT_SECONDS.labels(name).set(round(took, 3))
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
            message=f"{version}, {len(nodes)} node(s): {counts.gpu} gpu, {counts.npu} npu, {counts.cpu} cpu; "
                    f"answered in {took:.1f} s",
            generation=generation, now=now,
        )  # fmt: skip
        return status


class Heartbeats:
    """Probes every watched EdgeCluster whose heartbeat is due, writes its status and hands a
    reachable one to ``on_reachable`` (the sweep of trainers left by jobs deleted meanwhile).

    One loop over the watched copies wakes every ``TICK_SECONDS`` (at once when a cluster is added
    or its spec changes); due probes go to a pool of ``workers`` threads, at most one per cluster, so
    a cluster that answers slowly holds up no other. Runs on the leader only (started with the
    controllers)."""

    TICK_SECONDS = 1.0

    def __init__(
        self, clusters: Clusters, on_reachable: Callable[[dict[str, Any]], None], on_deleted: Callable[[str], None],
        *, workers: int = 4,
    ) -> None:  # fmt: skip
        self.clusters = clusters
        self.on_reachable = on_reachable
        self.on_deleted = on_deleted
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="heartbeat")
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeats", daemon=True)

    def start(self) -> Heartbeats:
        self.clusters.watch(self.changed)
        self._thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self._wake.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.clusters.watched is not None:
            self.clusters.watched.stop()

    def changed(self, name: str) -> None:
        """From the EdgeCluster watch: a deleted cluster is forgotten, any other change looked at now."""
        watched = self.clusters.watched
        if watched is not None and watched.get("", name) is None:
            self.clusters.forget(name)
            self.on_deleted(name)
        self._wake.set()

    def _loop(self) -> None:
        while not self.stop.is_set():
            self._wake.wait(self.TICK_SECONDS)
            self._wake.clear()
            watched = self.clusters.watched
            if watched is None or not watched.synced.is_set():
                continue
            now = time.monotonic()
            for obj in watched.objects():
                name = obj["metadata"]["name"]
                with self._lock:
                    if name in self._busy or not self.clusters.due(obj, now):
                        continue
                    self._busy.add(name)
                try:
                    self._pool.submit(self._beat, obj)
                except RuntimeError:  # shut down meanwhile
                    return

    def _beat(self, edge_cluster: dict[str, Any]) -> None:
        name = edge_cluster["metadata"]["name"]
        try:
            status = self.clusters.heartbeat(edge_cluster)
            written = self.clusters.local.replace_status(EDGE_CLUSTERS, name, None, status.to_wire())
            self.clusters.remember(written)
            if status.reachable:
                self.on_reachable(written)
        except NotFoundError:
            pass  # deleted meanwhile: its watch event forgets it
        except Exception:  # the next due heartbeat tries again; the loop must go on
            log.exception("heartbeat of EdgeCluster %s failed", name)
        finally:
            with self._lock:
                self._busy.discard(name)


def describe(exc: Exception) -> str:
    """What a failed call to a cluster means, for a condition a person reads."""
    if isinstance(exc, ThrottledError):
        after = f"; it asked to retry after {exc.retry_after:.0f} s" if exc.retry_after is not None else ""
        return (f"the API server is throttling the operator (429 Too Many Requests: {exc.message}){after}; the "
                "cluster answers, so its trainers are kept and the operator retries")  # fmt: skip
    return str(exc)


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
