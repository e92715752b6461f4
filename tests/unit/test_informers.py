"""The operator's watch caches and work queue, against a scripted API server (pure logic: the real
API server's side is covered end to end in tests/e2e/test_operator.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from edgetune_operator.clients.kube import JOBS, KubeError, Resource, UnreachableError
from edgetune_operator.controllers.informers import Informer, backoff_delay, newer
from edgetune_operator.controllers.workqueue import WorkQueue
from tests.support import eventually

LABEL = "edgetune.io/training-job-uid"


def _job(name: str, owner: str, version: int, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}", "labels": {LABEL: owner},
                     "resourceVersion": str(version), "managedFields": [{"big": "x" * 1000}]},
        "spec": {"suspend": False, "template": {"spec": {"containers": []}}},
        "status": status,
    }  # fmt: skip


class ScriptedKube:
    """Answers list_versioned from ``objects`` and plays one scripted watch per call (a list of
    events, or an exception to raise), then blocks until stopped."""

    cluster = "edge-x"

    def __init__(self, objects: list[dict[str, Any]], watches: list[Any]) -> None:
        self.objects = objects
        self.watches = watches
        self.lists = 0
        self.watch_versions: list[str | None] = []
        self.stop = threading.Event()

    def list_versioned(self, resource: Resource, *, selector: str) -> tuple[list[dict[str, Any]], str]:
        assert selector == LABEL
        self.lists += 1
        return list(self.objects), str(100 * self.lists)

    def watch(self, resource: Resource, *, selector: str, resource_version: str | None,
              timeout_seconds: int) -> Iterator[dict[str, Any]]:  # fmt: skip
        self.watch_versions.append(resource_version)
        if not self.watches:
            self.stop.wait(5)
            return
        script = self.watches.pop(0)
        if isinstance(script, Exception):
            raise script
        yield from script


def _informer(kube: ScriptedKube, changes: list[tuple[str, str, str]]) -> Informer:
    return Informer("edge-x", kube, JOBS, LABEL, lambda *c: changes.append(c), spec_keys=("suspend",))  # type: ignore[arg-type]


def test_an_informer_lists_then_follows_the_watch_and_resumes_from_the_last_version() -> None:
    kube = ScriptedKube([_job("a-0", "a", 5)], [
        [{"type": "MODIFIED", "object": _job("a-0", "a", 7, succeeded=1)},
         {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}}],
        [{"type": "DELETED", "object": _job("a-0", "a", 11)}],
    ])  # fmt: skip
    changes: list[tuple[str, str, str]] = []
    informer = _informer(kube, changes).start()
    try:
        eventually(lambda: len(kube.watch_versions) >= 3, timeout=5, what="three watches")
        # Listed once; the first watch resumed from the list's version, the next from the bookmark's.
        assert kube.lists == 1
        assert kube.watch_versions[:3] == ["100", "9", "11"]
        assert informer.owned_by("a") == []  # deleted
        assert changes == [("edge-x", "ns", "a")] * 3  # listed, modified, deleted
    finally:
        informer.stop()
        kube.stop.set()


def test_gone_relists_and_an_unreachable_server_clears_sync_until_it_answers() -> None:
    kube = ScriptedKube([_job("a-0", "a", 5)], [
        KubeError(410, "Gone", "too old resource version"),
        UnreachableError("connection refused"),
    ])  # fmt: skip
    changes: list[tuple[str, str, str]] = []
    informer = _informer(kube, changes).start()
    try:
        eventually(lambda: kube.lists >= 3, timeout=10, what="listed again after 410 and after the outage")
        assert kube.watch_versions[:2] == ["100", "200"]  # 410: listed afresh, watched from the new list
        eventually(informer.synced.is_set, timeout=5, what="in sync again")
        cached = informer.owned_by("a")
        assert len(cached) == 1
        # The cache keeps what reconciles read, not the megabytes around it.
        assert "managedFields" not in cached[0]["metadata"] and cached[0]["spec"] == {"suspend": False}
    finally:
        informer.stop()
        kube.stop.set()


def test_a_write_through_is_not_replaced_by_an_older_event() -> None:
    kube = ScriptedKube([], [])
    informer = _informer(kube, [])
    informer.remember(_job("a-0", "a", 20, active=1))
    informer._put(_job("a-0", "a", 19))  # an event still in flight from before our write
    assert informer.owned_by("a")[0]["status"] == {"active": 1}
    assert newer({"metadata": {"resourceVersion": "21"}}, informer.owned_by("a")[0])
    assert newer({"metadata": {"resourceVersion": "opaque"}}, informer.owned_by("a")[0])  # unparsable: replace


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    delays = [backoff_delay(n, first=1.0, cap=30.0) for n in range(10)]
    assert all(0.5 * min(30.0, 2**n) <= d <= min(30.0, 2**n) for n, d in enumerate(delays))
    assert max(backoff_delay(50, first=1.0, cap=30.0) for _ in range(100)) <= 30.0


def test_the_work_queue_runs_a_burst_once_and_a_change_during_work_once_more() -> None:
    seen: list[str] = []
    started, release = threading.Event(), threading.Event()

    def work(key: Any) -> None:
        seen.append(key)
        if key == "slow" and seen.count("slow") == 1:
            started.set()
            release.wait(5)

    queue = WorkQueue(work, threads=2)
    try:
        queue.put("slow")
        assert started.wait(5)
        for _ in range(5):  # changes while it is being worked on: one more run, not five
            queue.put("slow")
        release.set()
        eventually(lambda: seen.count("slow") == 2 and len(queue) == 0, timeout=5, what="one more run")
        for _ in range(3):
            queue.put_after("batched", 0.2)
        queue.put_after("batched", 60)  # a later retry does not postpone the batch due sooner
        eventually(lambda: "batched" in seen, timeout=5, what="the batch")
        time.sleep(0.5)
        assert seen.count("batched") == 1
    finally:
        queue.stop()


def test_keys_put_first_are_served_before_waiting_ones_in_their_own_order() -> None:
    """New jobs (nothing started) go before finishing work: their trainers start while finished
    jobs wait to be verified and registered, not behind them."""
    seen: list[str] = []
    taken, gate = threading.Event(), threading.Event()

    def work(key: Any) -> None:
        if key == "busy":
            taken.set()
            gate.wait(5)
        seen.append(key)

    queue = WorkQueue(work, threads=1)
    try:
        queue.put("busy")
        assert taken.wait(5)
        for key in ("done-1", "done-2"):
            queue.put(key)
        for key in ("new-1", "new-2"):
            queue.put(key, first=True)
        queue.put("done-1", first=True)  # already waiting: keeps its place, runs once
        gate.set()
        eventually(lambda: len(seen) == 5, timeout=5, what="every key")
        assert seen == ["busy", "new-1", "new-2", "done-1", "done-2"]
    finally:
        queue.stop()


class RecordingQueue:
    def __init__(self) -> None:
        self.keys: list[Any] = []
        self.first: list[bool] = []

    def put(self, key: Any, *, first: bool = False) -> None:
        self.keys.append(key)
        self.first.append(first)


def _etj(version: int, generation: int = 1, *, edge: bool = False, finalizers: tuple[str, ...] = (),
         observed: int | None = None, phase: str | None = None) -> dict[str, Any]:  # fmt: skip
    placement: dict[str, Any] = {"accelerator": "cpu"}
    if edge:
        placement["clusterSelector"] = {"matchLabels": {"site": "farm"}}
    status = {"observedGeneration": observed, "phase": phase} if observed else {}
    return {
        "apiVersion": "edgetune.io/v1alpha1", "kind": "EdgeTrainingJob",
        "metadata": {"name": "j", "namespace": "ns", "uid": "u1", "generation": generation,
                     "resourceVersion": str(version), "finalizers": list(finalizers)},
        "spec": {"placement": placement}, "status": status,
    }  # fmt: skip


def test_job_events_queue_a_reconcile_only_when_something_needs_one() -> None:
    from edgetune_operator.controllers.clusters import Clusters  # noqa: PLC0415
    from edgetune_operator.controllers.training_job import FINALIZER, TrainingJobController  # noqa: PLC0415
    from edgetune_operator.settings import Settings  # noqa: PLC0415

    ctl = TrainingJobController(Settings(), Clusters(None, Settings()), s3_factory=lambda *_: None, mlflow=None)  # type: ignore[arg-type]
    queue = ctl.queue = RecordingQueue()  # type: ignore[assignment]
    ctl.observed(_etj(1))
    assert queue.keys == [("ns", "j")]  # first seen (created, or listed at start-up)
    ctl.observed(_etj(1))
    ctl.observed(_etj(2, observed=1, phase="Training"))  # our own status write coming back
    ctl.observed(_etj(1))  # an older event after it
    assert queue.keys == [("ns", "j")]
    ctl.observed(_etj(3, generation=2, observed=1, phase="Training"))  # the spec changed
    assert queue.keys == [("ns", "j")] * 2
    ctl.observed(_etj(4, generation=2, observed=2, phase="Succeeded"))
    ctl.observed(_etj(4, generation=2, observed=2, phase="Succeeded"), deleted=True)
    assert queue.keys == [("ns", "j")] * 2 and ctl._bodies == {}
    # Bound for edge clusters: nothing until kopf's finalizer is on (its deletion must find the trainers).
    ctl.observed(_etj(10, edge=True))
    assert len(queue.keys) == 2
    ctl.observed(_etj(11, edge=True, finalizers=(FINALIZER,)))
    assert len(queue.keys) == 3


def test_only_jobs_that_may_have_edge_trainers_need_the_finalizer() -> None:
    from edgetune_operator.controllers.training_job import needs_finalizer  # noqa: PLC0415

    assert not needs_finalizer(_etj(1))
    assert needs_finalizer(_etj(1, edge=True))
    on_edge = _etj(1)
    on_edge["status"] = {"targets": [{"cluster": "farm-1", "phase": "Training"}]}  # selector removed since
    assert needs_finalizer(on_edge)


class _Hub:
    """Just what the audit calls: a list of jobs, and merge patches recorded (and applied)."""

    def __init__(self, jobs: list[dict[str, Any]]) -> None:
        self.jobs = jobs
        self.patches: list[dict[str, Any]] = []

    def list(self, _resource: Any) -> list[dict[str, Any]]:
        return self.jobs

    def merge_patch(self, _resource: Any, name: str, patch: dict[str, Any], namespace: str) -> dict[str, Any]:
        self.patches.append(patch)
        job = next(j for j in self.jobs if j["metadata"]["name"] == name)
        return {**job, "metadata": {**job["metadata"], **patch["metadata"], "resourceVersion": "99"}}


def test_the_audit_takes_up_jobs_the_watch_never_delivered_and_a_finalizer_kopf_never_added() -> None:
    from edgetune_operator.controllers.clusters import Clusters  # noqa: PLC0415
    from edgetune_operator.controllers.training_job import FINALIZER, TrainingJobController  # noqa: PLC0415
    from edgetune_operator.settings import Settings  # noqa: PLC0415

    old, young = "2026-12-07T10:00:00Z", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    lost = _etj(5)
    lost["metadata"] |= {"name": "lost", "uid": "u-lost", "creationTimestamp": old}
    fresh = _etj(6)
    fresh["metadata"] |= {"name": "fresh", "uid": "u-fresh", "creationTimestamp": young}
    done = _etj(7, observed=1, phase="Succeeded")
    done["metadata"] |= {"name": "done", "uid": "u-done", "creationTimestamp": old}
    hub = _Hub([lost, fresh, done])
    ctl = TrainingJobController(Settings(), Clusters(hub, Settings()), s3_factory=lambda *_: None, mlflow=None)  # type: ignore[arg-type]
    queue = ctl.queue = RecordingQueue()  # type: ignore[assignment]
    assert ctl.audit() == ["ns/lost"] and queue.keys == [("ns", "lost")]  # the fresh one's event may be coming
    # Bound for edge clusters, seen, and still without kopf's finalizer a minute later: we add it.
    stuck = _etj(8, edge=True)
    stuck["metadata"] |= {"name": "stuck", "uid": "u-stuck", "creationTimestamp": old}
    hub.jobs = [stuck]
    ctl.observed(stuck)
    assert ("ns", "stuck") not in queue.keys  # waits for the finalizer
    assert ctl.audit() == ["ns/stuck"]
    assert hub.patches == [{"metadata": {"finalizers": [FINALIZER], "resourceVersion": "8"}}]
    assert queue.keys[-1] == ("ns", "stuck")  # and now it runs
