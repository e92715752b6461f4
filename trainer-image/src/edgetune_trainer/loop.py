"""The edge training loop: a frozen base, a LoRA adapter, node-local data, and budgets.

Deliberately a plain, visible loop (no trainer framework): micro-batches, gradient accumulation,
one optimizer step, then the checks that decide whether to go on. What it does to memory is what
you read here.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import signal
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft.helpers import disable_input_dtype_casting
from torch import nn

from edgetune_api.meta import parse_duration, parse_quantity
from edgetune_api.trainer_config import TrainerConfig
from edgetune_api.training_job import DataSpec
from edgetune_trainer import checkpoint as ckpt
from edgetune_trainer.data import DataError, DataInfo, NodeDataset, Sample, augment, fit_length
from edgetune_trainer.energy import (
    EnergyMeter,
    battery_percent,
    best_meter,
    current_rss_bytes,
    on_ac_power,
    peak_rss_bytes,
    reset_peak_rss,
    trim_heap,
)
from edgetune_trainer.models import (
    BaseModel,
    ModelError,
    adapter_state,
    attach,
    cast_frozen_weights,
    load_adapter_state,
)

DEFAULT_SEQUENCE_LENGTH = 128  # DataSpec.sequence_length's default, for tasks built without a spec
LOSS_CHUNK_TOKENS = 32  # sequence positions per chunk of logits in the LM loss
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

    def __init__(self, base: BaseModel, info: DataInfo, device: torch.device, data: DataSpec | None = None) -> None:
        self.device = device
        self.text = info.kind == "text"
        self.length = info.length or 0
        self.length_policy = data.length_policy if data else "resample"
        self.sequence_length = data.sequence_length if data else DEFAULT_SEQUENCE_LENGTH
        self.packing = bool(data and data.packing)
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
            x = fit_length(np.asarray(s.x, dtype=np.float32), self.length, self.length_policy)
            xs.append(augment(x, spec_aug, rng) if rng is not None else x)
        ys = [self.label_index[str(s.y)] for s in samples]
        return {"x": self._to_device(torch.from_numpy(np.stack(xs))),
                "y": self._to_device(torch.tensor(ys, dtype=torch.long))}  # fmt: skip

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Host to GPU without waiting for the GPU: a plain ``.to("cuda")`` from pageable memory
        synchronises with everything queued, so the host could not prepare the next batch while
        the GPU runs this one. Pinned memory and a non-blocking copy keep the stream ordered."""
        if self.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _tokens(self, texts: list[str]) -> tuple[list[list[int]], int, int]:
        """Token ids per text (untruncated), the separator (end of text) and the padding id."""
        if self.tokenizer is not None:
            ids = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
            eos = self.tokenizer.eos_token_id
            pad = self.tokenizer.pad_token_id
            eos = 0 if eos is None else int(eos)
            return [list(r) for r in ids], eos, eos if pad is None else int(pad)
        # byte-level fallback for models shipped without a tokenizer (vocabulary >= 256)
        return [list(t.encode()) for t in texts], 0, 0

    def _text_batch(self, texts: list[str]) -> dict[str, torch.Tensor]:
        tokens, eos, pad = self._tokens(texts)
        size = self.sequence_length
        if self.packing:  # one stream, cut into full rows; only the last row is padded
            stream = [t for row in tokens for t in [*row, eos]]
            rows = [stream[i : i + size] for i in range(0, len(stream), size)] or [[pad]]
        else:
            rows = [r[:size] or [pad] for r in tokens]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        if all(len(r) == width for r in rows):
            # No padding: no mask. transformers would otherwise test the mask on the GPU for being all
            # ones (a host sync per step) and attention would not take the plain causal path.
            return {"input_ids": self._to_device(ids)}
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {"input_ids": self._to_device(ids), "attention_mask": self._to_device(mask)}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | int]:
        """Mean loss of the batch and the number of correct predictions (classification), both
        still on the device: reading them is a host sync, which training steps must not pay."""
        if self.text:
            return causal_lm_loss(model, batch["input_ids"], batch.get("attention_mask")), 0
        logits = model(batch["x"])
        if hasattr(logits, "logits"):
            logits = logits.logits
        loss = nn.functional.cross_entropy(logits.float(), batch["y"])
        correct = (logits.argmax(dim=-1) == batch["y"]).sum()
        return loss, correct


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Output head + cross-entropy, chunk by chunk, for a frozen head (LoRA leaves it frozen).

    The forward pass computes each chunk's logits, its loss, and at once the gradient with
    respect to the hidden states (softmax minus one-hot, times the head's weight); the chunk's
    logits are then dropped. Backward only scales that stored gradient. Same arithmetic as the
    plain loss's forward and backward (no recomputation), but never more than one chunk of
    (positions x vocabulary) logits in memory.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, rows: int) -> torch.Tensor:
        counted = (target != -100).sum().clamp(min=1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.zeros_like(hidden) if hidden.requires_grad else None
        head = weight.to(hidden.dtype)  # cast once, not per chunk
        head_fp32 = weight.float() if grad is not None else head
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start : start + rows], target[start : start + rows]
            logits = (h @ head.T).float()
            total += nn.functional.cross_entropy(logits, t, reduction="sum", ignore_index=-100)
            if grad is not None:
                # softmax minus one-hot, padding rows zeroed; scatter and masks rather than boolean
                # indexing, which would stop the host until the GPU reached this chunk
                probs = logits.softmax(dim=-1)
                valid = (t != -100).unsqueeze(1)
                probs.scatter_add_(1, t.clamp(min=0).unsqueeze(1), -valid.to(probs.dtype))
                probs.masked_fill_(~valid, 0.0)
                grad[start : start + rows] = (probs @ head_fp32).to(hidden.dtype)
        ctx.save_for_backward(grad if grad is not None else hidden.new_empty(0))
        ctx.counted = counted
        return total / counted

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * (grad_out / ctx.counted).to(grad.dtype), None, None, None


