"""Tell Kubernetes what the agent serves, on its own pod only.

Three writes, all with the pod's service-account token: the ``edgetune.io/adapter-status``
annotation (JSON ``AdapterReport``), the ``edgetune.io/AdapterReady`` condition in the pod status
(a readiness gate), and Events about swaps and refusals. The agent's RBAC allows patching pods
in its namespace; a ValidatingAdmissionPolicy (chart: ``agent-policy.yaml``) narrows that to the
pod its token is bound to, and to those fields.

Writing is asynchronous and coalescing: the newest report replaces an unsent one, failures are
retried with backoff, and none of it ever blocks serving (``edgetune_api.own_pod`` does the HTTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from edgetune_agent.metrics import AgentMetrics
from edgetune_api.assignment import READY_CONDITION, REPORT_ANNOTATION, AdapterReport, dumps
from edgetune_api.own_pod import SA_DIR, OwnPod, OwnPodError

log = logging.getLogger("edgetune_agent.report")
COMPONENT = "edgetune-agent"


def ready_condition(report: AdapterReport) -> tuple[str, str, str]:
    """(status, reason, message) of the readiness-gate condition.

    True when the agent answers with what it should: the desired adapter, or — while a new one
    loads, retries or was refused — the last good adapter it already served. False only when it
    has nothing good to serve for its assignment (a new pod whose first adapter is not loaded).
    """
    active = report.active
    if report.state in ("Serving", "NoAssignment"):
        what = f"serving adapter {active.version}" if active else "serving the base model"
        return "True", "Serving" if report.state == "Serving" else "NoAssignment", what
    error = report.error
    if active is not None:
        detail = f"{error.reason}: {error.message}" if error else "loading the desired adapter"
        return (
            "True",
            {"Loading": "Swapping"}.get(report.state, report.state),
            f"still serving {active.version}; {detail}",
        )
    return "False", report.state, error.message if error else "loading the desired adapter"


class PodReporter:
    def __init__(
        self, *, namespace: str, pod: str, uid: str | None, metrics: AgentMetrics, server: str | None = None,
        token_path: Path | None = None, ca_path: Path | None = None,
    ) -> None:  # fmt: skip
        sa_dir = Path(os.environ.get("EDGETUNE_AGENT_SA_DIR", str(SA_DIR)))
        self.own = OwnPod(namespace=namespace, name=pod, user_agent=COMPONENT, server=server, sa_dir=sa_dir,
                          token_path=token_path, ca_path=ca_path)  # fmt: skip
        self.namespace, self.pod, self.uid = namespace, pod, uid
        self.metrics = metrics
        self._latest: AdapterReport | None = None
        self._events: list[tuple[str, str, str]] = []
        self._wake = asyncio.Event()
        self._condition: tuple[str, str, str] | None = None
        self._transition = ""

    @classmethod
    def in_cluster(
        cls, namespace: str | None, pod: str | None, uid: str | None, metrics: AgentMetrics
    ) -> PodReporter | None:
        if not (namespace and pod and os.environ.get("KUBERNETES_SERVICE_HOST")):
            return None
        return cls(namespace=namespace, pod=pod, uid=uid, metrics=metrics)

    def publish(self, report: AdapterReport, event: tuple[str, str, str] | None) -> None:
        self._latest = report
        if event is not None and len(self._events) < 50:
            self._events.append(event)
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        delay = 0.5
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            if not self._wake.is_set():
                waiter = asyncio.ensure_future(self._wake.wait())
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
                if stop.is_set():
                    return
            self._wake.clear()
            report, events = self._latest, list(self._events)
            try:
                if report is not None:
                    await loop.run_in_executor(None, self._write_report, report)
                    if self._latest is report:
                        self._latest = None
                for event in events:
                    await loop.run_in_executor(None, self._write_event, event)
                    self._events.remove(event)
                delay = 0.5
            except Exception as exc:  # apiserver down, token rotated, …: keep serving, retry later
                log.warning("reporting to pod %s/%s failed: %s (retrying in %.1f s)", self.namespace, self.pod, exc,
                            delay)  # fmt: skip
                self._wake.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 30.0)

    # -- HTTP ------------------------------------------------------------------------------------

    def _counted(self, kind: str, write: Callable[[], None]) -> None:
        try:
            write()
        except OwnPodError as exc:
            self.metrics.reports_failed.labels(kind).inc()
            raise (PermissionError if exc.status else ConnectionError)(str(exc)) from exc

    def _write_report(self, report: AdapterReport) -> None:
        self._counted("annotation", lambda: self.own.annotate({REPORT_ANNOTATION: dumps(report)}))
        condition = ready_condition(report)
        if condition != self._condition:
            if self._condition is None or condition[0] != self._condition[0]:
                self._transition = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            status, reason, message = condition
            conditions = [{"type": READY_CONDITION, "status": status, "reason": reason, "message": message[:1000],
                           "lastTransitionTime": self._transition}]  # fmt: skip
            self._counted("condition", lambda: self.own.patch_status({"conditions": conditions}))
            self._condition = condition

    def _write_event(self, event: tuple[str, str, str]) -> None:
        kind, reason, message = event
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{self.pod}.{uuid.uuid4().hex[:16]}", "namespace": self.namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": self.pod, "namespace": self.namespace,
                               **({"uid": self.uid} if self.uid else {})},
            "reason": reason, "message": message, "type": kind, "count": 1,
            "firstTimestamp": stamp, "lastTimestamp": stamp,
            "source": {"component": COMPONENT}, "reportingComponent": COMPONENT, "reportingInstance": self.pod,
        }  # fmt: skip
        self._counted("event", lambda: self.own.create_event(body))
