"""The trainer on a CUDA GPU: skipped without one (CI has none); run on a lent GPU machine by
bench/bench_trainer_gpu.py's device command, next to the benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgetune_api.trainer_config import TrainerConfig
from edgetune_trainer import models
from edgetune_trainer.data import NodeDataset
from edgetune_trainer.loop import TrainingRun
from tests.trainer_support import config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


class _Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, **fields: Any) -> None:
        self.seen.append((name, fields))

    def gauge(self, name: str, value: float, **extra: str) -> None:
        pass


def test_training_steps_on_a_gpu_never_wait_for_it(tmp_path: Path) -> None:
    """A step queues its work and returns: no host sync (reading the loss, a pageable copy of the
    batch, boolean indexing in the loss) until the next step is queued, so the GPU never idles
    while the host prepares a batch. The steps are still all reported, in order, with real losses."""
    llama = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=128, vocab_size=256, max_position_embeddings=128)  # fmt: skip
    transformers.LlamaForCausalLM(llama).save_pretrained(tmp_path / "base", safe_serialization=True)
    data = tmp_path / "text"
    data.mkdir()
    (data / "lines.txt").write_text("\n".join(f"valve {i % 7} pressure {i % 5} nominal" * 3 for i in range(200)))
    cfg = config(
        tmp_path, data,
        baseModel={"uri": str(tmp_path / "base"), "sha256": models.weights_sha256(tmp_path / "base")},
        data={"format": "text", "evalFraction": 0.1, "sequenceLength": 64},
        peft={"r": 4, "alpha": 8, "targetModules": ["all-linear"]},
        training={"maxSteps": 8, "batchSize": 8, "evalEvery": 1000, "checkpointEvery": 1000, "precision": "bf16"},
        runtime={"device": "cuda"},
    )  # fmt: skip
    trainer_config = TrainerConfig.model_validate(cfg)
    base = models.load_base(tmp_path / "base", models.weights_sha256(tmp_path / "base"))
    dataset = NodeDataset(data, trainer_config.spec.data, None)
    events = _Events()
    run = TrainingRun(trainer_config, base, dataset, events, device=torch.device("cuda"))
    # The frozen base is stored in bf16 (as a bare loop loads it), the adapter in float32.
    dtypes = {(p.requires_grad, p.dtype) for p in run.model.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}

    from edgetune_trainer.loop import _micro_batches  # noqa: PLC0415

    micro = _micro_batches(dataset, 3, run.state.cursor, run.batch_size)
    run.optimizer_step(micro)  # warm-up: the first step allocates (pinned buffers, optimizer state)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            run.optimizer_step(micro)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    run.report_steps()
    steps = [fields for name, fields in events.seen if name == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert [h["step"] for h in run.state.history] == [1, 2, 3, 4]
    assert all(0 < s["loss"] < 10 for s in steps)  # byte-level: an untrained model scores about ln(256)
