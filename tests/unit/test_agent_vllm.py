"""The agent's vLLM backend against a protocol test double of vLLM (tests/vllm_double.py): vLLM
needs a GPU and cannot run here. What is checked is our side of the protocol: the PEFT folder we
write, the calls in the right order (load under the version's name, in-place reload of the served
name, prefix-cache reset), and clear refusals. The real server: tests/e2e/test_agent_vllm_gpu.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from edgetune_agent.adapters import AdapterRefused, Delta
from edgetune_agent.backends.vllm import VllmBackend
from edgetune_agent.settings import AgentSettings
from edgetune_api.assignment import AdapterAssignment
from tests.vllm_double import VllmDouble

SHA = "d" * 64
KEYS = ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")  # fmt: skip


def delta(rank: int = 8, seed: int = 0) -> Delta:
    rng = np.random.default_rng(seed)
    tensors = {KEYS[0]: rng.normal(size=(rank, 64)).astype(np.float32),
               KEYS[1]: rng.normal(size=(64, rank)).astype(np.float32)}  # fmt: skip
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 16, "target_modules": ["q_proj"]}
    return Delta(AdapterAssignment(version="1", uri="/x", sha256=SHA), None, tensors, config, Path("/x"), 0)  # type: ignore[arg-type]


def backend(server: VllmDouble, tmp: Path, **extra: Any) -> VllmBackend:
    settings = AgentSettings(base_uri="base-model", base_sha256="e" * 64, backend="vllm", vllm_url=server.url,
                             vllm_adapter_dir=tmp / "adapters", model_name="sensors", **extra)  # fmt: skip
    return VllmBackend(settings)


def prompt(text: str) -> list[dict[str, Any]]:
    return [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]


def test_add_activate_and_swap_in_place(tmp_path: Path) -> None:
    with VllmDouble() as server:
        b = backend(server, tmp_path)
        b.add("a1", delta(seed=1))
        folder = tmp_path / "adapters" / "a1"
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        assert sorted(load_file(str(folder / "adapter_model.safetensors"))) == sorted(KEYS)
        written = json.loads((folder / "adapter_config.json").read_text())
        assert written["r"] == 8 and written["target_modules"] == ["q_proj"]
        # The package's slim configuration, written out in full: vLLM reads it without peft's defaults.
        assert written["lora_dropout"] == 0.0 and written["bias"] == "none" and "use_rslora" in written
        assert "sensors-a1" in b.models() and "sensors" not in b.models()  # resident, not yet serving
        assert b.predict(prompt("hi"), {}, None)[0]["data"] == ["base-model|-|hi"]

        b.activate("a1")
        assert b.predict(prompt("hi"), {}, "a1")[0]["data"] == [f"sensors|{folder}|hi"]
        b.add("a2", delta(seed=2))
        b.activate("a2")  # the served name now means a2: reloaded in place, prefix cache reset
        assert b.predict(prompt("hi"), {}, "a2")[0]["data"] == [f"sensors|{tmp_path / 'adapters' / 'a2'}|hi"]
        assert [c[1].get("load_inplace", False) for c in server.calls if c[0] == "load"] == [False, True, False, True]
        assert server.prefix_cache_resets == 2
        b.remove("a1")
        assert "sensors-a1" not in b.models() and not folder.exists()
        b.activate(None)  # back to the bare base
        assert "sensors" not in b.models()


def test_rank_above_the_servers_limit_is_refused_before_any_call(tmp_path: Path) -> None:
    with VllmDouble(max_lora_rank=8) as server:
        b = backend(server, tmp_path, vllm_max_lora_rank=8)
        with pytest.raises(AdapterRefused) as info:
            b.add("big", delta(rank=32))
        assert info.value.reason == "BackendRefused" and "--max-lora-rank 8" in info.value.message
        assert server.calls == []


def test_a_server_without_runtime_lora_updates_is_named_as_the_cause(tmp_path: Path) -> None:
    with VllmDouble(runtime_updates=False) as server:
        with pytest.raises(AdapterRefused) as info:
            backend(server, tmp_path).add("a1", delta())
        assert info.value.reason == "BackendRefused" and "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in info.value.message


def test_an_unreachable_server_is_retryable(tmp_path: Path) -> None:
    with VllmDouble() as server:
        url = server.url
    settings = AgentSettings(base_uri="b", backend="vllm", vllm_url=url, vllm_adapter_dir=tmp_path / "a")
    with pytest.raises(AdapterRefused) as info:
        VllmBackend(settings).add("a1", delta())
    assert info.value.reason == "BackendUnavailable" and info.value.retryable
