"""The agent's settings: command-line flags, each with an ``EDGETUNE_AGENT_*`` environment default."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class AgentSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str = "edgetune"
    """Name clients use in ``/v2/models/{name}``."""
    base_uri: str
    """The frozen base model: `builtin:<arch>`, a local folder, `s3://…` or `models:/…` (as the trainer)."""
    base_sha256: str | None = None
    """Expected SHA-256 of the base weights; required for every source except `builtin:`."""
    builtin_channels: int = 1
    builtin_classes: int = 2
    builtin_seed: int = 0
    num_labels: int | None = None
    """For a transformers base: classify text into this many labels instead of generating text."""
    backend: Literal["torch", "vllm"] = "torch"
    vllm_url: str | None = None
    """Base URL of the vLLM server the `vllm` backend drives."""
    vllm_adapter_dir: Path | None = None
    """Folder shared with the vLLM server where adapters are written in PEFT format."""
    vllm_max_lora_rank: Annotated[int, Field(ge=1)] = 16
    """The vLLM server's --max-lora-rank (vLLM's default 16): higher-rank adapters are refused up front."""
    hosts: list[str] = Field(default_factory=lambda: ["0.0.0.0"])  # noqa: S104 - a server inside a pod
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    assignment_file: Path | None = None
    """Downward-API file with the pod's annotations (or a file holding the assignment JSON itself)."""
    poll_seconds: float = 0.02
    revocation_poll_seconds: Annotated[float, Field(ge=0)] = 30.0
    """How often the agent looks in S3 for a published revocation of what it serves (0: never)."""
    cache_dir: Path = Path("/var/cache/edgetune")
    trusted_keys_dir: Path | None = None
    """Folder of Ed25519 public keys (PEM); when set, only packages signed by one of them run."""
    require_signature: bool = False
    merge: bool = True
    """Add the active adapter's update into the base weights (no per-request LoRA cost; fp32 bases
    only, where merging and unmerging round-trip exactly enough); other adapters run unmerged."""
    max_resident: Annotated[int, Field(ge=1, le=64)] = 3
    """Adapters kept in memory (least recently used dropped first; the active one never)."""
    s3_endpoint: str | None = None
    mlflow_uri: str | None = None
    eval_data_dir: Path | None = None
    """Labelled node-local data: a candidate is scored against the current adapter before serving."""
    eval_format: Literal["csv", "jsonl", "npy", "text", "ts"] = "npy"
    eval_max_drop: float | None = None
    """Refuse a candidate whose accuracy is lower than the current adapter's by more than this."""
    shadow_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    """Share of live requests also run through a shadow adapter."""
    threads: int = 0
    """torch intra-op threads (0: torch's default)."""
    pod_name: str | None = None
    pod_namespace: str | None = None
    pod_uid: str | None = None
    report: bool = True
    """Report to the pod (condition, annotation, Events) when running in a cluster."""


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"EDGETUNE_AGENT_{name}", default)


