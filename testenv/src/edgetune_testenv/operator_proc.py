"""The edgetune operator as a real process against a local control plane (``python -m edgetune_operator``),
so tests can kill it at any moment and start it again."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from edgetune_testenv.cluster import EXECUTOR_LABEL, ControlPlane
from edgetune_testenv.procs import ManagedProcess, free_port, http_ok


class OperatorProcess:
    def __init__(self, hub: ControlPlane, workdir: Path, env: Mapping[str, str], trainer_image: str) -> None:
        self.hub = hub
        self.workdir = workdir
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("EDGETUNE_", "AWS_"))},
            "KUBECONFIG": str(hub.kubeconfig),
            "EDGETUNE_TRAINER_IMAGE": trainer_image,
            "EDGETUNE_TRAINER_LABELS": json.dumps({EXECUTOR_LABEL: "local"}),
            "EDGETUNE_METRICS_PORT": str(self.metrics_port),
            "EDGETUNE_HEALTH_PORT": str(self.health_port),
            "EDGETUNE_RESYNC_SECONDS": "2",
            "EDGETUNE_TERMINATION_GRACE_SECONDS": "10",
            "PYTHONUNBUFFERED": "1",
            "MALLOC_ARENA_MAX": "2",  # as the chart sets it: a threaded Python's RSS stays flatter
            **env,
        }
        self.starts = 0
        self.proc: ManagedProcess | None = None

    def start(self, timeout: float = 60.0) -> OperatorProcess:
        self.starts += 1
        self.proc = ManagedProcess(
            "edgetune-operator", [sys.executable, "-m", "edgetune_operator"], self.workdir / "operator.log",
            env=self.env, ports=(self.metrics_port, self.health_port),
        )  # fmt: skip
        self.proc.start()
        self.proc.wait_until(lambda: http_ok(f"http://127.0.0.1:{self.health_port}/healthz"), timeout, "live")
        return self

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, as when a node dies."""
        if self.proc and self.proc.alive() and self.proc.proc is not None:
            self.proc.proc.send_signal(signal.SIGKILL)
            self.proc.proc.wait(30)

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    def dump_stacks(self) -> None:
        """Have the operator write every thread's stack into its log (its SIGUSR1 handler)."""
        if self.proc and self.proc.alive() and self.proc.proc is not None:
            self.proc.proc.send_signal(signal.SIGUSR1)
            time.sleep(0.5)

    def log_tail(self, chars: int = 4000) -> str:
        return self.proc.log_tail(chars) if self.proc else "(not started)"

    def __enter__(self) -> OperatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
