"""Fault matrix: EdgeTrainingJobs run through faults injected at random moments, repeatedly, and each
must end in the right phase with exactly one MLflow registration per adapter (none for a package
that must be refused), nothing lost, and the Events that name what happened.

Run with ``.venv/bin/python bench/chaos.py [--runs 5] [--faults a,b,...] [--seed N]`` (``--smoke``: one
operator kill, to check the script). Prints one JSON line: faults injected, how many hit a job **in
flight** (injected while it was not finished yet) and how many of those it survived, the faults that
missed (not injected, or landing after the job had finished: counted apart, never as survived), lost
and duplicated registrations, per fault the runs, where the job was when the fault hit and the
Event reasons seen. Exit 1 when any job ended wrong, whether the fault hit it or not.

What runs: a hub and one edge control plane (etcd, kube-apiserver, controller-manager, scheduler,
kwok nodes), S3 (versitygw), MLflow, the pod executor running trainers as processes, the operator
as a process. Every job is signed (the trust chain of docs/security.md is under test too). Faults:

- ``operator-kill``: SIGKILL the operator, start it again after 0-3 s;
- ``trainer-kill``: SIGKILL the running trainer container (exit 137): the Job's next pod resumes;
- ``hub-apiserver-restart`` / ``edge-apiserver-restart``: stop the apiserver, start it 2-10 s later
  (every watch breaks; etcd keeps the state);
- ``mlflow-outage`` / ``s3-outage``: the server stopped for 3-12 s (connections refused);
- ``edge-unreachable``: the edge's kubeconfig points nowhere for 3-12 s, then back;
- ``edge-throttled``: the edge's real API server answers 429 to every operator request for 3-12 s
  (API Priority and Fairness, ``testenv.faults.Throttle``);
- ``edge-slow``: the edge's API server answers each request 1.5 s late for 5-15 s
  (``testenv.faults.SlowProxy``);
- ``trainer-disk-full``: the nodes' work folders are small filesystems of their own (tmpfs, 8 MiB:
  needs root); the fault fills them for 5-15 s (checkpoints and packaging hit ENOSPC), then frees
  them: the trainer fails with ``StorageError``, the Job retries, the next pod resumes;
- ``package-tampered`` / ``package-truncated`` / ``package-wrongly-signed`` / ``package-unsigned``:
  the operator is stopped while the trainer uploads, the package is altered in S3, the operator comes
  back: the job must fail with ``VerificationFailed`` and nothing may be registered.

Not in this matrix (each covered by its own test): operator killed mid-release
(``tests/e2e/test_release.py::test_the_operator_killed_at_random_points_ends_every_release_right``),
an edge cluster lost for longer than the cluster-lost period (``tests/e2e/test_operator.py``), and a
full agent cache (``tests/unit/test_agent_parts.py``, with a fake).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from kubernetes import client as k8s

from edgetune_api.codec import WEIGHTS
from edgetune_api.delta import sign
from edgetune_operator.controllers.credentials import SECRET_TTL_SECONDS
from edgetune_testenv.cluster import ControlPlane
from edgetune_testenv.executor import LocalImage, PodExecutor
from edgetune_testenv.faults import SlowProxy, Throttle
from edgetune_testenv.nodes import default_fleet
from edgetune_testenv.operator_proc import OperatorProcess
from edgetune_testenv.procs import ManagedProcess, wait_for
from edgetune_testenv.servers import MlflowServer, S3Server

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.operator_support import dead_kubeconfig, point_kubeconfig, restore_kubeconfig  # noqa: E402 - as the tests do
from tests.trainer_support import sine_classes  # noqa: E402 - the tests' data generator, from the repository

TRAINER_IMAGE = "edgetune.io/trainer:chaos"
DATA = "/var/lib/edgetune/sensors"
NS = "chaos"
PACKAGE_FAULTS = ("package-tampered", "package-truncated", "package-wrongly-signed", "package-unsigned")
FAULTS = ("operator-kill", "trainer-kill", "hub-apiserver-restart", "edge-apiserver-restart", "mlflow-outage",
          "s3-outage", "edge-unreachable", "edge-throttled", "edge-slow", "trainer-disk-full",
          *PACKAGE_FAULTS)  # fmt: skip
WORK_ROOT = "/var/lib/edgetune/work"  # the operator's default work_host_path
WORK_FS_BYTES = 8 << 20
EDGE_ONLY = ("edge-apiserver-restart", "edge-unreachable", "edge-throttled", "edge-slow")


@dataclass
class World:
    hub: ControlPlane
    edge: ControlPlane
    s3: S3Server
    mlflow: MlflowServer
    executors: dict[str, PodExecutor]
    operator: OperatorProcess
    api: Any
    rng: random.Random
    durations: list[float] = field(default_factory=list)
    """How long jobs took so far (create to finished): faults are timed to land while one runs."""
    work_roots: dict[str, list[Path]] = field(default_factory=dict)
    """Per cluster, the CPU nodes' work folders, each a small filesystem of its own (disk-full fault)."""
    throttle: Throttle | None = None
    """The edge's API Priority and Fairness jail for the operator's identity (edge-throttled fault)."""

    def moment(self) -> float:
        """A random delay after a job's creation that falls inside a typical job's life."""
        typical = statistics.median(self.durations) if self.durations else 15.0
        return self.rng.uniform(0.0, 0.6 * typical)


