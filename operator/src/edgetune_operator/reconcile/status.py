"""An EdgeTrainingJob's status from what was observed in one reconcile, and the Events its changes
deserve. Pure: the controller gathers the observation, this decides what it means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from edgetune_api.training_job import EdgeTrainingJobSpec, EdgeTrainingJobStatus, TargetStatus, TrainingResult
from edgetune_operator.reconcile.training_job import PROGRESS_FIELDS, RETRYING, set_condition

FINISHED = ("Succeeded", "Failed")
WARNING_CONDITIONS = {("Failed", "True"), ("ClustersReachable", "False")}
QUIET = {"DataSufficient", "ClustersReachable", "Reconciled", "Training", "Accelerated"}
"""Conditions whose becoming True is not worth an Event of its own (Scheduled, Verified, … are)."""
WARNING_REASONS = {
    "RegistrationBlocked",
    "RegistryUnavailable",
    "VerificationFailed",
    "ClusterUnreachable",
    "CredentialsUnavailable",
    "NoClusters",
    "TrainerRetrying",
    "CpuFallback",
    "ClusterPaused",
}


@dataclass
class Observation:
    """What one reconcile saw and did."""

    targets: list[TargetStatus] = field(default_factory=list)
    """One per trainer, in a stable order."""
    waiting: list[str] = field(default_factory=list)
    """Why clusters have no trainers yet (data, matching nodes)."""
    created: int = 0
    """Trainers this reconcile started."""
    unreachable: dict[str, str] = field(default_factory=dict)
    """Clusters that did not answer (or cannot be reached at all), with why."""
    throttled: set[str] = field(default_factory=set)
    """Clusters among ``unreachable`` that answered 429 Too Many Requests (alive, busy)."""
    result: TrainingResult | None = None
    """The registered adapter (single trainer or aggregate)."""
    aggregation_error: str | None = None
    """Why fedavg could not produce an adapter."""
    pending_error: str | None = None
    """A failure holding up verification or registration; retried on the next reconcile."""
    pending_system: str | None = None
    """Which system the pending error came from (s3, mlflow, kubernetes)."""
    blocked: bool = False
    """The pending error needs a person (missing Secret, bucket, MLflow configuration), not just time."""
    start_error: str | None = None
    """Why trainers could not be started: their credentials (upload policy, derived key, presigned
    base model) could not be issued; retried on the next reconcile."""
    no_clusters: bool = False
    """``placement.clusterSelector`` matches no EdgeCluster (not a wait for data: a person must act)."""
    paused: list[str] = field(default_factory=list)
    """Selected EdgeClusters with spec.paused that have no trainer of this job yet (none is started)."""


def _progress(ok: int, n: int, *, failed: int) -> str:
    """The PROGRESS column: trainers succeeded of all, and how many failed (a failed job read 1/1)."""
    return f"{ok}/{n}" + (f" ({failed} failed)" if failed else "")


def _selector(spec: EdgeTrainingJobSpec) -> str:
    chosen = spec.placement.cluster_selector
    if chosen is None:
        return "none"
    labels = [f"{k}={v}" for k, v in sorted((chosen.match_labels or {}).items())]
    labels += [f"{e.key} {e.operator} {list(e.values or [])}" for e in chosen.match_expressions or []]
    return ", ".join(labels) or "empty"


def _registered(spec: EdgeTrainingJobSpec, obs: Observation) -> bool:
    if spec.aggregation.strategy == "fedavg" or len(obs.targets) == 1:
        return bool(obs.result and obs.result.mlflow_version)
    succeeded = [t for t in obs.targets if t.phase == "Succeeded"]
    return bool(succeeded) and all(t.mlflow_version for t in succeeded)


def summarize(  # noqa: PLR0912, PLR0915 - one decision table, easier to read whole
    spec: EdgeTrainingJobSpec, generation: int, old: EdgeTrainingJobStatus, obs: Observation,
    now: datetime | None = None,
) -> EdgeTrainingJobStatus:  # fmt: skip
    now = now or datetime.now(UTC).replace(microsecond=0)
    targets = obs.targets
    n = len(targets)
    done = sum(t.phase in FINISHED for t in targets)
    ok = sum(t.phase == "Succeeded" for t in targets)
    finished = n > 0 and done == n
    registered = _registered(spec, obs)
    failures = [f"{t.cluster}/{t.node or '-'}: {t.message}" for t in targets if t.phase == "Failed"]
    needed = spec.aggregation.min_participants if spec.aggregation.strategy == "fedavg" else 1

    if finished and (ok < needed or obs.aggregation_error):
        phase = "Failed"
    elif finished and registered:
        phase = "Succeeded"
    elif spec.suspend:
        phase = "Suspended"
    elif finished:
        phase = "Registering"
    elif any(t.phase in ("Packaging", "Registering") for t in targets):
        phase = "Packaging"
    elif any(t.phase == "Training" for t in targets):
        phase = "Training"
    elif n:
        phase = "Scheduled"
    elif obs.waiting:
        phase = "WaitingForData"
    else:
        phase = "Pending"

    conds = list(old.conditions)

    def cond(kind: str, value: bool, reason: str, message: str) -> None:
        nonlocal conds
        conds = set_condition(conds, kind, value, reason=reason, message=message, generation=generation, now=now)

    launched = sum(bool(t.job_name) for t in targets)
    if launched:
        cond("DataSufficient", True, "SamplesReported", f"{launched} trainer(s) started where the data suffices")
    elif obs.no_clusters:
        cond("DataSufficient", False, "NoClusters", f"no EdgeCluster matches placement.clusterSelector "
             f"({_selector(spec)}): label an EdgeCluster or change the selector (kubectl get edgeclusters "
             "--show-labels)")  # fmt: skip
    elif obs.waiting or not n:
        cond("DataSufficient", False, "WaitingForData", "; ".join(obs.waiting) or "no cluster selected yet")
    else:  # only placeholders: clusters paused or not answering, whose nodes were not looked at
        cond("DataSufficient", False, "NotObserved", "no selected cluster's nodes were looked at yet (see "
             "Scheduled and ClustersReachable)")  # fmt: skip
    if obs.no_clusters and not n:  # vacuously true; DataSufficient says what to do (one Warning Event, not two)
        cond("ClustersReachable", True, "NoneSelected", "no cluster is selected (see DataSufficient)")
    elif obs.unreachable:
        cond("ClustersReachable", False, "ClusterThrottled" if set(obs.unreachable) <= obs.throttled else
             "ClusterUnreachable", "; ".join(f"{c}: {m}" for c, m in sorted(obs.unreachable.items())))  # fmt: skip
    else:
        cond("ClustersReachable", True, "Reachable", "every selected cluster answered")
    bound = sum(bool(t.node) and t.phase not in ("Pending",) for t in targets)
    if obs.start_error and not n:
        cond("Scheduled", False, "CredentialsUnavailable", obs.start_error)
    elif obs.paused:
        cond("Scheduled", False, "ClusterPaused", f"EdgeCluster {', '.join(obs.paused)} is paused (spec.paused: "
             f"true): no trainer starts there until it is resumed; {bound}/{n} trainer pod(s) bound to "
             "nodes")  # fmt: skip
    else:
        cond("Scheduled", bool(n) and bound == n, "TrainersBound" if n and bound == n else "Pending",
             f"{bound}/{n} trainer pod(s) bound to nodes")  # fmt: skip
    training = sum(t.phase == "Training" for t in targets)
    retrying = [t for t in targets if t.phase in ("Training", "Scheduled") and (t.message or "").startswith(RETRYING)]
    if retrying:
        cond("Training", training > 0, "TrainerRetrying", f"{training} trainer(s) running; " + "; ".join(
            f"{t.cluster}/{t.node or '-'}: {t.message}" for t in retrying)[:3000])  # fmt: skip
    else:
        cond("Training", training > 0, "TrainersRunning" if training else ("Finished" if finished else "NotRunning"),
             f"{training} trainer(s) running")  # fmt: skip
    bad = [t for t in targets if t.phase == "Failed" and (t.message or "").startswith("VerificationFailed")]
    verified = [t for t in targets if t.sha256]
    if bad:
        cond("Verified", False, "VerificationFailed", "; ".join(f"{t.cluster}/{t.node or '-'}: {t.message}"
                                                                for t in bad))  # fmt: skip
    else:
        cond("Verified", bool(verified), "PackagesVerified" if verified else "NothingToVerify",
             f"{len(verified)} package(s) verified (SHA-256 of every file, signature when configured)")  # fmt: skip
    if registered:
        if obs.result and obs.result.mlflow_version:
            where = f"{obs.result.mlflow_model} version {obs.result.mlflow_version}"
        else:
            where = ", ".join(f"{t.cluster}/{t.node or '-'} → version {t.mlflow_version}"
                              for t in targets if t.mlflow_version)  # fmt: skip
        cond("Registered", True, "ModelVersionCreated", f"registered in MLflow: {where}")
    else:
        reason = "NotYetRegistered"
        if obs.pending_error:
            reason = "RegistrationBlocked" if obs.blocked else "RegistryUnavailable"
        cond("Registered", False, reason,
             obs.pending_error or "no verified adapter to register yet")  # fmt: skip
    if phase == "Succeeded":
        partial = ok < n
        cond("Succeeded", True, "PartiallySucceeded" if partial else "AdapterRegistered",
             f"{ok}/{n} trainer(s) succeeded" + (f"; failed: {'; '.join(failures)}" if partial else ""))  # fmt: skip
        cond("Failed", False, "Succeeded", "")
    elif phase == "Failed":
        why = obs.aggregation_error or f"{ok}/{n} trainer(s) succeeded, {needed} needed: {'; '.join(failures)}"
        cond("Succeeded", False, "Failed", why)
        cond("Failed", True, "TrainingFailed" if not obs.aggregation_error else "AggregationFailed", why)
    else:
        cond("Succeeded", False, "InProgress", f"phase {phase}")
        cond("Failed", False, "InProgress", "")

    if spec.placement.accelerator in ("gpu", "npu"):
        on_cpu = [f"{t.cluster}/{t.node or '-'}" for t in targets if t.device == "cpu"]
        reported = [t for t in targets if t.device]
        if on_cpu:
            cond("Accelerated", False, "CpuFallback", f"{len(on_cpu)}/{n} trainer(s) trained on the CPU although "
                 f"placement.accelerator is {spec.placement.accelerator} (placement.allowCpuFallback): "
                 + ", ".join(on_cpu[:20]) + (f" and {len(on_cpu) - 20} more" if len(on_cpu) > 20 else ""))  # fmt: skip
        elif reported:
            cond("Accelerated", True, "OnAccelerator", f"{len(reported)}/{n} trainer(s) reported training on "
                 f"the {spec.placement.accelerator}")  # fmt: skip
    cond("Reconciled", True, "ReconcileSucceeded", "the last reconcile completed")
    started = old.start_time or (now if any(t.job_name for t in targets) else None)
    return EdgeTrainingJobStatus(
        phase=phase,  # type: ignore[arg-type]
        conditions=conds,
        observed_generation=generation,
        progress="NoClusters" if obs.no_clusters and not n else _progress(ok, n, failed=len(failures)),
        start_time=started,
        completion_time=(old.completion_time or now) if phase in FINISHED else None,
        targets=targets,
        result=obs.result,
        energy=_energy(targets),
        devices=",".join(sorted({t.device for t in targets if t.device})) or None,
    )


def _energy(targets: list[TargetStatus]) -> str | None:
    """``3.2 kJ (rapl)``: the energy every trainer reported, summed, and how each measured it."""
    measured = [t for t in targets if t.energy_joules is not None]
    if not measured:
        return None
    total = sum(t.energy_joules or 0.0 for t in measured)
    amount = f"{total / 1000:.1f} kJ" if total >= 1000 else f"{total:.0f} J"
    methods = ", ".join(sorted({t.energy_method or "unknown" for t in measured}))
    return f"{amount} ({methods})"


def transitions(old: EdgeTrainingJobStatus, new: EdgeTrainingJobStatus) -> list[tuple[str, str, bool]]:
    """Events for condition changes: (reason, message, warning). The reason is the condition type
    when it became True, ``Not<Type>`` style reasons when it became False."""
    before = {c.type: (c.status, c.reason) for c in old.conditions}
    events = []
    for c in new.conditions:
        if before.get(c.type) == (c.status, c.reason):
            continue
        if c.type in ("Failed", "Succeeded") and c.reason == "InProgress":
            continue
        warning = (c.type, c.status) in WARNING_CONDITIONS or c.reason in WARNING_REASONS
        if c.status == "False" and not warning and c.type != "DataSufficient":
            continue
        if c.status == "True" and c.type in QUIET and not warning:
            continue
        reason = c.type if c.status == "True" else c.reason
        events.append((reason, c.message or c.type, warning))
    return events


def same(a: EdgeTrainingJobStatus, b: EdgeTrainingJobStatus) -> bool:
    """Equal apart from timestamps that do not matter on their own."""
    return a.model_dump(exclude={"conditions"}) == b.model_dump(exclude={"conditions"}) and [
        (c.type, c.status, c.reason, c.message, c.observed_generation) for c in a.conditions
    ] == [(c.type, c.status, c.reason, c.message, c.observed_generation) for c in b.conditions]


def progress_only(old: EdgeTrainingJobStatus, new: EdgeTrainingJobStatus) -> bool:
    """Whether ``new`` differs from ``old`` in running trainers' progress alone (step, loss, memory,
    energy and the sums of them): a change the operator may write later, at most every
    ``progress_seconds`` per job, while every other change is written at once."""
    if len(old.targets) != len(new.targets):
        return False
    carried = [
        n.model_copy(update={name: getattr(o, name) for name in PROGRESS_FIELDS})
        for o, n in zip(old.targets, new.targets, strict=True)
    ]
    return same(old, new.model_copy(update={"targets": carried, "energy": old.energy, "devices": old.devices}))
