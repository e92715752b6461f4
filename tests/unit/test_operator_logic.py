"""Pure operator logic: placement and data sufficiency, status and Events, registration metadata,
the shared codec and FedAvg packaging."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from edgetune_api import codec
from edgetune_api.delta import DeltaManifest, FileEntry, Lineage, verify_package
from edgetune_api.meta import LabelSelector
from edgetune_api.training_job import EdgeTrainingJobSpec, EdgeTrainingJobStatus, TargetStatus, TrainingResult
from edgetune_operator import discovery
from edgetune_operator.clients.object_store import Verified
from edgetune_operator.controllers.clusters import Clusters, count_nodes
from edgetune_operator.delta.aggregate import aggregate
from edgetune_operator.delta.fedavg import AggregationError
from edgetune_operator.reconcile import registration
from edgetune_operator.reconcile.placement import SAMPLES_ANNOTATION, Node, data_key, plan
from edgetune_operator.reconcile.status import Observation, same, summarize, transitions
from edgetune_operator.reconcile.training_job import JobRef
from edgetune_operator.settings import Settings, default_profiles

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
PROFILES = default_profiles()


def spec(**overrides: Any) -> EdgeTrainingJobSpec:
    base: dict[str, Any] = {
        "baseModel": {"uri": "builtin:timeseries-cnn"},
        "data": {"source": {"hostPath": "/data/x/"}, "format": "npy"},
        "budgets": {"memory": "2Gi"},
        "output": {"s3": {"bucket": "adapters"}, "mlflow": {"registeredModel": "m"}},
    }
    base.update(overrides)
    return EdgeTrainingJobSpec.model_validate(base)


def node(name: str, resources: dict[str, str] | None = None, samples: Any = None, *, ready: bool = True,
         unschedulable: bool = False, labels: dict[str, str] | None = None) -> Node:  # fmt: skip
    annotations = {} if samples is None else {SAMPLES_ANNOTATION: samples if isinstance(samples, str) else
                                              json.dumps(samples)}  # fmt: skip
    return Node.from_wire({
        "metadata": {"name": name, "labels": labels or {}, "annotations": annotations},
        "spec": {"unschedulable": unschedulable},
        "status": {"allocatable": {"cpu": "4", **(resources or {})},
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    })  # fmt: skip


GPU = {"nvidia.com/gpu": "1"}
NPU = {"hailo.ai/h8": "1"}


def test_accelerators_pick_only_their_nodes_and_cpu_keeps_off_accelerators() -> None:
    nodes = [node("g", GPU), node("n", NPU), node("c"), node("g-down", GPU, ready=False),
             node("g-cordoned", GPU, unschedulable=True)]  # fmt: skip
    gpu = plan("local", spec(placement={"accelerator": "gpu", "perNode": True}), nodes, PROFILES)
    assert [t[0] for t in gpu.targets] == ["g"]
    npu = plan("local", spec(placement={"accelerator": "npu", "perNode": True}), nodes, PROFILES)
    assert [(t[0], t[1].resource) for t in npu.targets] == [("n", "hailo.ai/h8")]  # any NPU vendor
    cpu = plan("local", spec(placement={"accelerator": "cpu", "perNode": True}), nodes, PROFILES)
    assert [t[0] for t in cpu.targets] == ["c"]
    anything = plan("local", spec(placement={"accelerator": "any", "perNode": True}), nodes, PROFILES)
    assert [t[0] for t in anything.targets] == ["c", "g", "n"]
    two = plan("local", spec(placement={"accelerator": "gpu", "acceleratorCount": 2}), nodes, PROFILES)
    assert two.targets == [] and two.waiting and "no ready node" in two.waiting


def test_node_selector_and_max_nodes() -> None:
    nodes = [node(f"g{i}", GPU, labels={"zone": "a" if i < 3 else "b"}) for i in range(5)]
    out = plan("x", spec(placement={"accelerator": "gpu", "perNode": True, "maxNodes": 2,
                                    "nodeSelector": {"zone": "b"}}), nodes, PROFILES)  # fmt: skip
    assert [t[0] for t in out.targets] == ["g3", "g4"]
    out = plan("x", spec(placement={"accelerator": "gpu", "perNode": True, "maxNodes": 2}), nodes, PROFILES)
    assert [t[0] for t in out.targets] == ["g0", "g1"]


def test_data_sufficiency_from_node_reports() -> None:
    job = spec(data={"source": {"hostPath": "/data/x/"}, "format": "npy", "minSamples": 100},
               placement={"accelerator": "gpu"})  # fmt: skip
    assert data_key(job) == "/data/x"
    nodes = [node("a", GPU, {"/data/x": 40}), node("b", GPU), node("c", GPU, "not json"), node("d", GPU, {"/y": 500})]
    out = plan("edge", job, nodes, PROFILES)
    assert out.targets == []
    assert out.waiting == ("cluster edge: no node reports 100 samples under '/data/x' yet "
                           "(a has 40, b has no report, c has no report, d has no report)")  # fmt: skip
    nodes.append(node("e", GPU, {"/data/x": 150}))
    nodes.append(node("f", GPU, {"/data/x": 100}))
    out = plan("edge", job, nodes, PROFILES)
    assert [(t[0], t[2]) for t in out.targets] == [(None, ["e", "f"])]  # one trainer, pinned to nodes with data
    assert out.samples == {"a": 40, "e": 150, "f": 100}
    pvc = spec(data={"source": {"persistentVolumeClaim": {"claimName": "line-3"}}, "format": "csv"})
    assert data_key(pvc) == "pvc:line-3"
    # minSamples 1 (the default) needs no report at all
    assert plan("edge", spec(placement={"accelerator": "gpu"}), [node("z", GPU)], PROFILES).targets


def test_label_selector_semantics() -> None:
    labels = {"region": "eu", "site": "farm"}
    assert LabelSelector.model_validate({}).matches(labels)
    assert LabelSelector.model_validate({"matchLabels": {"region": "eu"}}).matches(labels)
    assert not LabelSelector.model_validate({"matchLabels": {"region": "us"}}).matches(labels)
    expr = [{"key": "site", "operator": "In", "values": ["farm", "shop"]}, {"key": "tier", "operator": "DoesNotExist"}]
    assert LabelSelector.model_validate({"matchExpressions": expr}).matches(labels)
    assert not LabelSelector.model_validate({"matchExpressions": [{"key": "site", "operator": "NotIn",
                                                                   "values": ["farm"]}]}).matches(labels)  # fmt: skip
    assert not LabelSelector.model_validate({"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}).matches(
        labels)  # fmt: skip


def target(phase: str, **kw: Any) -> TargetStatus:
    return TargetStatus(cluster=kw.pop("cluster", "local"), phase=phase, **kw)  # type: ignore[arg-type]


def cond(status: EdgeTrainingJobStatus, kind: str) -> tuple[str, str]:
    c = next(c for c in status.conditions if c.type == kind)
    return c.status, c.reason


def test_a_paused_cluster_holds_a_pending_target_and_says_why() -> None:
    held = target("Pending", cluster="farm", message="ClusterPaused: EdgeCluster farm is paused (spec.paused: true)")
    running = target("Training", cluster="factory", node="n1", job_name="j")
    status = summarize(spec(), 1, EdgeTrainingJobStatus(), Observation(targets=[running, held], paused=["farm"]), NOW)
    assert status.phase == "Training" and status.progress == "0/2"  # the paused part keeps the job open
    assert cond(status, "Scheduled") == ("False", "ClusterPaused")
    assert "farm" in next(c.message for c in status.conditions if c.type == "Scheduled")
    assert ("ClusterPaused", True) in [(r, w) for r, _, w in transitions(EdgeTrainingJobStatus(), status)]
    only = summarize(spec(), 1, EdgeTrainingJobStatus(), Observation(targets=[held], paused=["farm"]), NOW)
    assert cond(only, "DataSufficient") == ("False", "NotObserved")  # no trainer started: not "1 started"


def test_the_device_and_energy_each_trainer_used_are_in_the_status() -> None:
    gpu = spec(placement={"accelerator": "gpu", "allowCpuFallback": True, "perNode": True})
    on_cpu = [target("Succeeded", node=f"n{i}", job_name=f"j{i}", device="cpu", energy_joules=600.0,
                     energy_method=method) for i, method in enumerate(("rapl", "estimate"))]  # fmt: skip
    status = summarize(gpu, 1, EdgeTrainingJobStatus(), Observation(targets=on_cpu), NOW)
    assert cond(status, "Accelerated") == ("False", "CpuFallback") and status.devices == "cpu"
    assert status.energy == "1.2 kJ (estimate, rapl)"
    assert ("CpuFallback", True) in [(r, w) for r, _, w in transitions(EdgeTrainingJobStatus(), status)]
    on_gpu = [target("Training", node="n0", job_name="j0", device="gpu", energy_joules=12.4, energy_method="nvml")]
    status = summarize(gpu, 1, EdgeTrainingJobStatus(), Observation(targets=on_gpu), NOW)
    assert cond(status, "Accelerated") == ("True", "OnAccelerator") and status.energy == "12 J (nvml)"
    cpu_job = summarize(spec(placement={"accelerator": "cpu"}), 1, EdgeTrainingJobStatus(),
                        Observation(targets=on_cpu), NOW)  # fmt: skip
    assert not [c for c in cpu_job.conditions if c.type == "Accelerated"]  # nothing to fall back from


def test_status_phases_follow_the_targets() -> None:
    job = spec()
    old = EdgeTrainingJobStatus()
    waiting = summarize(job, 1, old, Observation(waiting=["cluster local: no node reports 5 samples"]), NOW)
    assert waiting.phase == "WaitingForData" and cond(waiting, "DataSufficient") == ("False", "WaitingForData")
    training = summarize(job, 1, waiting, Observation(targets=[target("Training", node="n1", job_name="j")]), NOW)
    assert training.phase == "Training" and training.start_time == NOW
    assert cond(training, "Scheduled") == ("True", "TrainersBound") and cond(training, "Training")[0] == "True"
    result = TrainingResult(mlflow_model="m", mlflow_version="3", sha256="a" * 64)
    done = summarize(job, 1, training, Observation(targets=[target("Succeeded", node="n1", sha256="a" * 64)],
                                                   result=result), NOW)  # fmt: skip
    assert done.phase == "Succeeded" and done.completion_time == NOW and done.progress == "1/1"
    assert cond(done, "Registered") == ("True", "ModelVersionCreated") and cond(done, "Succeeded")[0] == "True"
    reasons = [r for r, _, _ in transitions(training, done)]
    assert "Verified" in reasons and "Registered" in reasons and "Succeeded" in reasons
    assert transitions(done, summarize(job, 1, done, Observation(targets=done.targets, result=result), NOW)) == []
    assert same(done, summarize(job, 1, done, Observation(targets=done.targets, result=result), NOW))


def test_a_selector_matching_no_cluster_says_so_where_people_look() -> None:
    """It showed WaitingForData 0/0 and ClustersReachable "every selected cluster answered"."""
    job = spec(placement={"clusterSelector": {"matchLabels": {"edgetune.io/site": "nowhere"}}})
    status = summarize(job, 1, EdgeTrainingJobStatus(), Observation(no_clusters=True), NOW)
    assert status.phase == "Pending" and status.progress == "NoClusters"  # the PROGRESS printer column
    assert cond(status, "DataSufficient") == ("False", "NoClusters")
    message = next(c.message for c in status.conditions if c.type == "DataSufficient")
    assert "edgetune.io/site=nowhere" in (message or "")
    assert cond(status, "ClustersReachable") == ("True", "NoneSelected")
    assert [(r, w) for r, _, w in transitions(EdgeTrainingJobStatus(), status)] == [("NoClusters", True)]


def test_partial_success_failure_and_suspension() -> None:
    job = spec()
    old = EdgeTrainingJobStatus()
    targets = [target("Succeeded", cluster="a", node="n", mlflow_version="1", sha256="b" * 64),
               target("Failed", cluster="b", message="ClusterUnreachable: gone")]  # fmt: skip
    partial = summarize(job, 1, old, Observation(targets=targets, unreachable={"b": "refused"}), NOW)
    assert partial.phase == "Succeeded" and cond(partial, "Succeeded") == ("True", "PartiallySucceeded")
    assert "b/-: ClusterUnreachable: gone" in next(c.message for c in partial.conditions if c.type == "Succeeded")
    warnings = {r for r, _, w in transitions(old, partial) if w}
    assert "ClusterUnreachable" in warnings
    failed = summarize(job, 1, old, Observation(targets=[target("Failed", message="VerificationFailed: x")]), NOW)
    assert failed.phase == "Failed" and cond(failed, "Verified") == ("False", "VerificationFailed")
    assert ("VerificationFailed", "local/-: VerificationFailed: x", True) in transitions(old, failed)
    fed = spec(placement={"perNode": True}, aggregation={"strategy": "fedavg", "minParticipants": 3})
    short = summarize(fed, 1, old, Observation(targets=[target("Succeeded"), target("Succeeded"), target("Failed")]))
    assert short.phase == "Failed" and "3 needed" in next(c.message for c in short.conditions if c.type == "Failed")
    suspended = summarize(spec(suspend=True), 2, old, Observation(), NOW)
    assert suspended.phase == "Suspended" and suspended.observed_generation == 2
    blocked = summarize(job, 1, old, Observation(targets=[target("Packaging", node="n")],
                                                 pending_error="MlflowUnavailableError: down"), NOW)  # fmt: skip
    assert blocked.phase == "Packaging" and cond(blocked, "Registered") == ("False", "RegistryUnavailable")


def manifest(samples: int, **kw: Any) -> DeltaManifest:
    return DeltaManifest(
        encoding=kw.pop("encoding", "fp32"), files={}, peft={"r": 2}, steps=4, duration_s=1.0,
        metrics={"eval_loss": kw.pop("loss", 1.0)}, adapter_bytes=0, created_at="2026-11-22T10:00:00Z",
        lineage=Lineage(base_model_uri="builtin:x", base_model_sha256="c" * 64, data_sha256="d" * 64, samples=samples,
                        data_format="npy", job_namespace="ns", job_name="j", job_uid="u", cluster="local",
                        node=kw.pop("node", "n1"), trainer_version="0.1.0"),
        **kw,
    )  # fmt: skip


def test_registration_tags_and_aliases() -> None:
    job = JobRef("j", "ns", "u")
    tags = registration.tags(job, manifest(10), "e" * 64, "s3://b/p")
    assert tags["edgetune.job"] == "j" and tags["edgetune.nodes"] == "n1" and tags["edgetune.delta_sha256"] == "e" * 64
    assert tags["edgetune.base_model_sha256"] == "c" * 64 and tags["edgetune.aggregation"] == "none"
    assert registration.target_alias("candidate", "edge-a", "Node.7") == "candidate-edge-a-node-7"
    values = registration.metric_values(manifest(10))
    assert values["samples"] == 10 and values["eval_loss"] == 1.0


def package(state: dict[str, np.ndarray], samples: int, node: str, encoding: str = "fp32") -> Verified:
    weights = codec.encode(state, encoding)
    files = {codec.WEIGHTS[encoding]: weights}
    from edgetune_api.delta import sha256_bytes  # noqa: PLC0415

    m = manifest(samples, node=node, encoding=encoding).model_copy(
        update={"files": {k: FileEntry(sha256=sha256_bytes(v), bytes=len(v)) for k, v in files.items()}}
    )
    return Verified(uri=f"s3://b/{node}", digest=sha256_bytes(node.encode()), manifest=m, files=files)


def test_fedavg_package_is_weighted_verifiable_and_deterministic() -> None:
    a = package({"w": np.ones((4, 4), np.float32)}, 30, "n1")
    b = package({"w": np.zeros((4, 4), np.float32)}, 10, "n2")
    digest, m, files = aggregate([a, b], signing_key_pem=None)
    assert np.allclose(codec.decode(files["adapter.safetensors"], "fp32")["w"], 0.75)
    assert verify_package(files).lineage.samples == 40
    assert [s["node"] for s in m.sources] == sorted(["n1", "n2"], key=lambda n: {"n1": a.digest, "n2": b.digest}[n])
    assert aggregate([b, a], signing_key_pem=None)[0] == digest  # order-independent, same bytes
    other = package({"w": np.zeros((2, 2), np.float32)}, 10, "n3")
    with pytest.raises(AggregationError):
        aggregate([a, other], signing_key_pem=None)


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8-zstd", "int4-zstd"])
def test_codec_round_trip_within_the_encodings_error(encoding: str) -> None:
    rng = np.random.default_rng(0)
    state = {"lora_A": rng.normal(size=(8, 300)).astype(np.float32), "b": rng.normal(size=(7,)).astype(np.float32)}
    out = codec.decode(codec.encode(state, encoding), encoding)
    tolerance = {"fp32": 0, "fp16": 1e-2, "int8-zstd": 0.05, "int4-zstd": 0.6}[encoding]
    for name, array in state.items():
        assert out[name].shape == array.shape and out[name].dtype == np.float32
        assert float(np.abs(out[name] - array).max()) <= tolerance


def test_node_counts_by_accelerator() -> None:
    counts = count_nodes([node("g", GPU), node("n", {"rockchip.com/npu": "2"}), node("c"), node("x", ready=False)],
                         Settings())  # fmt: skip
    assert (counts.gpu, counts.npu, counts.cpu) == (1, 1, 1)


# -- bounded decompression ----------------------------------------------------------------------


def test_a_zstd_frame_declaring_a_huge_size_is_refused_before_any_allocation() -> None:
    # A frame header: magic, descriptor (single segment, 8-byte content size), content size 1 TiB.
    bomb = (0xFD2FB528).to_bytes(4, "little") + bytes([0xE0]) + (1 << 40).to_bytes(8, "little") + b"\x01\x00\x00"
    with pytest.raises(codec.DecodeError, match="declare 1099511627776 bytes"):
        codec.decode(bomb, "int8-zstd")


def test_weights_that_decompress_past_the_limit_are_refused_even_without_a_declared_size() -> None:
    import zstandard  # noqa: PLC0415

    stream = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 200_000)  # ~100 bytes
    assert zstandard.frame_content_size(stream) == -1
    with pytest.raises(codec.DecodeError, match="more than the limit of 100000 bytes"):
        codec.decode(stream, "int8-zstd", limit=100_000)
    with pytest.raises(codec.DecodeError, match="not a zstd frame"):
        codec.decode(b"definitely not zstd", "int4-zstd")
    state = {"w": np.linspace(-1, 1, 4096, dtype=np.float32).reshape(64, 64)}
    for encoding in ("int8-zstd", "int4-zstd"):  # real weights still decode within a tight bound
        decoded = codec.decode(codec.encode(state, encoding), encoding, limit=10_000)
        assert np.abs(decoded["w"] - state["w"]).max() < 0.15


# -- endpoints a spec names ----------------------------------------------------------------------


@pytest.mark.parametrize("named", [
    "http://169.254.169.254",  # the cloud metadata service (link-local)
    "http://kubernetes.default.svc:443",  # in-cluster
    "http://10.96.0.10:9000",
    "https://minio.storage.svc:9000.evil.example",
])  # fmt: skip
def test_the_operator_calls_no_s3_endpoint_outside_its_allow_list(named: str) -> None:
    from edgetune_operator.controllers.credentials import ConfigurationError, s3_endpoint  # noqa: PLC0415
    from edgetune_operator.settings import Settings  # noqa: PLC0415

    settings = Settings.from_env({"EDGETUNE_S3_ENDPOINT": "http://minio.storage:9000",
                                  "EDGETUNE_S3_ENDPOINTS_ALLOWED": '["https://*.s3.amazonaws.com"]'})  # fmt: skip
    with pytest.raises(ConfigurationError, match=f"S3 endpoint {named} is not one the operator may call"):
        s3_endpoint(settings, named)
    assert s3_endpoint(settings, None) == "http://minio.storage:9000"  # the job names none: the operator's own
    assert s3_endpoint(settings, "http://minio.storage:9000/") == "http://minio.storage:9000"
    assert s3_endpoint(settings, "https://eu-west-1.s3.amazonaws.com") == "https://eu-west-1.s3.amazonaws.com"


class _Discovery:
    """Answers discovery as an API server does in the moment after a CRD became Established: the
    group is listed first without its resources, then with them."""

    def __init__(self, steps: list[tuple[bool, list[str]]]) -> None:
        self.steps = steps
        self.calls = 0

    def call(self, method: str, path: str) -> dict[str, object]:
        listed, resources = self.steps[min(self.calls // 2, len(self.steps) - 1)]
        self.calls += 1
        if path == "/apis":
            return {"groups": [{"name": "edgetune.io", "versions": [{"version": "v1alpha1"}]}] if listed else []}
        return {"resources": [{"name": r} for r in resources]}


def test_start_up_waits_until_discovery_serves_every_edgetune_resource() -> None:
    kube = _Discovery([(False, []), (True, ["edgetrainingjobs"]), (True, list(discovery.RESOURCES))])
    assert discovery.missing(kube) == sorted(discovery.RESOURCES)  # type: ignore[arg-type]
    discovery.wait_until_served(kube, timeout=5, poll=0.01)  # type: ignore[arg-type]
    assert kube.calls >= 6  # it did wait for the third answer
    late = _Discovery([(True, ["edgetrainingjobs"])])
    with pytest.raises(discovery.ResourcesNotServedError, match="does not serve adapterreleases, edgeclusters"):
        discovery.wait_until_served(late, timeout=0.05, poll=0.01)  # type: ignore[arg-type]


def _edge(generation: int, interval: str) -> dict[str, Any]:
    spec = {"kubeconfigSecretRef": {"name": "k", "namespace": "ns"}, "heartbeatInterval": interval}
    return {"metadata": {"name": "shop-1", "generation": generation}, "spec": spec}


def test_heartbeat_is_due_once_per_interval_and_at_once_after_a_spec_change() -> None:
    clusters = Clusters(None, Settings())  # type: ignore[arg-type] - due() makes no request
    assert clusters.due(_edge(1, "30s"), now=100.0)  # first sight: probed at once
    assert not clusters.due(_edge(1, "30s"), now=129.0)
    assert clusters.due(_edge(1, "30s"), now=130.0)
    assert not clusters.due(_edge(1, "30s"), now=131.0)
    assert clusters.due(_edge(2, "5s"), now=131.5)  # a new generation: at once, at its own interval
    assert not clusters.due(_edge(2, "5s"), now=136.0)
    assert clusters.due(_edge(2, "5s"), now=136.5)
    clusters.forget("shop-1")
    assert clusters.due(_edge(2, "5s"), now=137.0)  # a cluster deleted and created again starts afresh


class _Fleet:
    """The one thing ``_carry_unreachable`` reads of the clusters: an EdgeCluster's status."""

    local = None

    def __init__(self, status: dict[str, Any]) -> None:
        self.status = status

    def edge_cluster(self, name: str, *, fresh: bool = False) -> dict[str, Any]:
        return {"metadata": {"name": name}, "status": self.status}


