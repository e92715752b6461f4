"""Small data sets and configurations for trainer tests (made here, never downloaded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def sine_classes(
    folder: Path, *, n: int = 240, channels: int = 3, length: int = 48, seed: int = 0, gain: float = 1.0
) -> Path:
    """Three classes of noisy multi-channel sines, saved as ``samples.npz`` (x, y)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    t = np.linspace(0, 1, length)
    x = np.stack(
        [
            np.stack(
                [
                    np.sin(2 * np.pi * (k + 1) * (c + 1) * t + rng.normal(0, 0.3)) + rng.normal(0, 0.3, length)
                    for k in range(channels)
                ]
            )
            for c in y
        ]
    )
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "samples.npz", x=(x * gain).astype(np.float32), y=y)
    return folder


def config(tmp: Path, data_dir: Path, /, **overrides: Any) -> dict[str, Any]:
    """A trainer config for ``data_dir``; keyword arguments are merged into spec.training / budgets / runtime."""
    cfg: dict[str, Any] = {
        "spec": {
            "baseModel": {"uri": "builtin:timeseries-cnn"},
            "data": {"source": {"hostPath": "/data"}, "format": "npy", "evalFraction": 0.2},
            "training": {
                "maxSteps": 12,
                "batchSize": 16,
                "evalEvery": 4,
                "checkpointEvery": 4,
                "learningRate": 0.01,
                "seed": 3,
            },
            "budgets": {"memory": "4Gi"},
            "output": {"s3": {"bucket": "adapters"}, "mlflow": {"registeredModel": "m"}, "encoding": "fp16"},
        },
        "runtime": {
            "dataDir": str(data_dir),
            "workDir": str(tmp / "work"),
            "terminationLog": str(tmp / "termination-log"),
            "threads": 1,
        },
    }
    for section in ("training", "budgets", "data", "peft", "output", "baseModel", "placement"):
        cfg["spec"].setdefault(section, {}).update(overrides.pop(section, {}))
    cfg["runtime"].update(overrides.pop("runtime", {}))
    if overrides:
        raise TypeError(f"unknown overrides {sorted(overrides)}")
    return cfg


def write_config(tmp: Path, cfg: dict[str, Any]) -> Path:
    path = tmp / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def spawn(config_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """The trainer CLI as a separate process (as the pod runs it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "edgetune_trainer", "--config", str(config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def events(lines: list[str]) -> list[dict[str, Any]]:
    out = []
    for raw in lines:
        line = raw.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def termination(tmp: Path) -> dict[str, Any]:
    return json.loads((tmp / "termination-log").read_text())  # type: ignore[no-any-return]
