"""Watched caches of a job's children (trainer Jobs and their pods), one pair per cluster.

Listing each job's Jobs and pods on every reconcile (and polling edge clusters for changes) costs
two requests per job per resync and notices a finished trainer a resync period late. Instead one
informer per (cluster, kind) lists once, then watches every object labelled with a training job's
uid — resumed from the last resourceVersion after a disconnect (bookmarks keep it fresh), listed
again after ``410 Gone`` — keeps a slimmed copy of each object, and calls back with the owning
job's namespace and name on every change. Reconciles read the cache; they list only while an
informer is not in sync (cluster unreachable, just started).

A broken watch is retried with exponential backoff and jitter, per informer: one silent cluster
never delays another.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Mapping
from typing import Any

from edgetune_operator import metrics
from edgetune_operator.clients.kube import JOBS, NODES, PODS, Kube, KubeError, Resource, UnreachableError
from edgetune_operator.reconcile.placement import Node

log = logging.getLogger("edgetune.informer")

OnChange = Callable[[str, str, str], None]
"""Called with (cluster, namespace, uid label value) when a child of that job changed; for an
informer without a label, with the changed object's own name."""

WATCH_SECONDS = 240
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 10.0
"""A watch that failed is started again after 0.5 s, doubling up to 10 s: a cluster back from a
restart is followed again within seconds."""


def backoff_delay(attempt: int, first: float = BACKOFF_FIRST, cap: float = BACKOFF_MAX) -> float:
    """Exponential with full jitter in its upper half: ``first·2^attempt`` capped, times 0.5 to 1."""
    jitter = 0.5 + random.random() / 2  # noqa: S311 - jitter, not crypto
    return float(min(cap, first * 2.0 ** min(attempt, 30)) * jitter)