def _heartbeat(reason: str, at: str) -> dict[str, Any]:
    return {"reachable": False, "lastHeartbeatTime": at,
            "conditions": [{"type": "Reachable", "status": "False", "reason": reason}]}  # fmt: skip


@pytest.mark.parametrize(
    ("reason", "last_answer", "job_age", "throttled", "phase"),
    [
        ("Unreachable", "2026-01-01T00:00:00Z", "old", False, "Failed"),  # silent past the grace period: given up
        ("Unreachable", "now", "old", False, "Pending"),  # silent, within the grace period: waited for
        ("Unreachable", "2026-01-01T00:00:00Z", "new", False, "Pending"),  # the job has not waited that long
        ("Throttled", "2026-01-01T00:00:00Z", "old", True, "Pending"),  # answering 429 for long: never given up
    ],
)
def test_a_cluster_cut_off_before_its_trainers_started_holds_its_part_of_the_job(
    reason: str, last_answer: str, job_age: str, throttled: bool, phase: str
) -> None:
    """Before, a cluster unreachable when the job started had no target at all, and the job
    finished (Succeeded) as soon as the other clusters' trainers did, without it."""
    from edgetune_operator.controllers.training_job import TrainingJobController  # noqa: PLC0415

    at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if last_answer == "now" else last_answer
    job = JobRef("j", "ns", "u", created=datetime.now(UTC).timestamp() if job_age == "new" else 0.0)
    controller = TrainingJobController(Settings(), _Fleet(_heartbeat(reason, at)), s3_factory=lambda *_: None,
                                       mlflow=None)  # type: ignore[arg-type]  # fmt: skip
    done = target("Succeeded", cluster="a", node="n", mlflow_version="1", sha256="b" * 64)
    obs = Observation(targets=[done], unreachable={"b": "429 Too Many Requests" if throttled else "refused"},
                      throttled={"b"} if throttled else set())  # fmt: skip
    controller._carry_unreachable("b", job, obs, {}, throttled=throttled)
    held = obs.targets[-1]
    assert (held.cluster, held.node, held.phase) == ("b", None, phase)
    assert ("429" in (held.message or "")) == throttled
    status = summarize(spec(), 1, EdgeTrainingJobStatus(), obs, NOW)
    if phase == "Failed":
        assert status.phase == "Succeeded" and cond(status, "Succeeded") == ("True", "PartiallySucceeded")
    else:
        assert status.phase not in ("Succeeded", "Failed")  # the job waits for cluster b
    expected = "ClusterThrottled" if throttled else "ClusterUnreachable"
    assert cond(status, "ClustersReachable") == ("False", expected)
    # the next reconcile carries the placeholder, not two of them
    again = Observation(targets=[done], unreachable=obs.unreachable, throttled=obs.throttled)
    controller._carry_unreachable("b", job, again, {("b", None): held}, throttled=throttled)
    assert [t.cluster for t in again.targets] == ["a", "b"] and again.targets[-1].phase == phase