def parse_args(argv: list[str] | None = None) -> AgentSettings:
    p = argparse.ArgumentParser(prog="python -m edgetune_agent", description="edgetune edge agent")
    p.add_argument("--model-name", default=_env("MODEL_NAME", "edgetune"))
    p.add_argument("--base-uri", default=_env("BASE_URI"), required=_env("BASE_URI") is None)
    p.add_argument("--base-sha256", default=_env("BASE_SHA256"))
    p.add_argument("--builtin-channels", type=int, default=int(_env("BUILTIN_CHANNELS", "1") or 1))
    p.add_argument("--builtin-classes", type=int, default=int(_env("BUILTIN_CLASSES", "2") or 2))
    p.add_argument("--builtin-seed", type=int, default=int(_env("BUILTIN_SEED", "0") or 0))
    p.add_argument("--num-labels", type=int, default=int(_env("NUM_LABELS", "0") or 0) or None)
    p.add_argument("--backend", choices=["torch", "vllm"], default=_env("BACKEND", "torch"))
    p.add_argument("--vllm-url", default=_env("VLLM_URL"))
    p.add_argument("--vllm-adapter-dir", default=_env("VLLM_ADAPTER_DIR"))
    p.add_argument("--vllm-max-lora-rank", type=int, default=int(_env("VLLM_MAX_LORA_RANK", "16") or 16))
    p.add_argument("--host", action="append", dest="hosts", help="address to listen on (repeatable)")
    p.add_argument("--port", type=int, default=int(_env("PORT", "8080") or 8080))
    p.add_argument("--assignment-file", default=_env("ASSIGNMENT_FILE"))
    p.add_argument("--poll-seconds", type=float, default=float(_env("POLL_SECONDS", "0.02") or 0.02))
    p.add_argument("--revocation-poll-seconds", type=float,
                   default=float(_env("REVOCATION_POLL_SECONDS", "30") or 30))  # fmt: skip
    p.add_argument("--cache-dir", default=_env("CACHE_DIR", "/var/cache/edgetune"))
    p.add_argument("--trusted-keys-dir", default=_env("TRUSTED_KEYS_DIR"))
    p.add_argument("--require-signature", action="store_true", default=_env("REQUIRE_SIGNATURE") == "true")
    p.add_argument(
        "--no-merge",
        action="store_true",
        default=_env("MERGE") == "false",
        help="keep the active adapter unmerged (LoRA computed per request)",
    )
    p.add_argument("--max-resident", type=int, default=int(_env("MAX_RESIDENT", "3") or 3))
    p.add_argument("--s3-endpoint", default=_env("S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL_S3"))
    p.add_argument("--mlflow-uri", default=_env("MLFLOW_URI") or os.environ.get("MLFLOW_TRACKING_URI"))
    p.add_argument("--eval-data-dir", default=_env("EVAL_DATA_DIR"))
    p.add_argument("--eval-format", default=_env("EVAL_FORMAT", "npy"))
    p.add_argument("--eval-max-drop", type=float, default=float(_env("EVAL_MAX_DROP", "nan") or "nan"))
    p.add_argument("--shadow-fraction", type=float, default=float(_env("SHADOW_FRACTION", "1.0") or 1.0))
    p.add_argument("--threads", type=int, default=int(_env("THREADS", "0") or 0))
    p.add_argument("--no-report", action="store_true", help="never write to the pod (outside Kubernetes)")
    a = p.parse_args(argv)
    hosts = a.hosts or (_env("HOSTS") or "0.0.0.0").split(",")  # noqa: S104
    return AgentSettings(
        model_name=a.model_name, base_uri=a.base_uri, base_sha256=a.base_sha256 or None,
        builtin_channels=a.builtin_channels, builtin_classes=a.builtin_classes, builtin_seed=a.builtin_seed,
        num_labels=a.num_labels, backend=a.backend, vllm_url=a.vllm_url,
        vllm_adapter_dir=Path(a.vllm_adapter_dir) if a.vllm_adapter_dir else None,
        vllm_max_lora_rank=a.vllm_max_lora_rank,
        hosts=hosts, port=a.port,
        assignment_file=Path(a.assignment_file) if a.assignment_file else None, poll_seconds=a.poll_seconds,
        revocation_poll_seconds=a.revocation_poll_seconds,
        cache_dir=Path(a.cache_dir), trusted_keys_dir=Path(a.trusted_keys_dir) if a.trusted_keys_dir else None,
        require_signature=a.require_signature, merge=not a.no_merge, max_resident=a.max_resident,
        s3_endpoint=a.s3_endpoint or None,
        mlflow_uri=a.mlflow_uri or None, eval_data_dir=Path(a.eval_data_dir) if a.eval_data_dir else None,
        eval_format=a.eval_format,
        eval_max_drop=None if a.eval_max_drop != a.eval_max_drop else a.eval_max_drop,  # NaN: not set
        shadow_fraction=a.shadow_fraction, threads=a.threads,
        pod_name=os.environ.get("POD_NAME"), pod_namespace=os.environ.get("POD_NAMESPACE"),
        pod_uid=os.environ.get("POD_UID"), report=not a.no_report,
    )  # fmt: skip