@dataclass
class Outcome:
    fault: str
    job: str
    cluster: str
    phase_at_injection: str
    injected: bool
    phase: str = ""
    registrations: int = 0
    reasons: list[str] = field(default_factory=list)
    trainer_pod_failures: list[str] = field(default_factory=list)
    """Why each failed trainer pod of the job failed (the trainer's termination reason, or exit code)."""
    correct: bool = False
    """The job ended as it must (phase, registrations, the Events that name a refusal)."""
    detail: str = ""

    @property
    def in_flight(self) -> bool:
        """The fault hit the job before it finished."""
        return self.injected and self.phase_at_injection not in ("Succeeded", "Failed")

    @property
    def survived(self) -> bool:
        """Only a fault that hit the job in flight can be survived."""
        return self.in_flight and self.correct


def _job(name: str, cluster: str) -> dict[str, Any]:
    placement: dict[str, Any] = {"accelerator": "cpu"}
    if cluster == "edge-a":
        placement["clusterSelector"] = {"matchLabels": {"site": "factory"}}
    return {
        "apiVersion": "edgetune.io/v1alpha1", "kind": "EdgeTrainingJob", "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "builtin:timeseries-cnn"},
            "data": {"source": {"hostPath": DATA}, "format": "npy"},
            "training": {"maxSteps": 200, "batchSize": 16, "evalEvery": 20, "checkpointEvery": 10},
            "budgets": {"memory": "4Gi", "deadline": "10m"},
            "placement": placement,
            "output": {"s3": {"bucket": "adapters", "credentialsSecretRef": "s3-credentials"},
                       "mlflow": {"registeredModel": f"{name}-adapter"}, "encoding": "int8-zstd",
                       "signingKeySecretRef": {"name": "signing", "key": "key.pem"}},
        },
    }  # fmt: skip


def _status(world: World, name: str) -> dict[str, Any]:
    obj = k8s.CustomObjectsApi(world.api).get_namespaced_custom_object("edgetune.io", "v1alpha1", NS,
                                                                       "edgetrainingjobs", name)  # fmt: skip
    return dict(obj.get("status") or {})


def _phase(world: World, name: str) -> str:
    try:
        return str(_status(world, name).get("phase") or "Pending")
    except Exception:  # the hub apiserver may be the fault
        return "unknown"


def _wait(what: str, probe: Callable[[], bool], timeout: float) -> None:
    wait_for(what, probe, timeout, tolerate=(Exception,))  # a server coming back may refuse meanwhile


def _restart(proc: ManagedProcess, seconds: float, ready: Callable[[], bool]) -> None:
    """Stop ``proc`` for ``seconds``, start it again (same port, same data), wait until ``ready``."""
    proc.stop()
    try:
        time.sleep(seconds)
    finally:
        proc.start()
    _wait(f"{proc.name} ready", ready, 90)


