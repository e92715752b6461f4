"""A protocol test double of vLLM's OpenAI-compatible server, for unit tests of the agent's vLLM
backend. vLLM needs a GPU and cannot run on these machines; this double mirrors the documented
behaviour of the endpoints the backend uses and nothing more:

- ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` exist only when the server runs with
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` (404 otherwise); loading a name that is already loaded
  fails unless ``load_inplace`` is true; the folder must hold ``adapter_config.json`` and
  ``adapter_model.safetensors`` and the rank must not exceed ``--max-lora-rank``;
- ``/v1/models`` lists the base model and every loaded adapter (with its ``parent``);
- ``/reset_prefix_cache`` is counted;
- ``/v1/completions`` answers ``<model>|<adapter folder>|<prompt>`` so a test sees which adapter
  computed the answer.

The real server is exercised by the ``gpu``-marked test in tests/e2e/test_agent_vllm_gpu.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

from aiohttp import web

from edgetune_testenv.procs import free_port


class VllmDouble:
    def __init__(self, base: str = "base-model", *, runtime_updates: bool = True, max_lora_rank: int = 16) -> None:
        self.base = base
        self.runtime_updates = runtime_updates
        self.max_lora_rank = max_lora_rank
        self.loras: dict[str, str] = {}
        self.prefix_cache_resets = 0
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> VllmDouble:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/reset_prefix_cache", self._reset)
        if self.runtime_updates:
            app.router.add_post("/v1/load_lora_adapter", self._load)
            app.router.add_post("/v1/unload_lora_adapter", self._unload)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    async def _models(self, _: web.Request) -> web.Response:
        data = [{"id": self.base, "object": "model", "root": self.base, "parent": None}]
        data += [
            {"id": name, "object": "model", "root": path, "parent": self.base} for name, path in self.loras.items()
        ]
        return web.json_response({"object": "list", "data": data})

    async def _load(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(("load", body))
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return web.Response(status=400, text="Both 'lora_name' and 'lora_path' must be provided.")
        if name in self.loras and not body.get("load_inplace"):
            return web.Response(status=400, text=f"The lora adapter '{name}' has already been loaded.")
        folder = Path(path)
        if not (folder / "adapter_config.json").exists() or not (folder / "adapter_model.safetensors").exists():
            return web.Response(status=400, text=f"No adapter found for {path}")
        rank = json.loads((folder / "adapter_config.json").read_text()).get("r", 0)
        if rank > self.max_lora_rank:
            return web.Response(
                status=400, text=f"LoRA rank {rank} is greater than max_lora_rank {self.max_lora_rank}."
            )
        self.loras[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(("unload", body))
        if self.loras.pop(body.get("lora_name"), None) is None:
            return web.Response(status=404, text=f"The lora adapter '{body.get('lora_name')}' cannot be found.")
        return web.Response(text="Success")

    async def _reset(self, _: web.Request) -> web.Response:
        self.prefix_cache_resets += 1
        return web.Response(text="")

    async def _completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        model = body.get("model")
        if model != self.base and model not in self.loras:
            return web.json_response({"error": {"message": f"The model `{model}` does not exist."}}, status=404)
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        source = self.loras.get(model, "-")
        choices = [{"index": i, "text": f"{model}|{source}|{p}"} for i, p in enumerate(prompts)]
        return web.json_response({"object": "text_completion", "model": model, "choices": choices})
