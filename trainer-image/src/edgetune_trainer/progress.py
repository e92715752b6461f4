"""Live progress on the trainer's own pod: the ``edgetune.io/trainer-progress`` annotation.

The operator watches trainer pods already (on every cluster); what it reads there reaches the job's
``status.targets`` while the trainer trains, not only from the termination message when it exits.
The trainer's service account may patch pods, and the chart's ``edgetune-trainer-own-pod`` admission
policy narrows that to this one annotation of the pod its token is bound to.

Writing never slows training: gauges update a dict, a thread writes the newest values at most every
``interval`` seconds, and a refusal (no RBAC, no policy: an older chart) stops it after one line in
the log.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgetune_api.own_pod import SA_DIR, OwnPod, OwnPodError
from edgetune_api.trainer_config import PROGRESS_ANNOTATION, TrainerProgress

COMPONENT = "edgetune-trainer"
GAUGES: dict[str, str] = {
    "step": "step",
    "loss": "loss",
    "eval_loss": "eval_loss",
    "samples": "samples",
    "peak_memory": "peak_memory_bytes",
    "energy": "energy_joules",
}
"""Trainer gauges (``TrainerMetrics``) that are progress, and the ``TrainerProgress`` field of each."""
WHOLE = {"step", "samples", "peak_memory_bytes"}


class ProgressWriter:
    def __init__(self, own: OwnPod, interval: float, event: Callable[..., None]) -> None:
        self.own, self.interval, self.event = own, interval, event
        self._fields: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.writes = 0
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._thread.start()

    @classmethod
    def in_pod(cls, interval: float, event: Callable[..., None]) -> ProgressWriter | None:
        """A writer when the trainer runs in a pod that has a token (the operator's trainers: the
        pod's name and namespace from the downward API); None by hand or with ``interval`` 0."""
        name, namespace = os.environ.get("POD_NAME"), os.environ.get("POD_NAMESPACE")
        sa_dir = Path(os.environ.get("EDGETUNE_TRAINER_SA_DIR", str(SA_DIR)))
        if interval <= 0 or not (name and namespace and os.environ.get("KUBERNETES_SERVICE_HOST")):
            return None
        if not (sa_dir / "token").is_file():
            return None
        return cls(OwnPod(namespace=namespace, name=name, user_agent=COMPONENT, sa_dir=sa_dir), interval, event)

    def gauge(self, name: str, value: float, **labels: str) -> None:
        """A trainer gauge was set: keep what is progress."""
        fields: dict[str, Any] = {}
        if name in GAUGES and math.isfinite(value):
            field = GAUGES[name]
            fields[field] = int(value) if field in WHOLE else round(float(value), 6)
        if name == "energy" and labels.get("method"):
            fields["energy_method"] = labels["method"]
        if name == "device_info" and labels.get("device"):
            fields["device"] = labels["device"]
        if fields:
            with self._lock:
                self._fields.update(fields)
            self._wake.set()

    def _run(self) -> None:
        last = -math.inf
        while True:
            self._wake.wait()
            if self._stop.is_set():
                return
            wait = last + self.interval - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                return
            with self._lock:
                fields = dict(self._fields)
                self._wake.clear()
            at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            last = time.monotonic()
            try:
                progress = TrainerProgress.model_validate({**fields, "at": at})
            except ValidationError as exc:  # a value out of range (negative energy?): say so, keep training
                self.event("progress_invalid", error=str(exc)[:500])
                continue
            try:
                self.own.annotate({PROGRESS_ANNOTATION: progress.model_dump_json(by_alias=True, exclude_none=True)})
                self.writes += 1
            except OSError as exc:  # the token unreadable: asking again changes nothing
                self.event("progress_unreportable", error=f"{type(exc).__name__}: {exc}"[:500])
                return
            except OwnPodError as exc:
                if exc.status in (401, 403, 404):  # not allowed, or no such pod: asking again changes nothing
                    self.event("progress_unreportable", error=str(exc)[:500])
                    return
                self.event("progress_write_failed", error=str(exc)[:500])  # next interval: the newest values

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