def test_a_429_is_a_throttled_error_with_the_servers_retry_after() -> None:
    from edgetune_operator.clients.kube import ThrottledError, _api_error  # noqa: PLC0415
    from edgetune_operator.controllers.clusters import describe  # noqa: PLC0415

    body = json.dumps({"kind": "Status", "message": "Too many requests, please try again later."}).encode()
    error = _api_error(429, "Too Many Requests", body, "2")
    assert isinstance(error, ThrottledError) and error.retry_after == 2.0
    assert "please try again later" in describe(error) and "retry after 2 s" in describe(error)
    assert _api_error(429, "Too Many Requests", body, "Wed, 21 Oct 2026 07:28:00 GMT").retry_after is None  # type: ignore[attr-defined]
    assert not isinstance(_api_error(500, "Internal", body), ThrottledError)


class _Secrets:
    """The hub as ``read_secret`` sees it: Secrets by (namespace, name)."""

    def __init__(self, secrets: dict[tuple[str, str], dict[str, str]]) -> None:
        self.secrets = secrets

    def get_or_none(self, resource: object, name: str, namespace: str) -> dict[str, object] | None:
        data = self.secrets.get((namespace, name))
        return None if data is None else {"data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def test_a_missing_credential_names_the_field_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """The quickstart's first job created ``s3-credentials`` but named it nowhere: the job's status
    held ``AttributeError: 'NoneType' object has no attribute 'access_key'`` from deep in botocore.
    Each way a credential can be missing now says which field to set."""
    from edgetune_operator.clients import object_store  # noqa: PLC0415
    from edgetune_operator.controllers import credentials  # noqa: PLC0415

    monkeypatch.setattr(object_store, "ambient_credentials", lambda: False)
    hub = _Secrets({("team-a", "s3-credentials"): {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"},
                    ("team-a", "signing"): {"other.pem": "x"}})  # fmt: skip
    field = "output.s3.credentialsSecretRef"
    with pytest.raises(credentials.ConfigurationError, match=r"output.s3.credentialsSecretRef is not set and the "
                       r"operator has no S3 credentials of its own: create a Secret in team-a"):  # fmt: skip
        credentials.s3_credentials(hub, "team-a", None, field=field)  # type: ignore[arg-type]
    with pytest.raises(credentials.ConfigurationError, match=r"output.s3.credentialsSecretRef names Secret "
                       r"team-b/s3-credentials, which does not exist"):  # fmt: skip
        credentials.s3_credentials(hub, "team-b", "s3-credentials", field=field)  # type: ignore[arg-type]
    assert credentials.s3_credentials(hub, "team-a", "s3-credentials", field=field) == {  # type: ignore[arg-type]
        "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}  # fmt: skip
    with pytest.raises(credentials.ConfigurationError, match=r"output.signingKeySecretRef names key key.pem of "
                       r"Secret team-a/signing, which has no such key \(its keys: other.pem\)"):  # fmt: skip
        credentials.secret_value(hub, "team-a", "signing", "key.pem", field="output.signingKeySecretRef")  # type: ignore[arg-type]
    monkeypatch.setattr(object_store, "ambient_credentials", lambda: True)
    assert credentials.s3_credentials(hub, "team-a", None, field=field) == {}  # type: ignore[arg-type]


@pytest.mark.parametrize("client", ["mlflow", "prometheus"])
def test_concurrent_calls_keep_their_connections(client: str, caplog: pytest.LogCaptureFixture) -> None:
    """Eight reconcile threads calling MLflow (or Prometheus) at once: with urllib3's default pool of
    one connection, each overlapping call opened a connection and dropped it with a WARNING ("Connection
    pool is full"), hundreds of them in the operator's log under bench_operator's happy path."""
    import http.server  # noqa: PLC0415
    import logging  # noqa: PLC0415
    import threading  # noqa: PLC0415
    import time  # noqa: PLC0415
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    from edgetune_operator.clients.mlflow import Mlflow  # noqa: PLC0415
    from edgetune_operator.clients.prometheus import Prometheus  # noqa: PLC0415

    class Slow(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as MLflow's and Prometheus' servers answer

        def do_GET(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            time.sleep(0.05)  # long enough for the calls to overlap
            body = b'{"status": "success", "data": {"resultType": "scalar", "result": [0, "1"]}}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET  # noqa: N815 - Prometheus' queries are POSTs

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    if client == "mlflow":
        mlflow = Mlflow(url)
        call: Any = lambda _: mlflow.call("GET", "experiments/get-by-name", query={"experiment_name": "e"})  # noqa: E731
    else:
        prometheus = Prometheus(url)
        call = lambda _: prometheus.query("1")  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"), ThreadPoolExecutor(8) as pool:
        list(pool.map(call, range(32)))
    server.shutdown()
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]
