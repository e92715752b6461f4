"""HTTP: the Open Inference Protocol (KServe v2 REST) plus ``/metrics``.

``/v2/health/live``, ``/v2/health/ready``, ``/v2``, ``/v2/models/{name}``,
``/v2/models/{name}/ready``, ``POST /v2/models/{name}[/versions/{version}]/infer``. A response's
``model_version`` is the adapter version that computed it (``base`` for the bare base model), and
``parameters`` carry its package digest, so a client sees exactly which adapter answered.
"""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from edgetune_agent.backends import RequestError
from edgetune_agent.runtime import BASE_VERSION, AgentRuntime

PROTOCOL_VERSION = "2"
RUNTIME: web.AppKey[AgentRuntime] = web.AppKey("runtime", AgentRuntime)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def live(_: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    ok = request.app[RUNTIME].ready
    return web.json_response({"ready": ok}, status=200 if ok else 503)


async def server_metadata(request: web.Request) -> web.Response:
    return web.json_response({"name": "edgetune-agent", "version": PROTOCOL_VERSION, "extensions": []})


def _model_or_404(request: web.Request) -> AgentRuntime | web.Response:
    runtime = request.app[RUNTIME]
    name = request.match_info["name"]
    if name != runtime.settings.model_name:
        return _error(404, f"model {name!r} not found; this agent serves {runtime.settings.model_name!r}")
    return runtime


async def model_metadata(request: web.Request) -> web.Response:
    runtime = _model_or_404(request)
    if isinstance(runtime, web.Response):
        return runtime
    versions = [BASE_VERSION, *(a.version for a in runtime.resident.values())]
    return web.json_response({"name": runtime.settings.model_name, "versions": versions,
                              **runtime.backend.metadata()})  # fmt: skip


async def model_ready(request: web.Request) -> web.Response:
    runtime = _model_or_404(request)
    if isinstance(runtime, web.Response):
        return runtime
    return web.json_response({"name": runtime.settings.model_name, "ready": runtime.ready},
                             status=200 if runtime.ready else 503)  # fmt: skip


def _body(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise RequestError("expected a JSON object with an 'inputs' list (Open Inference Protocol)")
    return body


async def infer(request: web.Request) -> web.Response:
    started = time.perf_counter()
    runtime = _model_or_404(request)
    if isinstance(runtime, web.Response):
        return runtime
    metrics = runtime.metrics
    labels = runtime.labels(runtime.active)
    try:
        body = _body(await request.json(loads=json.loads))
        wanted = request.match_info.get("version")
        if wanted is not None and wanted != labels[1]:
            return _error(404, f"version {wanted!r} is not the one serving ({labels[1]!r})")
        outputs, used = await runtime.infer(body["inputs"], body.get("parameters") or {})
    except (RequestError, ValueError) as exc:
        metrics.request_errors.labels(*labels, "400").inc()
        return _error(400, str(exc))
    except Exception as exc:
        metrics.request_errors.labels(*labels, "500").inc()
        return _error(500, f"inference failed: {exc}")
    labels = runtime.labels(used)
    requested = {o.get("name") for o in body.get("outputs") or [] if isinstance(o, dict)}
    if requested:
        outputs = [o for o in outputs if o["name"] in requested]
    response: dict[str, Any] = {
        "model_name": runtime.settings.model_name,
        "model_version": labels[1],
        "outputs": outputs,
        "parameters": {"adapter_sha256": used.sha256 if used else "", "release": labels[2]},
    }
    if "id" in body:
        response["id"] = body["id"]
    metrics.requests.labels(*labels).inc()
    metrics.request_seconds.labels(*labels).observe(time.perf_counter() - started)
    return web.json_response(response)


async def prometheus(request: web.Request) -> web.Response:
    data = request.app[RUNTIME].metrics.exposition()
    return web.Response(body=data, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def make_app(runtime: AgentRuntime) -> web.Application:
    app = web.Application(client_max_size=64 * 2**20)
    app[RUNTIME] = runtime
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2", server_metadata)
    app.router.add_get("/v2/models/{name}", model_metadata)
    app.router.add_get("/v2/models/{name}/ready", model_ready)
    app.router.add_post("/v2/models/{name}/infer", infer)
    app.router.add_post("/v2/models/{name}/versions/{version}/infer", infer)
    app.router.add_get("/metrics", prometheus)
    return app
