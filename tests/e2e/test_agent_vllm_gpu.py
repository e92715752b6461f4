"""The agent's vLLM backend against a real vLLM server on a GPU (skipped where there is none, or no
vllm package). A small Llama-shaped model is built from its config (no download), a LoRA adapter
for it is packaged as the trainer would, and the agent loads it into vLLM at runtime, switches the
served name to it, and back."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from edgetune_agent.adapters import PackageStore
from edgetune_agent.backends.vllm import VllmBackend
from edgetune_agent.settings import AgentSettings
from edgetune_api.assignment import AdapterAssignment
from edgetune_testenv.procs import free_port

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def _gpu_and_vllm() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch  # noqa: PLC0415

    return bool(torch.cuda.is_available())


@pytest.mark.skipif(not _gpu_and_vllm(), reason="needs a CUDA GPU and the vllm package")
def test_real_vllm_loads_swaps_and_unloads_an_edgetune_adapter(tmp_path: Path) -> None:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    from edgetune_api.delta import Lineage  # noqa: PLC0415
    from edgetune_trainer import models, package  # noqa: PLC0415

    base = tmp_path / "base"
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(base, safe_serialization=True)
    base_sha = models.weights_sha256(base)
    peft_model = get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base),
                                LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))  # fmt: skip
    state = {k: torch.randn_like(v) * 0.5 for k, v in models.adapter_state(peft_model).items()}
    peft_config = json.loads(json.dumps(peft_model.peft_config["default"].to_dict(),
                                        default=lambda o: sorted(o) if isinstance(o, set) else str(o)))  # fmt: skip
    lineage = Lineage(base_model_uri=str(base), base_model_sha256=base_sha, data_sha256="0" * 64, samples=1,
                      data_format="text", trainer_version="test")  # fmt: skip
    digest, _ = package.build(tmp_path / "pkg", state, encoding="fp16", peft_config=peft_config, lineage=lineage,
                              steps=1, duration_s=0, metrics={}, energy_joules=None, energy_method=None,
                              peak_memory_bytes=None, signing_key_pem=None)  # fmt: skip

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base), "--port", str(port),
         "--enable-lora", "--max-lora-rank", "16", "--max-model-len", "256", "--gpu-memory-utilization", "0.2",
         "--tokenizer", str(base), "--skip-tokenizer-init"],
        env={**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=2)  # noqa: S310
                break
            except OSError:
                time.sleep(2)
        settings = AgentSettings(base_uri=str(base), base_sha256=base_sha, backend="vllm", vllm_url=url,
                                 vllm_adapter_dir=tmp_path / "adapters", cache_dir=tmp_path / "cache")  # fmt: skip
        backend = VllmBackend(settings)
        store = PackageStore(settings.cache_dir, trusted_keys={}, require_signature=False)
        delta = store.load(AdapterAssignment(version="1", uri=str(tmp_path / "pkg"), sha256=digest), backend.base)
        backend.add("a1", delta)
        backend.activate("a1")
        assert "edgetune" in backend.models() and "edgetune-a1" in backend.models()
        backend.activate(None)
        assert "edgetune" not in backend.models()
        backend.remove("a1")
        assert "edgetune-a1" not in backend.models()
    finally:
        server.terminate()
        server.wait(60)
