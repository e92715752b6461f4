"""What goes into MLflow for an adapter: run name, params, metrics, lineage tags, aliases. Pure."""

from __future__ import annotations

import re

from edgetune_api.delta import DeltaManifest
from edgetune_api.training_job import EdgeTrainingJobSpec, TargetStatus
from edgetune_operator.reconcile.training_job import JobRef

TAG = "edgetune."


def run_name(job: JobRef, target: TargetStatus | None) -> str:
    where = "fedavg" if target is None else f"{target.cluster}-{target.node or 'cluster'}"
    return f"{job.namespace}-{job.name}-{where}"[:250]


def target_alias(alias: str, cluster: str, node: str | None) -> str:
    """Without aggregation, each trainer's adapter gets its own alias: ``<alias>-<cluster>[-<node>]``."""
    raw = f"{alias}-{cluster}" + (f"-{node}" if node else "")
    return re.sub(r"[^a-z0-9_-]", "-", raw.lower())[:255]


def params(spec: EdgeTrainingJobSpec, manifest: DeltaManifest) -> dict[str, str]:
    out = {
        "peft.method": spec.peft.method, "peft.r": str(spec.peft.r), "peft.alpha": str(spec.peft.alpha),
        "peft.dropout": str(spec.peft.dropout), "peft.target_modules": ",".join(spec.peft.target_modules),
        "training.max_steps": str(spec.training.max_steps), "training.batch_size": str(spec.training.batch_size),
        "training.learning_rate": str(spec.training.learning_rate), "training.optimizer": spec.training.optimizer,
        "training.precision": spec.training.precision, "training.seed": str(spec.training.seed),
        "training.gradient_accumulation": str(spec.training.gradient_accumulation),
        "budgets.memory": spec.budgets.memory, "encoding": manifest.encoding,
        "aggregation": spec.aggregation.strategy, "data.format": spec.data.format,
    }  # fmt: skip
    return out


def metric_values(manifest: DeltaManifest) -> dict[str, float]:
    values = {k: float(v) for k, v in manifest.metrics.items()}
    values["steps"] = float(manifest.steps)
    values["samples"] = float(manifest.lineage.samples)
    values["adapter_bytes"] = float(manifest.adapter_bytes)
    values["duration_s"] = float(manifest.duration_s)
    if manifest.energy_joules is not None:
        values["energy_joules"] = float(manifest.energy_joules)
    if manifest.peak_memory_bytes is not None:
        values["peak_memory_bytes"] = float(manifest.peak_memory_bytes)
    return values


def tags(job: JobRef, manifest: DeltaManifest, digest: str, uri: str) -> dict[str, str]:
    """Lineage: which job, where, from which base model and data, by which trainer."""
    lineage = manifest.lineage
    nodes = sorted({s.get("node") or "" for s in manifest.sources} - {""}) if manifest.sources else [lineage.node or ""]
    clusters = sorted({s.get("cluster") or "" for s in manifest.sources} - {""}) if manifest.sources else [
        lineage.cluster or ""]  # fmt: skip
    out = {
        "job": job.name, "namespace": job.namespace, "job_uid": job.uid,
        "cluster": ",".join(clusters), "nodes": ",".join(nodes),
        "base_model_uri": lineage.base_model_uri, "base_model_sha256": lineage.base_model_sha256 or "",
        "base_model_revision": lineage.base_model_revision or "", "device": lineage.device or "",
        "data_sha256": lineage.data_sha256, "trainer_version": lineage.trainer_version,
        "delta_sha256": digest, "delta_uri": uri, "encoding": manifest.encoding,
        "energy_method": manifest.energy_method or "", "aggregation": "fedavg" if manifest.sources else "none",
    }  # fmt: skip
    if manifest.sources:
        out["sources"] = ",".join(f"{s.get('node')}={s.get('digest')}" for s in manifest.sources)
    return {TAG + k: v for k, v in out.items() if v}