def causal_lm_loss(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, chunk: int = LOSS_CHUNK_TOKENS
) -> torch.Tensor:
    """Next-token loss without ever holding the full (batch x sequence x vocabulary) logits.

    With a large vocabulary the logits and their gradient dominate training memory (they are
    larger than the whole adapter's activations). The backbone runs once; the frozen output head
    and the cross-entropy then run ``chunk`` positions at a time (``_FrozenHeadCrossEntropy``).
    Models whose head trains, or that are not transformers language models, use the plain loss.
    """
    get_base = getattr(model, "get_base_model", None)
    hf: Any = get_base() if callable(get_base) else model
    backbone = getattr(hf, "base_model", None)
    get_head = getattr(hf, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    target = ids[:, 1:] if mask is None else ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    if (
        backbone is None
        or backbone is hf
        or not isinstance(head, nn.Linear)
        or head.bias is not None
        or head.weight.requires_grad
    ):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))
    hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    loss = _FrozenHeadCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), head.weight, target.reshape(-1), chunk * ids.shape[0]
    )
    return loss


def evaluate(model: nn.Module, task: Task, dataset: NodeDataset, batch_size: int, aug: Any, *,
             split: str = "eval") -> dict[str, float]:  # fmt: skip
    """Mean loss (and accuracy for classification) over the held-out split (or ``all`` samples)."""
    model.eval()
    total_loss = total = correct = 0.0
    batch: list[Sample] = []

    def flush() -> None:
        nonlocal total_loss, total, correct
        loss, right = task.loss(model, task.batch(batch, None, aug))
        total_loss += float(loss) * len(batch)
        total += len(batch)
        correct += int(right)
        batch.clear()

    with torch.no_grad():
        for sample in dataset.iterate(split):
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
    # fused: one kernel for all of the adapter's tensors on a GPU (hundreds of small ones with LoRA)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=device.type == "cuda")


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


