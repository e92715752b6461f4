"""Which nodes of a cluster may train a job, whether they hold enough data, and the trainers
(targets) that follow. Pure: nodes come in as the apiserver returns them.

How a node reports its samples: the annotation ``edgetune.io/samples`` holds a JSON object from
data location to sample count, e.g. ``{"/var/lib/edgetune/sensors": 1200, "pvc:line-3": 80}``.
A node-local data agent (or the pipeline that lands the data) keeps it current with
``kubectl annotate --overwrite``. Keys are the job's ``data.source.hostPath``, or ``pvc:<claimName>``
for PVC sources. A job with ``minSamples: 1`` (the default) does not need a report: it trains
wherever the node matches; a larger ``minSamples`` needs a report of at least that many.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from edgetune_api.meta import parse_quantity
from edgetune_api.training_job import EdgeTrainingJobSpec
from edgetune_operator.settings import AcceleratorProfile

SAMPLES_ANNOTATION = "edgetune.io/samples"


def data_key(spec: EdgeTrainingJobSpec) -> str:
    """The key under which nodes report this job's samples."""
    source = spec.data.source
    if source.host_path:
        return source.host_path.rstrip("/") or "/"
    assert source.persistent_volume_claim is not None  # noqa: S101 - guaranteed by the CRD's CEL rule
    return f"pvc:{source.persistent_volume_claim.claim_name}"


@dataclass(frozen=True)
class Node:
    name: str
    labels: dict[str, str]
    allocatable: dict[str, str]
    ready: bool
    schedulable: bool
    samples: dict[str, int]

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Node:
        meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        try:
            raw = json.loads((meta.get("annotations") or {}).get(SAMPLES_ANNOTATION) or "{}")
            samples = {str(k): int(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
        except (ValueError, TypeError):
            samples = {}  # a malformed report counts as no report
        return cls(
            name=meta["name"], labels=dict(meta.get("labels") or {}), allocatable=dict(status.get("allocatable") or {}),
            ready=ready, schedulable=not spec.get("unschedulable", False), samples=samples,
        )  # fmt: skip

    def has_resource(self, resource: str, count: int = 1) -> bool:
        try:
            return parse_quantity(self.allocatable.get(resource, "0")) >= count
        except ValueError:
            return False


def accelerator_resources(profiles: dict[str, list[AcceleratorProfile]]) -> set[str]:
    return {p.resource for kind in ("gpu", "npu") for p in profiles.get(kind, []) if p.resource}


def node_profile(
    spec: EdgeTrainingJobSpec, node: Node, profiles: dict[str, list[AcceleratorProfile]]
) -> AcceleratorProfile | None:
    """The profile under which ``node`` can run this job's trainer, or None."""
    placement = spec.placement
    if any(node.labels.get(k) != v for k, v in placement.node_selector.items()):
        return None
    kind = placement.accelerator
    if kind == "any":
        return AcceleratorProfile()
    if kind == "cpu":  # keep accelerator nodes for the work that needs them
        busy = accelerator_resources(profiles)
        return AcceleratorProfile() if not any(node.has_resource(r) for r in busy) else None
    for profile in profiles.get(kind, []):
        if profile.resource and not node.has_resource(profile.resource, placement.accelerator_count):
            continue
        if any(node.labels.get(k) != v for k, v in profile.node_labels.items()):
            continue
        return profile
    return None


@dataclass
class ClusterPlan:
    """The trainers a cluster should run for a job, or why none yet."""

    targets: list[tuple[str | None, AcceleratorProfile, list[str]]] = field(default_factory=list)
    """(node for perNode else None, profile, candidate nodes)."""
    matching: int = 0
    """Nodes that match the placement (accelerator, selector), ready and schedulable."""
    waiting: str | None = None
    """Why there are no targets: a sentence for the DataSufficient condition."""
    samples: dict[str, int] = field(default_factory=dict)
    """Reported samples of matching nodes."""


def plan(cluster: str, spec: EdgeTrainingJobSpec, nodes: list[Node],
         profiles: dict[str, list[AcceleratorProfile]]) -> ClusterPlan:  # fmt: skip
    key = data_key(spec)
    need = spec.data.min_samples
    out = ClusterPlan()
    sufficient: list[tuple[Node, AcceleratorProfile]] = []
    short: list[str] = []
    for node in sorted(nodes, key=lambda n: n.name):
        if not (node.ready and node.schedulable):
            continue
        profile = node_profile(spec, node, profiles)
        if profile is None:
            continue
        out.matching += 1
        reported = node.samples.get(key)
        if reported is not None:
            out.samples[node.name] = reported
        if (reported if reported is not None else (1 if need <= 1 else 0)) >= need:
            sufficient.append((node, profile))
        else:
            short.append(f"{node.name} has {'no report' if reported is None else reported}")
    if out.matching == 0:
        out.waiting = f"no ready node in cluster {cluster} matches accelerator {spec.placement.accelerator}" + (
            f" and nodeSelector {spec.placement.node_selector}" if spec.placement.node_selector else ""
        )
        return out  # fmt: skip
    if not sufficient:
        shown = ", ".join(short[:5]) + (f" and {len(short) - 5} more" if len(short) > 5 else "")
        out.waiting = f"cluster {cluster}: no node reports {need} samples under {key!r} yet ({shown})"
        return out
    if spec.placement.per_node:
        chosen = sufficient[: spec.placement.max_nodes] if spec.placement.max_nodes else sufficient
        out.targets = [(node.name, profile, [node.name]) for node, profile in chosen]
    else:
        first = sufficient[0][1]
        out.targets = [(None, first, [n.name for n, p in sufficient if p == first])]
    return out