def _inject(world: World, fault: str, name: str, cluster: str) -> tuple[str, bool]:
    """Inject ``fault`` at a random moment of job ``name``; returns (its phase then, whether it hit)."""
    rng = world.rng
    if fault in PACKAGE_FAULTS:
        return _alter_package(world, fault, name, cluster)
    if fault == "trainer-kill":
        executor = world.executors[cluster]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.2, 2.0))
            phase = _phase(world, name)
            if executor.kill_containers(NS, f"{name}-"):
                return phase, True
            if phase in ("Succeeded", "Failed"):
                break
        return _phase(world, name), False
    time.sleep(world.moment())
    phase = _phase(world, name)
    _timed_fault(world, fault, cluster)
    return phase, True


def _timed_fault(world: World, fault: str, cluster: str) -> None:
    """A fault that hits now, whatever the job is doing."""
    rng = world.rng
    if fault == "operator-kill":
        world.operator.kill()
        time.sleep(rng.uniform(0.0, 3.0))
        world.operator.start()
    elif fault in ("hub-apiserver-restart", "edge-apiserver-restart"):
        plane = world.hub if fault.startswith("hub") else world.edge
        _restart(plane.process("kube-apiserver"), rng.uniform(2.0, 10.0),
                 lambda: plane.kubectl("get", "--raw", "/readyz", check=False).returncode == 0)  # fmt: skip
    elif fault == "mlflow-outage":
        _restart(world.mlflow.processes[0], rng.uniform(3.0, 12.0),
                 lambda: httpx.get(f"{world.mlflow.url}/health", timeout=2).status_code == 200)  # fmt: skip
    elif fault == "s3-outage":
        _restart(world.s3.processes[0], rng.uniform(3.0, 12.0), lambda: bool(world.s3.client().list_buckets()))
    elif fault == "trainer-disk-full":
        fills = [root / "fill" for root in world.work_roots[cluster]]
        for fill in fills:
            with contextlib.suppress(OSError), fill.open("wb") as fh:  # until ENOSPC
                while True:
                    fh.write(b"\0" * (1 << 16))
        try:
            time.sleep(rng.uniform(5.0, 15.0))
        finally:
            for fill in fills:
                fill.unlink(missing_ok=True)
    elif fault in ("edge-unreachable", "edge-throttled", "edge-slow"):
        _edge_fault(world, fault)


def _edge_fault(world: World, fault: str) -> None:
    """The operator's way to the edge API server broken, throttled or slowed for a while."""
    rng = world.rng
    if fault == "edge-unreachable":
        # The operator reads a kubeconfig Secret again within SECRET_TTL_SECONDS: the outage it sees
        # lasts 3-12 s.
        _edge_kubeconfig(world, dead_kubeconfig(world.edge), SECRET_TTL_SECONDS + rng.uniform(3.0, 12.0))
    elif fault == "edge-throttled":
        if world.throttle is None:
            world.throttle = Throttle(world.edge)
        with world.throttle:
            _edge_kubeconfig(world, world.throttle.kubeconfig(), SECRET_TTL_SECONDS + rng.uniform(3.0, 12.0))
    elif fault == "edge-slow":
        with SlowProxy(("127.0.0.1", world.edge.api_port), delay=1.5) as proxy:
            slow = world.edge.kubeconfig.read_text().replace(world.edge.server, proxy.server)
            _edge_kubeconfig(world, slow, SECRET_TTL_SECONDS + rng.uniform(5.0, 15.0))
            time.sleep(SECRET_TTL_SECONDS)  # until the operator's client goes straight to the server again


def _edge_kubeconfig(world: World, kubeconfig: str, seconds: float) -> None:
    """The edge's EdgeCluster Secret holds ``kubeconfig`` for ``seconds``, then the edge's own again."""
    saved = point_kubeconfig(world.hub, "edge-a", kubeconfig)
    try:
        time.sleep(seconds)
    finally:
        restore_kubeconfig(world.hub, "edge-a", saved)


