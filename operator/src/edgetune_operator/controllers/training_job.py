"""EdgeTrainingJob controller: one level-based ``reconcile`` that observes the job's children on
every selected cluster, creates the missing ones, verifies and registers finished adapters, and
writes the status. It converges on the same state whatever woke it; calls for one job are
serialised.

What wakes it, without polling: the job itself changing (kopf's watch feeds ``observed``; a new
generation or a job seen for the first time is queued), any of its trainer Jobs or pods changing
on any cluster (``informers``: one watch per cluster and kind, shared by all jobs), a retry whose
backoff has passed, and a slow resync as a safety net. Reconciles run on a fixed pool of threads
fed by a de-duplicating queue (``WorkQueue``), and read children from the informers' caches, so a
reconcile that changes nothing makes no API call at all.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Mapping
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from typing import Any

from edgetune_api.delta import (
    MAX_PACKAGE_BYTES,
    SIGNATURE,
    DeltaManifest,
    DeltaVerificationError,
    derive_trainer_key,
    public_key_pem,
    sha256_bytes,
)
from edgetune_api.trainer_config import BaseFiles, UploadPolicy
from edgetune_api.training_job import EdgeTrainingJobSpec, EdgeTrainingJobStatus, TargetStatus, TrainingResult
from edgetune_operator import metrics
from edgetune_operator.clients import object_store
from edgetune_operator.clients.kube import (
    EDGE_CLUSTERS,
    FIELD_MANAGER,
    JOBS,
    NODES,
    PODS,
    SECRETS,
    TRAINING_JOBS,
    ConflictError,
    Kube,
    KubeError,
    Resource,
    ThrottledError,
    UnreachableError,
)  # fmt: skip
from edgetune_operator.clients.mlflow import Mlflow, MlflowError, MlflowUnavailableError
from edgetune_operator.clients.object_store import Verified
from edgetune_operator.controllers.clusters import LOCAL, Clusters, ClusterUnavailableError, describe
from edgetune_operator.controllers.credentials import (
    ConfigurationError,
    s3_credentials,
    s3_endpoint,
    secret_value,
)
from edgetune_operator.controllers.informers import ClusterInformers, backoff_delay, newer
from edgetune_operator.controllers.locks import PerObjectLocks
from edgetune_operator.controllers.workqueue import WorkQueue
from edgetune_operator.delta.trust import verify_trained
from edgetune_operator.reconcile import placement, registration
from edgetune_operator.reconcile.placement import Node
from edgetune_operator.reconcile.status import Observation, progress_only, same, summarize, transitions
from edgetune_operator.reconcile.training_job import (
    ANNOTATION_CLUSTER,
    ANNOTATION_NODE,
    BASE_FILES,
    LABEL_JOB_UID,
    LABEL_TARGET,
    SALT,
    TRAINER_KEY,
    UPLOAD_POLICY,
    JobRef,
    Target,
    child_name,
    credentials_seconds,
    observe_trainer,
    s3_prefix,
    set_condition,
    trainer_job,
    trainer_key_context,
    trainer_secret,
)  # fmt: skip
from edgetune_operator.settings import Settings

log = logging.getLogger("edgetune.training")


FINALIZER = "edgetune.io/finalizer"
"""kopf's finalizer (``handlers.configure``): only on jobs that may have trainers on edge clusters."""


def needs_finalizer(body: Mapping[str, Any]) -> bool:
    """Whether deleting the job needs the operator: trainers on edge clusters are not collected by
    the hub's garbage collector. Hub trainers follow their owner reference, so a hub job carries no
    finalizer (one request less per job)."""
    placement = (body.get("spec") or {}).get("placement") or {}
    targets = (body.get("status") or {}).get("targets") or []
    return placement.get("clusterSelector") is not None or any(t.get("cluster", LOCAL) != LOCAL for t in targets)


def _finalized(body: Mapping[str, Any]) -> bool:
    return FINALIZER in ((body.get("metadata") or {}).get("finalizers") or [])


class RetryableError(RuntimeError):
    """S3 or MLflow is unavailable: nothing is lost, the next reconcile retries."""


RETRYABLE = (UnreachableError, MlflowUnavailableError, ConnectionError, TimeoutError, RetryableError)
Issuer = Callable[[Target], dict[str, bytes]]
"""Gives one trainer its credentials Secret's data."""


IDENTITY_SECONDS = 600.0
"""How long trainers' ServiceAccount and RoleBinding in a namespace are taken to exist without
asking again (a namespace deleted and made again gets them back within this time)."""


