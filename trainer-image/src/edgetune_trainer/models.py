"""Base models (built-in sensor models or Hugging Face transformers), their verified loading,
and the LoRA adapter that is the only trainable part (or, for a baseline run by hand, the head or
the whole base).

A base model is a folder: ``config.json`` plus weights in safetensors. Its SHA-256 (what
``spec.baseModel.sha256`` pins) is the digest of its single ``*.safetensors`` file, or, for
sharded weights, the digest of the sorted lines ``<name> <sha256>`` of all shards.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from edgetune_api.delta import sha256_bytes, sha256_file
from edgetune_api.trainer_config import BaseFiles, Baseline
from edgetune_api.training_job import PeftSpec
from edgetune_trainer.registry import resolve_mlflow_uri

BUILTIN_CONFIG = "config.json"
BUILTIN_WEIGHTS = "model.safetensors"


class ModelError(ValueError):
    """The base model cannot be used; the message says where it was looked for and why."""


class TimeSeriesCNN(nn.Module):
    """A small 1-D CNN classifier for sensor series (channels x length): conv blocks, global
    average pooling, a hidden linear layer and a linear head. No batch norm: a frozen base must not
    change its statistics while an adapter trains on top of it."""

    architecture = "timeseries-cnn"
    input_mean: torch.Tensor
    input_std: torch.Tensor

    def __init__(self, channels: int, classes: int, width: int = 64, depth: int = 3, hidden: int = 64) -> None:
        super().__init__()
        self.config = {"architecture": self.architecture, "channels": channels, "classes": classes,
                       "width": width, "depth": depth, "hidden": hidden}  # fmt: skip
        self.register_buffer("input_mean", torch.zeros(channels, 1))
        self.register_buffer("input_std", torch.ones(channels, 1))
        blocks: list[nn.Module] = []
        c_in = channels
        for _ in range(depth):
            blocks += [nn.Conv1d(c_in, width, kernel_size=7, padding=3), nn.GELU()]
            c_in = width
        self.features = nn.Sequential(*blocks)
        self.hidden = nn.Linear(width, hidden)
        self.head = nn.Linear(hidden, classes)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.input_mean) / self.input_std
        if self.gradient_checkpointing and self.training:
            # One segment per conv block: recomputing the whole stack as one segment rebuilt every
            # activation at once in the backward pass, and the peak rose instead of falling.
            for start in range(0, len(self.features), 2):
                x = checkpoint(self.features[start : start + 2], x, use_reentrant=False)
        else:
            x = self.features(x)
        x = x.mean(dim=-1)
        return self.head(torch.nn.functional.gelu(self.hidden(x)))  # type: ignore[no-any-return]

    def adaptable_modules(self) -> list[str]:
        """Names LoRA adapts for ``all-linear``: every conv and linear layer except the head."""
        return [n for n, m in self.named_modules() if isinstance(m, nn.Conv1d | nn.Linear) and n != "head"]


BUILTINS: dict[str, type[TimeSeriesCNN]] = {TimeSeriesCNN.architecture: TimeSeriesCNN}


@dataclass
class BaseModel:
    """A loaded, frozen base model."""

    model: nn.Module
    kind: str  # "builtin" or "transformers"
    sha256: str | None
    labels: list[str]
    tokenizer: Any = None
    path: Path | None = None


def weights_sha256(folder: Path) -> str:
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise ModelError(f"no *.safetensors weights in {folder}")
    if len(shards) == 1:
        return sha256_file(shards[0])
    return sha256_bytes("".join(f"{p.name} {sha256_file(p)}\n" for p in shards).encode())


def save_builtin(model: TimeSeriesCNN, folder: Path, labels: list[str]) -> str:
    """Write a built-in model as a base-model folder; returns its SHA-256."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / BUILTIN_CONFIG).write_text(json.dumps({**model.config, "labels": labels}, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / BUILTIN_WEIGHTS))
    # safetensors writes 0600: on a node's disk the trainers and agents (non-root) could not read
    # the base then. Weights are not secrets: readable by all, as config.json already is.
    (folder / BUILTIN_WEIGHTS).chmod(0o644)
    return weights_sha256(folder)


