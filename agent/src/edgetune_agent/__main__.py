"""``python -m edgetune_agent``: serve the base model, run what the pod's assignment names.

Start-up: the base model is fetched and verified first, then the port opens (live and ready),
then the assignment loop runs. SIGTERM stops accepting, finishes requests in flight, exits 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys

from aiohttp import web

from edgetune_agent.adapters import PackageStore, load_trusted_keys
from edgetune_agent.backends import Backend
from edgetune_agent.metrics import AgentMetrics
from edgetune_agent.report import PodReporter
from edgetune_agent.runtime import AgentRuntime
from edgetune_agent.server import make_app
from edgetune_agent.settings import AgentSettings, parse_args

log = logging.getLogger("edgetune_agent")


def make_backend(settings: AgentSettings) -> Backend:
    if settings.backend == "vllm":
        from edgetune_agent.backends.vllm import VllmBackend  # noqa: PLC0415

        return VllmBackend(settings)
    from edgetune_agent.backends.torch import TorchBackend  # noqa: PLC0415

    return TorchBackend(settings)


async def serve(settings: AgentSettings) -> None:
    metrics = AgentMetrics()
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    trusted = load_trusted_keys(settings.trusted_keys_dir)
    store = PackageStore(settings.cache_dir, trusted_keys=trusted, require_signature=settings.require_signature,
                         s3_endpoint=settings.s3_endpoint, mlflow_uri=settings.mlflow_uri)  # fmt: skip
    loop = asyncio.get_running_loop()
    backend = await loop.run_in_executor(None, make_backend, settings)
    runtime = AgentRuntime(settings, backend, store, metrics)
    runtime._info(None, "active", 1)
    reporter = PodReporter.in_cluster(settings.pod_namespace, settings.pod_name, settings.pod_uid, metrics) \
        if settings.report else None  # fmt: skip
    if reporter is not None:
        runtime.on_report = reporter.publish
    app = make_app(runtime)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=10)
    await runner.setup()
    for host in settings.hosts:
        await web.TCPSite(runner, host, settings.port).start()
    runtime.ready = True
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(json.dumps({"event": "serving", "model": settings.model_name, "base": backend.base.uri,
                         "base_sha256": backend.base.sha256, "hosts": settings.hosts, "port": settings.port,
                         "trusted_keys": len(trusted), "reporting": reporter is not None}))  # fmt: skip
    tasks = [asyncio.create_task(runtime.run(stop)), asyncio.create_task(runtime.watch_revocations(stop))]
    if reporter is not None:
        tasks.append(asyncio.create_task(reporter.run(stop)))
    await stop.wait()
    runtime.ready = False
    await asyncio.gather(*tasks, return_exceptions=True)
    await runner.cleanup()
    runtime.close()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    settings = parse_args(argv)
    try:
        asyncio.run(serve(settings))
    except Exception as exc:
        log.error(json.dumps({"event": "failed", "error": f"{type(exc).__name__}: {exc}"}))  # noqa: TRY400
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
