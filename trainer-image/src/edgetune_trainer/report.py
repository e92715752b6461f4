"""How the trainer tells the world what it does: JSON lines on stdout, Prometheus metrics
(served and/or pushed), its progress on its own pod while it trains (``progress``), and a JSON
summary in the termination-message file on exit."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import push_to_gateway, start_http_server

from edgetune_trainer.metrics import TrainerMetrics
from edgetune_trainer.progress import ProgressWriter

TERMINATION_LIMIT = 4096  # bytes Kubernetes keeps of a termination message
PUSH_INTERVAL_SECONDS = 5.0
"""While training, metrics are pushed this often (and once more at the end): a trainer on a remote
edge cluster cannot be scraped, so without it Prometheus would see nothing until the run is over."""


class Reporter:
    def __init__(
        self,
        *,
        job: str,
        namespace: str,
        cluster: str,
        node: str,
        metrics_port: int = 0,
        pushgateway_url: str | None = None,
        push_interval: float = PUSH_INTERVAL_SECONDS,
        progress_seconds: float = 0.0,
    ) -> None:
        self.metrics = TrainerMetrics()
        self.labels = {"job": job, "namespace": namespace, "cluster": cluster, "node": node}
        self.pushgateway_url = pushgateway_url
        self._server: Any = None
        if metrics_port:
            self._server = start_http_server(metrics_port, addr="0.0.0.0", registry=self.metrics.registry)  # noqa: S104
        self._stop = threading.Event()
        self._pusher: threading.Thread | None = None
        if pushgateway_url and push_interval > 0:
            self._pusher = threading.Thread(target=self._push_every, args=(push_interval,), name="metrics-push",
                                            daemon=True)  # fmt: skip
            self._pusher.start()
        self.progress = ProgressWriter.in_pod(progress_seconds, self.event)

    def _push_every(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.push()

    def event(self, name: str, **fields: Any) -> None:
        """One JSON line on stdout (what `kubectl logs` shows)."""
        sys.stdout.write(json.dumps({"ts": round(time.time(), 3), "event": name, **fields}, default=str) + "\n")
        sys.stdout.flush()

    def gauge(self, name: str, value: float, **extra: str) -> None:
        getattr(self.metrics, name).labels(**self.labels, **extra).set(value)
        if self.progress is not None:
            self.progress.gauge(name, value, **extra)

    def push(self) -> None:
        if not self.pushgateway_url:
            return
        grouping = {k: v for k, v in self.labels.items() if k != "job"}
        try:
            push_to_gateway(
                self.pushgateway_url, job=f"edgetune-trainer-{self.labels['job']}", grouping_key=grouping,
                registry=self.metrics.registry, timeout=5,
            )  # fmt: skip
        except OSError as exc:  # metrics are best effort; training goes on
            self.event("pushgateway_unreachable", error=str(exc))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self._stop.set()
        if self._pusher is not None:
            self._pusher.join(timeout=10)
        if self._server is not None:
            server, thread = self._server if isinstance(self._server, tuple) else (self._server, None)
            server.shutdown()
            if thread is not None:
                thread.join(timeout=5)


def write_termination(path: Path, summary: dict[str, Any], limit: int = TERMINATION_LIMIT) -> None:
    """Write the exit summary as JSON within Kubernetes' limit: a long message is shortened first."""
    data = json.dumps(summary, separators=(",", ":"), default=str)
    if len(data.encode()) > limit and "message" in summary:
        excess = len(data.encode()) - limit + 8
        message = str(summary["message"]).encode()
        summary = {**summary, "message": message[: max(len(message) - excess, 0)].decode(errors="ignore") + "..."}
        data = json.dumps(summary, separators=(",", ":"), default=str)
    if len(data.encode()) > limit:  # still too long: keep the verdict, drop the details
        data = json.dumps({k: summary[k] for k in ("status", "reason") if k in summary})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(data)
    except OSError as exc:
        sys.stderr.write(
            json.dumps({"event": "termination_log_unwritable", "path": str(path), "error": str(exc)}) + "\n"
        )
