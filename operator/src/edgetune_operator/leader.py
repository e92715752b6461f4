"""Leader election over a ``coordination.k8s.io/v1`` Lease: of several operator replicas, one reconciles.

The same protocol as client-go's: the holder renews ``spec.renewTime`` every ``renew`` seconds; a
candidate takes the Lease over once it has seen the record unchanged for ``duration`` seconds (by
its own monotonic clock, so clocks need not agree); every write carries the ``resourceVersion`` it
read, so two candidates cannot both win. A leader that cannot renew for ``duration`` seconds stops
(``on_lost``: the process exits and Kubernetes restarts it as a candidate) before a standby could
take over, so two replicas never reconcile at once. On a clean stop the leader releases the Lease
and a standby takes over at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from edgetune_operator.clients.kube import LEASES, ConflictError, Kube, KubeError, UnreachableError

log = logging.getLogger("edgetune.leader")


def _micro_time(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class LeaderElection:
    kube: Kube
    namespace: str
    identity: str
    name: str = "edgetune-operator"
    duration: float = 15.0
    renew: float = 5.0
    _seen: tuple[str, float] | None = field(default=None, init=False)  # (record, monotonic time first seen)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _renewer: threading.Thread | None = field(default=None, init=False)

    def _spec(self, lease: dict[str, Any] | None, now: datetime) -> dict[str, Any]:
        old = (lease or {}).get("spec") or {}
        ours = old.get("holderIdentity") == self.identity
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.duration),
            "acquireTime": old.get("acquireTime") if ours else _micro_time(now),
            "renewTime": _micro_time(now),
            "leaseTransitions": int(old.get("leaseTransitions") or 0) + (0 if ours or lease is None else 1),
        }

    def try_acquire_or_renew(self) -> bool:
        """One attempt: True when this replica holds the Lease afterwards."""
        now = datetime.now(UTC)
        try:
            lease = self.kube.get_or_none(LEASES, self.name, self.namespace)
            if lease is None:
                self.kube.create({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                  "metadata": {"name": self.name, "namespace": self.namespace},
                                  "spec": self._spec(None, now)})  # fmt: skip
                return True
            spec = lease.get("spec") or {}
            holder = spec.get("holderIdentity")
            if holder and holder != self.identity and not self._expired(lease):
                return False
            lease["spec"] = self._spec(lease, now)
            self.kube.call("PUT", LEASES.path(self.namespace, self.name), body=lease)
        except ConflictError:
            return False  # another replica wrote first
        except (KubeError, UnreachableError) as exc:
            log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
            return False
        return True

    def _expired(self, lease: dict[str, Any]) -> bool:
        spec = lease.get("spec") or {}
        record = f"{spec.get('holderIdentity')}|{spec.get('renewTime')}|{lease['metadata'].get('resourceVersion')}"
        if self._seen is None or self._seen[0] != record:
            self._seen = (record, time.monotonic())
            return False
        duration = float(spec.get("leaseDurationSeconds") or self.duration)
        return time.monotonic() - self._seen[1] > duration

    def wait_until_leader(self) -> bool:
        """Block until this replica holds the Lease (True), or ``release`` was called (False)."""
        announced = False
        while not self._stop.is_set():
            if self.try_acquire_or_renew():
                log.info("became leader (lease %s/%s, identity %s)", self.namespace, self.name, self.identity)
                return True
            if not announced:
                log.info("standby: another replica holds lease %s/%s", self.namespace, self.name)
                announced = True
            self._stop.wait(self.renew / 2)
        return False

    def keep_renewing(self, on_lost: Callable[[], None]) -> None:
        """Renew in a thread; call ``on_lost`` once renewals have failed for ``duration`` seconds."""

        def loop() -> None:
            last = time.monotonic()
            while not self._stop.wait(self.renew):
                if self.try_acquire_or_renew():
                    last = time.monotonic()
                elif time.monotonic() - last > self.duration - self.renew:
                    log.error("lost lease %s/%s: could not renew for %.0f s", self.namespace, self.name,
                              time.monotonic() - last)  # fmt: skip
                    on_lost()
                    return

        self._renewer = threading.Thread(target=loop, name="leader-renew", daemon=True)
        self._renewer.start()

    def release(self) -> None:
        """Give the Lease up (a clean stop): a standby takes over without waiting for it to expire."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=self.renew + 5)
        try:
            lease = self.kube.get_or_none(LEASES, self.name, self.namespace)
            if lease and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"] = {**lease["spec"], "holderIdentity": None, "leaseDurationSeconds": 1,
                                 "renewTime": _micro_time(datetime.now(UTC))}  # fmt: skip
                self.kube.call("PUT", LEASES.path(self.namespace, self.name), body=lease)
                log.info("released lease %s/%s", self.namespace, self.name)
        except (KubeError, UnreachableError) as exc:
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name, exc)
