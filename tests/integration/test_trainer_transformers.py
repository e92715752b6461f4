"""A Hugging Face transformers base (a tiny GPT-2 built from config here, no hub) fine-tuned with
LoRA on node-local text: the same loop, package and verification as the sensor models."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgetune_api.delta import read_folder, verify_package
from edgetune_trainer.__main__ import main
from edgetune_trainer.models import weights_sha256
from tests.trainer_support import config, termination, write_config

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")


def test_lora_on_a_tiny_gpt2_from_a_local_folder(tmp_path: Path) -> None:
    model_config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=160)
    transformers.GPT2LMHeadModel(model_config).save_pretrained(tmp_path / "base", safe_serialization=True)
    digest = weights_sha256(tmp_path / "base")
    data = tmp_path / "logs"
    data.mkdir()
    lines = [f"pump {i % 4} pressure nominal, valve {i % 3} open" for i in range(120)]
    (data / "maintenance.txt").write_text("\n".join(lines) + "\n")

    cfg = config(
        tmp_path, data,
        baseModel={"uri": str(tmp_path / "base"), "sha256": digest},
        data={"format": "text", "evalFraction": 0.2},
        peft={"r": 4, "alpha": 8, "targetModules": ["all-linear"]},
        training={"maxSteps": 30, "batchSize": 8, "learningRate": 0.01, "evalEvery": 30, "checkpointEvery": 15},
    )  # fmt: skip
    assert main(["--config", str(write_config(tmp_path, cfg))]) == 0
    summary = termination(tmp_path)
    manifest = verify_package(read_folder(tmp_path / "work" / "package"), expected_digest=str(summary["sha256"]))
    assert manifest.lineage.base_model_sha256 == digest
    assert manifest.peft["r"] == 4 and manifest.peft["peft_type"] == "LORA"
    assert summary["metrics"]["eval_loss"] < 5.0  # an untrained byte-level model scores ln(256) = 5.55
    # The delta is a small fraction of the base.
    assert summary["adapterBytes"] * 20 < (tmp_path / "base" / "model.safetensors").stat().st_size
