"""Crash-safe checkpoints: adapter, optimizer, scheduler, RNG states and data cursor.

A checkpoint is a folder ``step-00000123`` written as ``.tmp-step-…`` first: every file is
fsynced, a ``COMPLETE`` marker with the SHA-256 of each file is written last, the folder is
renamed into place and the parent directory fsynced. Loading takes the newest folder whose
marker verifies and skips (and reports) any other. Older checkpoints beyond ``keep`` are removed
only after a newer one is in place, so the last good checkpoint is never at risk.
"""

from __future__ import annotations

import copy
import io
import json
import os
import random
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetune_api.delta import sha256_file

MARKER = "COMPLETE"
PREFIX = "step-"


@dataclass
class Cursor:
    """Where in the data the run is: epoch and training samples consumed in it."""

    epoch: int = 0
    position: int = 0


@dataclass
class TrainState:
    step: int
    cursor: Cursor
    best_eval: float | None
    evals_without_improvement: int
    history: list[dict[str, float]]
    elapsed_s: float
    energy_j: float
    identity: dict[str, str] = field(default_factory=dict)
    """What produced the checkpoint (digests of the base, the data and the settings that shape the
    run): a run resumes only from checkpoints with its own identity."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    root: Path,
    state: TrainState,
    *,
    adapter: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    extra_rng: dict[str, Any],
    keep: int = 2,
    rng: dict[str, Any] | None = None,
) -> Path:
    """Write one checkpoint atomically; return its folder. ``rng`` defaults to the states now."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"{PREFIX}{state.step:08d}"
    tmp = root / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    payload = {
        "adapter.pt": adapter,
        "optimizer.pt": optimizer,
        "scheduler.pt": scheduler,
        "rng.pt": {**(rng if rng is not None else rng_state()), **extra_rng},
    }
    for filename, obj in payload.items():
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        _write(tmp / filename, buffer.getvalue())
    meta = {
        "step": state.step,
        "cursor": {"epoch": state.cursor.epoch, "position": state.cursor.position},
        "best_eval": state.best_eval,
        "evals_without_improvement": state.evals_without_improvement,
        "history": state.history,
        "elapsed_s": state.elapsed_s,
        "energy_j": state.energy_j,
        "identity": state.identity,
    }
    _write(tmp / "state.json", json.dumps(meta).encode())
    digests = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
    _write(tmp / MARKER, json.dumps(digests, sort_keys=True).encode())
    _fsync_dir(tmp)
    final = root / name
    if final.exists():  # same step written twice (SIGTERM right after a periodic save)
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(root)
    for old in sorted(p for p in root.iterdir() if p.name.startswith(PREFIX))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _valid(folder: Path) -> bool:
    try:
        digests = json.loads((folder / MARKER).read_text())
        return all(sha256_file(folder / name) == digest for name, digest in digests.items())
    except (OSError, ValueError):
        return False


@dataclass
class Loaded:
    folder: Path
    state: TrainState
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]


def load_latest(root: Path) -> tuple[Loaded | None, list[str]]:
    """The newest checkpoint that verifies (or None), and the names of corrupt ones skipped."""
    skipped: list[str] = []
    if not root.exists():
        return None, skipped
    for folder in sorted((p for p in root.iterdir() if p.name.startswith(PREFIX)), reverse=True):
        if not _valid(folder):
            skipped.append(folder.name)
            continue
        meta = json.loads((folder / "state.json").read_text())
        state = TrainState(
            step=meta["step"],
            cursor=Cursor(**meta["cursor"]),
            best_eval=meta["best_eval"],
            evals_without_improvement=meta["evals_without_improvement"],
            history=meta["history"],
            elapsed_s=meta["elapsed_s"],
            energy_j=meta["energy_j"],
            identity=dict(meta.get("identity") or {}),
        )

        def load(name: str, folder: Path = folder) -> Any:
            return torch.load(folder / name, map_location="cpu", weights_only=False)  # our own files

        loaded = Loaded(folder, state, load("adapter.pt"), load("optimizer.pt"), load("scheduler.pt"), load("rng.pt"))
        return loaded, skipped
    return None, skipped


class BackgroundWriter:
    """Writes checkpoints on a thread while training goes on.

    ``submit`` snapshots everything (tensors cloned, RNG states taken now) and returns at once;
    serialising and fsyncing happen beside the next step. At most one write is in flight:
    ``wait`` (called before each step and before exiting) finishes it and re-raises its error.
    So when step N has started, checkpoint N-1 is on disk: a crash loses at most one step.
    """

    def __init__(self, root: Path, keep: int = 2) -> None:
        self.root = root
        self.keep = keep
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(
        self,
        state: TrainState,
        *,
        adapter: dict[str, torch.Tensor],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
    ) -> None:
        self.wait()
        snapshot = {
            "state": copy.deepcopy(state),
            "adapter": {k: v.detach().clone() for k, v in adapter.items()},
            "optimizer": copy.deepcopy(optimizer),
            "scheduler": copy.deepcopy(scheduler),
            "rng": rng_state(),
        }
        self._thread = threading.Thread(target=self._write, args=(snapshot,), name="checkpoint-writer")
        self._thread.start()

    def _write(self, snapshot: dict[str, Any]) -> None:
        try:
            save(
                self.root, snapshot["state"], adapter=snapshot["adapter"], optimizer=snapshot["optimizer"],
                scheduler=snapshot["scheduler"], extra_rng={}, keep=self.keep, rng=snapshot["rng"],
            )  # fmt: skip
        except BaseException as exc:  # surfaced by wait() on the training thread
            self._error = exc

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
