"""Drive a vLLM server beside the agent through vLLM's runtime LoRA API.

The vLLM server (started with ``--enable-lora``, ``--max-lora-rank`` and the environment switch
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``) serves clients itself, under the served name
``<model_name>``: the agent decides which adapter that name means. Verified packages are written
as PEFT folders (``adapter_model.safetensors`` + ``adapter_config.json``) into a folder both
containers mount. Activation reloads ``<model_name>`` in place from that folder and then resets
the prefix cache (cached prefixes were computed with the previous adapter). Resident versions
are also loaded under ``<model_name>-<version>`` so that vLLM keeps them warm.

No torch here; the Open Inference Protocol endpoint forwards to ``/v1/completions``. Shadowing and
local evaluation need the logits in-process and are not offered by this backend.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import urllib3
from safetensors.numpy import save_file

from edgetune_agent.adapters import AdapterRefused, BaseIdentity, Delta
from edgetune_agent.backends import RequestError
from edgetune_agent.settings import AgentSettings


class VllmBackend:
    def __init__(self, settings: AgentSettings) -> None:
        if not settings.vllm_url or settings.vllm_adapter_dir is None:
            raise ValueError("the vllm backend needs --vllm-url and --vllm-adapter-dir")
        self.url = settings.vllm_url.rstrip("/")
        self.folder = settings.vllm_adapter_dir
        self.folder.mkdir(parents=True, exist_ok=True)
        self.served = settings.model_name
        self.max_lora_rank = settings.vllm_max_lora_rank
        self.base = BaseIdentity(uri=settings.base_uri, sha256=settings.base_sha256)
        self.http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=3, read=120), retries=False)
        self.paths: dict[str, Path] = {}

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            resp = self.http.request(method, self.url + path, body=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        except urllib3.exceptions.HTTPError as exc:
            raise AdapterRefused("BackendUnavailable", f"vLLM at {self.url} unreachable: {exc}") from exc
        text = resp.data.decode(errors="replace")
        if resp.status == 404 and "lora_adapter" in path:
            raise AdapterRefused("BackendRefused", f"vLLM at {self.url} has no {path}: start it with "
                                 "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora")  # fmt: skip
        if resp.status >= 300:
            raise AdapterRefused("BackendRefused", f"vLLM refused {path}: HTTP {resp.status}: {text[:500]}")
        try:
            return json.loads(text) if text.strip().startswith(("{", "[")) else text
        except ValueError:
            return text

    def models(self) -> list[str]:
        return [m["id"] for m in self._call("GET", "/v1/models").get("data", [])]

    def metadata(self) -> dict[str, Any]:
        return {"platform": "vllm", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
                "outputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}]}  # fmt: skip

    def add(self, name: str, delta: Delta) -> None:
        rank = int(delta.peft_config.get("r", 0))
        if rank > self.max_lora_rank:
            raise AdapterRefused(
                "BackendRefused", f"LoRA rank {rank} exceeds vLLM's --max-lora-rank {self.max_lora_rank}"
            )
        target = self.folder / name
        tmp = self.folder / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.astype("float16") for k, v in delta.tensors.items()}, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(_peft_folder_config(delta.peft_config), sort_keys=True))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        self.paths[name] = target
        self._call("POST", "/v1/load_lora_adapter", {"lora_name": f"{self.served}-{name}", "lora_path": str(target)})

    def remove(self, name: str) -> None:
        if self.paths.pop(name, None) is not None:
            self._call("POST", "/v1/unload_lora_adapter", {"lora_name": f"{self.served}-{name}"})
            shutil.rmtree(self.folder / name, ignore_errors=True)

    def activate(self, name: str | None) -> None:
        if name is None:
            if self.served in self.models():
                self._call("POST", "/v1/unload_lora_adapter", {"lora_name": self.served})
            return
        body = {"lora_name": self.served, "lora_path": str(self.paths[name]), "load_inplace": True}
        self._call("POST", "/v1/load_lora_adapter", body)
        self._call("POST", "/reset_prefix_cache")

    def predict(self, inputs: list[dict[str, Any]], parameters: dict[str, Any], adapter: str | None) -> list[
        dict[str, Any]
    ]:  # fmt: skip
        if len(inputs) != 1 or inputs[0].get("datatype") != "BYTES":
            raise RequestError("expected one BYTES input tensor (prompts)")
        prompts = inputs[0].get("data")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        model = self.served if adapter is not None else self.base.uri
        body = {"model": model, "prompt": prompts, "temperature": 0,
                "max_tokens": int(parameters.get("max_new_tokens", 16))}  # fmt: skip
        out = self._call("POST", "/v1/completions", body)
        texts = [c["text"] for c in sorted(out["choices"], key=lambda c: c["index"])]
        return [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]

    def evaluate(self, adapter: str | None) -> dict[str, float] | None:
        return None

    def close(self) -> None:
        self.http.clear()


def _peft_folder_config(slim: dict[str, Any]) -> dict[str, Any]:
    """The full adapter_config.json a PEFT folder carries: packages store only the fields that differ
    from peft's defaults, and vLLM reads the file without peft's defaults at hand."""
    from peft import PeftConfig  # noqa: PLC0415

    full = PeftConfig.from_peft_type(**slim).to_dict()  # type: ignore[no-untyped-call]
    return dict(json.loads(json.dumps(full, default=lambda o: sorted(o) if isinstance(o, set) else str(o))))
