"""The agent serving transformers bases (tiny models built from config here, no hub): a causal LM
with an adapter trained by the real trainer, and a text classifier, both over the Open Inference
Protocol's text tensors."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from edgetune_agent.adapters import PackageStore
from edgetune_agent.backends.torch import TorchBackend
from edgetune_agent.metrics import AgentMetrics
from edgetune_agent.runtime import AgentRuntime
from edgetune_agent.settings import AgentSettings
from edgetune_api.assignment import AdapterAssignment
from edgetune_trainer.__main__ import main as trainer_main
from edgetune_trainer.models import weights_sha256
from tests.agent_support import make_package
from tests.trainer_support import config, termination, write_config

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")


def runtime_for(base: Path, sha: str, tmp: Path, **extra: Any) -> AgentRuntime:
    settings = AgentSettings(base_uri=str(base), base_sha256=sha, cache_dir=tmp / "cache", threads=1, **extra)
    store = PackageStore(settings.cache_dir, trusted_keys={}, require_signature=False)
    return AgentRuntime(settings, TorchBackend(settings), store, AgentMetrics())


def texts(*values: str) -> list[dict[str, Any]]:
    return [{"name": "text", "datatype": "BYTES", "shape": [len(values)], "data": list(values)}]


def test_a_causal_lm_generates_differently_with_its_trained_adapter(tmp_path: Path) -> None:
    model_config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=160)
    transformers.GPT2LMHeadModel(model_config).save_pretrained(tmp_path / "base", safe_serialization=True)
    sha = weights_sha256(tmp_path / "base")
    data = tmp_path / "logs"
    data.mkdir()
    (data / "maintenance.txt").write_text("\n".join(f"pump {i % 4} pressure nominal" for i in range(120)) + "\n")
    cfg = config(
        tmp_path, data, baseModel={"uri": str(tmp_path / "base"), "sha256": sha},
        data={"format": "text", "evalFraction": 0.2}, peft={"r": 4, "alpha": 8, "targetModules": ["all-linear"]},
        training={"maxSteps": 40, "batchSize": 8, "learningRate": 0.02, "evalEvery": 40, "checkpointEvery": 40},
    )  # fmt: skip
    assert trainer_main(["--config", str(write_config(tmp_path, cfg))]) == 0
    digest = str(termination(tmp_path)["sha256"])
    runtime = runtime_for(tmp_path / "base", sha, tmp_path)
    params = {"max_new_tokens": 12}

    async def scenario() -> tuple[Any, Any, Any]:
        before, _ = await runtime.infer(texts("pump 2 pre"), params)
        assignment = AdapterAssignment(version="7", uri=str(tmp_path / "work" / "package"), sha256=digest)
        await runtime.apply(assignment, 0.0)
        after, used = await runtime.infer(texts("pump 2 pre"), params)
        return before, after, used

    before, after, used = asyncio.run(scenario())
    runtime.close()
    assert runtime.backend.metadata()["outputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert used is not None and used.version == "7"
    assert before[0]["data"] != after[0]["data"]
    assert after[0]["data"][0].startswith("ssure n"), after  # "pump 2 pre|ssure nominal": the site's own text


def test_a_text_classifier_answers_labels_and_swaps_adapters(tmp_path: Path) -> None:
    model_config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256, n_positions=64,
                                           num_labels=2, pad_token_id=0)  # fmt: skip
    transformers.GPT2ForSequenceClassification(model_config).save_pretrained(tmp_path / "base", safe_serialization=True)
    sha = weights_sha256(tmp_path / "base")
    digest = make_package(tmp_path / "pkg", tmp_path / "base", sha, seed=1, scale=2.0, num_labels=2)
    runtime = runtime_for(tmp_path / "base", sha, tmp_path, num_labels=2)

    async def scenario() -> tuple[Any, Any]:
        before, _ = await runtime.infer(texts("valve open", "valve stuck"), {})
        await runtime.apply(AdapterAssignment(version="1", uri=str(tmp_path / "pkg"), sha256=digest), 0.0)
        after, _ = await runtime.infer(texts("valve open", "valve stuck"), {})
        return before, after

    before, after = asyncio.run(scenario())
    runtime.close()
    assert [o["name"] for o in after] == ["label", "probabilities"] and after[1]["shape"] == [2, 2]
    assert set(after[0]["data"]) <= {"LABEL_0", "LABEL_1", "0", "1"}
    assert before[1]["data"] != after[1]["data"]
