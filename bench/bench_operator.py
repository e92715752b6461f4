"""Benchmark the operator: EdgeTrainingJob applied -> trainer pod bound to a node, at one job and at
many jobs in flight; operator memory; API requests per job; reconcile throughput — on two paths.

Run with ``.venv/bin/python bench/bench_operator.py [--quick] [--path happy|failure|both]``. Prints
one JSON object as its last line: every figure of a path under ``happy_…`` or ``failure_…``
(``pod_bound_p50_s_1job``, ``pod_bound_p99_s_1job``, ``pod_bound_p99_s_1000jobs``,
``operator_vs_bare_p99_ratio_1000jobs``, ``api_requests_per_job``, ``operator_peak_rss_mb_1000jobs``,
``reconciles_per_s``, …), and the headline ``happy_api_requests_per_job``, ``happy_p99_ratio`` and
``happy_rss_mb``.

What runs, per path: one real control plane (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler) with N kwok nodes, the CRDs, a real S3 server, and the operator as a process
(``python -m edgetune_operator``). Single jobs are measured client-side: from the create call
returning to the first watch event that shows ``spec.nodeName``. The bursts (``*_1000*`` keys) are
measured server-side: from the owner's creationTimestamp (plain Job or EdgeTrainingJob) to the pod's
PodScheduled transition, both whole seconds, which a watch falling behind under load cannot distort
(the client-side figures are kept as ``*_watch_*``).

- **happy**: jobs that succeed, as a user's do. A trainer double plays the kubelet for trainer pods
  (kwok leaves them alone): it marks the pod Running, writes the progress annotation a trainer writes
  when it starts, reads the trainer's Secret as the trainer would (its config, upload policy and
  derived key), trains for ``--train-seconds`` (sleeps), builds a tiny real package with the
  trainer's own packaging code (the job's encoding, signed with the derived key), uploads it with the
  presigned policy and ends the pod Succeeded with the trainer's summary as its termination message.
  The operator then verifies the package, counter-signs it and registers it in a real MLflow: every
  job ends ``Succeeded`` (the run fails otherwise).
- **failure**: kwok completes trainer pods without running them, so no package is produced,
  verified or registered and no ``Training`` status is written: each job ends ``Failed``
  (``VerificationFailed``) — the cheapest path, kept for comparison.

``--quick``: 100 nodes and 100 jobs (same keys; the 1000-job keys then describe 100 jobs, and
``jobs`` says so). ``--smoke``: 10 nodes, 5 jobs, 3 single jobs (checks the script).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import re
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from kubernetes import client as k8s

from edgetune_api.delta import TRAINER_SIGNATURE, Lineage
from edgetune_api.trainer_config import PROGRESS_ANNOTATION, TrainerConfig, UploadPolicy
from edgetune_operator.clients.kube import PODS, SECRETS, Kube, KubeError, UnreachableError
from edgetune_testenv.cluster import EXECUTOR_LABEL, ControlPlane
from edgetune_testenv.nodes import scale_fleet
from edgetune_testenv.operator_proc import OperatorProcess
from edgetune_testenv.procs import cpu_seconds, memory_mb
from edgetune_testenv.servers import MlflowServer, S3Server
from edgetune_trainer import package

REPO = Path(__file__).resolve().parents[1]
LABEL = "edgetune.io/training-job"
LABEL_UID = "edgetune.io/training-job-uid"


SIGNING_SECRET = "bench-signing-key"  # noqa: S105 - a Secret's name


def manifest(name: str, *, signed: bool) -> dict[str, Any]:
    output: dict[str, Any] = {"s3": {"bucket": "adapters"}, "mlflow": {"registeredModel": "bench"}}
    if signed:  # as a careful user's jobs are: trainers sign with a derived key, the hub counter-signs
        output["signingKeySecretRef"] = {"name": SIGNING_SECRET, "key": "key.pem"}
    return {
        "apiVersion": "edgetune.io/v1alpha1", "kind": "EdgeTrainingJob", "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "builtin:timeseries-cnn"},
            "data": {"source": {"hostPath": "/var/lib/edgetune/data"}, "format": "npy"},
            "budgets": {"memory": "1Gi"},
            "placement": {"accelerator": "any"},
            "output": output,
        },
    }  # fmt: skip


class PodWatch:
    """Calls ``_saw`` with every pod matching ``selector`` in namespace bench, listed, then watched.
    Plain JSON through the operator's small client, resumed from the last resourceVersion: the
    official client's watch turns every event into model objects, and under the burst that fell
    minutes behind the API server (and took CPU from it) — the burst keys are server-side for that
    reason."""

    def __init__(self, plane: ControlPlane, selector: str) -> None:
        self.kube = Kube.from_kubeconfig_dict(yaml.safe_load(plane.kubeconfig.read_text()), "bench")
        self.selector = selector
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _saw(self, pod: dict[str, Any]) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        version = None
        while not self._stop:
            try:
                if version is None:
                    items, version = self.kube.list_versioned(PODS, selector=self.selector)
                    for pod in items:
                        self._saw(pod)
                for event in self.kube.watch(PODS, "bench", selector=self.selector, resource_version=version,
                                             timeout_seconds=240):  # fmt: skip
                    obj = event.get("object") or {}
                    version = (obj.get("metadata") or {}).get("resourceVersion") or version
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        self._saw(obj)
                    if self._stop:
                        return
            except (KubeError, UnreachableError) as exc:
                # An API server behind on its watch cache under the burst answers a resumed watch with
                # 504 "Too large resource version" (or 410 Gone): list and watch afresh, at once.
                print(f"bench watch restarted: {exc}"[:300], file=sys.stderr, flush=True)
                version = None

    def stop(self) -> None:
        self._stop = True


class BoundWatch(PodWatch):
    """Records when each trainer pod (by job name) is first seen bound to a node."""

    def __init__(self, plane: ControlPlane) -> None:
        super().__init__(plane, LABEL)
        self.bound: dict[str, float] = {}
        self.cond = threading.Condition()
        self.thread.start()

    def _saw(self, pod: dict[str, Any]) -> None:
        if (pod.get("spec") or {}).get("nodeName"):
            job = ((pod.get("metadata") or {}).get("labels") or {}).get(LABEL)
            with self.cond:
                self.bound.setdefault(job, time.monotonic())
                self.cond.notify_all()

    def wait(self, names: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not names <= set(self.bound):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(names - set(self.bound))
                    raise TimeoutError(f"{len(missing)} pods never bound, e.g. {missing[:5]}")
                self.cond.wait(left)


class TrainerDouble(PodWatch):
    """Plays the kubelet and the trainer for trainer pods (``EXECUTOR_LABEL=bench``; kwok leaves those
    alone), doing what a trainer that succeeds does on the API server and S3, with a tiny package
    built by the trainer's own code. Plain Jobs' pods (the baseline) are run to Succeeded without a
    package. Its requests are the bench's, not the operator's (the audit counts the operator's only)."""

    def __init__(self, plane: ControlPlane, train_seconds: float, workdir: Path, threads: int = 8) -> None:
        super().__init__(plane, f"{EXECUTOR_LABEL}=bench")
        self.train_seconds, self.workdir = train_seconds, workdir
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="trainer-double")
        self.seen: set[str] = set()
        self.errors: list[str] = []
        self.thread.start()

    def _saw(self, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        if (pod.get("spec") or {}).get("nodeName") and (pod.get("status") or {}).get("phase") == "Pending" \
                and name not in self.seen:  # fmt: skip
            self.seen.add(name)
            self.pool.submit(self._trainer, pod)

    def _status(self, name: str, status: dict[str, Any]) -> None:
        self.kube.merge_patch(PODS, name, {"status": status}, "bench", subresource="status")

    def _trainer(self, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        try:
            started = _now()
            container = {"name": "trainer", "image": pod["spec"]["containers"][0]["image"], "imageID": "",
                         "restartCount": 0, "started": True}  # fmt: skip
            self._status(name, {"phase": "Running", "startTime": started, "containerStatuses": [
                {**container, "ready": True, "state": {"running": {"startedAt": started}}}]})  # fmt: skip
            labels = pod["metadata"].get("labels") or {}
            summary: dict[str, Any] = {"status": "Succeeded", "reason": "Succeeded"}
            if LABEL_UID in labels:  # an EdgeTrainingJob's trainer, not a plain Job's pod
                progress = {"device": "cpu", "at": started}
                self.kube.merge_patch(PODS, name, {"metadata": {"annotations": {
                    PROGRESS_ANNOTATION: json.dumps(progress)}}}, "bench")  # fmt: skip
                time.sleep(self.train_seconds)
                summary = self._package(pod)
            else:
                time.sleep(self.train_seconds)
            finished = _now()
            self._status(name, {"phase": "Succeeded", "containerStatuses": [{**container, "ready": False, "state": {
                "terminated": {"exitCode": 0, "reason": "Completed", "startedAt": started, "finishedAt": finished,
                               "message": json.dumps(summary, separators=(",", ":"))}}}]})  # fmt: skip
        except Exception as exc:  # the run fails at its end, with these
            self.errors.append(f"{name}: {type(exc).__name__}: {exc}"[:500])

    def _package(self, pod: dict[str, Any]) -> dict[str, Any]:
        """What the trainer does after training: read its Secret, package, sign, upload."""
        secret_name = next(v["secret"]["secretName"] for v in pod["spec"]["volumes"] if v["name"] == "config")
        secret = self.kube.get(SECRETS, secret_name, "bench")
        data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
        config = TrainerConfig.model_validate_json(data["config.json"])
        policy = UploadPolicy.model_validate_json(data["upload.json"])
        rt = config.runtime
        generator = torch.Generator().manual_seed(len(pod["metadata"]["name"]))
        state = {"base_model.model.fc.lora_A.default.weight": torch.randn(4, 32, generator=generator),
                 "base_model.model.fc.lora_B.default.weight": torch.randn(8, 4, generator=generator) / 10}  # fmt: skip
        lineage = Lineage(base_model_uri=config.spec.base_model.uri, data_sha256="0" * 64, samples=256,
                          data_format="npy", job_namespace=rt.job_namespace, job_name=rt.job_name, job_uid=rt.job_uid,
                          cluster=rt.cluster, node=pod["spec"]["nodeName"], trainer_version="bench-double",
                          device="cpu")  # fmt: skip
        folder = self.workdir / pod["metadata"]["name"]
        encoding = config.spec.output.encoding  # as asked: a trainer whose encoding held up on its held-out data
        digest, built = package.build(
            folder, state, encoding=encoding, peft_config={"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                             "target_modules": ["fc"]},
            lineage=lineage, steps=20, duration_s=self.train_seconds, metrics={"eval_loss": 0.5, "train_loss": 0.4},
            energy_joules=1.0, energy_method="estimate", peak_memory_bytes=50_000_000,
            signing_key_pem=data.get("key.pem"), signature=TRAINER_SIGNATURE,
        )  # fmt: skip
        uri = package.upload_presigned(folder, policy)
        return {"status": "Succeeded", "reason": "Succeeded", "stopReason": "MaxSteps", "steps": 20, "deltaUri": uri,
                "sha256": digest, "adapterBytes": built.adapter_bytes, "encoding": encoding, "samples": 256,
                "metrics": {"eval_loss": 0.5, "train_loss": 0.4}, "energyJoules": 1.0, "energyMethod": "estimate",
                "peakMemoryBytes": 50_000_000, "device": "cpu", "durationSeconds": self.train_seconds}  # fmt: skip

    def stop(self) -> None:
        super().stop()
        self.pool.shutdown(wait=True, cancel_futures=True)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def reconciles(metrics_text: str) -> float:
    return sum(float(m) for m in re.findall(r"^edgetune_operator_reconciles_total\{[^}]*\} (\S+)$", metrics_text, re.M))


def _series(text: str, name: str) -> list[tuple[str, float]]:
    return [(labels, float(v)) for labels, v in re.findall(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M)]


def call_stats(text: str) -> dict[str, Any]:
    """Mean reconcile time, and mean latency and count of Kubernetes API calls by verb."""
    total = sum(v for _, v in _series(text, "edgetune_operator_reconcile_duration_seconds_sum"))
    count = sum(v for _, v in _series(text, "edgetune_operator_reconcile_duration_seconds_count"))
    calls: dict[str, list[float]] = {}
    for suffix, slot in (("sum", 0), ("count", 1)):
        for labels, v in _series(text, f"edgetune_operator_external_call_duration_seconds_{suffix}"):
            if 'system="kubernetes"' in labels:
                verb = re.search(r'operation="(\w+)"', labels)
                calls.setdefault(verb.group(1) if verb else "?", [0.0, 0.0])[slot] += v
    return {
        "reconcile_mean_ms": round(1000 * total / max(count, 1), 1),
        "kube_call_mean_ms_and_count": {k: [round(1000 * s / max(c, 1), 1), int(c)] for k, (s, c) in calls.items()},
    }


OPERATOR_USER = "edgetune-operator"


def api_requests(plane: ControlPlane, since: float, until: float) -> dict[str, Any]:
    """The operator's requests as the API server saw them (audit log), watches excluded, between two
    wall-clock times: total and by verb/resource."""
    tally: dict[str, int] = {}
    for event in plane.audit_events(OPERATOR_USER, since, until):
        if event.get("verb") == "watch":
            continue
        ref = event.get("objectRef") or {}
        resource = "/".join(x for x in (ref.get("resource", "?"), ref.get("subresource")) if x)
        key = f"{event['verb']} {resource}"
        tally[key] = tally.get(key, 0) + 1
    return {"total": sum(tally.values()), "by_call": dict(sorted(tally.items(), key=lambda kv: -kv[1]))}


def bare_job(template: dict[str, Any], name: str) -> dict[str, Any]:
    """A plain batch/v1 Job with the operator's trainer pod template: the baseline."""
    pod = json.loads(json.dumps(template["spec"]["template"]))
    pod["metadata"] = {"labels": {LABEL: name}}
    spec = {k: v for k, v in template["spec"].items() if k not in ("selector", "template", "suspend")}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": {**spec, "template": pod}}


def _ts(value: Any) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def training_jobs_created(custom: Any, names: set[str]) -> dict[str, float]:
    """The named EdgeTrainingJobs' creationTimestamps (server-side, whole seconds)."""
    jobs = custom.list_namespaced_custom_object("edgetune.io", "v1alpha1", "bench", "edgetrainingjobs")["items"]
    return {
        j["metadata"]["name"]: _ts(j["metadata"]["creationTimestamp"]) for j in jobs if j["metadata"]["name"] in names
    }


def creation_lag(batch: Any, created: dict[str, float]) -> dict[str, float]:
    """Server-side: from each EdgeTrainingJob's creation to its trainer Job's creation (whole
    seconds, as creationTimestamp has them): the operator's share of the latency."""
    lags = []
    for child in batch.list_namespaced_job("bench", label_selector="edgetune.io/training-job-uid").items:
        name = (child.metadata.labels or {}).get(LABEL)
        if name in created:
            lags.append(_ts(child.metadata.creation_timestamp) - created[name])
    return {"trainer_job_created_p50_s": round(statistics.median(lags), 1), "trainer_job_created_p99_s": round(
        p(lags, 0.99), 1)}  # fmt: skip


def server_bound(core: Any, owners: dict[str, float]) -> tuple[float, float]:
    """Server-side create -> pod bound: from each owner's creationTimestamp (the plain Job, or the
    EdgeTrainingJob) to its pod's ``PodScheduled`` transition, both written by the API server in whole
    seconds. Independent of how late the benchmark's own watch hears of a binding under load."""
    lags = []
    for pod in core.list_namespaced_pod("bench", label_selector=LABEL).items:
        name = (pod.metadata.labels or {}).get(LABEL)
        scheduled = next((c for c in pod.status.conditions or [] if c.type == "PodScheduled" and c.status == "True"),
                         None)  # fmt: skip
        if name in owners and scheduled is not None:
            lags.append(_ts(scheduled.last_transition_time) - owners[name])
    return round(statistics.median(lags), 1), round(p(lags, 0.99), 1)


def wait_complete(batch: Any, names: set[str], timeout: float) -> None:
    """Until every named batch/v1 Job has its Complete condition."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = {j.metadata.name for j in batch.list_namespaced_job("bench").items
                if any(c.type == "Complete" and c.status == "True" for c in j.status.conditions or [])}  # fmt: skip
        if names <= done:
            return
        time.sleep(2)
    raise TimeoutError(f"{len(names - done)} plain Jobs not complete after {timeout} s")


def wait_terminal(custom: Any, names: set[str], timeout: float, *, want: str | None = None) -> float:
    """Until every named EdgeTrainingJob has a terminal phase; returns when (monotonic). With
    ``want``, a job ending in another phase fails the run, naming why."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = custom.list_namespaced_custom_object("edgetune.io", "v1alpha1", "bench", "edgetrainingjobs")["items"]
        phases = {i["metadata"]["name"]: i.get("status") or {} for i in items if i["metadata"]["name"] in names}
        done = {n for n, st in phases.items() if st.get("phase") in ("Succeeded", "Failed")}
        if names <= done:
            wrong = {n: st for n, st in phases.items() if want and st.get("phase") != want}
            if wrong:
                name, st = next(iter(sorted(wrong.items())))
                why = [c.get("message") for c in st.get("conditions") or [] if c.get("type") == "Failed"]
                raise RuntimeError(f"{len(wrong)} jobs ended {st.get('phase')}, not {want}; e.g. {name}: {why}")
            return time.monotonic()
        time.sleep(2)
    raise TimeoutError(f"{len(names - done)} jobs not finished after {timeout} s")


PATHS = {
    "happy": "happy: a trainer double runs each trainer pod (Running, progress annotation, a tiny signed "
             "package uploaded with the presigned policy, Succeeded); the operator verifies, counter-signs and "
             "registers it in MLflow: every job Succeeded",
    "failure": "failure: kwok completes trainer pods without running them (no package, verification, MLflow "
               "registration or Training status): every job Failed",
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="100 nodes and 100 jobs")
    parser.add_argument("--smoke", action="store_true", help="10 nodes, 5 jobs, 3 single jobs: checks the script")
    parser.add_argument("--path", choices=("happy", "failure", "both"), default="both",
                        help="which life cycle jobs take (default both, one control plane each, happy first)")
    parser.add_argument("--nodes", type=int, default=None, help="kwok nodes (default 1000)")
    parser.add_argument("--jobs", type=int, default=None, help="jobs in the burst (default 1000; 0: single jobs only)")
    parser.add_argument("--single", type=int, default=None, help="single-job samples for p50/p99")
    parser.add_argument("--train-seconds", type=float, default=2.0,
                        help="how long the happy path's trainer double trains (default 2)")
    parser.add_argument("--log", type=Path, default=None, help="copy the operator log here (PATH.happy, PATH.failure)")
    args = parser.parse_args()
    nodes = args.nodes or (10 if args.smoke else 100 if args.quick else 1000)
    jobs = args.jobs if args.jobs is not None else (5 if args.smoke else 100 if args.quick else 1000)
    single = args.single or (3 if args.smoke else 10 if args.quick else 30)
    result: dict[str, Any] = {"nodes": nodes, "jobs": jobs, "single_samples": single, "smoke": args.smoke,
                              "train_seconds": args.train_seconds}  # fmt: skip
    for path in ("happy", "failure") if args.path == "both" else (args.path,):
        figures = run_path(path, args, nodes=nodes, jobs=jobs, single=single)
        result.update({f"{path}_{k}": v for k, v in figures.items()})
        print(json.dumps({path: figures}), file=sys.stderr, flush=True)  # a path's figures, even if the next fails
    if "happy_api_requests_per_job" in result:  # the headline figures of the path users take
        result["happy_p99_ratio"] = result["happy_operator_vs_bare_p99_ratio_1000jobs"]
        result["happy_rss_mb"] = result.get("happy_operator_peak_rss_mb_1000jobs")
    print(json.dumps(result), flush=True)


def run_path(path: str, args: argparse.Namespace, *, nodes: int, jobs: int, single: int) -> dict[str, Any]:  # noqa: PLR0915 - one linear script
    happy = path == "happy"
    result: dict[str, Any] = {"path": PATHS[path]}
    with (
        tempfile.TemporaryDirectory(prefix="edgetune-bench-") as tmp,
        ControlPlane("bench", Path(tmp), audit_users=(OPERATOR_USER,)) as plane,
        S3Server(Path(tmp) / "s3") as s3,
        contextlib.ExitStack() as stack,
    ):
        mlflow = stack.enter_context(MlflowServer(s3, workdir=Path(tmp) / "mlflow")) if happy else None
        plane.add_nodes(scale_fleet(nodes), timeout=600)
        plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        plane.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        s3.create_bucket("adapters")
        api = plane.api_client()
        api.configuration.connection_pool_maxsize = 16
        core, custom, batch = k8s.CoreV1Api(api), k8s.CustomObjectsApi(api), k8s.BatchV1Api(api)
        core.create_namespace({"metadata": {"name": "bench"}})
        key = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption())  # fmt: skip
        core.create_namespaced_secret("bench", {"metadata": {"name": SIGNING_SECRET},
                                                "data": {"key.pem": base64.b64encode(key).decode()}})  # fmt: skip
        time.sleep(1)
        operator = OperatorProcess(
            plane,
            Path(tmp),
            {
                "KUBECONFIG": str(plane.user_kubeconfig(OPERATOR_USER, ("system:masters",))),
                # happy: the trainer double runs trainer pods (kwok leaves pods with this label alone);
                # failure: kwok completes them without running them, so each job ends Failed
                # (VerificationFailed: no package) — a full life cycle too, create to terminal phase.
                "EDGETUNE_TRAINER_LABELS": json.dumps({EXECUTOR_LABEL: "bench"} if happy else {}),
                "EDGETUNE_RESYNC_SECONDS": "10",
                "EDGETUNE_S3_ENDPOINT": s3.endpoint,
                **({"EDGETUNE_MLFLOW_TRACKING_URI": mlflow.url} if mlflow else {}),
                **{k: v for k, v in s3.env().items() if k.startswith("AWS_")},
            },
            "edgetune/trainer:bench",
        )
        want = "Succeeded" if happy else None
        with operator:
            pods = BoundWatch(plane)
            double = TrainerDouble(plane, args.train_seconds, Path(tmp) / "packages") if happy else None

            def create(name: str) -> float:
                custom.create_namespaced_custom_object("edgetune.io", "v1alpha1", "bench", "edgetrainingjobs",
                                                       manifest(name, signed=happy))  # fmt: skip
                return time.monotonic()

            # One job at a time, after a first one that pays every cold start (the operator's first
            # reconcile, the controller-manager's and scheduler's first Job and pod), reported apart.
            first = create("first")
            pods.wait({"first"}, 60)
            result["pod_bound_s_first_job"] = round(pods.bound["first"] - first, 3)
            latencies = []
            for i in range(single):
                name = f"one-{i}"
                created = create(name)
                pods.wait({name}, 60)
                latencies.append(pods.bound[name] - created)
            result["pod_bound_p50_s_1job"] = round(statistics.median(latencies), 3)
            result["pod_bound_p99_s_1job"] = round(p(latencies, 0.99), 3)
            result["pod_bound_s_1job_samples"] = [round(x, 2) for x in latencies]
            wait_terminal(custom, {"first", *(f"one-{i}" for i in range(single))}, 120 + 2 * args.train_seconds,
                          want=want)  # fmt: skip
            if not jobs:  # single jobs only (the 1-job figures over several runs)
                pods.stop()
                if double is not None:
                    double.stop()
                return result

            # The baseline: as many plain batch/v1 Jobs with the same pod template, same client and
            # threads, same cluster, before the operator's burst (the operator idles meanwhile).
            template = batch.list_namespaced_job("bench", label_selector=f"{LABEL}=one-0").items[0]
            template = api.sanitize_for_serialization(template)
            bare = [f"bare-{i}" for i in range(jobs)]

            def create_bare(name: str) -> float:
                batch.create_namespaced_job("bench", bare_job(template, name))
                return time.monotonic()

            with ThreadPoolExecutor(8) as pool:
                bare_at = dict(zip(bare, pool.map(create_bare, bare), strict=True))
            pods.wait(set(bare), 900)
            plain = [pods.bound[n] - bare_at[n] for n in bare]
            result["bare_job_pod_bound_watch_p50_s_1000"] = round(statistics.median(plain), 3)
            result["bare_job_pod_bound_watch_p99_s_1000"] = round(p(plain, 0.99), 3)
            # The Job controller (20 QPS) is still completing them: the operator's burst starts once
            # it is idle again, or it would pay for the baseline's leftovers.
            wait_complete(batch, set(bare), 900)
            bare_names = set(bare)
            bare_created = {
                j.metadata.name: _ts(j.metadata.creation_timestamp)
                for j in batch.list_namespaced_job("bench").items
                if j.metadata.name in bare_names
            }
            result["bare_job_pod_bound_p50_s_1000"], result["bare_job_pod_bound_p99_s_1000"] = server_bound(
                core, bare_created
            )
            time.sleep(2)

            # Many jobs in flight at once.
            before = reconciles(operator.metrics())
            cpu_before = cpu_seconds(operator.proc.pid) if operator.proc is not None else 0.0
            started, wall_started = time.monotonic(), time.time()
            names = [f"many-{i}" for i in range(jobs)]
            with ThreadPoolExecutor(8) as pool:
                created_at = dict(zip(names, pool.map(create, names), strict=True))
            result["create_all_s"] = round(time.monotonic() - started, 1)
            pods.wait(set(names), 900)
            many = [pods.bound[n] - created_at[n] for n in names]
            result["pod_bound_watch_p50_s_1000jobs"] = round(statistics.median(many), 3)
            result["pod_bound_watch_p99_s_1000jobs"] = round(p(many, 0.99), 3)
            result["all_bound_s"] = round(max(pods.bound[n] for n in names) - started, 1)
            etj_created = training_jobs_created(custom, set(names))
            result.update(creation_lag(batch, etj_created))
            result["pod_bound_p50_s_1000jobs"], result["pod_bound_p99_s_1000jobs"] = server_bound(core, etj_created)
            result["operator_vs_bare_p99_ratio_1000jobs"] = round(
                result["pod_bound_p99_s_1000jobs"] / max(result["bare_job_pod_bound_p99_s_1000"], 1.0), 2
            )
            result["operator_vs_bare_p99_ratio_watch"] = round(
                result["pod_bound_watch_p99_s_1000jobs"] / result["bare_job_pod_bound_watch_p99_s_1000"], 2
            )
            result["all_terminal_s"] = round(wait_terminal(custom, set(names), 900, want=want) - started, 1)
            elapsed = time.monotonic() - started
            result["reconciles_per_s"] = round((reconciles(operator.metrics()) - before) / elapsed, 1)
            if operator.proc is not None:
                result["operator_peak_rss_mb_1000jobs"] = round(memory_mb(operator.proc.pid, "VmHWM"), 1)
                # CPU is what the operator takes from the control plane on a small machine.
                result["operator_cpu_s_1000jobs"] = round(cpu_seconds(operator.proc.pid) - cpu_before, 1)
            time.sleep(20)  # two resync periods with every job finished: what idling costs
            calls = api_requests(plane, wall_started, time.time())
            result["api_requests_per_job"] = round(calls["total"] / jobs, 2)
            result["api_requests_by_call"] = calls["by_call"]
            result.update(call_stats(operator.metrics()))
            pods.stop()
            if double is not None:
                double.stop()
                if double.errors:
                    raise RuntimeError(f"the trainer double failed {len(double.errors)} times: {double.errors[:3]}")
        if args.log:
            Path(f"{args.log}.{path}").write_text((Path(tmp) / "operator.log").read_text())
        api.close()
    return result


if __name__ == "__main__":
    sys.exit(main())
