"""The encoding quality gate: never ship weights that the encoding degraded beyond a bound.

The adapter is encoded, decoded and scored on the held-out split, as it will run at the edge.
If the held-out metric got worse by more than ``output.maxMetricDrop`` (accuracy: that much,
absolute; tasks without accuracy: loss up by that fraction), the next finer encoding is tried
(int4 → int8 → fp16 → fp32, which is exact). Without held-out data nothing can be scored, and the
decoded tensors' relative error (|decoded - trained| / |trained|, worst tensor) must stay within
``MAX_WEIGHT_ERROR`` instead. Every encoding tried is recorded, so the summary, the events and the
metrics say what happened.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from edgetune_trainer import package

FINER = {"int4-zstd": "int8-zstd", "int8-zstd": "fp16", "fp16": "fp32"}
MAX_WEIGHT_ERROR = 0.05
"""Without held-out data: worst relative error of a decoded tensor (int8: ~0.5 %, int4: 8 to 16 % on
the adapters measured; docs/trainer.md)."""


@dataclass
class Attempt:
    encoding: str
    weight_error: float
    metrics: dict[str, float]
    degradation: float | None
    """Accuracy lost (absolute) or loss gained (fraction) against the unencoded adapter; None
    when there was no held-out data to measure it."""
    ok: bool


@dataclass
class Choice:
    requested: str
    encoding: str
    metrics: dict[str, float]
    """Held-out metrics of the shipped (decoded) adapter."""
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def fell_back(self) -> bool:
        return self.encoding != self.requested


def weight_error(state: dict[str, torch.Tensor], decoded: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for name, tensor in state.items():
        ref = tensor.detach().float().cpu()
        norm = float(ref.norm())
        if norm > 0:
            worst = max(worst, float((decoded[name].float() - ref).norm()) / norm)
    return worst


def degradation(reference: dict[str, float], shipped: dict[str, float]) -> float | None:
    if "eval_accuracy" in reference and "eval_accuracy" in shipped:
        return reference["eval_accuracy"] - shipped["eval_accuracy"]
    if "eval_loss" in reference and "eval_loss" in shipped:
        return (shipped["eval_loss"] - reference["eval_loss"]) / max(abs(reference["eval_loss"]), 1e-12)
    return None


def choose(requested: str, state: dict[str, torch.Tensor], reference: dict[str, float], max_drop: float,
           score: Callable[[dict[str, torch.Tensor]], dict[str, float]]) -> Choice:  # fmt: skip
    """The coarsest encoding, starting at ``requested``, that keeps within the bound.

    ``reference``: held-out metrics of the adapter as trained (empty: no held-out data);
    ``score(decoded)``: held-out metrics with the decoded tensors loaded."""
    encoding = requested
    attempts: list[Attempt] = []
    while encoding != "fp32":
        decoded = package.decode(package.encode(state, encoding), encoding)
        error = weight_error(state, decoded)
        shipped = score(decoded) if reference else {}
        lost = degradation(reference, shipped)
        ok = (lost <= max_drop + 1e-9) if lost is not None else error <= MAX_WEIGHT_ERROR
        attempts.append(Attempt(encoding, error, shipped, lost, ok))
        if ok:
            return Choice(requested, encoding, shipped or dict(reference), attempts)
        encoding = FINER[encoding]
    attempts.append(Attempt("fp32", 0.0, dict(reference), 0.0 if reference else None, True))
    return Choice(requested, "fp32", dict(reference), attempts)