def fetch(uri: str, cache: Path, s3_client: Any = None, mlflow_uri: str | None = None) -> Path:
    """Make the base model folder named by ``uri`` available locally; return its path."""
    if uri.startswith("file://"):
        return Path(urllib.parse.urlparse(uri).path)
    if uri.startswith("/"):
        return Path(uri)
    if uri.startswith("s3://"):
        return _fetch_s3(uri, cache, s3_client)
    if uri.startswith(("models:/", "runs:/")):
        if not mlflow_uri:
            raise ModelError(f"{uri} is an MLflow URI but MLFLOW_TRACKING_URI is not set")
        return fetch(resolve_mlflow_uri(uri, mlflow_uri), cache, s3_client, mlflow_uri)
    raise ModelError(f"cannot fetch base model {uri!r}: unsupported scheme")


def _cached(cache: Path, source: str, download: Callable[[Path], None]) -> Path:
    """The base model folder for ``source`` in the cache: ``download`` fills a temporary folder,
    which becomes the cached one only once complete (a crash mid-download leaves nothing used)."""
    target = cache / "base" / sha256_bytes(source.encode())[:16]
    if (target / ".complete").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache))
    try:
        download(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / ".complete").touch()
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(target)
    return target


def fetch_presigned(files: BaseFiles, cache: Path) -> Path:
    """Download a base model the operator resolved and presigned (``BaseFiles``) into the cache;
    the caller verifies it against spec.baseModel.sha256 (``load_base``)."""
    from edgetune_trainer.package import presigned_http  # noqa: PLC0415

    if not files.files:
        raise ModelError(f"no objects under {files.source} ({files.uri})")
    http = presigned_http()

    def download(tmp: Path) -> None:
        for rel, url in sorted(files.files.items()):
            dest = (tmp / rel).resolve()
            if not dest.is_relative_to(tmp.resolve()):
                raise ModelError(f"base model file name {rel!r} leaves the model folder")
            dest.parent.mkdir(parents=True, exist_ok=True)
            response = http.request("GET", url, preload_content=False)
            try:
                if response.status != 200:
                    raise ModelError(f"downloading {files.source}/{rel} failed: HTTP {response.status} (these "
                                     f"URLs expire {files.expires})")  # fmt: skip
                with dest.open("wb") as fh:
                    for chunk in response.stream(1 << 20):
                        fh.write(chunk)
            finally:
                response.release_conn()

    return _cached(cache, files.source, download)


def _fetch_s3(uri: str, cache: Path, s3_client: Any) -> Path:
    if s3_client is None:
        raise ModelError(f"{uri} needs S3 access, but no S3 client is configured")
    parsed = urllib.parse.urlparse(uri)
    bucket, prefix = parsed.netloc, parsed.path.lstrip("/").rstrip("/") + "/"

    def download(tmp: Path) -> None:
        keys = []
        for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", [])]
        if not keys:
            raise ModelError(f"no objects under {uri}")
        for key in keys:
            dest = tmp / key[len(prefix) :]
            dest.parent.mkdir(parents=True, exist_ok=True)
            s3_client.download_file(bucket, key, str(dest))

    return _cached(cache, uri, download)


def load_base(folder: Path, expected_sha256: str | None, *, num_labels: int | None = None) -> BaseModel:
    """Load and verify a base model folder, then freeze it."""
    if not (folder / BUILTIN_CONFIG).exists():
        raise ModelError(f"base model folder {folder} has no {BUILTIN_CONFIG}")
    digest = weights_sha256(folder)
    if expected_sha256 is not None and digest != expected_sha256:
        raise ModelError(f"base model weights in {folder} have SHA-256 {digest}, the job expects {expected_sha256}")
    config = json.loads((folder / BUILTIN_CONFIG).read_text())
    if config.get("architecture") in BUILTINS:
        cls = BUILTINS[config["architecture"]]
        model: nn.Module = cls(
            config["channels"], config["classes"], config["width"], config["depth"], config["hidden"]
        )
        model.load_state_dict(load_file(str(folder / BUILTIN_WEIGHTS)))
        base = BaseModel(model, "builtin", digest, list(config.get("labels", [])), path=folder)
    else:
        base = _load_transformers(folder, digest, num_labels)
    for param in base.model.parameters():
        param.requires_grad_(False)
    return base


