"""kopf handlers: thin. Each one hands the object to a controller's level-based reconcile.

An AdapterRelease is reconciled on create, spec update, resume and by its own resync loop.
EdgeTrainingJobs: kopf's watch feeds every event to ``TrainingJobController.observed`` (in the
event loop, no thread), which queues a reconcile for a new job, a job listed at start-up or a
changed spec; the trainers' own watches (``controllers/informers.py``, every cluster) queue it when
a trainer Job or pod changes. No change handler: kopf writes no progress or diff-base annotations
for them, only its finalizer. All lead to the same ``reconcile``; none depends on which came first.
EdgeClusters: no kopf handler at all (``controllers.clusters.Heartbeats``).
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import threading
from typing import Any

import kopf

from edgetune_api.meta import GROUP, VERSION
from edgetune_operator import discovery, metrics
from edgetune_operator.clients.kube import Connection, Kube
from edgetune_operator.clients.mlflow import Mlflow
from edgetune_operator.clients.prometheus import Prometheus
from edgetune_operator.controllers.clusters import Clusters, Heartbeats
from edgetune_operator.controllers.release import ReleaseController
from edgetune_operator.controllers.training_job import FINALIZER, TrainingJobController, needs_finalizer
from edgetune_operator.settings import Settings

log = logging.getLogger("edgetune")
PREFIX = GROUP  # finalizer, progress and diff-base annotations live under edgetune.io


class Runtime:
    """Built once at start-up; the handlers read it."""

    settings: Settings
    clusters: Clusters
    jobs: TrainingJobController
    releases: ReleaseController
    resync: threading.Thread
    release_resync: threading.Thread
    heartbeats: Heartbeats


RUNTIME = Runtime()
#: Read at import: kopf's decorators need the intervals before the operator starts.
SETTINGS = Settings.from_env()


def _s3_factory(endpoint: str | None, creds: dict[str, str]) -> Any:
    """One client per endpoint and key pair, reused: building one costs ~14 ms of CPU under the GIL
    here (the first ~0.2 s more), and every reconcile that starts trainers or verifies needs one."""
    return _s3_client(endpoint, tuple(sorted(creds.items())))


@functools.lru_cache(maxsize=32)
def _s3_client(endpoint: str | None, creds_items: tuple[tuple[str, str], ...]) -> Any:
    creds = dict(creds_items)
    import boto3  # noqa: PLC0415 - loaded in the background at start-up (TrainingJobController._warm_up)
    from botocore.config import Config  # noqa: PLC0415

    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=creds.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=creds.get("AWS_SECRET_ACCESS_KEY"),
        # SigV4 throughout: the presigned POST policies and URLs trainers get must be SigV4 too.
        config=Config(connect_timeout=3, read_timeout=30, retries={"max_attempts": 2}, signature_version="s3v4"),
    )  # fmt: skip


def build_runtime(settings: Settings, local: Kube) -> None:
    RUNTIME.settings = settings
    RUNTIME.clusters = Clusters(local, settings)
    mlflow = Mlflow(settings.mlflow_tracking_uri) if settings.mlflow_tracking_uri else None
    RUNTIME.jobs = TrainingJobController(settings, RUNTIME.clusters, s3_factory=_s3_factory, mlflow=mlflow)
    prometheus = Prometheus(settings.prometheus_url) if settings.prometheus_url else None
    RUNTIME.releases = ReleaseController(
        settings, RUNTIME.clusters, mlflow=mlflow, prometheus=prometheus, s3_factory=_s3_factory
    )


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf's own connection: the one the operator's client uses (``Connection``): the pod's service
    account (``InCluster``, which honours ``EDGETUNE_SERVICE_ACCOUNT_DIR``), else ``$KUBECONFIG``.

    The token is projected and rotated by the kubelet; marking it expired after a few minutes makes
    kopf read the file again instead of holding an old token until the API server refuses it."""
    connection = Connection.from_environment()
    token, expires = connection.current_token(), None
    if connection.token_path:
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)
    return kopf.ConnectionInfo(
        server=connection.server, ca_path=connection.ca_path, ca_data=connection.ca_pem,
        insecure=connection.insecure, certificate_path=connection.cert_path, certificate_data=connection.cert_pem,
        private_key_path=connection.key_path, private_key_data=connection.key_pem, username=connection.username,
        password=connection.password, scheme="Bearer" if token else None, token=token,
        default_namespace=connection.namespace, expiration=expires,
    )  # fmt: skip


