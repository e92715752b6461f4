"""Pod watches for releases: wake the release loop the moment a target pod changes.

An AdapterRelease waits for agents to confirm what they were told (their report annotation on
their pod). Listing every target pod on a timer would either be slow (a step noticed up to a
resync period late) or expensive (1000 pods listed several times a second). Instead one watch per
(cluster, namespace, selector) that a running release uses tells the release loop that something
changed; the loop then reconciles once for a whole burst of reports.

A watch that fails (cluster unreachable, ``410 Gone``, the server closing it) starts again after a
short backoff; one no release asked for in ``IDLE_SECONDS`` ends; one whose cluster got a new client
(its kubeconfig Secret changed) is replaced.
"""

from __future__ import annotations

import logging
import threading
import time

from edgetune_operator.clients.kube import PODS, Kube, KubeError, UnreachableError

log = logging.getLogger("edgetune.release.watch")
IDLE_SECONDS = 300.0


class _Watch:
    def __init__(self, owner: PodWatches, key: tuple[str, str, str], kube: Kube, namespace: str,
                 labels: dict[str, str]) -> None:  # fmt: skip
        self.owner, self.key, self.kube, self.namespace, self.labels = owner, key, kube, namespace, labels
        self.used = time.monotonic()
        self.stopped = False
        self.thread = threading.Thread(target=self.run, name=f"watch-pods-{key[0]}-{namespace}", daemon=True)
        self.thread.start()

    def run(self) -> None:
        delay = 0.5
        while not self.stopped and time.monotonic() - self.used < IDLE_SECONDS:
            try:
                for event in self.kube.watch(PODS, self.namespace, labels=self.labels or None, timeout_seconds=60):
                    if self.stopped:
                        return
                    if event.get("type") != "BOOKMARK":
                        self.owner.wake.set()
                    delay = 0.5
            except (UnreachableError, KubeError) as exc:
                log.debug("pod watch %s ended: %s", self.key, exc)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        self.owner.forget(self)


class PodWatches:
    def __init__(self, wake: threading.Event) -> None:
        self.wake = wake
        self._lock = threading.Lock()
        self._watches: dict[tuple[str, str, str], _Watch] = {}

    def ensure(self, cluster: str, kube: Kube, namespace: str, labels: dict[str, str]) -> None:
        """A watch of the pods a release targets on ``cluster`` (called by every reconcile)."""
        key = (cluster, namespace, ",".join(f"{k}={v}" for k, v in sorted(labels.items())))
        with self._lock:
            current = self._watches.get(key)
            if current is not None and current.kube is kube and not current.stopped:
                current.used = time.monotonic()
                return
            if current is not None:
                current.stopped = True  # the cluster's client changed: watch with the new one
            self._watches[key] = _Watch(self, key, kube, namespace, labels)

    def forget(self, watch: _Watch) -> None:
        with self._lock:
            if self._watches.get(watch.key) is watch:
                del self._watches[watch.key]

    def close(self) -> None:
        with self._lock:
            for watch in self._watches.values():
                watch.stopped = True
            self._watches.clear()