class TrainingJobController:
    def __init__(
        self, settings: Settings, clusters: Clusters, *, s3_factory: Callable[[str | None, dict[str, str]], Any],
        mlflow: Mlflow | None,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.clusters = clusters
        self.hub = clusters.local
        self.s3_factory = s3_factory
        self.mlflow = mlflow
        self._locks = PerObjectLocks()
        self._phases: dict[str, str] = {}
        self._polled: dict[str, tuple[float, bool]] = {}
        """uid -> (when last reconciled, whether it needs polling: an unreachable cluster, waiting for
        data or nodes)."""
        self._bodies: dict[tuple[str, str], dict[str, Any]] = {}
        """(namespace, name) -> the job as last seen (kopf's watch, or our own status write)."""
        self._uids: dict[str, tuple[str, str]] = {}
        self._informers: dict[str, ClusterInformers] = {}
        self._informers_lock = threading.Lock()
        self._failures: dict[str, int] = {}
        """uid -> consecutive failed attempts (reconcile errors, or S3/MLflow holding it up)."""
        self._retry_at: dict[str, float] = {}
        """uid -> monotonic time before which a job held up by S3/MLflow is not retried."""
        self._written_at: dict[str, float] = {}
        """uid -> monotonic time of the job's last status write (progress alone waits progress_seconds)."""
        self._trainer_identities: dict[tuple[str, str], float] = {}
        """(cluster, namespace) -> monotonic time the trainers' ServiceAccount and RoleBinding were
        last ensured there."""
        self.queue: WorkQueue | None = None
        self.stop = threading.Event()

    # -- entry points ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the reconcile threads and the hub's trainer watches (existing children are listed
        once: a restarted operator picks up where it was)."""
        self.queue = WorkQueue(self._work, self.settings.workers)
        self.informers(LOCAL, self.hub)
        # The first job must not wait for boto3 to load (~0.5 s): the S3 client its trainers' upload
        # policies are signed with is built now, in the background.
        threading.Thread(target=self._warm_up, name="warm-up", daemon=True).start()

    def _warm_up(self) -> None:
        try:
            self.s3_factory(self.settings.s3_endpoint, {})
        except Exception:  # only a head start: the first job builds it otherwise
            log.debug("S3 client warm-up failed", exc_info=True)

    def close(self) -> None:
        self.stop.set()
        if self.queue is not None:
            self.queue.stop()
        with self._informers_lock:
            for informers in self._informers.values():
                informers.stop()
            self._informers.clear()

    def observed(self, body: Mapping[str, Any], *, deleted: bool = False) -> None:
        """A watch event of an EdgeTrainingJob (called in kopf's event loop: never blocks). Keeps
        the latest copy; queues a reconcile for a job seen for the first time (created, or listed at
        start-up) or whose spec changed, unless it is finished or being deleted."""
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        if not self.settings.serves(key[0]):
            return
        if deleted:
            self._bodies.pop(key, None)
            self._uids.pop(meta["uid"], None)
            self.forget(meta["uid"])  # a hub job has no finalizer: its deletion ends here
            return
        current = self._bodies.get(key)
        if current is not None and current["metadata"]["uid"] == meta["uid"] and not newer(body, current, strict=True):
            return
        self._remember(body)
        status = body.get("status") or {}
        first = current is None or current["metadata"]["uid"] != meta["uid"]
        changed = status.get("observedGeneration") != meta.get("generation")
        finished = status.get("phase") in ("Succeeded", "Failed") and not changed
        # A job bound for edge clusters waits for the event that shows kopf's finalizer on it.
        finalized = _finalized(body) and (first or not _finalized(current or {}))
        if needs_finalizer(body) and not _finalized(body):
            return
        wanted = first or changed or finalized
        if wanted and not finished and not meta.get("deletionTimestamp") and self.queue is not None:
            self.queue.put(key, first=not status.get("targets"))  # nothing started yet: before finishing work

    def _remember(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        kept = (
            "name",
            "namespace",
            "uid",
            "generation",
            "creationTimestamp",
            "resourceVersion",
            "deletionTimestamp",
            "labels",
            "finalizers",
        )
        self._bodies[(meta["namespace"], meta["name"])] = {
            "apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
            # Plain dicts, not kopf's views: those keep the whole raw object alive (managedFields too).
            "metadata": {k: meta[k] for k in kept if k in meta}, "spec": dict(body.get("spec") or {}),
            "status": dict(body.get("status") or {}),
        }  # fmt: skip
        self._uids[meta["uid"]] = (meta["namespace"], meta["name"])

    def _child_changed(self, cluster: str, namespace: str, uid: str) -> None:
        """A trainer Job or pod changed: reconcile its job after ``batch_seconds``, so the burst of
        changes one trainer makes (pod bound, running, Job complete) costs one status write."""
        key = self._uids.get(uid)
        if key is not None and self.queue is not None:
            self.queue.put_after(key, self.settings.batch_seconds)

    def _work(self, key: Any) -> None:
        body = self._bodies.get(key)
        if body is None:
            return
        uid = body["metadata"]["uid"]
        try:
            self.reconcile(body)
        except Exception:
            attempts = self._failures[uid] = self._failures.get(uid, 0) + 1
            if self.queue is not None:
                self.queue.put_after(key, backoff_delay(attempts - 1, first=1.0, cap=300.0))

    def informers(self, cluster: str, kube: Kube) -> ClusterInformers:
        """The cluster's trainer watches, started on first use; replaced when the cluster's client
        is (its kubeconfig Secret changed)."""
        with self._informers_lock:
            current = self._informers.get(cluster)
            if current is not None and current.kube is kube:
                return current
            if current is not None:
                current.stop()
            created = self._informers[cluster] = ClusterInformers(cluster, kube, LABEL_JOB_UID, self._child_changed)
            return created

    def forget_cluster(self, cluster: str) -> None:
        with self._informers_lock:
            informers = self._informers.pop(cluster, None)
        if informers is not None:
            informers.stop()

    def reconcile(self, body: dict[str, Any]) -> EdgeTrainingJobStatus:
        """``body``: the cached copy, which our own status writes keep current (``_remember``)."""
        meta = body["metadata"]
        status = body.get("status") or {}
        finished = status.get("phase") in ("Succeeded", "Failed")
        if finished and status.get("observedGeneration") == meta.get("generation"):
            return EdgeTrainingJobStatus.model_validate(status)  # finished: no I/O at all
        started = time.perf_counter()
        result = "ok"
        try:
            with self._locks.hold(meta["uid"]):
                return self._reconcile(body)
        except Exception as exc:
            result = "error"
            self._report_error(body, exc)
            raise
        finally:
            metrics.RECONCILES.labels("EdgeTrainingJob", result).inc()
            metrics.RECONCILE_SECONDS.labels("EdgeTrainingJob").observe(time.perf_counter() - started)

    def _reconcile(self, body: dict[str, Any]) -> EdgeTrainingJobStatus:
        """Not called for a finished job (``reconcile`` returns before)."""
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return EdgeTrainingJobStatus()
        created = meta.get("creationTimestamp")
        job = JobRef(meta["name"], meta["namespace"], meta["uid"], int(meta.get("generation", 1)),
                     _timestamp(created) if created else 0.0)  # fmt: skip
        old = EdgeTrainingJobStatus.model_validate(body.get("status") or {})
        spec = EdgeTrainingJobSpec.model_validate(body["spec"])
        obs = Observation()
        old_targets = {(t.cluster, t.node): t for t in old.targets}
        try:
            names = self.clusters.select(spec.placement.cluster_selector)
        except RETRYABLE as exc:
            names = []
            obs.unreachable[LOCAL] = str(exc)
        if not names and LOCAL not in obs.unreachable:
            obs.no_clusters = True
        # Trainers' credentials, issued (Secrets read, base model resolved and listed) at most once per
        # reconcile, and only when some cluster starts trainers.
        credentials = functools.cache(functools.partial(self._credentials, spec, job))
        for cluster in names:
            self._observe_cluster(spec, job, cluster, obs, old_targets, credentials=credentials,
                                  finalized=_finalized(body))  # fmt: skip
        self._results(spec, job, body, obs, old)
        self._schedule_retry(job, obs)
        new = summarize(spec, job.generation, old, obs)
        if obs.created and self.queue is not None:
            # Trainers just started: their status is written by the reconcile their first changes
            # wake (batched), so a burst of new jobs gets its trainers created first, at two requests
            # per trainer, and a trainer already running by then costs one status write, not two.
            self.queue.put_after((job.namespace, job.name), self.settings.batch_seconds)
            self._polled[job.uid] = (time.monotonic(), False)
            return new
        if not same(old, new):
            wait = self._progress_wait(job.uid) if progress_only(old, new) else 0.0
            if wait > 0:  # running trainers' progress alone: written at most every progress_seconds
                if self.queue is not None:
                    self.queue.put_after((job.namespace, job.name), wait)
            else:
                written = self.hub.replace_status(TRAINING_JOBS, job.name, job.namespace, new.to_wire())
                self._written_at[job.uid] = time.monotonic()
                if written.get("metadata", {}).get("uid") == job.uid:
                    self._remember(written)  # the next reconcile starts from what we wrote, not an older event
                for reason, message, warning in transitions(old, new):
                    self.hub.event(body, reason=reason, message=message, warning=warning)
        self._count_phase(job.uid, new.phase or "Pending")
        # Children are watched; what no watch reports is a cluster coming back, nodes or data appearing.
        needs_polling = not obs.targets or bool(obs.unreachable or obs.waiting or obs.start_error or obs.paused)
        self._polled[job.uid] = (time.monotonic(), needs_polling)
        return new

    def _schedule_retry(self, job: JobRef, obs: Observation) -> None:
        """S3 or MLflow holding a job up: retried with exponential backoff and jitter, reset once it
        answers. The attempt and the next retry's time go into the Registered condition's message
        (so into the status), the delay into ``edgetune_operator_retry_delay_seconds``."""
        system = obs.pending_system or "s3"
        if not obs.pending_error or obs.blocked:
            if self._failures.pop(job.uid, None) is not None:
                self._retry_at.pop(job.uid, None)
                for name in ("s3", "mlflow", "kubernetes"):
                    with suppress(KeyError):
                        metrics.RETRY_DELAY.remove(name, f"{job.namespace}/{job.name}")
            return
        attempts = self._failures[job.uid] = self._failures.get(job.uid, 0) + 1
        delay = backoff_delay(attempts - 1, first=self.settings.retry_first_seconds,
                              cap=self.settings.retry_max_seconds)  # fmt: skip
        self._retry_at[job.uid] = time.monotonic() + delay
        at = (datetime.now(UTC) + timedelta(seconds=delay)).strftime("%Y-%m-%dT%H:%M:%SZ")
        obs.pending_error = f"{obs.pending_error} (attempt {attempts}; next retry in {delay:.0f} s, at {at})"
        metrics.RETRY_DELAY.labels(system, f"{job.namespace}/{job.name}").set(round(delay, 1))
        if self.queue is not None:
            self.queue.put_after((job.namespace, job.name), delay)

    def resync_loop(self) -> None:
        """Queue unfinished jobs nobody reconciled lately: every ``resync_seconds`` those waiting for
        something no watch reports (an unreachable cluster, data, nodes); every
        ``local_resync_seconds`` the rest (a safety net: their children's watches wake them). Jobs
        held up by S3/MLflow wait for their backoff instead. Reads the cached jobs; once every
        ``local_resync_seconds`` also lists them (``audit``)."""
        audited = time.monotonic()
        while not self.stop.wait(self.settings.resync_seconds):
            if self.queue is None:
                continue
            now = time.monotonic()
            if now - audited >= self.settings.local_resync_seconds:
                audited = now
                try:
                    self.audit()
                except Exception:  # the next round tries again
                    log.exception("listing EdgeTrainingJobs for the audit failed")
            for key, body in list(self._bodies.items()):
                meta, status = body["metadata"], body.get("status") or {}
                if meta.get("deletionTimestamp") or (status.get("phase") in ("Succeeded", "Failed") and status.get(
                        "observedGeneration") == meta.get("generation")):  # fmt: skip
                    continue
                if self._retry_at.get(meta["uid"], 0.0) > now:
                    continue
                last, polled = self._polled.get(meta["uid"], (float("-inf"), True))
                interval = self.settings.resync_seconds if polled else self.settings.local_resync_seconds
                if now - last >= 0.9 * interval:
                    self.queue.put(key)

    def audit(self) -> list[str]:
        """A safety net under kopf's watch (one list per ``local_resync_seconds``): an unfinished job
        the watch never delivered is taken from the list, and one bound for edge clusters still
        without kopf's finalizer after that long gets it from us (the trainers wait for it), each
        with a warning in the log. Twice in CI a job's first event never reached the handler. The
        keys of the jobs it acted on."""
        acted = []
        grace = self.settings.local_resync_seconds
        for job in self.hub.list(TRAINING_JOBS):
            meta, status = job["metadata"], job.get("status") or {}
            key = (meta["namespace"], meta["name"])
            if not self.settings.serves(key[0]) or meta.get("deletionTimestamp") or status.get("phase") in (
                    "Succeeded", "Failed"):  # fmt: skip
                continue
            age = time.time() - _timestamp(meta.get("creationTimestamp"))
            cached = self._bodies.get(key)
            if cached is None or cached["metadata"]["uid"] != meta["uid"]:
                if age < grace:
                    continue  # its event may still be on the way
                log.warning("EdgeTrainingJob %s/%s (%.0f s old) never arrived through the watch; reconciling it "
                            "from a list", *key, age)  # fmt: skip
                acted.append(f"{key[0]}/{key[1]}")
                self.observed(job)
            elif needs_finalizer(job) and not _finalized(job) and age >= grace:
                log.warning("EdgeTrainingJob %s/%s has waited %.0f s for its finalizer; adding it", *key, age)
                acted.append(f"{key[0]}/{key[1]}")
                written = self.hub.merge_patch(TRAINING_JOBS, meta["name"], {"metadata": {
                    "finalizers": [*(meta.get("finalizers") or []), FINALIZER],
                    "resourceVersion": meta["resourceVersion"]}}, meta["namespace"])  # fmt: skip
                self.observed(written)
        return acted

    def _report_error(self, body: dict[str, Any], exc: Exception) -> None:
        """An unexpected failure: a condition and a Warning Event say so; kopf retries with backoff."""
        log.exception("reconcile of %s/%s failed", body["metadata"]["namespace"], body["metadata"]["name"])
        message = f"{type(exc).__name__}: {exc}"[:2000]
        try:
            old = EdgeTrainingJobStatus.model_validate(body.get("status") or {})
            conditions = set_condition(old.conditions, "Reconciled", False, reason="ReconcileError", message=message,
                                       generation=int(body["metadata"].get("generation", 1)))  # fmt: skip
            self.hub.merge_patch(TRAINING_JOBS, body["metadata"]["name"], {"status": {"conditions": [
                c.to_wire() for c in conditions]}}, body["metadata"]["namespace"], subresource="status")  # fmt: skip
            self.hub.event(body, reason="ReconcileError", message=message, warning=True)
        except Exception:
            log.exception("could not report the reconcile error")

    def _progress_wait(self, uid: str) -> float:
        return self.settings.progress_seconds - (time.monotonic() - self._written_at.get(uid, -math.inf))

    def forget(self, uid: str) -> None:
        self._locks.forget(uid)
        self._written_at.pop(uid, None)
        self._phases.pop(uid, None)
        self._polled.pop(uid, None)
        self._failures.pop(uid, None)
        self._retry_at.pop(uid, None)
        self._publish_phases()

    def _count_phase(self, uid: str, phase: str) -> None:
        if self._phases.get(uid) != phase:
            self._phases[uid] = phase
            self._publish_phases()

    def _publish_phases(self) -> None:
        tally = Tally(self._phases.values())
        for phase in ("Pending", "WaitingForData", "Scheduled", "Training", "Packaging", "Registering",
                      "Succeeded", "Failed", "Suspended"):  # fmt: skip
            metrics.JOBS_BY_PHASE.labels(phase).set(tally.get(phase, 0))

    # -- one cluster -----------------------------------------------------------------------------

    def _observe_cluster(
        self, spec: EdgeTrainingJobSpec, job: JobRef, cluster: str, obs: Observation,
        old_targets: dict[tuple[str, str | None], TargetStatus], *, credentials: Callable[[], Issuer],
        finalized: bool,
    ) -> None:  # fmt: skip
        try:
            kube = self.clusters.get(cluster)
            watched = self.informers(cluster, kube)
            children = _owned(watched, kube, JOBS, job)
            fresh = False
            # Never an edge trainer the job's deletion could not find: not before kopf's finalizer is on.
            may_start = cluster == LOCAL or finalized
            if not children and not spec.suspend and self.clusters.paused(cluster):
                obs.paused.append(cluster)
                obs.targets.append(TargetStatus(cluster=cluster, phase="Pending", message=(
                    f"ClusterPaused: EdgeCluster {cluster} is paused (spec.paused: true); its trainers start once "
                    "it is resumed")))  # fmt: skip
                return
            if not children and not spec.suspend and may_start:
                children = self._start(spec, job, cluster, kube, obs, credentials=credentials,
                                       nodes=watched.node_list())  # fmt: skip
                for child in children:
                    watched.jobs.remember(child)  # before its watch event: the next reconcile must see it
                fresh = all(not c.get("status") for c in children)  # just created: no pods yet
                obs.created += len(children)
            pods = _owned(watched, kube, PODS, job) if children and not fresh else []
            for child in sorted(children, key=lambda c: c["metadata"]["name"]):
                annotations = child["metadata"].get("annotations") or {}
                target = Target(annotations.get(ANNOTATION_CLUSTER, cluster), annotations.get(ANNOTATION_NODE))
                own = [p for p in pods if (p["metadata"].get("labels") or {}).get(LABEL_TARGET) == target.key]
                status = observe_trainer(target, child, own)
                if bool((child.get("spec") or {}).get("suspend")) != spec.suspend and status.phase not in (
                        "Packaging", "Failed"):  # fmt: skip
                    watched.jobs.remember(kube.merge_patch(JOBS, child["metadata"]["name"], {"spec": {
                        "suspend": spec.suspend}}, job.namespace))  # fmt: skip
                    status.phase = "Suspended" if spec.suspend else "Scheduled"
                if status.phase == "Scheduled" and target.node and self._node_gone(kube, target.node, own):
                    status.phase = "Failed"
                    status.message = f"NodeGone: node {target.node} no longer exists"
                    kube.delete(JOBS, child["metadata"]["name"], job.namespace)
                previous = old_targets.get((target.cluster, target.node))
                if previous and previous.phase in ("Succeeded", "Failed") and previous.job_name == status.job_name:
                    status = previous  # verified/registered earlier (or refused): keep that outcome
                elif previous and status.phase == "Packaging" and previous.sha256:
                    status.sha256 = previous.sha256
                obs.targets.append(status)
        except ClusterUnavailableError as exc:  # e.g. its kubeconfig Secret was deleted: same as silent
            obs.unreachable[cluster] = str(exc)
            self._carry_unreachable(cluster, job, obs, old_targets)
        except (UnreachableError, KubeError) as exc:
            throttled = isinstance(exc, ThrottledError)
            obs.unreachable[cluster] = describe(exc)
            if throttled:
                obs.throttled.add(cluster)
            self._carry_unreachable(cluster, job, obs, old_targets, throttled=throttled)
        except (RetryableError, MlflowUnavailableError, ConfigurationError, MlflowError) as exc:
            obs.start_error = f"cannot issue the trainers' credentials on {cluster}: {type(exc).__name__}: {exc}"

    def _carry_unreachable(
        self, cluster: str, job: JobRef, obs: Observation, old_targets: dict[tuple[str, str | None], TargetStatus],
        *, throttled: bool = False,
    ) -> None:  # fmt: skip
        """Keep the last known state of an unreachable cluster's trainers; past the grace period the
        unfinished ones fail (the rest of the job goes on). The grace period counts from the
        cluster's last heartbeat or the job's creation, whichever is later: a job never gives up a
        cluster it has waited for less than that (one created as a long-silent cluster returns,
        before a heartbeat says so, would fail at once). A cluster that throttles (429) answers: it
        is never given up for that. A cluster with no trainer known yet holds its part of the job
        open with one placeholder target (otherwise the job could finish without it)."""
        since = None if throttled else self._unreachable_since(cluster)
        lost = since is not None and time.time() - max(since, job.created) > self.settings.cluster_lost_after_seconds
        gone = (f"ClusterUnreachable: cluster {cluster} has not answered for more than "
                f"{self.settings.cluster_lost_after_seconds} s")  # fmt: skip
        waiting = (f"cluster {cluster} is throttling the operator (429); retrying" if throttled
                   else f"cluster {cluster} is not answering; retrying")  # fmt: skip
        known = [
            previous for (c, node), previous in old_targets.items() if c == cluster and (node or previous.job_name)
        ]
        for previous in known:
            status = previous.model_copy()
            if status.phase not in ("Succeeded", "Failed", "Packaging"):
                if lost:
                    status.phase = "Failed"
                status.message = gone if lost else waiting
            obs.targets.append(status)
        if not known:
            obs.targets.append(TargetStatus(cluster=cluster, phase="Failed" if lost else "Pending",
                                            message=gone if lost else waiting))  # fmt: skip

    def _unreachable_since(self, cluster: str) -> float | None:
        """When the cluster last answered a heartbeat (EdgeCluster status), as a Unix time."""
        if cluster == LOCAL:
            return None
        try:
            status = self.clusters.edge_cluster(cluster).get("status") or {}
        except (ClusterUnavailableError, UnreachableError, KubeError):
            return None
        beat = status.get("lastHeartbeatTime")
        if not beat or status.get("reachable") is not False:
            return None
        reachable: dict[str, Any] = next(
            (c for c in status.get("conditions") or [] if c.get("type") == "Reachable"), {}
        )
        if reachable.get("reason") == "Throttled":  # it answers, with 429: alive, never lost for that
            return None
        return _timestamp(beat)

    def _node_gone(self, kube: Kube, node: str, pods: list[dict[str, Any]]) -> bool:
        if any((p.get("spec") or {}).get("nodeName") for p in pods if (p.get("status") or {}).get("phase") != "Failed"):
            return False
        return kube.get_or_none(NODES, node) is None

    def _start(
        self, spec: EdgeTrainingJobSpec, job: JobRef, cluster: str, kube: Kube, obs: Observation, *,
        credentials: Callable[[], Issuer], nodes: list[Node] | None,
    ) -> list[dict[str, Any]]:  # fmt: skip
        if nodes is None:  # the node watch is not in sync yet: a (cached) list
            nodes = self.clusters.nodes(cluster, kube)
        plan = placement.plan(cluster, spec, nodes, self.settings.accelerator_profiles)
        if plan.waiting:
            obs.waiting.append(plan.waiting)
            return []
        issue = credentials()
        if cluster != LOCAL:
            kube.ensure_namespace(job.namespace)
        identity = self._trainer_identity(cluster, kube, job.namespace)
        created = []
        for node, profile, candidates in plan.targets:
            target = Target(cluster, node)
            secret = trainer_secret(spec, job, target, self.settings, issue(target))
            try:
                # First, so the pod never starts without it. One left by an attempt interrupted before
                # its Job was created holds the same key and salt and a policy still valid: kept.
                kube.create_unread(secret)
            except KubeError as exc:
                if exc.status != 403:
                    raise
                raise ConfigurationError(f"the operator may not create Secret {job.namespace}/"
                                         f"{secret['metadata']['name']} on {cluster}: add {job.namespace} to the "
                                         "chart's operator.secretNamespaces") from None  # fmt: skip
            created.append(kube.create(trainer_job(spec, job, target, self.settings, profile, candidates=candidates,
                                                   service_account=identity)))  # fmt: skip
        return created

    def _trainer_identity(self, cluster: str, kube: Kube, namespace: str) -> str | None:
        """The trainers' ServiceAccount in ``namespace`` on ``cluster``, with its RoleBinding to the
        ClusterRole of the same name (the chart's: patch pods, narrowed by its admission policy to
        the trainer's own progress annotation); ensured at most every IDENTITY_SECONDS. None when
        live progress is turned off, or the operator may not create them (trainers then run without
        a token, and report when they exit)."""
        name = self.settings.trainer_service_account
        if not name:
            return None
        key = (cluster, namespace)
        if time.monotonic() - self._trainer_identities.get(key, -math.inf) < IDENTITY_SECONDS:
            return name
        labels = {"app.kubernetes.io/name": "edgetune", "app.kubernetes.io/managed-by": FIELD_MANAGER}
        try:
            kube.create_unread({"apiVersion": "v1", "kind": "ServiceAccount", "automountServiceAccountToken": False,
                                "metadata": {"name": name, "namespace": namespace, "labels": labels}})  # fmt: skip
            kube.create_unread({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": name, "namespace": namespace, "labels": labels},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
            })  # fmt: skip
        except KubeError as exc:
            if exc.status != 403:
                raise
            log.warning("cluster %s: may not create ServiceAccount/RoleBinding %s in %s (%s): its trainers run "
                        "without a token and report progress only when they exit (the chart's RBAC allows it)",
                        cluster, name, namespace, exc)  # fmt: skip
            return None
        self._trainer_identities[key] = time.monotonic()
        return name

    def _credentials(self, spec: EdgeTrainingJobSpec, job: JobRef) -> Issuer:
        """What each trainer of the job gets in its own Secret, and nothing that would work for
        another: a presigned S3 POST policy for its package prefix only (no S3 credentials), an
        Ed25519 key derived for it alone (the hub key never leaves the hub), the privacy salt, and
        presigned URLs of a remote base model (no S3 or MLflow access of its own)."""
        s3 = self._s3(spec, job.namespace)
        seconds = credentials_seconds(spec, self.settings)
        expires = (datetime.now(UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")
        private, _ = self._keys(spec, job.namespace)
        salt_ref = spec.data.privacy.salt_secret_ref
        salt = (secret_value(self.hub, job.namespace, salt_ref.name, salt_ref.key, field="data.privacy.saltSecretRef")
                if salt_ref else None)  # fmt: skip
        base = self._base_files(spec, s3, seconds, expires) if spec.base_model.remote else None
        bucket = spec.output.s3.bucket

        def issue(target: Target) -> dict[str, bytes]:
            from botocore.exceptions import BotoCoreError  # noqa: PLC0415

            prefix = s3_prefix(spec, job, target)
            try:
                post = s3.generate_presigned_post(
                    Bucket=bucket, Key=f"{prefix}/${{filename}}", ExpiresIn=seconds,
                    Conditions=[["content-length-range", 0, MAX_PACKAGE_BYTES]],
                )  # fmt: skip
            except BotoCoreError as exc:  # e.g. no credentials to sign with: signing needs no network
                raise ConfigurationError(
                    f"cannot presign the trainers' S3 uploads: {exc} (name output.s3."
                    "credentialsSecretRef or give the operator S3 credentials)"
                ) from None
            fields = {k: str(v) for k, v in post["fields"].items() if k != "key"}
            policy = UploadPolicy(url=post["url"], bucket=bucket, fields=fields, prefix=prefix, expires=expires)
            data = {UPLOAD_POLICY: json.dumps(policy.to_wire()).encode()}
            if private is not None:
                data[TRAINER_KEY] = derive_trainer_key(private, trainer_key_context(job.uid, child_name(job, target)))
            if salt is not None:
                data[SALT] = salt
            if base is not None:
                data[BASE_FILES] = base
            return data

        return issue

    def _base_files(self, spec: EdgeTrainingJobSpec, s3: Any, seconds: int, expires: str) -> bytes:
        """Resolve a remote base model on the hub (MLflow URIs through the registry) and presign a
        GET for each of its objects."""
        uri = source = spec.base_model.uri
        if uri.startswith(("models:/", "runs:/")):
            if self.mlflow is None:
                raise ConfigurationError(f"base model {uri} is an MLflow URI but no MLflow tracking URI is configured")
            source = self.mlflow.resolve(uri)
        if not source.startswith("s3://"):
            raise ConfigurationError(f"base model {uri} resolves to {source}: trainers can be given S3 objects only")
        bucket, prefix = object_store.split_uri(source)
        keys = _s3_call(lambda: [o["Key"] for o in object_store.list_objects(s3, bucket, prefix)])
        if not keys:
            raise ConfigurationError(f"base model {uri}: no objects under {source}")
        files = {key[len(prefix) + 1 :]: s3.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=seconds) for key in keys}  # fmt: skip
        return json.dumps(BaseFiles(uri=uri, source=source, files=files, expires=expires).to_wire()).encode()

    def _drop_credentials(self, job: JobRef, target: TargetStatus) -> None:
        """A verified trainer needs its Secret no more: delete it from the edge cluster now rather than
        at job deletion (on the hub it belongs to the job, which the hub's garbage collector follows)."""
        if not target.job_name or target.cluster == LOCAL:
            return
        try:
            self.clusters.get(target.cluster).delete(SECRETS, target.job_name, job.namespace)
        except (ClusterUnavailableError, UnreachableError, KubeError):
            log.info("could not delete Secret %s/%s on %s yet (job deletion will)", job.namespace, target.job_name,
                     target.cluster)  # fmt: skip

    # -- results ---------------------------------------------------------------------------------

    def _s3(self, spec: EdgeTrainingJobSpec, namespace: str) -> Any:
        creds = s3_credentials(self.hub, namespace, spec.output.s3.credentials_secret_ref,
                               field="output.s3.credentialsSecretRef")  # fmt: skip
        return self.s3_factory(s3_endpoint(self.settings, spec.output.s3.endpoint), creds)

    def _keys(self, spec: EdgeTrainingJobSpec, namespace: str) -> tuple[bytes | None, bytes | None]:
        """(private, public) PEM of the job's signing key, when it has one."""
        ref = spec.output.signing_key_secret_ref
        if ref is None:
            return None, None
        private = secret_value(self.hub, namespace, ref.name, ref.key, field="output.signingKeySecretRef")
        try:
            return private, public_key_pem(private)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"Secret {namespace}/{ref.name} (key {ref.key}) is not an Ed25519 private key "
                                     f"(PEM): {exc}") from None  # fmt: skip

    def _results(
        self, spec: EdgeTrainingJobSpec, job: JobRef, body: dict[str, Any], obs: Observation,
        old: EdgeTrainingJobStatus,
    ) -> None:  # fmt: skip
        obs.result = old.result
        if obs.result and obs.result.mlflow_version:
            return
        ready = [t for t in obs.targets if t.phase == "Packaging"]
        fedavg = spec.aggregation.strategy == "fedavg"
        if not ready and not (fedavg and obs.targets and all(t.phase in ("Succeeded", "Failed") for t in obs.targets)):
            return
        try:
            s3 = self._s3(spec, job.namespace)
            private, public = self._keys(spec, job.namespace)
            verified: list[Verified] = []
            for target in ready:
                package = self._verify(s3, job, body, target, private)
                self._drop_credentials(job, target)  # verified or refused: the trainer is done with them
                if package is None:
                    continue
                if package.manifest.encoding != spec.output.encoding:
                    self.hub.event(body, reason="EncodingFallback", warning=True, message=(
                        f"{target.cluster}/{target.node}: {spec.output.encoding} lost more than output.maxMetricDrop "
                        f"({spec.output.max_metric_drop}) on the held-out split; the trainer shipped the finer "
                        f"{package.manifest.encoding} instead"))  # fmt: skip
                if fedavg:
                    target.phase = "Succeeded"  # its part is done; the aggregate is registered below
                    verified.append(package)
                else:
                    reg = self._register(spec, job, package.manifest, package.digest, package.uri, single=len(
                        obs.targets) == 1, target=target)  # fmt: skip
                    target.phase, target.mlflow_version = "Succeeded", reg.version
                    if len(obs.targets) == 1:
                        obs.result = TrainingResult(
                            delta_uri=package.uri, sha256=package.digest, bytes=package.manifest.adapter_bytes,
                            encoding=package.manifest.encoding, mlflow_model=reg.model, mlflow_version=reg.version,
                            mlflow_run_id=reg.run_id,
                            base_model_revision=package.manifest.lineage.base_model_revision,
                        )  # fmt: skip
            if fedavg and obs.targets and all(t.phase in ("Succeeded", "Failed") for t in obs.targets):
                self._aggregate(spec, job, body, obs, s3=s3, public=public, private=private)
        except RETRYABLE as exc:
            obs.pending_error = f"{type(exc).__name__}: {exc}"
            obs.pending_system = "mlflow" if isinstance(exc, MlflowUnavailableError) else (
                "s3" if isinstance(exc, RetryableError) else "kubernetes")  # fmt: skip
            log.warning("%s/%s: %s (will retry)", job.namespace, job.name, obs.pending_error)
        except (ConfigurationError, MlflowError) as exc:
            obs.pending_error = f"{type(exc).__name__}: {exc}"
            obs.blocked = True

    def _verify(
        self, s3: Any, job: JobRef, body: dict[str, Any], target: TargetStatus, private: bytes | None
    ) -> Verified | None:
        """Fetch and verify a trainer's package (``trust.verify_trained``: its own signature, every
        file, its lineage), then counter-sign it with the hub key for the agents."""
        uri = target.delta_uri
        if not uri:
            target.phase, target.message = "Failed", "VerificationFailed: the trainer reported no package URI"
            return None
        context = trainer_key_context(job.uid, target.job_name or "")
        try:
            files = _s3_call(lambda: object_store.fetch_package(s3, uri))
            manifest, countersignature = verify_trained(files, hub_private=private, context=context, job_uid=job.uid,
                                                        cluster=target.cluster, node=target.node)  # fmt: skip
        except (DeltaVerificationError, object_store.PackageNotFoundError, ValueError) as exc:
            metrics.VERIFICATION_FAILURES.labels(job.namespace).inc()
            target.phase, target.message = "Failed", f"VerificationFailed: {uri}: {exc}"[:4096]
            return None
        if countersignature is not None:
            bucket, prefix = object_store.split_uri(uri)
            _s3_call(functools.partial(s3.put_object, Bucket=bucket, Key=f"{prefix}/{SIGNATURE}",
                                       Body=countersignature))  # fmt: skip
            files = {**files, SIGNATURE: countersignature}
        digest = sha256_bytes(files["manifest.json"])
        target.sha256 = digest
        return Verified(uri=uri, digest=digest, manifest=manifest, files=files)

    def _register(
        self, spec: EdgeTrainingJobSpec, job: JobRef, manifest: DeltaManifest, digest: str, uri: str, *,
        single: bool, target: TargetStatus | None,
    ) -> Any:  # fmt: skip
        if self.mlflow is None:
            raise ConfigurationError("no MLflow tracking URI is configured (EDGETUNE_MLFLOW_TRACKING_URI)")
        alias = spec.output.mlflow.alias if single or target is None else registration.target_alias(
            spec.output.mlflow.alias, target.cluster, target.node)  # fmt: skip
        return self.mlflow.register(
            experiment=spec.output.mlflow.experiment, model=spec.output.mlflow.registered_model, alias=alias,
            digest=digest, source=uri, run_name=registration.run_name(job, target),
            params=registration.params(spec, manifest), metrics_=registration.metric_values(manifest),
            tags=registration.tags(job, manifest, digest, uri),
        )  # fmt: skip

    def _aggregate(
        self, spec: EdgeTrainingJobSpec, job: JobRef, body: dict[str, Any], obs: Observation, *, s3: Any,
        public: bytes | None, private: bytes | None,
    ) -> None:  # fmt: skip
        succeeded = [t for t in obs.targets if t.phase == "Succeeded"]
        if len(succeeded) < spec.aggregation.min_participants:
            return  # summarize() reports the shortfall
        packages = []
        for target in succeeded:
            package = self._verify(s3, job, body, target, private)  # re-read: the bytes averaged are verified bytes
            if package is None:
                continue
            packages.append(package)
        if len(packages) < spec.aggregation.min_participants:
            return
        from edgetune_operator.delta.aggregate import aggregate  # noqa: PLC0415 - numpy only when averaging
        from edgetune_operator.delta.fedavg import AggregationError  # noqa: PLC0415

        try:
            digest, manifest, files = aggregate(packages, signing_key_pem=private)
        except AggregationError as exc:
            obs.aggregation_error = f"fedavg: {exc}"
            return
        bucket = spec.output.s3.bucket
        parts = (spec.output.s3.prefix.strip("/"), job.namespace, job.name, "fedavg")
        prefix = "/".join(p for p in parts if p)
        uri = f"s3://{bucket}/{prefix}"
        for name, data in files.items():
            _s3_call(functools.partial(s3.put_object, Bucket=bucket, Key=f"{prefix}/{name}", Body=data))
        stored, _ = _s3_call(
            lambda: object_store.fetch_and_verify(s3, uri, expected_digest=digest, public_key_pem=public)
        )
        reg = self._register(spec, job, stored, digest, uri, single=True, target=None)
        obs.result = TrainingResult(
            delta_uri=uri, sha256=digest, bytes=manifest.adapter_bytes, encoding=manifest.encoding,
            mlflow_model=reg.model, mlflow_version=reg.version, mlflow_run_id=reg.run_id, participants=len(packages),
            base_model_revision=manifest.lineage.base_model_revision,
        )  # fmt: skip

    # -- deletion ------------------------------------------------------------------------------------

    def cleanup(self, body: dict[str, Any]) -> list[str]:
        """Delete the job's children on every cluster it may have used; returns the clusters to retry
        (the finalizer stays). An edge cluster that has not answered for ``cluster_lost_after_seconds``
        since the deletion is not waited for any longer: the job's uid is recorded on its EdgeCluster
        (``ANNOTATION_PENDING_CLEANUP``) with an Event, and ``sweep`` deletes the children when the
        cluster answers again. Local children also go by owner reference."""
        meta = body["metadata"]
        spec = EdgeTrainingJobSpec.model_validate(body["spec"])
        failed = []
        try:
            names = set(self.clusters.select(spec.placement.cluster_selector))
        except RETRYABLE:
            names = set()
        names |= {t.get("cluster", LOCAL) for t in (body.get("status") or {}).get("targets") or []}
        for cluster in sorted(names):
            try:
                _delete_children(self.clusters.get(cluster), meta["namespace"], meta["uid"], edge=cluster != LOCAL)
            except ClusterUnavailableError:
                continue  # nothing we can reach or ever could
            except (UnreachableError, KubeError):
                failed.append(cluster)
        waited = time.time() - _timestamp(meta.get("deletionTimestamp"))
        if any(c == LOCAL for c in failed) or (failed and waited < self.settings.cluster_lost_after_seconds):
            return failed
        for cluster in failed:
            self._defer_cleanup(cluster, body)
        self.forget(meta["uid"])
        return []

    def _defer_cleanup(self, cluster: str, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        entry = {"namespace": meta["namespace"], "job": meta["name"]}
        for _ in range(5):  # optimistic concurrency: another deletion may record its job meanwhile
            try:
                edge = self.clusters.edge_cluster(cluster, fresh=True)  # its resourceVersion guards the write
            except ClusterUnavailableError:
                return  # the EdgeCluster itself is gone: nothing will ever come back to sweep
            pending = _pending(edge)
            pending[meta["uid"]] = entry
            try:
                self.hub.merge_patch(EDGE_CLUSTERS, cluster, {"metadata": {
                    "resourceVersion": edge["metadata"]["resourceVersion"],
                    "annotations": {ANNOTATION_PENDING_CLEANUP: json.dumps(pending, sort_keys=True)}}})  # fmt: skip
                break
            except ConflictError:
                continue
        message = (f"{cluster} has not answered for {self.settings.cluster_lost_after_seconds:g} s since the job was "
                   f"deleted: the job is released, and its trainers there are deleted when the cluster answers "
                   f"again (recorded on EdgeCluster {cluster})")  # fmt: skip
        log.warning("%s/%s: %s", meta["namespace"], meta["name"], message)
        self.hub.event(body, reason="CleanupDeferred", message=message, warning=True)

    def sweep(self, edge_cluster: dict[str, Any]) -> None:
        """Delete the children of jobs deleted while this cluster was unreachable (it answered a
        heartbeat just now); forget each once done, with an Event on the EdgeCluster."""
        pending = _pending(edge_cluster)
        if not pending:
            return
        name = edge_cluster["metadata"]["name"]
        done = []
        kube = self.clusters.client_for(edge_cluster)
        for uid, entry in sorted(pending.items()):
            try:
                _delete_children(kube, entry["namespace"], uid, edge=True)
            except (UnreachableError, KubeError):
                continue
            done.append(uid)
            self.hub.event(edge_cluster, reason="OrphansDeleted", message=(
                f"deleted the trainers of EdgeTrainingJob {entry['namespace']}/{entry['job']} (uid {uid}), deleted "
                "while this cluster was unreachable"))  # fmt: skip
        if done:
            left = {uid: entry for uid, entry in pending.items() if uid not in done}
            with suppress(ConflictError):  # changed meanwhile: the next heartbeat sweeps again
                self.hub.merge_patch(
                    EDGE_CLUSTERS,
                    name,
                    {
                        "metadata": {
                            "resourceVersion": edge_cluster["metadata"]["resourceVersion"],
                            "annotations": {
                                ANNOTATION_PENDING_CLEANUP: json.dumps(left, sort_keys=True) if left else None
                            },
                        }
                    },
                )


ANNOTATION_PENDING_CLEANUP = "edgetune.io/pending-cleanup"
"""On an EdgeCluster: JSON ``{job uid: {namespace, job}}`` of deleted jobs whose trainers there are
still to be deleted (the cluster was unreachable when the job went)."""


def _pending(edge_cluster: dict[str, Any]) -> dict[str, dict[str, str]]:
    raw = (edge_cluster["metadata"].get("annotations") or {}).get(ANNOTATION_PENDING_CLEANUP)
    try:
        pending = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return pending if isinstance(pending, dict) else {}


def _delete_children(kube: Kube, namespace: str, uid: str, *, edge: bool) -> None:
    """A job's trainer Jobs (by label) and, on an edge cluster, their Secrets by the Jobs' names:
    never listed or read (on the hub, owner references take them)."""
    for child in kube.list(JOBS, namespace, labels={LABEL_JOB_UID: uid}):
        kube.delete(JOBS, child["metadata"]["name"], namespace)
        if edge:
            kube.delete(SECRETS, child["metadata"]["name"], namespace)


def _owned(watched: ClusterInformers, kube: Kube, resource: Resource, job: JobRef) -> list[dict[str, Any]]:
    """The job's trainer Jobs or pods on one cluster: the watch's copies once it is in sync (no
    request), else a list."""
    informer = watched.jobs if resource is JOBS else watched.pods
    if watched.synced:
        return [o for o in informer.owned_by(job.uid) if o["metadata"].get("namespace") == job.namespace]
    return kube.list(resource, job.namespace, labels={LABEL_JOB_UID: job.uid})


def _timestamp(value: str | None) -> float:
    if not value:
        return time.time()
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _s3_call(fn: Callable[[], Any]) -> Any:
    """Run an S3 operation, timing it; connection problems become retryable errors."""
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError  # noqa: PLC0415

    started = time.perf_counter()
    outcome = "ok"
    try:
        return fn()
    except (EndpointConnectionError, BotoCoreError) as exc:
        outcome = "unreachable"
        raise RetryableError(f"S3: {exc}") from None
    except ClientError as exc:
        outcome = str(exc.response.get("Error", {}).get("Code", "error"))
        if outcome in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise ConfigurationError(f"S3: {outcome}: {exc}") from None
        raise RetryableError(f"S3: {exc}") from None
    finally:
        metrics.observe_call("s3", "package", outcome, time.perf_counter() - started)