def probe_samples(dataset: NodeDataset, limit: int) -> list[Sample]:
    """Up to ``limit`` training samples to measure a batch with (reused cyclically when fewer)."""
    samples = [s for _, s in zip(range(limit), dataset.iterate("train"), strict=False)]
    if not samples:
        raise DataError("no training samples (all went to the evaluation split)")
    return samples


def probe_peak(model: nn.Module, task: Task, samples: list[Sample], size: int, *, aug: Any,
               device: torch.device) -> int:  # fmt: skip
    """Peak memory of one forward/backward pass over a micro-batch of ``size``."""
    batch = [samples[i % len(samples)] for i in range(size)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        trim_heap()  # a larger probe before this one (or a search without checkpointing) must not count
    reset_peak_rss()
    loss, _ = task.loss(model, task.batch(batch, None, aug))
    loss.backward()  # type: ignore[no-untyped-call]
    model.zero_grad(set_to_none=True)
    return int(torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes())


def too_big(what: str, peak: int, runtime: int, budget: int) -> str:
    """Why a budget is too small, saying what takes the memory."""
    mib = 2**20
    return (f"{what} needs {peak / mib:.0f} MiB, more than {MEMORY_HEADROOM:.0%} of budgets.memory "
            f"({budget / mib:.0f} MiB); {runtime / mib:.0f} MiB of it is the trainer's runtime before any "
            "training (Python, torch, peft and the base model), the rest the batch's activations and "
            "gradients")  # fmt: skip


def find_batch_size(
    model: nn.Module, task: Task, dataset: NodeDataset, *, budget_bytes: int, aug: Any, device: torch.device,
    limit: int,
) -> tuple[int, list[dict[str, int]]]:  # fmt: skip
    """Largest micro-batch (powers of two up to ``limit``) whose measured fwd/bwd peak fits the
    budget, 0 when not even one sample fits; and the probes."""
    samples = probe_samples(dataset, limit)
    probes: list[dict[str, int]] = []
    best = 0
    size = 1
    while size <= limit:
        peak = probe_peak(model, task, samples, size, aug=aug, device=device)
        probes.append({"batch": size, "peak_bytes": peak})
        if peak > budget_bytes * MEMORY_HEADROOM:
            break
        best = size
        size *= 2
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


class _StepLosses:
    """Step losses read back without stalling the GPU.

    ``float(loss)`` right after a step waits for every kernel queued so far: the host then builds
    the next batch and launches its kernels while the GPU idles (several per cent of a step, found
    by bench/bench_trainer_gpu.py). On a GPU each step's loss is copied into pinned host memory
    behind the step's own kernels and read once the next step is queued, when that copy is long
    done; on a CPU the value is there at once."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending: deque[tuple[int, torch.Tensor, torch.cuda.Event | None, int, float]] = deque()

    def push(self, step: int, loss: torch.Tensor, consumed: int, t0: float) -> None:
        if not self.cuda:
            self.pending.append((step, loss.float(), None, consumed, t0))
            return
        host = torch.empty((), dtype=torch.float32, pin_memory=True)
        host.copy_(loss.float(), non_blocking=True)
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()
        self.pending.append((step, host, event, consumed, t0))

    def ready(self, keep: int) -> Iterator[tuple[int, float, int, float]]:
        """(step, loss, samples, start time) of each pending step but the newest ``keep``, oldest first."""
        while len(self.pending) > keep:
            step, host, event, consumed, t0 = self.pending.popleft()
            if event is not None:
                event.synchronize()
            yield step, float(host), consumed, t0


class TrainingRun:
    """One (possibly resumed) run: set up once, then ``run()`` steps until a stop condition."""

    def __init__(
        self, config: TrainerConfig, base: BaseModel, dataset: NodeDataset, report: Any, *, device: torch.device,
        meter: EnergyMeter | None = None,
    ) -> None:  # fmt: skip
        self.spec, self.rt, self.tr = config.spec, config.runtime, config.spec.training
        self.dataset, self.report, self.device = dataset, report, device
        self.info = dataset.scan()
        if self.info.samples < self.spec.data.min_samples:
            raise InsufficientDataError(
                f"{self.info.samples} samples on this node, the job needs at least {self.spec.data.min_samples}"
            )
        torch.manual_seed(self.tr.seed)
        np.random.seed(self.tr.seed)  # legacy global state that libraries may use
        self.task = Task(base, self.info, device, self.spec.data)
        self.autocast = self._autocast_dtype()
        if device.type == "cuda" and self.autocast is not None and base.kind == "transformers" and not self.rt.baseline:
            # The frozen base in the autocast dtype, as a bare loop would load it: autocast would
            # otherwise cast every weight again in every step (and the base take twice the memory).
            # The adapter's weights stay float32 (peft keeps them so for stable updates).
            cast = cast_frozen_weights(base.model, self.autocast)
            report("base_weights_cast", dtype=str(self.autocast).removeprefix("torch."), parameters=cast)
        self.model = attach(base, self.spec.peft, self.rt.baseline).to(device)
        self.base_module = base.model
        self.checkpointing = False
        if self.tr.gradient_checkpointing:
            self._set_checkpointing(True)
        self.model.train()
        self.batch_size = self._batch_size()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.tr.optimizer, params, self.tr.learning_rate, device, report)
        self.scheduler = make_scheduler(self.optimizer, self.tr.max_steps)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast is torch.float16 else None
        self.step_losses = _StepLosses(device)
        self.last_reported = 0.0
        self.checkpoints = Path(str(self.rt.work_dir)) / "checkpoints"
        self.writer = ckpt.BackgroundWriter(self.checkpoints)
        self.identity = run_identity(config, base, self.info)
        self.state = ckpt.TrainState(0, ckpt.Cursor(), None, 0, [], 0.0, 0.0, identity=self.identity)
        self.resumed_from = self._resume()
        self.meter = meter or best_meter(Path(self.rt.powercap_root), self.rt.watts_estimate, device.type == "cuda")
        self.energy_offset = self.state.energy_j
        self.started = time.monotonic() - self.state.elapsed_s
        self.deadline_s = parse_duration(self.spec.budgets.deadline) if self.spec.budgets.deadline else None
        # Budgets beside usage, so an alert can compare them (edgetune_trainer_*_budget_*).
        self.report.gauge("memory_budget", parse_quantity(self.spec.budgets.memory))
        if self.spec.budgets.energy_joules is not None:
            self.report.gauge("energy_budget", self.spec.budgets.energy_joules)

    def _set_checkpointing(self, on: bool) -> None:
        """Gradient checkpointing on the base: transformers' switch, or our built-in models' flag."""
        switch = getattr(self.base_module, "gradient_checkpointing_enable" if on else "gradient_checkpointing_disable",
                         None)  # fmt: skip
        if callable(switch):  # transformers models
            switch()
        else:  # our built-in models
            setattr(self.base_module, "gradient_checkpointing", on)  # noqa: B010 - nn.Module attribute typing
        self.checkpointing = on

    def _auto_checkpointing(self, plain: int, limit: int, budget: int, aug: Any) -> int:
        """``batchSize: auto`` with ``gradientCheckpointing`` left unset: measure again with
        checkpointing on, and keep it when it lets a micro-batch at least twice as large fit (or any,
        where none fitted without): recomputing activations costs about a third more compute per
        sample, and fewer, larger steps win that back. The choice and the search are reported."""
        if plain >= limit or self.tr.gradient_checkpointing is not None:
            return plain
        self._set_checkpointing(True)
        with_ckpt, probes = find_batch_size(self.model, self.task, self.dataset, budget_bytes=budget, aug=aug,
                                            device=self.device, limit=limit)  # fmt: skip
        chosen = with_ckpt >= max(1, 2 * plain)
        self.report("gradient_checkpointing_auto", enabled=chosen, batch_size=with_ckpt if chosen else plain,
                    without=plain, with_checkpointing=with_ckpt, probes=probes)  # fmt: skip
        if not chosen:
            self._set_checkpointing(False)
            return plain
        return with_ckpt

    def _batch_size(self) -> int:
        """The micro-batch: measured against the memory budget whether fitted (``auto``) or fixed,
        so a run never exceeds its budget silently (a real pod would be OOM-killed)."""
        budget = int(parse_quantity(self.spec.budgets.memory))
        runtime = current_rss_bytes() if self.device.type == "cpu" else 0
        if runtime > budget * MEMORY_HEADROOM:
            need = math.ceil(runtime / MEMORY_HEADROOM / 2**20 / 64) * 64 + 64
            raise BudgetTooSmallError(
                f"the trainer's runtime alone (Python, torch, peft and the base model) takes {runtime / 2**20:.0f} MiB "
                f"before any training, more than {MEMORY_HEADROOM:.0%} of budgets.memory ({budget / 2**20:.0f} MiB); "
                f"give the job at least {need}Mi"
            )
        aug = self.spec.data.augmentation
        if self.tr.batch_size != "auto":
            size = int(self.tr.batch_size)
            samples = probe_samples(self.dataset, size)
            peak = probe_peak(self.model, self.task, samples, size, aug=aug, device=self.device)
            if peak > budget * MEMORY_HEADROOM:
                advice = "; lower batchSize, enable gradientCheckpointing, or use batchSize: auto"
                raise BudgetTooSmallError(too_big(f"batchSize {size}", peak, runtime, budget) + advice)
            self.report("batch_size_checked", batch_size=size, peak_bytes=peak, runtime_bytes=runtime,
                        budget_bytes=budget)  # fmt: skip
            return size
        limit = min(512, max(1, self.info.train_samples))
        size, probes = find_batch_size(self.model, self.task, self.dataset, budget_bytes=budget, aug=aug,
                                       device=self.device, limit=limit)  # fmt: skip
        if not self.checkpointing:
            size = self._auto_checkpointing(size, limit, budget, aug)
        if size == 0:
            raise BudgetTooSmallError(too_big("a micro-batch of 1", probes[0]["peak_bytes"], runtime, budget))
        self.report("batch_size_fitted", batch_size=size, probes=probes, budget_bytes=budget, runtime_bytes=runtime,
                    gradient_checkpointing=self.checkpointing)  # fmt: skip
        return size

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        """A training forward pass in the autocast dtype. peft would first cast each adapter's
        input to the adapter's float32 (and autocast cast it back): two copies of the activations
        per adapted layer for nothing, so that cast is off inside; evaluation, which runs without
        autocast, keeps it."""
        if self.autocast is None:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.autocast), disable_input_dtype_casting(self.model):
            yield

    def _autocast_dtype(self) -> torch.dtype | None:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.tr.precision)
        if dtype is torch.float16 and self.device.type == "cpu":
            self.report("precision_fallback", requested="fp16", used="bf16", reason="fp16 autocast is for GPUs")
            return torch.bfloat16
        return dtype

    def _resume(self) -> int | None:
        loaded, skipped = ckpt.load_latest(self.checkpoints)
        if skipped:
            self.report("checkpoints_skipped", corrupt=skipped)
        if loaded is None:
            return None
        if loaded.state.identity != self.identity:
            # Another run's checkpoints (another job, other data, another base or other settings):
            # resuming would ship that adapter under this run's lineage. Start fresh; keep theirs aside.
            theirs = loaded.state.identity
            differ = sorted(k for k in set(theirs) | set(self.identity) if theirs.get(k) != self.identity.get(k))
            stamp = time.strftime("%Y%m%dT%H%M%S")
            # Two runs set aside within one second (found by the baseline test) must not collide.
            names = (f"checkpoints-set-aside-{stamp}" + (f"-{n}" if n else "") for n in itertools.count())
            aside = next(p for name in names if not (p := self.checkpoints.with_name(name)).exists())
            self.checkpoints.rename(aside)
            self.report("checkpoints_set_aside", step=loaded.state.step, moved_to=str(aside), differ=differ,
                        reason="written by a different run; training starts from step 0")  # fmt: skip
            return None
        load_adapter_state(self.model, loaded.adapter)
        self.optimizer.load_state_dict(loaded.optimizer)
        self.scheduler.load_state_dict(loaded.scheduler)
        ckpt.set_rng_state(loaded.rng)
        self.state = loaded.state
        self.report("resumed", step=self.state.step, epoch=self.state.cursor.epoch,
                    position=self.state.cursor.position, checkpoint=loaded.folder.name)  # fmt: skip
        return self.state.step

    def energy(self) -> float:
        return self.energy_offset + self.meter.joules()

    def save(self, *, wait: bool = False) -> None:
        """Checkpoint now (written in the background unless ``wait``)."""
        self.report_steps()
        self.state.elapsed_s = time.monotonic() - self.started
        self.state.energy_j = self.energy()
        self.writer.submit(
            self.state, adapter=adapter_state(self.model), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
        )  # fmt: skip
        if wait:
            self.writer.wait()

    def optimizer_step(self, micro: Iterator[tuple[list[Sample], int]]) -> tuple[int, bool]:
        """Accumulate gradients over up to ``gradientAccumulation`` micro-batches and step once.
        Returns (samples consumed, whether the epoch ran out)."""
        self.writer.wait()  # the previous step's checkpoint is on disk before this step starts
        t0 = time.monotonic()
        self.optimizer.zero_grad(set_to_none=True)
        losses: list[torch.Tensor] = []
        consumed = 0
        for _ in range(self.tr.gradient_accumulation):
            item = next(micro, None)
            if item is None:
                return self._finish_step(losses, consumed, t0), True
            samples, first = item
            rng = np.random.default_rng([self.tr.seed, self.state.cursor.epoch, first])
            batch = self.task.batch(samples, rng, self.spec.data.augmentation)
            with self._autocast():
                loss, _ = self.task.loss(self.model, batch)
            scaled = loss * len(samples) / (self.batch_size * self.tr.gradient_accumulation)
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()  # type: ignore[no-untyped-call]
            losses.append(loss.detach())
            consumed += len(samples)
        return self._finish_step(losses, consumed, t0), False

    def _finish_step(self, losses: list[torch.Tensor], consumed: int, t0: float) -> int:
        if not consumed:
            return 0
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.state.step += 1
        self.state.cursor.position += consumed
        self.step_losses.push(self.state.step, torch.stack(losses).mean(), consumed, t0)
        self.report_steps(keep=1)
        return consumed

    def report_steps(self, keep: int = 0) -> None:
        """Report the steps whose loss has reached the host, all but the newest ``keep`` (a GPU
        step is reported once the next one is queued; ``keep=0`` before anything that reads the
        history: evaluation, a checkpoint, the end of the run)."""
        for step, loss, consumed, t0 in self.step_losses.ready(keep):
            now = time.monotonic()
            rate = consumed / max(now - max(t0, self.last_reported), 1e-9)
            self.last_reported = now
            self.state.history.append({"step": step, "loss": round(loss, 6)})
            self.report("step", step=step, loss=round(loss, 6), samples_per_s=round(rate, 1))
            self.report.gauge("step", step)
            self.report.gauge("loss", loss)
            self.report.gauge("samples_per_second", rate)

    def budget_stop(self, signals: _Signals) -> str:
        """Energy, deadline and battery checks after a step; '' means go on."""
        joules = self.energy()
        self.report.gauge("energy", joules, method=self.meter.method)
        self.report.gauge("peak_memory", _peak(self.device), device=self.device.type)
        if self.spec.budgets.energy_joules is not None and joules >= self.spec.budgets.energy_joules:
            return "EnergyBudget"
        if self.deadline_s is not None and time.monotonic() - self.started >= self.deadline_s:
            return "Deadline"
        if self.spec.budgets.min_battery_percent is not None:
            return _battery(self.spec, self.rt, self.report, lambda: self.save(wait=True), signals)
        return ""

    def run(self) -> Outcome:
        reason, last_eval = "", dict[str, float]()
        with _Signals() as signals:
            while not reason:
                if self.state.step >= self.tr.max_steps:
                    reason = "MaxSteps"
                elif self.tr.epochs is not None and self.state.cursor.epoch >= self.tr.epochs:
                    reason = "Epochs"
                else:
                    reason, last_eval = self._epoch(signals, last_eval)
        self.report_steps()
        if not last_eval or self.state.step % self.tr.eval_every != 0:
            last_eval = evaluate(self.model, self.task, self.dataset, self.batch_size, self.spec.data.augmentation)
        self.save(wait=True)
        self.report("stopped", reason=reason, step=self.state.step, **last_eval)
        return Outcome(
            reason=reason, steps=self.state.step, history=self.state.history, eval=last_eval,
            duration_s=time.monotonic() - self.started, energy_j=self.energy(), energy_method=self.meter.method,
            peak_memory_bytes=_peak(self.device), batch_size=self.batch_size, resumed_from=self.resumed_from,
            model=self.model, data=self.info, extra={"task": self.task},
        )  # fmt: skip

    def _epoch(self, signals: _Signals, last_eval: dict[str, float]) -> tuple[str, dict[str, float]]:
        """Steps through (the rest of) one epoch; returns a stop reason ('' at the epoch's end)."""
        micro = _micro_batches(self.dataset, self.tr.seed, self.state.cursor, self.batch_size)
        while self.state.step < self.tr.max_steps:
            consumed, exhausted = self.optimizer_step(micro)
            if exhausted:
                self.state.cursor = ckpt.Cursor(self.state.cursor.epoch + 1, 0)
            if signals.term:
                self.save(wait=True)
                raise Interrupted(f"SIGTERM at step {self.state.step}; checkpoint written")
            reason = ""
            if consumed and self.state.step % self.tr.eval_every == 0:
                self.report_steps()
                last_eval = evaluate(self.model, self.task, self.dataset, self.batch_size, self.spec.data.augmentation)
                reason = _after_eval(self.state, last_eval, self.tr, self.report)
            if consumed and self.state.step % self.tr.checkpoint_every == 0:
                self.save()
            reason = reason or self.budget_stop(signals)
            if reason:
                return reason, last_eval
            if exhausted:
                return "", last_eval
        return "MaxSteps", last_eval


def run_identity(config: TrainerConfig, base: BaseModel, info: DataInfo) -> dict[str, str]:
    """Digests of what shapes a run's checkpoints; resuming needs all of them equal."""

    def digest(value: object) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()

    spec = config.spec
    data = spec.data.model_dump(mode="json", exclude={"source"})  # where it is mounted does not matter
    return {
        "base": base.sha256 or f"{spec.base_model.uri}:{base.kind}",
        "data": info.sha256,
        "dataSettings": digest(data),
        "peft": digest(spec.peft.model_dump(mode="json")),
        "training": digest(spec.training.model_dump(mode="json")),
        "job": config.runtime.job_uid or "",
        **({"baseline": config.runtime.baseline} if config.runtime.baseline else {}),
    }


def train(
    config: TrainerConfig, base: BaseModel, dataset: NodeDataset, report: Any, *, device: torch.device,
    meter: EnergyMeter | None = None,
) -> Outcome:  # fmt: skip
    """Run (or resume) training until a stop condition; return what happened."""
    return TrainingRun(config, base, dataset, report, device=device, meter=meter).run()


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