class _DiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf's last-handled-configuration annotation, except on EdgeTrainingJobs: they have no change
    handlers (``training_job_event`` sees every event), so the annotation would be one PATCH per
    job that nothing reads."""

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None if body.get("kind") == "EdgeTrainingJob" else super().fetch(body=body)

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        if body.get("kind") != "EdgeTrainingJob":
            super().store(body=body, patch=patch, essence=essence)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    own = SETTINGS
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = _DiffBase(prefix=PREFIX, key="last-handled-configuration")
    settings.posting.enabled = False  # our controllers write their own, more specific Events
    settings.execution.max_workers = own.workers
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    local = Kube.from_environment()
    # Before kopf reads discovery (once): CRDs just installed may not be listed there yet.
    try:
        discovery.wait_until_served(local, own.crd_wait_seconds)
    except discovery.ResourcesNotServedError as exc:
        raise kopf.PermanentError(str(exc)) from None  # the operator stops (and its pod restarts), no retry loop
    build_runtime(own, local)
    metrics.serve(own.metrics_port)
    log.info("edgetune operator started: resync %ss, %d workers", own.resync_seconds, own.workers)


# -- EdgeTrainingJob ------------------------------------------------------------------------------

JOB = (GROUP, VERSION, "edgetrainingjobs")


@kopf.on.event(*JOB)
async def training_job_event(body: kopf.Body, type: str | None, **_: Any) -> None:  # noqa: A002 - kopf's name
    RUNTIME.jobs.observed(body, deleted=type == "DELETED")


@kopf.on.startup()
def start_resync(**_: Any) -> None:
    """One loop for all jobs instead of a kopf timer per object (a task and its state each)."""
    if not hasattr(RUNTIME, "jobs"):
        raise kopf.PermanentError("not configured: see the 'configure' activity's error")
    RUNTIME.jobs.start()
    RUNTIME.resync = threading.Thread(target=RUNTIME.jobs.resync_loop, name="resync", daemon=True)
    RUNTIME.resync.start()
    RUNTIME.release_resync = threading.Thread(target=RUNTIME.releases.resync_loop, name="release-resync", daemon=True)
    RUNTIME.release_resync.start()
    RUNTIME.heartbeats = Heartbeats(RUNTIME.clusters, RUNTIME.jobs.sweep, RUNTIME.jobs.forget_cluster).start()


@kopf.on.cleanup()
def stop_resync(**_: Any) -> None:
    RUNTIME.heartbeats.close()
    RUNTIME.jobs.close()
    RUNTIME.releases.close()


def _edge_bound(body: kopf.Body, **_: Any) -> bool:
    return needs_finalizer(body)


@kopf.on.delete(*JOB, when=_edge_bound)  # kopf's finalizer only where the hub's garbage collector cannot clean up
def training_job_deleted(body: kopf.Body, **_: Any) -> None:
    """Bounded: past the cluster-lost period an unreachable edge cluster is not waited for; its
    trainers are deleted when it answers again (``TrainingJobController.sweep``)."""
    failed = RUNTIME.jobs.cleanup(dict(body))
    if failed:
        raise kopf.TemporaryError(f"clusters {failed} did not answer; retrying the deletion of their trainers",
                                  delay=10)  # fmt: skip


# -- AdapterRelease -------------------------------------------------------------------------------

RELEASE = (GROUP, VERSION, "adapterreleases")


@kopf.on.event(*RELEASE)
async def release_event(body: kopf.Body, type: str | None, **_: Any) -> None:  # noqa: A002 - kopf's name
    RUNTIME.releases.observed(dict(body), deleted=type == "DELETED")
    if type == "DELETED":
        # No finalizer: a deleted release leaves its pods' assignments as they are (an agent keeps
        # serving what it runs); its metric series go, and deleted mid-rollout it says so in an
        # Event. The watch's DELETED event is the one place that always sees it (kopf calls no
        # optional delete handler for an object deleted without its finalizer).
        await asyncio.to_thread(RUNTIME.releases.forget, dict(body))


@kopf.on.resume(*RELEASE)
@kopf.on.create(*RELEASE)
@kopf.on.update(*RELEASE, field="spec")
def release_changed(body: kopf.Body, **_: Any) -> None:
    """Steps, analysis intervals and agents' confirmations are followed by the release resync loop
    (``ReleaseController.resync_loop``); a spec change (paused, promote, abort) acts at once."""
    RUNTIME.releases.reconcile(dict(body))


# -- EdgeCluster ----------------------------------------------------------------------------------
# No kopf handler: ``Heartbeats`` (started with the controllers) follows EdgeClusters with a watch
# of its own and probes each when its heartbeat is due; kopf neither watches nor annotates them.