def _alter_package(world: World, fault: str, name: str, cluster: str) -> tuple[str, bool]:
    """Stop the operator while the trainer runs, alter its uploaded package, start the operator."""
    _wait("the trainer to run", lambda: _phase(world, name) in ("Training", "Packaging"), 120)
    phase = _phase(world, name)
    world.operator.stop()
    try:
        client = world.s3.client()
        prefix = f"edgetune/{NS}/{name}/{cluster if cluster == 'edge-a' else 'local'}/any"
        _wait("the package in S3", lambda: client.list_objects_v2(Bucket="adapters", Prefix=f"{prefix}/trainer.sig")[
            "KeyCount"] > 0, 180)  # fmt: skip
        weights = f"{prefix}/{WEIGHTS['int8-zstd']}"
        body = client.get_object(Bucket="adapters", Key=weights)["Body"].read()
        if fault == "package-tampered":
            client.put_object(Bucket="adapters", Key=weights, Body=body[:-1] + bytes([body[-1] ^ 1]))
        elif fault == "package-truncated":
            client.put_object(Bucket="adapters", Key=weights, Body=body[: len(body) // 2])
        elif fault == "package-wrongly-signed":
            manifest = client.get_object(Bucket="adapters", Key=f"{prefix}/manifest.json")["Body"].read()
            other = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            client.put_object(Bucket="adapters", Key=f"{prefix}/trainer.sig", Body=sign(manifest, other))
        else:
            client.delete_object(Bucket="adapters", Key=f"{prefix}/trainer.sig")
    finally:
        world.operator.start()
    return phase, True


def _registrations(world: World, name: str) -> int:
    response = httpx.get(f"{world.mlflow.url}/api/2.0/mlflow/model-versions/search",
                         params={"filter": f"name = '{name}-adapter'"}, timeout=10)  # fmt: skip
    return len(response.json().get("model_versions") or [])


def _reasons(world: World, name: str) -> list[str]:
    out = world.hub.kubectl("-n", NS, "get", "events", "-o", "json", f"--field-selector=involvedObject.name={name}")
    return sorted({e["reason"] for e in json.loads(out.stdout)["items"]})


def _pod_failures(world: World, name: str, cluster: str) -> list[str]:
    api = (world.hub if cluster == "local" else world.edge).api_client()
    try:
        pods = k8s.CoreV1Api(api).list_namespaced_pod(NS, label_selector=f"edgetune.io/training-job={name}").items
    finally:
        api.close()
    out = []
    for pod in pods:
        if pod.status.phase != "Failed":
            continue
        state = (pod.status.container_statuses or [None])[0]
        ended: Any = state.state.terminated if state and state.state else None
        if ended is None:
            out.append(str(pod.status.reason))
            continue
        try:
            out.append(str(json.loads(ended.message)["reason"]))
        except (TypeError, ValueError, KeyError):
            out.append(f"exit {ended.exit_code}")
    return sorted(out)


def run_one(world: World, fault: str, index: int) -> Outcome:
    cluster = "edge-a" if fault in EDGE_ONLY else world.rng.choice(["local", "edge-a"])
    name = f"{fault}-{index}"[:50]
    objects = k8s.CustomObjectsApi(world.api)
    objects.create_namespaced_custom_object("edgetune.io", "v1alpha1", NS, "edgetrainingjobs", _job(name, cluster))
    created = time.monotonic()
    phase_then, injected = _inject(world, fault, name, cluster)
    outcome = Outcome(fault, name, cluster, phase_then, injected)
    try:
        _wait(f"{name} to finish", lambda: _phase(world, name) in ("Succeeded", "Failed"), 420)
        if fault not in PACKAGE_FAULTS:  # those wait for the operator, which they stopped
            world.durations.append(time.monotonic() - created)
    except TimeoutError as exc:
        outcome.detail = str(exc)
    status = _status(world, name)
    outcome.phase = str(status.get("phase"))
    outcome.registrations = _registrations(world, name)
    outcome.reasons = _reasons(world, name)
    outcome.trainer_pod_failures = _pod_failures(world, name, cluster)
    refused = fault in PACKAGE_FAULTS
    expected = ("Failed", 0) if refused else ("Succeeded", 1)
    outcome.correct = (outcome.phase, outcome.registrations) == expected and (
        not refused or "VerificationFailed" in outcome.reasons)  # fmt: skip
    if not outcome.correct:
        outcome.detail = outcome.detail or json.dumps([c for c in status.get("conditions") or []
                                                       if c.get("status") == "False"])[:2000]  # fmt: skip
    return outcome


def _small_filesystems(executors: dict[str, PodExecutor], stack: contextlib.ExitStack) -> dict[str, list[Path]]:
    """Mount an 8 MiB tmpfs on each CPU node's work folder, so that a fault can fill it (root only)."""
    roots: dict[str, list[Path]] = {}
    for cluster, executor in executors.items():
        prefix = "hub" if cluster == "local" else "factory"
        for i in range(2):
            root = executor.node_root(f"{prefix}-cpu-{i}") / WORK_ROOT.lstrip("/")
            root.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={WORK_FS_BYTES},mode=0777", "tmpfs", str(root)],
                           check=True, capture_output=True)  # fmt: skip
            stack.callback(subprocess.run, ["umount", "-l", str(root)], check=False)
            roots.setdefault(cluster, []).append(root)
    return roots


@contextlib.contextmanager
def world(seed: int, tmp: Path, *, small_disks: bool = False) -> Iterator[World]:
    with contextlib.ExitStack() as stack:
        hub = stack.enter_context(ControlPlane("hub", tmp / "hub"))
        edge = stack.enter_context(ControlPlane("edge-a", tmp / "edge"))
        hub.add_nodes(default_fleet("hub"))
        edge.add_nodes(default_fleet("factory"))
        hub.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        hub.kubectl("wait", "--for=condition=Established", "crd", "-l", "app.kubernetes.io/name=edgetune",
                    "--timeout=60s")  # fmt: skip
        s3 = stack.enter_context(S3Server(tmp / "s3"))
        s3.create_bucket("adapters")
        mlflow = stack.enter_context(MlflowServer(s3, workdir=tmp / "mlflow"))
        image = {TRAINER_IMAGE: LocalImage(entrypoint=(sys.executable, "-m", "edgetune_trainer"),
                                           env={"PYTHONUNBUFFERED": "1"})}  # fmt: skip
        executors = {"local": stack.enter_context(PodExecutor(hub, image)),
                     "edge-a": stack.enter_context(PodExecutor(edge, image))}  # fmt: skip
        for cluster, executor in executors.items():
            prefix = "hub" if cluster == "local" else "factory"
            for i in range(2):
                sine_classes(executor.node_root(f"{prefix}-cpu-{i}") / DATA.lstrip("/"), n=120)
        hub.kubectl("create", "namespace", "edgetune-system")
        hub.kubectl("-n", "edgetune-system", "create", "secret", "generic", "edge-a-kubeconfig",
                    f"--from-file=kubeconfig={edge.kubeconfig}")  # fmt: skip
        hub.kubectl("apply", "-f", "-", input_text=json.dumps({
            "apiVersion": "edgetune.io/v1alpha1", "kind": "EdgeCluster",
            "metadata": {"name": "edge-a", "labels": {"site": "factory"}},
            "spec": {"kubeconfigSecretRef": {"name": "edge-a-kubeconfig", "namespace": "edgetune-system"},
                     "heartbeatInterval": "2s"}}))  # fmt: skip
        hub.kubectl("create", "namespace", NS)
        key = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        api = hub.api_client()
        core = k8s.CoreV1Api(api)
        _wait("the namespace's ServiceAccount", lambda: bool(core.read_namespaced_service_account("default", NS)), 30)
        core.create_namespaced_secret(NS, {"metadata": {"name": "signing"},
                                           "data": {"key.pem": base64.b64encode(key).decode()}})  # fmt: skip
        core.create_namespaced_secret(NS, {"metadata": {"name": "s3-credentials"}, "stringData": {
            k: v for k, v in s3.env().items() if k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}})  # fmt: skip
        env = {
            "EDGETUNE_NAMESPACES": json.dumps([NS]), "EDGETUNE_MLFLOW_TRACKING_URI": mlflow.url,
            "EDGETUNE_S3_ENDPOINT": s3.endpoint, "EDGETUNE_CLUSTER_LOST_AFTER_SECONDS": "120",
            **{k: v for k, v in s3.env().items() if k.startswith("AWS_") and k != "AWS_ENDPOINT_URL_S3"},
        }  # fmt: skip
        operator = stack.enter_context(OperatorProcess(hub, tmp / "operator", env, TRAINER_IMAGE))
        stack.callback(api.close)
        roots = _small_filesystems(executors, stack) if small_disks else {}
        yield World(hub, edge, s3, mlflow, executors, operator, api, random.Random(seed), work_roots=roots)  # noqa: S311 - chaos, not cryptography


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--runs", type=int, default=5, help="runs per fault (default 5)")
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, of: {', '.join(FAULTS)}")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: the time)")
    parser.add_argument("--smoke", action="store_true", help="one operator kill: checks the script")
    args = parser.parse_args()
    if args.smoke:
        args.runs, args.faults = 1, "operator-kill"
    faults = [f for f in args.faults.split(",") if f]
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        parser.error(f"unknown faults {unknown}; known: {', '.join(FAULTS)}")
    seed = args.seed if args.seed is not None else int(time.time())
    started = time.monotonic()
    outcomes: list[Outcome] = []
    small_disks = "trainer-disk-full" in faults
    if small_disks and os.geteuid() != 0:
        parser.error("trainer-disk-full mounts a small filesystem per node: run as root, or leave that fault out")
    with (
        tempfile.TemporaryDirectory(prefix="edgetune-chaos-") as tmp,
        world(seed, Path(tmp), small_disks=small_disks) as w,
    ):
        plan = [(fault, i) for i in range(args.runs) for fault in faults]
        w.rng.shuffle(plan)
        for fault, i in plan:
            outcome = run_one(w, fault, i)
            outcomes.append(outcome)
            print(json.dumps({"run": len(outcomes), "of": len(plan), **_record(outcome)}), file=sys.stderr,
                  flush=True)  # fmt: skip
    per_fault: dict[str, dict[str, Any]] = {}
    for o in outcomes:
        entry = per_fault.setdefault(o.fault, {"runs": 0, "injected": 0, "in_flight": 0, "survived": 0,
                                               "missed": 0, "wrong": 0, "phases_at_injection": [],
                                               "reasons": set(), "trainer_pod_failures": []})  # fmt: skip
        entry["trainer_pod_failures"] += o.trainer_pod_failures
        entry["runs"] += 1
        entry["injected"] += o.injected
        entry["in_flight"] += o.in_flight
        entry["survived"] += o.survived
        entry["missed"] += not o.in_flight
        entry["wrong"] += not o.correct
        entry["phases_at_injection"].append(o.phase_at_injection)
        entry["reasons"] |= set(o.reasons)
    for entry in per_fault.values():
        entry["reasons"] = sorted(entry["reasons"])
    expected = {o.job: 0 if o.fault in PACKAGE_FAULTS else 1 for o in outcomes}
    result = {
        "seed": seed, "faults_injected": sum(o.injected for o in outcomes), "runs": len(outcomes),
        "injected_in_flight": sum(o.in_flight for o in outcomes),
        "job_seconds_median": round(statistics.median(w.durations), 1) if w.durations else None,
        "survived": sum(o.survived for o in outcomes),
        "survived_of_in_flight": f"{sum(o.survived for o in outcomes)}/{sum(o.in_flight for o in outcomes)}",
        "missed": sum(not o.in_flight for o in outcomes),
        "missed_but_ended_right": sum(not o.in_flight and o.correct for o in outcomes),
        "wrong": sum(not o.correct for o in outcomes),
        "lost_registrations": sum(max(0, expected[o.job] - o.registrations) for o in outcomes),
        "duplicated_registrations": sum(max(0, o.registrations - expected[o.job]) for o in outcomes),
        "refused_packages_registered": sum(o.registrations for o in outcomes if o.fault in PACKAGE_FAULTS),
        "wall_s": round(time.monotonic() - started, 1), "per_fault": per_fault,
        "failures": [_record(o) for o in outcomes if not o.correct],
    }  # fmt: skip
    print(json.dumps(result))
    return 0 if result["wrong"] == 0 else 1


def _record(o: Outcome) -> dict[str, Any]:
    return {**o.__dict__, "in_flight": o.in_flight, "survived": o.survived}


if __name__ == "__main__":
    raise SystemExit(main())