def _slim(obj: dict[str, Any], spec_keys: tuple[str, ...], status_keys: tuple[str, ...] | None) -> dict[str, Any]:
    """What reconciles read of an object: identity, labels, annotations, a few spec fields, the
    status (or a few of its fields)."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    kept = ("name", "namespace", "uid", "generation", "labels", "annotations", "resourceVersion", "deletionTimestamp")
    return {
        "metadata": {k: meta[k] for k in kept if k in meta},
        "spec": {k: spec[k] for k in spec_keys if k in spec},
        "status": status if status_keys is None else {k: status[k] for k in status_keys if k in status},
    }


def newer(incoming: Mapping[str, Any], current: Mapping[str, Any] | None, *, strict: bool = False) -> bool:
    """Whether ``incoming`` may replace ``current``: resourceVersions are etcd revisions on every
    API server we target; an object written through (``remember``) must not be replaced by an older
    event still in flight. ``strict``: the same version is not newer either. Unparsable versions
    always replace."""
    if current is None:
        return True
    try:
        theirs, ours = int(incoming["metadata"]["resourceVersion"]), int(current["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return True
    return theirs > ours or (theirs == ours and not strict)


class Informer:
    """One kind on one cluster, selected by the presence of ``label`` (every object without one),
    cached by (namespace, name) and indexed by the label's value. ``on_change`` hears of each change
    by the label's value, or without a label by the object's name."""

    def __init__(
        self, cluster: str, kube: Kube, resource: Resource, label: str | None, on_change: OnChange | None, *,
        spec_keys: tuple[str, ...] = (), status_keys: tuple[str, ...] | None = None,
    ) -> None:  # fmt: skip
        self.cluster, self.kube, self.resource, self.label = cluster, kube, resource, label
        self.on_change = on_change
        self.spec_keys, self.status_keys = spec_keys, status_keys
        self.version = 0
        """Counts changes to the cache (what a derived view is keyed by)."""
        self._lock = threading.Lock()
        self._objects: dict[tuple[str, str], dict[str, Any]] = {}
        self._by_owner: dict[str, set[tuple[str, str]]] = {}
        self.synced = threading.Event()
        self.stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"informer-{cluster}-{resource.plural}", daemon=True
        )  # fmt: skip

    def start(self) -> Informer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()

    # -- reads ----------------------------------------------------------------------------------

    def objects(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._objects.values())

    def owned_by(self, owner: str) -> list[dict[str, Any]]:
        with self._lock:
            return [self._objects[key] for key in self._by_owner.get(owner, ()) if key in self._objects]

    def remember(self, obj: dict[str, Any]) -> None:
        """Write-through: an object this operator just created or changed, before its watch event."""
        self._put(_slim(obj, self.spec_keys, self.status_keys))

    # -- cache ----------------------------------------------------------------------------------

    def _put(self, obj: dict[str, Any]) -> str | None:
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        owner = (meta.get("labels") or {}).get(self.label) if self.label else None
        with self._lock:
            if not newer(obj, self._objects.get(key)):
                return None
            self._objects[key] = obj
            self.version += 1
            if owner:
                self._by_owner.setdefault(owner, set()).add(key)
        return owner if self.label else meta["name"]

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._objects.get((namespace, name))

    def _drop(self, namespace: str, name: str) -> str | None:
        key = (namespace, name)
        with self._lock:
            obj = self._objects.pop(key, None)
            if obj is None:
                return None
            self.version += 1
            if not self.label:
                return name
            owner = (obj["metadata"].get("labels") or {}).get(self.label)
            if owner and owner in self._by_owner:
                self._by_owner[owner].discard(key)
                if not self._by_owner[owner]:
                    del self._by_owner[owner]
        return owner

    def _notify(self, namespace: str, owner: str | None) -> None:
        if owner and self.on_change is not None:
            try:
                self.on_change(self.cluster, namespace, owner)
            except Exception:
                log.exception("informer %s/%s: change handler failed", self.cluster, self.resource.plural)

    # -- the loop -------------------------------------------------------------------------------

    def _relist(self) -> str:
        items, version = self.kube.list_versioned(self.resource, selector=self.label)
        fresh = {(o["metadata"].get("namespace", ""), o["metadata"]["name"]): _slim(o, self.spec_keys, self.status_keys)
                 for o in items}  # fmt: skip
        with self._lock:
            gone = [k for k in self._objects if k not in fresh]
        changed = [(key[0], self._drop(*key)) for key in gone]
        changed += [(key[0], self._put(obj)) for key, obj in fresh.items()]
        self.synced.set()
        for namespace, owner in changed:
            self._notify(namespace, owner)
        return version

    def _run(self) -> None:
        version: str | None = None
        attempt = 0
        while not self.stopped.is_set():
            try:
                if version is None:
                    version = self._relist()
                for event in self.kube.watch(self.resource, selector=self.label, resource_version=version,
                                             timeout_seconds=WATCH_SECONDS):  # fmt: skip
                    if self.stopped.is_set():
                        return
                    obj = event.get("object") or {}
                    version = (obj.get("metadata") or {}).get("resourceVersion") or version
                    kind = event.get("type")
                    if kind == "BOOKMARK":
                        continue
                    meta = obj.get("metadata") or {}
                    if kind == "DELETED":
                        owner = self._drop(meta.get("namespace", ""), meta.get("name", ""))
                    else:
                        owner = self._put(_slim(obj, self.spec_keys, self.status_keys))
                    self._notify(meta.get("namespace", ""), owner)
                    attempt = 0
            except KubeError as exc:
                if exc.status == 410:  # our resourceVersion was compacted away: list again
                    log.info("informer %s/%s: %s; listing again", self.cluster, self.resource.plural, exc)
                    metrics.WATCH_RESTARTS.labels(self.cluster, self.resource.plural, "gone").inc()
                    version = None
                    continue
                self._backoff(attempt, exc, "error")
                attempt += 1
            except UnreachableError as exc:
                self.synced.clear()  # reconciles list (and find it unreachable) until we are back
                version = None  # a restarted API server may have lost its watch cache: list afresh
                self._backoff(attempt, exc, "unreachable")
                attempt += 1

    def _backoff(self, attempt: int, exc: Exception, reason: str) -> None:
        delay = backoff_delay(attempt)
        log.debug("informer %s/%s: %s; again in %.1f s", self.cluster, self.resource.plural, exc, delay)
        metrics.WATCH_RESTARTS.labels(self.cluster, self.resource.plural, reason).inc()
        self.stopped.wait(delay)


class ClusterInformers:
    """A cluster's trainer Jobs and pods, watched together for one client of that cluster, and its
    nodes (placement reads them: a 1000-node list per new job, or every few seconds, was the
    slowest part of starting one)."""

    def __init__(self, cluster: str, kube: Kube, label: str, on_change: OnChange) -> None:
        self.cluster, self.kube = cluster, kube
        self.jobs = Informer(cluster, kube, JOBS, label, on_change, spec_keys=("suspend",)).start()
        self.pods = Informer(cluster, kube, PODS, label, on_change, spec_keys=("nodeName",)).start()
        self.nodes = Informer(cluster, kube, NODES, None, None, spec_keys=("unschedulable",),
                              status_keys=("allocatable", "conditions")).start()  # fmt: skip
        self._node_view: tuple[int, list[Node]] = (-1, [])

    def node_list(self) -> list[Node] | None:
        """The cluster's nodes as placement reads them; None until the node watch is in sync."""
        if not self.nodes.synced.is_set():
            return None
        version, view = self._node_view
        if version != self.nodes.version:
            version = self.nodes.version
            view = [Node.from_wire(n) for n in self.nodes.objects()]
            self._node_view = (version, view)
        return view

    @property
    def synced(self) -> bool:
        return self.jobs.synced.is_set() and self.pods.synced.is_set()

    def stop(self) -> None:
        self.jobs.stop()
        self.pods.stop()
        self.nodes.stop()
