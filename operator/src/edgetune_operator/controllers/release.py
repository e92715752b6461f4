"""AdapterRelease controller: one level-based ``reconcile`` per release.

Each reconcile reads the release, resolves the adapter once (MLflow version, alias or the
version an EdgeTrainingJob registered, plus the stable version behind the promotion alias),
observes the target pods on every selected cluster (their assignment and their agent's report),
and then acts from the difference: writes assignment annotations for the current step
(``reconcile/release.py``), measures analysis metrics when they are due
(``reconcile/analysis.py`` over ``clients/prometheus.py``), rolls everything back on failure,
abort or a missed progress deadline, and promotes in MLflow at the end. Everything it needs to
continue after a restart is in the release's status.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from edgetune_api.adapter_release import (
    AdapterReleaseSpec,
    AdapterReleaseStatus,
    AnalysisMetric,
    ResolvedAdapter,
    served,
)
from edgetune_api.assignment import (
    ASSIGNMENT_ANNOTATION,
    REPORT_ANNOTATION,
    AdapterAssignment,
    AdapterReport,
    Revocation,
    dumps,
    parse_assignment,
    revocation_location,
)
from edgetune_api.meta import parse_duration
from edgetune_api.training_job import EdgeTrainingJobStatus
from edgetune_operator import metrics
from edgetune_operator.clients import object_store
from edgetune_operator.clients.kube import ADAPTER_RELEASES, PODS, TRAINING_JOBS, Kube, KubeError, UnreachableError
from edgetune_operator.clients.mlflow import BASE_TAG, DIGEST_TAG, Mlflow, MlflowError, MlflowUnavailableError
from edgetune_operator.clients.prometheus import Prometheus
from edgetune_operator.controllers.clusters import Clusters, ClusterUnavailableError
from edgetune_operator.controllers.credentials import ConfigurationError, s3_credentials, s3_endpoint
from edgetune_operator.controllers.locks import PerObjectLocks
from edgetune_operator.controllers.watches import PodWatches
from edgetune_operator.reconcile import analysis
from edgetune_operator.reconcile.release import (
    ReleasedAdapter,
    RivalRelease,
    StepPlan,
    Target,
    canary_plan,
    conflicts,
    rollback_plan,
    shadow_plan,
    versions_by_cluster,
    versions_served,
)
from edgetune_operator.reconcile.training_job import set_condition
from edgetune_operator.settings import Settings

log = logging.getLogger("edgetune.release")
FINAL = ("Promoted", "RolledBack", "Failed", "Aborted")
MAX_RUNS = 256
WRITERS = 32
"""Assignment writes in flight at once (per operator): a 1000-target step is not 1000 round trips in a row."""
PUBLISH_RETRY_SECONDS = 15.0
"""A revocation S3 refused is written again at most this often."""


class ResolveError(RuntimeError):
    """The release names something the registry does not have (a clear, user-facing message)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ReleaseController:
    def __init__(self, settings: Settings, clusters: Clusters, *, mlflow: Mlflow | None,
                 prometheus: Prometheus | None,
                 s3_factory: Callable[[str | None, dict[str, str]], Any] | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.clusters = clusters
        self.hub = clusters.local
        self.mlflow = mlflow
        self.prometheus = prometheus
        self.s3_factory = s3_factory
        self._locks = PerObjectLocks()
        self._phases: dict[str, str] = {}
        self._versions: dict[str, set[str]] = {}
        self.writers = ThreadPoolExecutor(WRITERS, thread_name_prefix="release-write")
        self.stop = threading.Event()
        self.wake = threading.Event()
        self._next = math.inf
        self.watches = PodWatches(self.wake)
        self.publish_tried: dict[str, float] = {}
        self._loop_thread: int | None = None
        self._known: dict[str, dict[str, Any]] = {}  # uid -> the latest body kopf's watch delivered
        self._known_lock = threading.Lock()

    def observed(self, body: dict[str, Any], *, deleted: bool = False) -> None:
        """Every AdapterRelease event of kopf's watch: the resync loop walks these instead of listing
        the releases every few seconds (0.16 requests per training job in bench_operator, with no
        release at all)."""
        with self._known_lock:
            if deleted:
                self._known.pop(body["metadata"]["uid"], None)
            else:
                self._known[body["metadata"]["uid"]] = body

    def resync_loop(self) -> None:
        """Reconcile every unfinished release when something it waits for happens: a target pod
        changed (an agent's report; ``PodWatches``), a pause ends or a measurement is due (the
        time its last reconcile asked for), and at least every ``release_resync_seconds``."""
        self._loop_thread = threading.get_ident()
        while not self.stop.is_set():
            timeout = min(self.settings.release_resync_seconds, max(0.0, self._next - time.monotonic()))
            if self.wake.wait(timeout):
                self.stop.wait(0.05)  # a burst of agents' reports: one reconcile, not one per pod
            self.wake.clear()
            self._next = math.inf
            if self.stop.is_set():
                return
            with self._known_lock:
                items = list(self._known.values())
            for body in items:
                status = body.get("status") or {}
                done = status.get("phase") in FINAL and status.get("observedGeneration") == body["metadata"].get(
                    "generation")  # fmt: skip
                if done or not self.settings.serves(body["metadata"]["namespace"]):
                    continue
                try:
                    self.reconcile(body)
                except Exception:
                    log.debug("release resync of %s failed", body["metadata"]["name"], exc_info=True)

    def _wake_at(self, when: float) -> None:
        earlier = when < self._next
        self._next = min(self._next, when)
        if earlier and threading.get_ident() != self._loop_thread:
            self.wake.set()  # a kopf handler's reconcile: the sleeping loop must learn the new time

    def close(self) -> None:
        self.stop.set()
        self.wake.set()
        self.watches.close()

    # -- the reconcile ---------------------------------------------------------------------------

    def reconcile(self, body: dict[str, Any]) -> AdapterReleaseStatus:
        started = time.perf_counter()
        result = "ok"
        try:
            with self._locks.hold(body["metadata"]["uid"]):
                fresh = self.hub.get_or_none(ADAPTER_RELEASES, body["metadata"]["name"], body["metadata"]["namespace"])
                if fresh is None or fresh["metadata"]["uid"] != body["metadata"]["uid"]:
                    return AdapterReleaseStatus()
                return self._reconcile(fresh)
        except Exception as exc:
            result = "error"
            self.hub.event(body, reason="ReconcileError", message=f"{type(exc).__name__}: {exc}", warning=True)
            raise
        finally:
            metrics.RECONCILES.labels("AdapterRelease", result).inc()
            metrics.RECONCILE_SECONDS.labels("AdapterRelease").observe(time.perf_counter() - started)

    def _reconcile(self, body: dict[str, Any]) -> AdapterReleaseStatus:
        meta = body["metadata"]
        namespace, name, generation = meta["namespace"], meta["name"], int(meta.get("generation", 1))
        spec = AdapterReleaseSpec.model_validate(body["spec"])
        old = AdapterReleaseStatus.model_validate(body.get("status") or {})
        if old.phase in FINAL and old.observed_generation == generation:
            return old
        status = old.model_copy(deep=True)
        if old.phase in FINAL:  # a new spec after the end: a new rollout from the current stable state
            status = AdapterReleaseStatus()
        ctx = _Context(self, body, spec, status=status, generation=generation, release=f"{namespace}/{name}")
        ctx.run()
        if ctx.due is not None:
            self._wake_at(time.monotonic() + ctx.due)
        status.observed_generation = generation
        if status != old:
            self.hub.replace_status(ADAPTER_RELEASES, name, namespace, status.to_wire())
        self._phases[meta["uid"]] = status.phase or "Pending"
        self._publish_metrics(f"{namespace}/{name}", status.targets_by_version)
        return status

    def forget(self, body: dict[str, Any]) -> None:
        """A deleted release leaves no series behind; deleted mid-rollout, it says what it left (the
        fleet split between versions, each pod keeping its assignment) in a Warning Event."""
        meta = body["metadata"]
        status = body.get("status") or {}
        if status.get("canary") is not None and status.get("phase") not in FINAL:
            self.hub.event(body, reason="DeletedMidRollout", warning=True, message=(
                f"deleted while {status.get('phase')} at step {status.get('currentStep', 0)}: the targets keep "
                f"what they were told ({served(status.get('targetsByVersion'))}); apply a release to move them "
                "on, or one of the stable version to take them back"))  # fmt: skip
        self._phases.pop(meta["uid"], None)
        self.publish_tried.pop(meta["uid"], None)
        self._publish_metrics(f"{meta['namespace']}/{meta['name']}", {})

    def _publish_metrics(self, release: str, by_version: dict[str, int]) -> None:
        counts = Counter(self._phases.values())
        for phase in ("Pending", "Progressing", "Paused", "Analyzing", "RollingBack", *FINAL):
            metrics.RELEASES_BY_PHASE.labels(phase).set(counts.get(phase, 0))
        for gone in self._versions.pop(release, set()) - set(by_version):
            metrics.RELEASE_TARGETS.remove(release, gone)
        for version, count in by_version.items():
            metrics.RELEASE_TARGETS.labels(release, version).set(count)
        if by_version:
            self._versions[release] = set(by_version)


class _Context:
    """One reconcile of one release (the I/O and the state machine around the pure plan)."""

    def __init__(self, ctl: ReleaseController, body: dict[str, Any], spec: AdapterReleaseSpec, *,
                 status: AdapterReleaseStatus, generation: int, release: str) -> None:  # fmt: skip
        self.ctl, self.body, self.spec, self.status = ctl, body, spec, status
        self.generation, self.release = generation, release
        self.namespace = body["metadata"]["namespace"]
        self.target_namespace = spec.targets.namespace or self.namespace
        self.now = datetime.now(UTC)  # step and measurement times keep sub-second precision
        self.due: float | None = None
        """Seconds until this release needs a reconcile again (a pause ends, a measurement is due)."""
        self.kubes: dict[str, Kube] = {}
        self.labels: dict[str, dict[str, str]] = {}
        self.clusters_seen: list[str] = []
        self.clusters_selected: list[str] = []
        self.paused: list[str] = []
        """Selected EdgeClusters with spec.paused: no step writes to their targets (a rollback does)."""

    # -- helpers ---------------------------------------------------------------------------------

    def condition(self, kind: str, ok: bool, reason: str, message: str) -> None:
        self.status.conditions = set_condition(self.status.conditions, kind, ok, reason=reason, message=message,
                                               generation=self.generation,
                                               now=self.now.replace(microsecond=0))  # fmt: skip

    def event(self, reason: str, message: str, *, warning: bool = False) -> None:
        self.ctl.hub.event(self.body, reason=reason, message=message, warning=warning)

    def adapters(self) -> tuple[ReleasedAdapter, ReleasedAdapter | None]:
        c, s = self.status.canary, self.status.stable
        assert c is not None  # noqa: S101 - resolved before any step runs
        stable = ReleasedAdapter(s.version, s.uri, s.sha256) if s and s.version != "base" and s.sha256 else None
        return ReleasedAdapter(c.version, c.uri, c.sha256), stable

    # -- the state machine -----------------------------------------------------------------------

    def start(self, targets: list[Target]) -> bool:
        """Before the first write: refuse pods another release drives, resolve the adapters.
        False when the release cannot start (now or ever)."""
        s = self.status
        rival = self.rival(targets)
        if rival is not None:
            s.phase = "Failed"
            self.condition("Progressing", False, "TargetsInUse", rival)
            self.event("TargetsInUse", rival, warning=True)
            return False
        try:
            self.resolve()
        except ResolveError as exc:
            s.phase = "Failed"
            self.condition("Resolved", False, exc.reason, str(exc))
            self.event(exc.reason, str(exc), warning=True)
            return False
        except (MlflowUnavailableError, ConnectionError) as exc:
            self.condition("Resolved", False, "RegistryUnavailable", str(exc))
            return False
        return True

    def run(self) -> None:
        s = self.status
        targets, unreachable = self.targets()
        if s.canary is None and not self.start(targets):
            return
        self.observe(targets)
        if unreachable:
            self.condition("ClustersReachable", False, "ClusterUnreachable",
                           f"cannot reach {', '.join(unreachable)}; the release does not advance past what it can "
                           "confirm there")  # fmt: skip
        else:
            self.condition("ClustersReachable", True, "AllReachable", "every selected cluster answered")
        self.paused = [c for c in self.clusters_selected if c not in unreachable and self.ctl.clusters.paused(c)]
        if not self.paused:
            self.condition("ClustersPaused", False, "NonePaused", "no selected EdgeCluster is paused")
        if s.phase == "RollingBack":
            self.roll_back(targets, unreachable)
            return
        if self.spec.abort:
            self.start_rollback("Aborted", "spec.abort is set")
            self.roll_back(targets, unreachable)
            return
        if not targets:
            s.phase = "Paused"
            self.condition("Progressing", False, "NoTargets",
                           f"no pod matches targets.workloadSelector in namespace {self.target_namespace} on "
                           f"the selected clusters ({', '.join(self.clusters_selected) or 'none'}); set "
                           "targets.namespace when the agents run in another namespace than the release")  # fmt: skip
            return
        if self.spec.paused and not self.spec.promote:
            s.phase = "Paused"
            if not any(c.type == "Paused" and c.status == "True" for c in s.conditions):
                self.condition("Paused", True, "PausedBySpec", "spec.paused is true; set it to false to resume")
            return
        if self.wrong_base(targets):
            return
        self.condition("Paused", False, "Running", "the release runs")
        self.advance(targets, unreachable)
        if self.status.phase == "RollingBack":  # the analysis failed, agents refused, a deadline passed: act now
            self.roll_back(targets, unreachable)

    def wrong_base(self, targets: list[Target]) -> bool:
        """Before any agent was told to load the canary: refuse it if agents report serving another
        base model than the one it was trained on (they would all refuse it, one by one)."""
        s, canary = self.status, self.status.canary
        want = canary.base_sha256 if canary else None
        if canary is None or not want or any(t.assigned(canary.sha256) for t in targets):
            return False
        other = sorted(t.key for t in targets if t.report and t.report.base_sha256 and t.report.base_sha256 != want)
        if not other:
            return False
        s.phase = "Failed"
        message = (f"version {s.canary_version} was trained on base model {want[:12]}, but {len(other)} target "
                   f"agents serve another base (e.g. {other[0]}); nothing was assigned")  # fmt: skip
        self.condition("Resolved", False, "IncompatibleBase", message)
        self.event("IncompatibleBase", message, warning=True)
        return True

    def resolve(self) -> None:
        mlflow = self.ctl.mlflow
        if mlflow is None:
            raise ResolveError(
                "RegistryNotConfigured", "the operator has no MLflow tracking URI (EDGETUNE_MLFLOW_TRACKING_URI)"
            )
        src = self.spec.adapter
        model = src.registered_model
        if src.version:
            version = mlflow.model_version(model, src.version)
            what = f"version {src.version} of {model}"
        elif src.alias:
            version = mlflow.alias_version(model, src.alias)
            what = f"alias {src.alias} of {model}"
        else:
            assert src.training_job_ref is not None  # noqa: S101 - the CRD allows exactly one of the three
            ref = src.training_job_ref.name
            job = self.ctl.hub.get_or_none(TRAINING_JOBS, ref, self.namespace)
            if job is None:
                raise ResolveError("TrainingJobNotFound", f"adapter.trainingJobRef names EdgeTrainingJob {ref}, which "
                                   f"does not exist in {self.namespace}")  # fmt: skip
            result = EdgeTrainingJobStatus.model_validate(job.get("status") or {}).result
            number = result.mlflow_version if result else None
            if not number:
                raise ResolveError("TrainingJobNotRegistered", f"EdgeTrainingJob {ref} has not registered one adapter "
                                   "(yet): it is still running, failed, or trains one adapter per node without "
                                   "aggregation (release one of its versions by adapter.version)")  # fmt: skip
            if result is not None and result.mlflow_model and result.mlflow_model != model:
                raise ResolveError("TrainingJobOtherModel", f"EdgeTrainingJob {ref} registered {result.mlflow_model}, "
                                   f"not adapter.registeredModel {model}")  # fmt: skip
            version = mlflow.model_version(model, str(number))
            what = f"version {number} of {model} (from EdgeTrainingJob {ref})"
        if version is None:
            raise ResolveError("AdapterNotFound", f"MLflow has no {what}")
        tags = {t["key"]: t["value"] for t in version.get("tags") or []}
        digest = tags.get(DIGEST_TAG, "")
        if len(digest) != 64:
            raise ResolveError("AdapterNotVerified", f"{what} carries no {DIGEST_TAG} tag: it was not registered by "
                               "edgetune after verification, so agents could not verify it")  # fmt: skip
        canary = ResolvedAdapter(version=str(version["version"]), uri=str(version["source"]), sha256=digest,
                                 base_sha256=tags.get(BASE_TAG) or None)  # fmt: skip
        stable_version = mlflow.alias_version(model, self.spec.promotion.alias)
        stable = ResolvedAdapter(version="base")
        if stable_version is not None:  # (releasing the current stable version again: it is its own fallback)
            stags = {t["key"]: t["value"] for t in stable_version.get("tags") or []}
            stable = ResolvedAdapter(version=str(stable_version["version"]), uri=str(stable_version["source"]),
                                     sha256=stags.get(DIGEST_TAG, ""))  # fmt: skip
        s = self.status
        s.canary, s.stable = canary, stable
        s.canary_version, s.stable_version = canary.version, stable.version
        s.current_step, s.canary_weight, s.step_started_at = 0, 0, self.now
        s.phase = "Progressing"
        self.condition("Resolved", True, "Resolved", f"{what}: {canary.uri} ({canary.sha256[:12]}); stable: "
                       f"{stable.version}")  # fmt: skip
        self.event("Resolved", f"releasing version {canary.version} of {model}; stable is {stable.version}")

    def targets(self) -> tuple[list[Target], list[str]]:
        selector = self.spec.targets.workload_selector
        labels = dict(selector.match_labels or {})
        targets: list[Target] = []
        unreachable: list[str] = []
        self.labels = {}
        self.clusters_selected = self.ctl.clusters.select(self.spec.targets.cluster_selector)
        for cluster in self.clusters_selected:
            try:
                kube = self.ctl.clusters.get(cluster)
                self.ctl.watches.ensure(cluster, kube, self.target_namespace, labels)
                pods = kube.list(PODS, self.target_namespace, labels=labels or None)
            except (ClusterUnavailableError, UnreachableError, KubeError):
                unreachable.append(cluster)
                continue
            self.kubes[cluster] = kube
            for pod in pods:
                meta = pod["metadata"]
                if meta.get("deletionTimestamp") or not selector.matches(dict(meta.get("labels") or {})):
                    continue
                annotations = meta.get("annotations") or {}
                assignment = report = None
                try:
                    raw = annotations.get(ASSIGNMENT_ANNOTATION)
                    assignment = parse_assignment(raw) if raw else None
                except ValueError:
                    assignment = None
                try:
                    raw = annotations.get(REPORT_ANNOTATION)
                    report = AdapterReport.model_validate_json(raw) if raw else None
                except ValueError:
                    report = None
                target = Target(cluster, meta["namespace"], meta["name"], meta["uid"], assignment, report)
                targets.append(target)
                self.labels[target.key] = dict(meta.get("labels") or {})
        return targets, unreachable

    def rival(self, targets: list[Target]) -> str | None:
        """Why this release may not start: another unfinished release (in any namespace of the hub)
        that started (or was created) before it selects some of the same pods. None when it may start."""
        mine = self.body["metadata"]
        rivals: list[RivalRelease] = []
        for other in self.ctl.hub.list(ADAPTER_RELEASES):
            meta, status = other["metadata"], other.get("status") or {}
            if meta["uid"] == mine["uid"]:
                continue
            if status.get("phase") in FINAL and status.get("observedGeneration") == meta.get("generation"):
                continue
            started = status.get("canary") is not None
            earlier = (meta.get("creationTimestamp", ""), meta["name"]) < (mine.get("creationTimestamp", ""),
                                                                            mine["name"])  # fmt: skip
            if not (started or earlier):
                continue  # this one came first: the other one yields
            try:
                spec = AdapterReleaseSpec.model_validate(other["spec"])
            except ValueError:
                continue
            clusters = frozenset(self.ctl.clusters.select(spec.targets.cluster_selector))
            where = spec.targets.namespace or meta["namespace"]
            if where != self.target_namespace:
                continue
            shown = meta["name"] if meta["namespace"] == self.namespace else f"{meta['namespace']}/{meta['name']}"
            rivals.append(RivalRelease(shown, status.get("phase") or "Pending", clusters,
                                       spec.targets.workload_selector, where))  # fmt: skip
        if not rivals:
            return None
        hit = conflicts(targets, self.labels, rivals)
        if hit is None:
            return None
        rival, keys = hit
        shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        return (f"{len(keys)} target pods ({shown}) belong to AdapterRelease {rival.name} ({rival.phase}), which "
                f"has not ended; two releases never drive the same pods. Wait for it to end (or abort it), then "
                f"change this release's spec to start it again")  # fmt: skip

    def observe(self, targets: list[Target]) -> None:
        s = self.status
        self.clusters_seen = sorted({t.cluster for t in targets})
        s.targets_total = len(targets)
        s.targets_by_version = versions_served(targets)
        s.targets_by_cluster = versions_by_cluster(targets)
        if s.canary and targets:
            on_canary = sum(1 for t in targets if t.confirms(s.canary.sha256))
            s.canary_weight = round(100 * on_canary / len(targets))
            shadows = sum(1 for t in targets if t.confirms_shadow(s.canary.sha256))
            s.targets_shadowing = shadows or (0 if s.targets_shadowing else None)

    def write(self, plan: StepPlan) -> None:
        """The plan's assignment annotations, several at a time (a rollback writes every target at
        once); a failed write is logged and the next reconcile plans it again."""

        def one(item: tuple[Target, AdapterAssignment]) -> None:
            target, assignment = item
            try:
                kube = self.kubes.get(target.cluster) or self.ctl.clusters.get(target.cluster)
                patch = {"metadata": {"annotations": {ASSIGNMENT_ANNOTATION: dumps(assignment)}}}
                kube.merge_patch(PODS, target.name, patch, target.namespace)
            except (ClusterUnavailableError, UnreachableError, KubeError) as exc:
                log.info("assigning %s to %s failed: %s", assignment.version, target.key, exc)

        if len(plan.writes) <= 2:
            for item in plan.writes:
                one(item)
        else:
            list(self.ctl.writers.map(one, plan.writes))

    # -- steps -----------------------------------------------------------------------------------

    def advance(self, targets: list[Target], unreachable: list[str]) -> None:
        s = self.status
        canary, _ = self.adapters()
        steps = self.spec.strategy.canary.steps
        while True:
            index = s.current_step or 0
            if self.spec.promote or index >= len(steps):
                if self.reach(targets, unreachable, 100, "Finishing", "finishing"):
                    self.promote()
                return
            step = steps[index]
            if step.set_weight is not None:
                if not self.reach(targets, unreachable, step.set_weight, "WaitingForAgents", f"step {index}"):
                    return
                self.next_step(f"{step.set_weight} % of targets confirm version {canary.version}")
                continue
            if step.shadow is not None:
                if not self.shadow(targets, unreachable, index, parse_duration(step.shadow.duration)):
                    return
                self.next_step(f"version {canary.version} ran in shadow on every target for {step.shadow.duration}")
                continue
            if step.pause is not None:
                if step.pause.duration is None:
                    if not self.pause_step_over():
                        return
                    self.next_step("resumed after an indefinite pause")
                    continue
                waited = (self.now - (s.step_started_at or self.now)).total_seconds()
                if waited < parse_duration(step.pause.duration):
                    self.wake_in(parse_duration(step.pause.duration) - waited)
                    s.phase = "Paused"
                    self.condition("Progressing", True, "PauseStep", f"step {index}: pause {step.pause.duration}")
                    return
                self.next_step(f"pause {step.pause.duration} over")
                continue
            verdict = self.analyse(index, step.analysis.metrics if step.analysis else [])
            if verdict is None:
                return
            self.next_step(verdict)

    def reach(self, targets: list[Target], unreachable: list[str], weight: int, reason: str, where: str) -> bool:
        """Write what moves the fleet to ``weight`` %; True once every wanted agent confirms and no
        cluster is out of reach. Agents refusing the canary, or the progress deadline, roll back."""
        canary, stable = self.adapters()
        plan = self.plan(targets, canary, stable, weight)
        held = self.hold(plan)
        self.write(plan)
        if plan.refused:
            self.refused(plan)
            return False
        if plan.complete and not unreachable:
            return True
        self.status.phase = "Progressing"
        share = f"{weight} % of {len(targets)} targets, in whole pods" if weight < 100 else f"{weight} %"
        self.condition("Progressing", True, reason, f"{where}: {plan.confirmed} of {plan.wanted} targets confirm "
                       f"version {canary.version} ({share})")  # fmt: skip
        if not held:  # waiting for a person to resume a cluster is not a rollout that failed to progress
            self.check_deadline(self.spec.strategy.canary.progress_deadline)
        return False

    def shadow(self, targets: list[Target], unreachable: list[str], index: int, duration: float) -> bool:
        """A shadow step: every target told to run the canary in shadow; True once all of them have
        for ``duration``. Agents refusing it roll back, like a setWeight step."""
        s = self.status
        canary, _ = self.adapters()
        plan = shadow_plan(targets, canary=canary, max_unavailable=self.spec.strategy.canary.max_unavailable,
                           release=self.release)  # fmt: skip
        held = self.hold(plan)
        self.write(plan)
        if plan.refused:
            self.refused(plan)
            return False
        s.phase = "Progressing"
        if plan.complete and not unreachable and not held:
            s.shadowing_since = s.shadowing_since or self.now
            waited = (self.now - s.shadowing_since).total_seconds()
            if waited >= duration:
                return True
            self.wake_in(duration - waited)
            self.condition("Progressing", True, "Shadowing", f"step {index}: version {canary.version} runs in shadow "
                           f"on all {plan.wanted} targets, beside what they serve; {duration - waited:.0f} s to go "
                           "(agreement: edgetune_agent_shadow_agreements_total)")  # fmt: skip
            return False
        self.condition("Progressing", True, "WaitingForShadows", f"step {index}: {plan.confirmed} of {plan.wanted} "
                       f"targets run version {canary.version} in shadow")  # fmt: skip
        if not held:
            self.check_deadline(self.spec.strategy.canary.progress_deadline)
        return False

    def hold(self, plan: StepPlan) -> int:
        """Drop the writes to targets on paused clusters (they stay where they are) and say so in the
        ClustersPaused condition; the number of targets held."""
        if not self.paused:
            return 0
        held = [(t, a) for t, a in plan.writes if t.cluster in self.paused]
        plan.writes = [(t, a) for t, a in plan.writes if t.cluster not in self.paused]
        message = (f"EdgeCluster {', '.join(self.paused)} is paused (spec.paused: true): "
                   + (f"{len(held)} of its targets hold where they are, and the step completes once it is resumed "
                      "(the progress deadline does not run meanwhile)" if held else "nothing to hold in this step")
                   + "; a rollback still takes its targets back")  # fmt: skip
        if held and not any(c.type == "ClustersPaused" and c.status == "True" for c in self.status.conditions):
            self.event("ClusterPaused", message)
        self.condition("ClustersPaused", True, "ClusterPaused", message)
        return len(held)

    def plan(self, targets: list[Target], canary: ReleasedAdapter, stable: ReleasedAdapter | None,
             weight: int) -> StepPlan:  # fmt: skip
        opts = self.spec.strategy.canary
        return canary_plan(targets, canary=canary, stable=stable, weight=weight, max_unavailable=opts.max_unavailable,
                           release=self.release, release_key=self.body["metadata"]["uid"],
                           waves=opts.waves)  # fmt: skip

    def pause_step_over(self) -> bool:
        """An indefinite pause step: the operator sets spec.paused; the step is over once a person
        sets it back to false (this reconcile only runs with spec.paused false)."""
        s = self.status
        if s.pause_started_at is None:
            s.pause_started_at = self.now
            s.phase = "Paused"
            self.condition("Paused", True, "PauseStep", f"step {s.current_step}: paused until spec.paused is false")
            self.set_paused()
            return False
        return True

    def next_step(self, why: str) -> None:
        s = self.status
        s.current_step = (s.current_step or 0) + 1
        s.step_started_at = self.now
        s.pause_started_at = None
        s.shadowing_since = None
        metrics.RELEASE_STEPS.labels(self.release).inc()
        self.event("StepCompleted", f"step {s.current_step - 1} done: {why}")
        # The previous step's reason (PauseStep, WaitingForAgents) must not outlive it.
        self.condition("Progressing", True, "StepCompleted", f"step {s.current_step - 1} done: {why}"[:2000])

    def wake_in(self, seconds: float) -> None:
        self.due = max(0.0, seconds) if self.due is None else min(self.due, max(0.0, seconds))

    def check_deadline(self, deadline: str) -> None:
        s = self.status
        waited = (self.now - (s.step_started_at or self.now)).total_seconds()
        self.wake_in(parse_duration(deadline) - waited + 0.1)
        if waited > parse_duration(deadline):
            self.start_rollback("ProgressDeadlineExceeded", f"step {s.current_step} did not complete within {deadline} "
                                f"({s.canary_weight} % of targets confirm the new version)")  # fmt: skip

    def refused(self, plan: StepPlan) -> None:
        reasons = ", ".join(sorted({f"{e.reason}" for _, e in plan.refused}))
        first = plan.refused[0]
        self.start_rollback("AgentsRefused", f"{len(plan.refused)} agents refused version {self.status.canary_version} "
                            f"({reasons}), e.g. {first[0].key}: {first[1].message[:300]}")  # fmt: skip

    # -- analysis --------------------------------------------------------------------------------

    def analyse(self, index: int, names: list[str]) -> str | None:
        """Measure what is due; return the success message, or None while running or after the
        analysis failed (rollback) or was inconclusive (paused). What a finished metric's verdict
        means for the step, and what measuring again after a pause means: ``analysis.analyse_step``."""
        s = self.status
        s.phase = "Analyzing"
        canary = s.canary
        variables = {"release": self.release, "namespace": self.target_namespace,  # where the agents' series are
                     "version": canary.version if canary else "", "stableVersion": s.stable_version or "",
                     "cluster": "", "model": self.spec.adapter.registered_model}  # fmt: skip
        chosen = [m for m in self.spec.analysis.metrics if not names or m.name in names]

        def measure(metric: AnalysisMetric) -> analysis.Measurement:
            if analysis.uses(metric.query, "cluster"):  # once per cluster; the worst one counts
                m = analysis.worst(metric, {c: self.measure(metric.query, {**variables, "cluster": c})
                                            for c in self.clusters_seen})  # fmt: skip
            else:
                m = self.measure(metric.query, variables)
            metrics.ANALYSIS_MEASUREMENTS.labels(metric.name, m.kind).inc()
            return m

        outcome = analysis.analyse_step(s.analysis_runs, index, chosen, self.now, measure, keep=MAX_RUNS)
        s.analysis_runs = outcome.runs
        if outcome.wake_in is not None:
            self.wake_in(outcome.wake_in)
        overall = outcome.verdict
        if overall.phase == "Running":
            self.condition("Analyzing", True, "Measuring", overall.message[:2000])
            return None
        if overall.phase == "Successful":
            self.condition("Analyzing", False, "Passed", overall.message[:2000])
            return overall.message
        if overall.phase == "Failed":
            self.condition("Analyzing", False, "Failed", overall.message[:2000])
            if self.spec.rollback.automatic:
                self.start_rollback("AnalysisFailed", overall.message)
                return None
            s.phase = "Paused"
            self.condition("Paused", True, "AnalysisFailed", f"{overall.message[:1500]}; rollback.automatic is false: "
                           "set spec.abort to roll back, or spec.paused to false to measure again")  # fmt: skip
            self.event("AnalysisFailed", overall.message, warning=True)
            self.set_paused()
            return None
        s.phase = "Paused"
        self.condition("Analyzing", False, "Inconclusive", overall.message[:2000])
        self.condition("Paused", True, "AnalysisInconclusive", f"{overall.message[:1500]}; set spec.paused to false "
                       "to measure again")  # fmt: skip
        self.event("AnalysisInconclusive", overall.message, warning=True)
        self.set_paused()
        return None

    def measure(self, query: str, variables: dict[str, str]) -> analysis.Measurement:
        if self.ctl.prometheus is None:
            return analysis.Measurement("error", message="the operator has no Prometheus URL (EDGETUNE_PROMETHEUS_URL)")
        try:
            return self.ctl.prometheus.measure(analysis.render_query(query, variables))
        except analysis.TemplateError as exc:
            return analysis.Measurement("error", message=str(exc))

    def set_paused(self) -> None:
        """The operator's only write to a spec: hold the release until a person lets it go on."""
        self.ctl.hub.merge_patch(ADAPTER_RELEASES, self.body["metadata"]["name"], {"spec": {"paused": True}},
                                 self.namespace)  # fmt: skip

    # -- the two endings -------------------------------------------------------------------------

    def start_rollback(self, reason: str, message: str) -> None:
        s = self.status
        if s.phase == "RollingBack":
            return
        s.phase = "RollingBack"
        self.condition("RolledBack", False, reason, f"rolling every target back to {s.stable_version}: {message}")
        self.event(reason, f"rolling back version {s.canary_version} to {s.stable_version}: {message}", warning=True)
        metrics.ROLLBACKS.labels(reason).inc()

    def roll_back(self, targets: list[Target], unreachable: list[str]) -> None:
        s = self.status
        canary, stable = self.adapters()
        plan = rollback_plan(targets, canary=canary, stable=stable, release=self.release)
        self.write(plan)
        started = next((c for c in s.conditions if c.type == "RolledBack"), None)
        reason = started.reason if started else "AnalysisFailed"
        self.publish_revocation(reason)
        waited = (self.now - started.last_transition_time).total_seconds() if started else 0.0
        deadline = self.spec.strategy.canary.progress_deadline
        published = any(c.type == "RevocationPublished" and c.status == "True" for c in s.conditions)
        if unreachable and plan.confirmed == plan.wanted and published:
            # Every reachable target is back; the unreachable clusters' agents fall back by
            # themselves through the revocation in S3. The release ends (it does not hold the rest
            # of the fleet) and names what is pending.
            self.condition("Degraded", True, "ClustersUnreachable", f"{', '.join(unreachable)} could not be "
                           f"reached: its agents fall back to {s.stable_version} by themselves through the "
                           "revocation published in S3; their assignments still name the revoked version until "
                           "a later release writes new ones")  # fmt: skip
        elif plan.confirmed < plan.wanted or unreachable:
            # Without a published revocation an unreachable cluster is waited for as long as it takes
            # (it is rolled back when it answers); reachable agents that do not confirm within the
            # deadline are named instead.
            if unreachable or waited < parse_duration(deadline):
                where = (f"; {', '.join(unreachable)} cannot be reached (rolled back as soon as it answers; with "
                         "rollback.publishRevocation its agents would fall back by themselves)") if unreachable else ""
                self.condition("Progressing", True, "RollingBack", f"{plan.confirmed} of {plan.wanted} targets "
                               f"confirm {s.stable_version} again{where}")  # fmt: skip
                return
            silent = sorted(t.key for t in targets if not t.confirms(stable.sha256 if stable else ""))
            shown = ", ".join(silent[:5]) + (f" and {len(silent) - 5} more" if len(silent) > 5 else "")
            self.condition("Degraded", True, "TargetsNotConfirming", f"{len(silent)} targets did not confirm "
                           f"{s.stable_version} within {deadline} of the rollback ({shown}); their assignment names "
                           "it and revokes the canary, so their agents switch when they run again")  # fmt: skip
        else:
            self.condition("Degraded", False, "AllConfirmed", f"every target confirms {s.stable_version}")
        if self.ctl.mlflow is not None and s.canary_version:
            try:
                self.ctl.mlflow.tag_version(self.spec.adapter.registered_model, s.canary_version,
                                            {"edgetune.release": self.release, "edgetune.outcome": "rolled-back",
                                             "edgetune.reason": reason})  # fmt: skip
            except (MlflowError, MlflowUnavailableError, ConnectionError) as exc:
                self.condition("Progressing", True, "RegistryUnavailable", f"tagging version {s.canary_version} "
                               f"rolled-back in MLflow failed (retried): {exc}"[:2000])  # fmt: skip
                return
        metrics.ROLLBACK_SECONDS.observe(waited)
        s.phase = "Aborted" if reason == "Aborted" else "RolledBack"
        why = started.message.split(": ", 1)[-1] if started else ""
        self.condition("RolledBack", True, reason, f"targets serve {s.stable_version} again; cause: {why}"[:4000])
        self.condition("Progressing", False, reason, "the release ended")
        self.event("RolledBack", f"targets serve {s.stable_version} again ({reason})", warning=True)

    def publish_revocation(self, reason: str) -> None:
        """Write the rolled-back package's revocation next to it in S3 (once), for the agents the
        operator cannot reach: they poll it for what they serve and fall back by themselves."""
        s, opts = self.status, self.spec.rollback
        if not opts.publish_revocation or s.revocation_published_at is not None or s.canary is None:
            return
        where = revocation_location(s.canary.uri, s.canary.sha256)
        if where is None:
            self.condition("RevocationPublished", False, "PackageNotInS3", f"{s.canary.uri} is not an s3:// URI: "
                           "agents learn of the rollback from their assignment only")  # fmt: skip
            return
        bucket, key = where
        uid = self.body["metadata"]["uid"]
        if time.monotonic() - self.ctl.publish_tried.get(uid, -math.inf) < PUBLISH_RETRY_SECONDS:
            return  # an S3 that times out must not slow every reconcile of the rollback down
        self.ctl.publish_tried[uid] = time.monotonic()
        record = Revocation(sha256=s.canary.sha256, version=s.canary.version, release=self.release, reason=reason,
                            revoked_at=self.now.isoformat().replace("+00:00", "Z"))  # fmt: skip
        try:
            if self.ctl.s3_factory is None:
                raise ConfigurationError("the operator has no S3 client")  # noqa: TRY301 - reported like the rest
            creds = s3_credentials(self.ctl.hub, self.namespace, opts.s3.credentials_secret_ref,
                                   field="rollback.s3.credentialsSecretRef")  # fmt: skip
            client = self.ctl.s3_factory(s3_endpoint(self.ctl.settings, opts.s3.endpoint), creds)
            object_store.put_json(client, bucket, key, record.model_dump_json(by_alias=True).encode())
        except Exception as exc:  # botocore's errors, a missing Secret: all reported the same way
            message = (f"writing s3://{bucket}/{key} failed (retried every {PUBLISH_RETRY_SECONDS:.0f} s): "
                       f"{type(exc).__name__}: {exc}")  # fmt: skip
            first = not any(c.type == "RevocationPublished" and c.reason == "PublishFailed" for c in s.conditions)
            self.condition("RevocationPublished", False, "PublishFailed", message[:2000])
            if first:
                self.event("RevocationNotPublished", message[:1000], warning=True)
            return
        s.revocation_published_at = self.now
        self.condition("RevocationPublished", True, "Published", f"s3://{bucket}/{key}: agents that poll it stop "
                       f"serving version {s.canary.version} even where the operator cannot reach them")  # fmt: skip

    def promote(self) -> None:
        s = self.status
        mlflow = self.ctl.mlflow
        model = self.spec.adapter.registered_model
        if mlflow is not None and s.canary_version:
            mlflow.set_alias(model, self.spec.promotion.alias, s.canary_version)
            mlflow.tag_version(model, s.canary_version, {"edgetune.release": self.release,
                                                         "edgetune.outcome": "promoted",
                                                         "edgetune.previous": s.stable_version or "base"})  # fmt: skip
        s.phase = "Promoted"
        s.canary_weight = 100
        self.condition("Promoted", True, "Promoted", f"version {s.canary_version} serves on every target; alias "
                       f"{self.spec.promotion.alias} moved from {s.stable_version}")  # fmt: skip
        s.stable, s.stable_version = s.canary, s.canary_version  # the released version is the stable one now
        self.condition("Progressing", False, "Promoted", "the release ended")
        self.condition("Degraded", False, "AllConfirmed", f"every target confirms version {s.canary_version}")
        self.event("Promoted", f"version {s.canary_version} promoted ({self.spec.promotion.alias})")
