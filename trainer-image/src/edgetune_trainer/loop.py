"""The edge training loop: a frozen base, a LoRA adapter, node-local data, and budgets.

Deliberately a plain, visible loop (no trainer framework): micro-batches, gradient accumulation,
one optimizer step, then the checks that decide whether to go on. What it does to memory is what
you read here.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgetune_api.meta import parse_duration, parse_quantity
from edgetune_api.trainer_config import TrainerConfig
from edgetune_trainer import checkpoint as ckpt
from edgetune_trainer.data import DataError, DataInfo, NodeDataset, Sample, augment, fit_length
from edgetune_trainer.energy import (
    EnergyMeter,
    battery_percent,
    best_meter,
    on_ac_power,
    peak_rss_bytes,
    reset_peak_rss,
)
from edgetune_trainer.models import BaseModel, ModelError, attach_lora, load_adapter_state

TEXT_MAX_TOKENS = 128
MEMORY_HEADROOM = 0.9  # auto batch size keeps the measured peak under 90 % of the budget


class InsufficientDataError(DataError):
    """Fewer samples than spec.data.minSamples."""


class BudgetTooSmallError(RuntimeError):
    """Even a micro-batch of one does not fit the memory budget."""


class Interrupted(Exception):  # noqa: N818 - a control-flow signal, not an error
    """SIGTERM arrived; a checkpoint was written."""


@dataclass
class Outcome:
    reason: str
    steps: int
    history: list[dict[str, float]]
    eval: dict[str, float]
    duration_s: float
    energy_j: float
    energy_method: str
    peak_memory_bytes: int
    batch_size: int
    resumed_from: int | None
    model: Any = None
    data: DataInfo | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Task:
    """Turns samples into tensors and computes the loss for the model's kind."""

    def __init__(self, base: BaseModel, info: DataInfo, device: torch.device) -> None:
        self.device = device
        self.text = info.kind == "text"
        self.length = info.length or 0
        self.tokenizer = base.tokenizer
        labels = base.labels or info.labels
        self.label_index = {label: i for i, label in enumerate(labels)}
        unknown = sorted(set(info.labels) - set(self.label_index))
        if unknown and not self.text:
            raise DataError(f"labels {unknown[:5]} in the node's data are unknown to the base model ({labels[:10]})")

    def batch(self, samples: list[Sample], rng: np.random.Generator | None, spec_aug: Any) -> dict[str, torch.Tensor]:
        if self.text:
            return self._text_batch([str(s.x) for s in samples])
        xs = []
        for s in samples:
            x = fit_length(np.asarray(s.x, dtype=np.float32), self.length)
            xs.append(augment(x, spec_aug, rng) if rng is not None else x)
        ys = [self.label_index[str(s.y)] for s in samples]
        return {
            "x": torch.from_numpy(np.stack(xs)).to(self.device),
            "y": torch.tensor(ys, dtype=torch.long, device=self.device),
        }

    def _text_batch(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self.tokenizer is not None:
            enc = self.tokenizer(texts, truncation=True, max_length=TEXT_MAX_TOKENS, padding=True, return_tensors="pt")
            ids, mask = enc["input_ids"], enc["attention_mask"]
        else:  # byte-level fallback for models shipped without a tokenizer (vocab >= 256)
            rows = [list(t.encode()[:TEXT_MAX_TOKENS]) or [0] for t in texts]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Mean loss of the batch and the number of correct predictions (classification)."""
        if self.text:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits = out.logits[:, :-1]
            target = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))
            return loss, 0
        logits = model(batch["x"])
        if hasattr(logits, "logits"):
            logits = logits.logits
        loss = nn.functional.cross_entropy(logits.float(), batch["y"])
        correct = int((logits.argmax(dim=-1) == batch["y"]).sum())
        return loss, correct


def evaluate(model: nn.Module, task: Task, dataset: NodeDataset, batch_size: int, aug: Any) -> dict[str, float]:
    """Mean loss (and accuracy for classification) over the held-out split."""
    model.eval()
    total_loss = total = correct = 0.0
    batch: list[Sample] = []

    def flush() -> None:
        nonlocal total_loss, total, correct
        loss, right = task.loss(model, task.batch(batch, None, aug))
        total_loss += float(loss) * len(batch)
        total += len(batch)
        correct += right
        batch.clear()

    with torch.no_grad():
        for sample in dataset.iterate("eval"):
            batch.append(sample)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    model.train()
    if total == 0:
        return {}
    result = {"eval_loss": total_loss / total}
    if not task.text:
        result["eval_accuracy"] = correct / total
    return result


def make_optimizer(
    name: str, params: list[nn.Parameter], lr: float, device: torch.device, report: Any
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adamw8bit":
        if device.type == "cuda":
            try:
                import bitsandbytes as bnb  # noqa: PLC0415 - optional, CUDA only

                return bnb.optim.AdamW8bit(params, lr=lr)  # type: ignore[no-any-return]
            except ImportError:
                pass
        report("optimizer_fallback", requested="adamw8bit", used="adamw",
               reason=f"bitsandbytes' 8-bit AdamW is not available on {device.type}")  # fmt: skip
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def make_scheduler(optimizer: torch.optim.Optimizer, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, min(50, max_steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, max_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _micro_batches(
    dataset: NodeDataset, seed: int, cursor: ckpt.Cursor, size: int
) -> Iterator[tuple[list[Sample], int]]:
    """Micro-batches of the current epoch from ``cursor.position`` on; yields (samples, first position)."""
    stream = dataset.shuffled(seed, cursor.epoch)
    for _ in range(cursor.position):  # replay the deterministic order up to the checkpoint
        next(stream, None)
    position = cursor.position
    batch: list[Sample] = []
    for sample in stream:
        batch.append(sample)
        if len(batch) == size:
            yield batch, position
            position += size
            batch = []
    if batch:
        yield batch, position


def find_batch_size(
    model: nn.Module, task: Task, dataset: NodeDataset, budget_bytes: int, aug: Any, device: torch.device, limit: int
) -> tuple[int, list[dict[str, int]]]:
    """Largest micro-batch (powers of two up to ``limit``) whose measured fwd/bwd peak fits the budget."""
    samples = [s for _, s in zip(range(limit), dataset.iterate("train"), strict=False)]
    if not samples:
        raise DataError("no training samples (all went to the evaluation split)")
    probes: list[dict[str, int]] = []
    best = 0
    size = 1
    while size <= limit:
        batch = [samples[i % len(samples)] for i in range(size)]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        reset_peak_rss()
        loss, _ = task.loss(model, task.batch(batch, None, aug))
        loss.backward()
        model.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
        probes.append({"batch": size, "peak_bytes": int(peak)})
        if peak > budget_bytes * MEMORY_HEADROOM:
            break
        best = size
        size *= 2
    if best == 0:
        raise BudgetTooSmallError(
            f"a micro-batch of 1 needs {probes[0]['peak_bytes'] / 2**20:.0f} MiB, more than "
            f"{MEMORY_HEADROOM:.0%} of the memory budget ({budget_bytes / 2**20:.0f} MiB)"
        )
    return best, probes


class _Signals:
    def __init__(self) -> None:
        self.term = False
        self._old: Any = None

    def __enter__(self) -> _Signals:
        self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.term = True

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._old)


def train(
    config: TrainerConfig,
    base: BaseModel,
    dataset: NodeDataset,
    report: Any,
    device: torch.device,
    meter: EnergyMeter | None = None,
) -> Outcome:
    """Run (or resume) training until a stop condition; return what happened."""
    spec, rt = config.spec, config.runtime
    tr = spec.training
    info = dataset.scan()
    if info.samples < spec.data.min_samples:
        raise InsufficientDataError(
            f"{info.samples} samples on this node, the job needs at least {spec.data.min_samples}"
        )
    torch.manual_seed(tr.seed)
    np.random.seed(tr.seed)
    task = Task(base, info, device)
    model = attach_lora(base, spec.peft).to(device)
    if tr.gradient_checkpointing:
        if hasattr(base.model, "gradient_checkpointing_enable"):
            base.model.gradient_checkpointing_enable()
        else:
            base.model.gradient_checkpointing = True
    model.train()
    budget = int(parse_quantity(spec.budgets.memory))
    if tr.batch_size == "auto":
        batch_size, probes = find_batch_size(
            model, task, dataset, budget, spec.data.augmentation, device, limit=min(512, max(1, info.train_samples))
        )
        report("batch_size_fitted", batch_size=batch_size, probes=probes, budget_bytes=budget)
    else:
        batch_size = int(tr.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(tr.optimizer, params, tr.learning_rate, device, report)
    scheduler = make_scheduler(optimizer, tr.max_steps)
    autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(tr.precision)
    if autocast_dtype is torch.float16 and device.type == "cpu":
        report("precision_fallback", requested="fp16", used="bf16", reason="fp16 autocast is for GPUs; CPUs use bf16")
        autocast_dtype = torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype is torch.float16 else None

    work = Path(rt.work_dir) / "checkpoints"
    state = ckpt.TrainState(0, ckpt.Cursor(), None, 0, [], 0.0, 0.0)
    loaded, skipped = ckpt.load_latest(work)
    if skipped:
        report("checkpoints_skipped", corrupt=skipped)
    resumed_from = None
    if loaded is not None:
        load_adapter_state(model, loaded.adapter)
        optimizer.load_state_dict(loaded.optimizer)
        scheduler.load_state_dict(loaded.scheduler)
        ckpt.set_rng_state(loaded.rng)
        state = loaded.state
        resumed_from = state.step
        report(
            "resumed",
            step=state.step,
            epoch=state.cursor.epoch,
            position=state.cursor.position,
            checkpoint=loaded.folder.name,
        )

    meter = meter or best_meter(Path(rt.powercap_root), rt.watts_estimate, device.type == "cuda")
    energy_offset = state.energy_j
    deadline_s = parse_duration(spec.budgets.deadline) if spec.budgets.deadline else None
    started = time.monotonic() - state.elapsed_s
    accumulation = tr.gradient_accumulation

    def save() -> None:
        state.elapsed_s = time.monotonic() - started
        state.energy_j = energy_offset + meter.joules()
        from edgetune_trainer.models import adapter_state  # noqa: PLC0415

        ckpt.save(work, state, adapter_state(model), optimizer.state_dict(), scheduler.state_dict(), {})

    reason = ""
    last_eval: dict[str, float] = {}
    with _Signals() as signals:
        while not reason:
            if state.step >= tr.max_steps:
                reason = "MaxSteps"
                break
            if tr.epochs is not None and state.cursor.epoch >= tr.epochs:
                reason = "Epochs"
                break
            micro = _micro_batches(dataset, tr.seed, state.cursor, batch_size)
            exhausted = False
            while state.step < tr.max_steps and not reason:
                t0 = time.monotonic()
                optimizer.zero_grad(set_to_none=True)
                losses = []
                consumed = 0
                for _ in range(accumulation):
                    item = next(micro, None)
                    if item is None:
                        exhausted = True
                        break
                    samples, first = item
                    rng = np.random.default_rng([tr.seed, state.cursor.epoch, first])
                    batch = task.batch(samples, rng, spec.data.augmentation)
                    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                        loss, _ = task.loss(model, batch)
                    scaled = loss * len(samples) / (batch_size * accumulation)
                    (scaler.scale(scaled) if scaler else scaled).backward()
                    losses.append(float(loss.detach()))
                    consumed += len(samples)
                if consumed:
                    if scaler:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    scheduler.step()
                    state.step += 1
                    state.cursor.position += consumed
                    step_loss = float(np.mean(losses))
                    state.history.append({"step": state.step, "loss": round(step_loss, 6)})
                    rate = consumed / max(time.monotonic() - t0, 1e-9)
                    report("step", step=state.step, loss=round(step_loss, 6), samples_per_s=round(rate, 1))
                    report.gauge("step", state.step)
                    report.gauge("loss", step_loss)
                    report.gauge("samples_per_second", rate)
                if exhausted:
                    state.cursor = ckpt.Cursor(state.cursor.epoch + 1, 0)
                if signals.term:
                    save()
                    raise Interrupted(f"SIGTERM at step {state.step}; checkpoint written")
                if consumed and state.step % tr.eval_every == 0:
                    last_eval = evaluate(model, task, dataset, batch_size, spec.data.augmentation)
                    reason = _after_eval(state, last_eval, tr, report)
                if consumed and state.step % tr.checkpoint_every == 0:
                    save()
                joules = energy_offset + meter.joules()
                report.gauge("energy", joules, method=meter.method)
                report.gauge("peak_memory", _peak(device), device=device.type)
                if not reason and spec.budgets.energy_joules is not None and joules >= spec.budgets.energy_joules:
                    reason = "EnergyBudget"
                if not reason and deadline_s is not None and time.monotonic() - started >= deadline_s:
                    reason = "Deadline"
                if not reason and spec.budgets.min_battery_percent is not None:
                    reason = _battery(spec, rt, report, save, signals)
                if exhausted:
                    break
            if state.step >= tr.max_steps and not reason:
                reason = "MaxSteps"
    if not last_eval or state.step % tr.eval_every != 0:
        last_eval = evaluate(model, task, dataset, batch_size, spec.data.augmentation)
    save()
    report("stopped", reason=reason, step=state.step, **last_eval)
    return Outcome(
        reason=reason,
        steps=state.step,
        history=state.history,
        eval=last_eval,
        duration_s=time.monotonic() - started,
        energy_j=energy_offset + meter.joules(),
        energy_method=meter.method,
        peak_memory_bytes=_peak(device),
        batch_size=batch_size,
        resumed_from=resumed_from,
        model=model,
        data=info,
        extra={"task": task},
    )


def _peak(device: torch.device) -> int:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else peak_rss_bytes()


def _after_eval(state: ckpt.TrainState, result: dict[str, float], tr: Any, report: Any) -> str:
    if not result:
        return ""
    loss = result["eval_loss"]
    report("eval", step=state.step, **{k: round(v, 6) for k, v in result.items()})
    report.gauge("eval_loss", loss)
    if "eval_accuracy" in result:
        report.gauge("eval_accuracy", result["eval_accuracy"])
    if tr.target_loss is not None and loss <= tr.target_loss:
        return "TargetLoss"
    if state.best_eval is None or loss < state.best_eval - (tr.early_stopping.min_delta if tr.early_stopping else 0.0):
        state.best_eval = loss
        state.evals_without_improvement = 0
    else:
        state.evals_without_improvement += 1
        if tr.early_stopping and state.evals_without_improvement >= tr.early_stopping.patience:
            return "EarlyStopping"
    return ""


def _battery(spec: Any, rt: Any, report: Any, save: Any, signals: _Signals) -> str:
    """Pause (checkpointed) while the battery is below the threshold and not charging; or stop."""
    root = Path(rt.power_supply_root)
    threshold = spec.budgets.min_battery_percent
    level = battery_percent(root)
    if level is None:
        return ""
    report.gauge("battery", level)
    if level >= threshold or on_ac_power(root):
        return ""
    if spec.budgets.battery_policy == "stop":
        return "LowBattery"
    save()
    report("paused", battery_percent=level, resume_at=threshold)
    report.gauge("paused", 1)
    while not signals.term:
        time.sleep(1.0)
        level = battery_percent(root)
        if level is None or level >= threshold or on_ac_power(root):
            break
    report.gauge("paused", 0)
    report("resumed_after_pause", battery_percent=level)
    return ""


__all__ = ["BudgetTooSmallError", "InsufficientDataError", "Interrupted", "ModelError", "Outcome", "train"]
