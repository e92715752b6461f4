"""FedAvg of per-node LoRA adapters, without torch (numpy + safetensors only).

Each node's adapter tensors are averaged, weighted by the node's sample count. As in the usual
federated-LoRA practice the A and B factors are averaged separately (an approximation of averaging
the products B·A, exact when the nodes' factors agree); all adapters must share the same
configuration (rank, targets), which the operator checks from the manifests first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class AggregationError(ValueError):
    """The adapters cannot be averaged (different tensors, shapes, or no samples)."""


def fedavg(adapters: Sequence[dict[str, np.ndarray]], samples: Sequence[int]) -> dict[str, np.ndarray]:
    """Sample-weighted average of adapters given as ``{tensor name: float array}``."""
    if not adapters or len(adapters) != len(samples):
        raise AggregationError(
            f"need one sample count per adapter, got {len(adapters)} adapters and {len(samples)} counts"
        )
    total = float(sum(samples))
    if total <= 0 or any(n < 0 for n in samples):
        raise AggregationError(f"sample counts must be non-negative and not all zero, got {list(samples)}")
    names = set(adapters[0])
    for i, adapter in enumerate(adapters[1:], start=1):
        if set(adapter) != names:
            raise AggregationError(
                f"adapter {i} has tensors {sorted(set(adapter) ^ names)[:5]} the first one lacks or has"
            )
        for name in names:
            if adapter[name].shape != adapters[0][name].shape:
                raise AggregationError(
                    f"{name}: shape {adapter[name].shape} in adapter {i}, {adapters[0][name].shape} in adapter 0"
                )
    return {
        name: sum((a[name].astype(np.float64) * (n / total) for a, n in zip(adapters, samples, strict=True)),
                  start=np.zeros(adapters[0][name].shape)).astype(np.float32)
        for name in sorted(names)
    }  # fmt: skip