def _load_transformers(folder: Path, digest: str, num_labels: int | None) -> BaseModel:
    try:
        import transformers  # noqa: PLC0415 - optional, heavy
    except ImportError as exc:
        raise ModelError(f"{folder} is a transformers model but the transformers package is missing") from exc
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    if num_labels:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            folder, local_files_only=True, num_labels=num_labels, ignore_mismatched_sizes=True
        )
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tokenizer = None
    if any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    labels = [str(v) for _, v in sorted((config.id2label or {}).items())] if num_labels else []
    return BaseModel(model, "transformers", digest, labels, tokenizer=tokenizer, path=folder)


def cast_frozen_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen floating-point weights in ``dtype``; returns how many values were cast.
    Buffers (rotary frequencies, normalisation statistics) keep their precision."""
    cast = 0
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += param.numel()
    return cast


def builtin_random(name: str, channels: int, classes: int, seed: int) -> BaseModel:
    """``builtin:<architecture>``: a randomly initialised base (seeded). For smoke tests and demos:
    a random frozen base only gives LoRA random features to work with."""
    if name not in BUILTINS:
        raise ModelError(f"unknown built-in model {name!r}; known: {sorted(BUILTINS)}")
    torch.manual_seed(seed)
    model = BUILTINS[name](channels, classes)
    for param in model.parameters():
        param.requires_grad_(False)
    return BaseModel(model, "builtin", None, [])


def lora_targets(base: BaseModel, spec: PeftSpec) -> list[str] | str:
    if spec.target_modules != ["all-linear"]:
        return list(spec.target_modules)
    if isinstance(base.model, TimeSeriesCNN):
        return base.model.adaptable_modules()
    return "all-linear"  # peft resolves it for transformers models (the output head excluded)


def attach_lora(base: BaseModel, spec: PeftSpec, *, trainable_head: bool = False) -> PeftModel:
    """Wrap the frozen base with a LoRA adapter; only the adapter's parameters train."""
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=lora_targets(base, spec),
        modules_to_save=["head"] if trainable_head else None,
    )
    try:
        return get_peft_model(base.model, config)
    except ValueError as exc:
        raise ModelError(f"cannot attach LoRA to the base model: {exc}") from exc


def head_module(model: nn.Module) -> nn.Module:
    """The output layer: ``head`` of the built-in models; a transformers model's output embeddings
    (causal LM) or its ``score``/``classifier`` (sequence classification)."""
    if isinstance(model, TimeSeriesCNN):
        return model.head
    for name in ("score", "classifier"):
        found = getattr(model, name, None)
        if isinstance(found, nn.Module):
            return found
    getter = getattr(model, "get_output_embeddings", None)
    output = getter() if callable(getter) else None
    if isinstance(output, nn.Module):
        return output
    raise ModelError(f"cannot tell the output layer of {type(model).__name__} for a head-only baseline")


def attach(base: BaseModel, spec: PeftSpec, baseline: Baseline | None = None) -> nn.Module:
    """What trains: a LoRA adapter on the frozen base, or, for a baseline, the base itself with its
    head (``head``) or every weight (``full``) unfrozen."""
    if baseline is None:
        return attach_lora(base, spec)
    trainable = base.model.parameters() if baseline == "full" else head_module(base.model).parameters()
    for param in trainable:
        param.requires_grad_(True)
    return base.model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights only: the adapter's (what the delta package carries), or a baseline's
    unfrozen ones (what its checkpoints hold)."""
    if isinstance(model, PeftModel):
        from peft import get_peft_model_state_dict  # noqa: PLC0415

        state = get_peft_model_state_dict(model)
    else:
        state = {name: p for name, p in model.named_parameters() if p.requires_grad}
    # A copy, never a view of the live parameters: the encoding gate loads decoded weights into the
    # model to score them, and a view would then silently turn into those degraded weights (and be
    # what a fallback encoding re-encodes and ships; found by bench_adapters, 2026-11-29).
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    if not isinstance(model, PeftModel):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        if set(state) != trainable:
            raise ModelError(f"checkpoint does not fit this baseline: {sorted(set(state) ^ trainable)[:5]}")
        model.load_state_dict(state, strict=False)
        return
    from peft import set_peft_model_state_dict  # noqa: PLC0415

    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ModelError(f"adapter state does not fit this model: unexpected keys {unexpected[:5]}")
