"""FedAvg of per-node adapters (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from edgetune_operator.delta.fedavg import AggregationError, fedavg


def test_sample_weighted_average() -> None:
    a = {"lora_A": np.full((2, 3), 1.0, dtype=np.float32), "lora_B": np.zeros((3, 2), dtype=np.float32)}
    b = {"lora_A": np.full((2, 3), 4.0, dtype=np.float32), "lora_B": np.ones((3, 2), dtype=np.float32)}
    out = fedavg([a, b], [100, 200])
    assert np.allclose(out["lora_A"], 3.0)  # (1*100 + 4*200) / 300
    assert np.allclose(out["lora_B"], 2 / 3)
    assert out["lora_A"].dtype == np.float32
    assert np.array_equal(fedavg([a], [5])["lora_A"], a["lora_A"])  # one participant: itself


@pytest.mark.parametrize(
    ("adapters", "samples", "message"),
    [
        ([{"x": np.zeros(2)}, {"y": np.zeros(2)}], [1, 1], "adapter 1 has tensors"),
        ([{"x": np.zeros(2)}, {"x": np.zeros(3)}], [1, 1], r"x: shape \(3,\) in adapter 1"),
        ([{"x": np.zeros(2)}], [0], "not all zero"),
        ([{"x": np.zeros(2)}], [1, 2], "one sample count per adapter"),
    ],
)
def test_mismatches_are_refused(adapters: list[dict[str, np.ndarray]], samples: list[int], message: str) -> None:
    with pytest.raises(AggregationError, match=message):
        fedavg(adapters, samples)
