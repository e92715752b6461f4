"""The agent's core: one model thread, resident adapters, the swap pipeline and the assignment loop.

- Every forward pass and every change of the model (add, activate, remove an adapter) runs on one
  thread, in submission order. A swap is one more job in that queue: requests before it finish on
  the old adapter, requests after it run on the new one, none fails or waits for a download.
- Downloading, verifying and decoding happen on other threads while the old adapter keeps serving.
- Up to ``max_resident`` adapters stay in memory (least recently used dropped first, never the
  active or shadow one): a swap back to one of them is a pointer change.
- The assignment loop re-reads the downward-API file; a refused digest is not retried until the
  assignment changes, storage and disk errors are retried with exponential backoff, and whatever
  happens the last good adapter keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from edgetune_agent.adapters import AdapterRefused, PackageStore
from edgetune_agent.backends import Backend
from edgetune_agent.metrics import AgentMetrics
from edgetune_agent.settings import AgentSettings
from edgetune_api.assignment import (
    ASSIGNMENT_ANNOTATION,
    AdapterAssignment,
    AdapterReport,
    AssignmentError,
    ReportError,
    ServedAdapter,
    parse_assignment,
    parse_downward_map,
)

log = logging.getLogger("edgetune_agent")
T = TypeVar("T")
BASE_VERSION = "base"


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Resident:
    """An adapter loaded next to the base."""

    name: str
    version: str
    sha256: str
    release: str | None
    nbytes: int
    loaded_at: str
    scores: dict[str, float] | None = None

    def served(self) -> ServedAdapter:
        return ServedAdapter(version=self.version, sha256=self.sha256, release=self.release, loaded_at=self.loaded_at)


@dataclass
class Outcome:
    """What happened to the current assignment; becomes the report."""

    state: str = "NoAssignment"
    error: ReportError | None = None


@dataclass
class _Pending:
    raw: str | None = None
    assignment: AdapterAssignment | None = None
    seen_at: float = 0.0
    attempts: int = 0
    next_try: float = 0.0
    done: bool = False
    refused: dict[tuple[str, str], ReportError] = field(default_factory=dict)
    """Permanent refusals by (digest, URI): not retried until the assignment names something else."""


def read_assignment(path: Path | None) -> str | None:
    """The assignment JSON from a downward-API annotations file (or a file holding the JSON itself)."""
    if path is None:
        return None
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    if text.lstrip().startswith("{"):
        return text
    return parse_downward_map(text).get(ASSIGNMENT_ANNOTATION)


class AgentRuntime:
    def __init__(self, settings: AgentSettings, backend: Backend, store: PackageStore, metrics: AgentMetrics) -> None:
        self.settings = settings
        self.backend = backend
        self.store = store
        self.metrics = metrics
        metrics.poll_interval.labels(settings.model_name).set(settings.poll_seconds)
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fetch")
        self.resident: OrderedDict[str, Resident] = OrderedDict()
        self.active: Resident | None = None
        self.shadow: Resident | None = None
        self.base_scores: dict[str, float] | None = None
        self.pending = _Pending()
        self.outcome = Outcome()
        self.on_report: Callable[[AdapterReport, tuple[str, str, str] | None], None] | None = None
        self._rng = random.Random()  # noqa: S311 - sampling, not security
        self._stamp: tuple[int, int, int] | None = None
        self._read_at = -1.0
        self.ready = False

    # -- threads ---------------------------------------------------------------------------------

    async def on_model(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.model_thread, fn, *args)

    async def on_io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.io, fn, *args)

    def close(self) -> None:
        self.model_thread.shutdown(wait=True, cancel_futures=True)
        self.io.shutdown(wait=False, cancel_futures=True)
        self.backend.close()

    # -- serving ---------------------------------------------------------------------------------

    def labels(self, adapter: Resident | None) -> tuple[str, str, str]:
        if adapter is None:
            return self.settings.model_name, BASE_VERSION, ""
        return self.settings.model_name, adapter.version, adapter.release or ""

    async def infer(
        self, inputs: list[dict[str, Any]], parameters: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], Resident | None]:
        """Outputs and the adapter that computed them (read on the model thread, so they agree)."""

        def job() -> tuple[list[dict[str, Any]], Resident | None]:
            active = self.active
            return self.backend.predict(inputs, parameters, active.name if active else None), active

        outputs, used = await self.on_model(job)
        shadow = self.shadow
        if shadow is not None and self._rng.random() < self.settings.shadow_fraction:
            asyncio.get_running_loop().run_in_executor(self.model_thread, self._shadow_job, inputs, parameters,
                                                       outputs, used, shadow)  # fmt: skip
        return outputs, used

    def _shadow_job(self, inputs: list[dict[str, Any]], parameters: dict[str, Any], served: list[dict[str, Any]],
                    used: Resident | None, shadow: Resident) -> None:  # fmt: skip
        if self.shadow is not shadow:
            return
        try:
            theirs = self.backend.predict(inputs, parameters, shadow.name)
        except Exception:  # a shadow must never disturb serving
            log.exception("shadow inference failed")
            return
        labels = (*self.labels(shadow), used.version if used else BASE_VERSION)
        self.metrics.shadow_requests.labels(*labels).inc()
        if theirs and served and theirs[0].get("data") == served[0].get("data"):
            self.metrics.shadow_agreements.labels(*labels).inc()

    # -- swapping --------------------------------------------------------------------------------

    async def apply(self, assignment: AdapterAssignment, seen_at: float) -> str:
        """Make ``assignment`` active (or shadow); returns where it came from. Raises AdapterRefused."""
        model = self.settings.model_name
        if assignment.base:
            await self.on_model(self._activate, None)
            self.metrics.swaps.labels(model, "resident").inc()
            self.metrics.swap_seconds.labels(model, "resident").observe(time.monotonic() - seen_at)
            return "resident"
        self.store.refuse_if_revoked(assignment)  # before the resident shortcut: memory is no excuse
        held = self.resident.get(assignment.sha256)
        if held is not None:
            source = "resident"
            held.version, held.release = assignment.version, assignment.release
        else:
            delta = await self.on_io(self.store.load, assignment, self.backend.base)
            source = "download" if delta.downloaded_bytes else "cache"
            if delta.downloaded_bytes:
                self.metrics.downloads.labels(model).inc()
                self.metrics.download_bytes.labels(model).inc(delta.downloaded_bytes)
            name = f"a{assignment.sha256[:16]}"
            await self.on_model(self.backend.add, name, delta)
            held = Resident(name, assignment.version, assignment.sha256, assignment.release, delta.nbytes,
                            now_rfc3339())  # fmt: skip
            self.resident[assignment.sha256] = held
            try:
                await self._eval_gate(held)
            except AdapterRefused:
                self.resident.pop(assignment.sha256, None)
                await self.on_model(self.backend.remove, name)
                raise
        self.resident.move_to_end(assignment.sha256)
        if assignment.mode == "shadow":
            await self.on_model(self._set_shadow, held)
        else:
            await self.on_model(self._activate, held)
            self.metrics.swaps.labels(model, source).inc()
            self.metrics.swap_seconds.labels(model, source).observe(time.monotonic() - seen_at)
        await self._evict()
        self._resident_metrics()
        return source

    async def _eval_gate(self, candidate: Resident) -> None:
        scores = await self.on_model(self.backend.evaluate, candidate.name)
        if scores is None:
            return
        candidate.scores = scores
        self._score_metrics(candidate, scores)
        current = self.active
        if current is None:
            if self.base_scores is None:
                self.base_scores = await self.on_model(self.backend.evaluate, None)
            reference = self.base_scores
        else:
            reference = current.scores or await self.on_model(self.backend.evaluate, current.name)
            current.scores = reference
        if reference is not None:
            self._score_metrics(current, reference)
        limit = self.settings.eval_max_drop
        if limit is None or reference is None or "eval_accuracy" not in scores:
            return
        drop = reference.get("eval_accuracy", 0.0) - scores["eval_accuracy"]
        if drop > limit:
            raise AdapterRefused(
                "EvalRegression",
                f"on this node's held-out data version {candidate.version} scores accuracy "
                f"{scores['eval_accuracy']:.3f}, {drop:.3f} below the current "
                f"{reference.get('eval_accuracy', 0.0):.3f} (allowed drop {limit})",
            )

    def _score_metrics(self, adapter: Resident | None, scores: dict[str, float]) -> None:
        labels = self.labels(adapter)
        if "eval_accuracy" in scores:
            self.metrics.eval_accuracy.labels(*labels).set(scores["eval_accuracy"])
        if "eval_loss" in scores:
            self.metrics.eval_loss.labels(*labels).set(scores["eval_loss"])

    def _activate(self, adapter: Resident | None) -> None:
        """Model thread: from the next request on, ``adapter`` answers."""
        previous = self.active
        self.backend.activate(adapter.name if adapter else None)
        self.active = adapter
        if self.shadow is not None:  # a served assignment names no shadow: the comparison is over
            self._info(self.shadow, "shadow", 0)
            self.shadow = None
        self._info(previous, "active", 0)
        self._info(adapter, "active", 1)

    def _set_shadow(self, adapter: Resident) -> None:
        if self.active is adapter:  # asked to shadow what already serves: nothing to compare
            return
        self._info(self.shadow, "shadow", 0)
        self.shadow = adapter
        self._info(adapter, "shadow", 1)

    def _info(self, adapter: Resident | None, role: str, value: int) -> None:
        labels = (*self.labels(adapter), adapter.sha256 if adapter else "", role)
        if value:
            self.metrics.adapter_info.labels(*labels).set(1)
        else:
            with contextlib.suppress(KeyError):
                self.metrics.adapter_info.remove(*labels)

    async def _evict(self) -> None:
        """Drop least recently used adapters beyond ``max_resident`` (the bookkeeping stays on the
        event loop, which also reads it; the model change runs on the model thread)."""
        keep = {a.sha256 for a in (self.active, self.shadow) if a is not None}
        while len(self.resident) > self.settings.max_resident:
            victim = next((sha for sha in self.resident if sha not in keep), None)
            if victim is None:
                return
            await self.on_model(self.backend.remove, self.resident.pop(victim).name)

    def _resident_metrics(self) -> None:
        model = self.settings.model_name
        self.metrics.resident.labels(model).set(len(self.resident))
        self.metrics.resident_bytes.labels(model).set(sum(a.nbytes for a in self.resident.values()))

    # -- the assignment loop ---------------------------------------------------------------------

    def report(self) -> AdapterReport:
        p, o = self.pending, self.outcome
        desired = None
        if p.assignment is not None:
            a = p.assignment
            desired = ServedAdapter(version=a.version, sha256=a.sha256 or None, release=a.release)
        return AdapterReport(
            state=o.state,  # type: ignore[arg-type]
            active=self.active.served() if self.active else None,
            desired=desired,
            shadow=self.shadow.served() if self.shadow else None,
            error=o.error,
            resident=[a.version for a in self.resident.values()],
            base_sha256=self.backend.base.sha256,
            observed_at=now_rfc3339(),
        )

    def _publish(self, event: tuple[str, str, str] | None = None) -> None:
        if self.on_report is not None:
            self.on_report(self.report(), event)

    async def step(self) -> None:
        """One pass of the assignment loop: notice a change, try to satisfy it, report."""
        p = self.pending
        now = time.monotonic()
        raw = self._read_if_changed(now)
        if raw != p.raw:
            p.raw, p.seen_at, p.attempts, p.next_try, p.done = raw, now, 0, 0.0, False
            p.assignment = None
            if raw is None:
                self.outcome = Outcome("NoAssignment")
                p.done = True
                self._publish()
                return
            try:
                p.assignment = parse_assignment(raw)
            except AssignmentError as exc:
                p.done = True
                self.metrics.swap_failures.labels(self.settings.model_name, "InvalidAssignment").inc()
                self.outcome = Outcome("Refused", ReportError(reason="InvalidAssignment", message=str(exc)[:4000]))
                self._publish(("Warning", "AdapterRefused", str(exc)[:1000]))
                return
            self.store.remember_revoked(p.assignment.revoked)
            await self._drop_revoked()
        a = p.assignment
        if p.done or a is None or now < p.next_try:
            return
        if (a.sha256, a.uri) in p.refused:
            p.done = True
            self.outcome = Outcome("Refused", p.refused[(a.sha256, a.uri)])
            self._publish()
            return
        if self._satisfied(a):
            p.done = True
            self.outcome = Outcome("Serving")
            self._publish()
            return
        if p.attempts == 0:
            self.outcome = Outcome("Loading")
            self._publish()
        p.attempts += 1
        try:
            source = await self.apply(a, p.seen_at)
        except AdapterRefused as refusal:
            self._refused(a, refusal)
            return
        p.done = True
        self.outcome = Outcome("Serving")
        verb = "shadows" if a.mode == "shadow" else "serves"
        what = "the base model" if a.base else f"adapter version {a.version} ({a.sha256[:12]}, from {source})"
        self._publish(("Normal", "AdapterSwapped" if a.mode == "serve" else "AdapterShadowed", f"agent {verb} {what}"))

    def _read_if_changed(self, now: float) -> str | None:
        """The assignment, re-read when the file's identity changed (the kubelet swaps a symlink,
        editors rename) and at least once a second; otherwise the last one read. A stat every
        poll is what keeps swaps fast without inotify."""
        path = self.settings.assignment_file
        try:
            st = path.stat() if path is not None else None
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size) if st else None
        except OSError:
            stamp = None
        if stamp == self._stamp and now - self._read_at < 1.0:
            return self.pending.raw
        self._stamp, self._read_at = stamp, now
        return read_assignment(path)

    def _satisfied(self, a: AdapterAssignment) -> bool:
        """The assignment is the whole desired state: a served one (or the base) also means no shadow."""
        if a.base:
            return self.active is None and self.shadow is None
        if a.mode == "shadow":
            return self.shadow is not None and self.shadow.sha256 == a.sha256
        return self.active is not None and self.active.sha256 == a.sha256 and self.shadow is None

    def _refused(self, a: AdapterAssignment, refusal: AdapterRefused) -> None:
        p = self.pending
        self.metrics.swap_failures.labels(self.settings.model_name, refusal.reason).inc()
        keeps = f"; still serving {self.active.version}" if self.active else "; serving the base model"
        error = ReportError(reason=refusal.reason, message=(refusal.message + keeps)[:4000], version=a.version,
                            sha256=a.sha256)  # fmt: skip
        if refusal.retryable:
            delay = min(30.0, 0.5 * 2 ** min(p.attempts, 6)) * (0.8 + 0.4 * self._rng.random())
            p.next_try = time.monotonic() + delay
            first = self.outcome.state != "Retrying"
            self.outcome = Outcome("Retrying", error)
            self._publish(("Warning", "AdapterFetchRetrying", f"{refusal.message} (retrying in {delay:.0f} s)")
                          if first else None)  # fmt: skip
            return
        p.refused[(a.sha256, a.uri)] = error
        p.done = True
        self.outcome = Outcome("Refused", error)
        self._publish(("Warning", "AdapterRefused", f"version {a.version}: {refusal.reason}: {error.message}"[:1000]))

    async def _drop_revoked(self) -> None:
        """A revoked adapter stops serving at once (back to the newest good resident, or the base)."""
        revoked = self.store.revoked
        if self.shadow is not None and self.shadow.sha256 in revoked:
            self.shadow = None
        if self.active is not None and self.active.sha256 in revoked:
            bad = self.active
            fallback = next((r for r in reversed(self.resident.values()) if r.sha256 not in revoked), None)
            await self.on_model(self._activate, fallback)
            now = fallback.version if fallback else "the base model"
            self._publish(("Warning", "AdapterRevoked", f"version {bad.version} ({bad.sha256[:12]}) was revoked; "
                           f"serving {now} until the assignment is satisfied"))  # fmt: skip

    async def watch_revocations(self, stop: asyncio.Event) -> None:
        """Poll S3 for a published revocation of the active (and shadow) adapter: the operator
        writes one when a release rolls back, so an agent it cannot reach falls back by itself."""
        every = self.settings.revocation_poll_seconds
        while every > 0 and not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
            for held in [a for a in (self.active, self.shadow) if a is not None]:
                try:
                    record = await self.on_io(self.store.published_revocation, held.sha256)
                except Exception:  # the watch must survive anything
                    log.exception("revocation poll failed")
                    continue
                if record is None or held.sha256 in self.store.revoked:
                    continue
                self.store.remember_revoked([held.sha256])
                self.metrics.swap_failures.labels(self.settings.model_name, "Revoked").inc()
                if held is self.active:
                    why = f"release {record.release or '?'} rolled it back ({record.reason or 'no reason given'})"
                    message = f"version {held.version} ({held.sha256[:12]}) was revoked: {why}; seen in S3"
                    error = ReportError(reason="Revoked", message=message, version=held.version, sha256=held.sha256)
                    self.outcome = Outcome("Refused", error)
                await self._drop_revoked()

    async def run(self, stop: asyncio.Event) -> None:
        self._publish()
        while not stop.is_set():
            try:
                await self.step()
            except Exception:  # the loop must survive anything; serving goes on regardless
                log.exception("assignment loop error")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.poll_seconds)
