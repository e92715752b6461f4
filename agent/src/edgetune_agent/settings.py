"""The agent's settings: one command-line flag per field of ``AgentSettings``, each with an
``EDGETUNE_AGENT_<FIELD>`` environment default, its help line made from the field's docstring, its
default and its variable (one source: a field cannot be added without its flag and its help)."""

from __future__ import annotations

import argparse
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ENV_PREFIX = "EDGETUNE_AGENT_"


class AgentSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    model_name: str = "edgetune"
    """Name clients use in /v2/models/{name}."""
    base_uri: str
    """The frozen base model: `builtin:<arch>`, a local folder, `s3://…` or `models:/…` (as the trainer)."""
    base_sha256: str | None = None
    """Expected SHA-256 of the base weights; required for every source except `builtin:`."""
    builtin_channels: int = 1
    """For a `builtin:` base: the input channels of its series."""
    builtin_classes: int = 2
    """For a `builtin:` base: the classes it predicts."""
    builtin_seed: int = 0
    """For a `builtin:` base: the seed of its random weights (the trainer's training.seed)."""
    num_labels: int | None = None
    """For a transformers base: classify text into this many labels instead of generating text."""
    backend: Literal["torch", "vllm"] = "torch"
    """torch: the agent runs the model itself; vllm: it drives a vLLM server's LoRA adapters."""
    vllm_url: str | None = None
    """Base URL of the vLLM server the `vllm` backend drives."""
    vllm_adapter_dir: Path | None = None
    """Folder shared with the vLLM server where adapters are written in PEFT format."""
    vllm_max_lora_rank: Annotated[int, Field(ge=1)] = 16
    """The vLLM server's --max-lora-rank (vLLM's default 16): higher-rank adapters are refused up front."""
    hosts: list[str] = Field(default_factory=lambda: ["0.0.0.0"])  # noqa: S104 - a server inside a pod
    """Addresses to listen on (the flag repeats; the variable is comma-separated)."""
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    """HTTP port of the Open Inference Protocol, health and metrics."""
    assignment_file: Path | None = None
    """Downward-API file with the pod's annotations (or a file holding the assignment JSON itself)."""
    poll_seconds: Annotated[float, Field(gt=0)] = 0.02
    """How often the assignment file is looked at for a change."""
    revocation_poll_seconds: Annotated[float, Field(ge=0)] = 30.0
    """How often the agent looks in S3 for a published revocation of what it serves (0: never)."""
    cache_dir: Path = Path("/var/cache/edgetune")
    """Where verified packages are kept (an emptyDir or hostPath)."""
    trusted_keys_dir: Path | None = None
    """Folder of Ed25519 public keys (PEM); when set, only packages signed by one of them run."""
    require_signature: bool = False
    """Refuse unsigned packages even without trusted keys configured."""
    merge: bool = True
    """Add the active adapter's update into the base weights (no per-request LoRA cost; fp32 bases
    only, where merging and unmerging round-trip exactly enough); other adapters run unmerged."""
    max_resident: Annotated[int, Field(ge=1, le=64)] = 3
    """Adapters kept in memory (least recently used dropped first; the active one never)."""
    s3_endpoint: str | None = None
    """S3 endpoint URL for s3:// packages and bases (else AWS_ENDPOINT_URL_S3, else AWS)."""
    mlflow_uri: str | None = None
    """MLflow tracking URI for models:/ and runs:/ URIs (else MLFLOW_TRACKING_URI)."""
    eval_data_dir: Path | None = None
    """Labelled node-local data: a candidate is scored against the current adapter before serving."""
    eval_format: Literal["csv", "jsonl", "npy", "text", "ts"] = "npy"
    """Format of the files in eval-data-dir."""
    eval_max_drop: Annotated[float, Field(ge=0)] | None = None
    """Refuse a candidate whose accuracy is lower than the current adapter's by more than this."""
    shadow_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    """Share of live requests also run through a shadow adapter."""
    threads: Annotated[int, Field(ge=0)] = 0
    """torch intra-op threads (0: torch's default)."""
    pod_name: str | None = None
    """This pod's name (the downward API's metadata.name; also read from POD_NAME)."""
    pod_namespace: str | None = None
    """This pod's namespace (also read from POD_NAMESPACE)."""
    pod_uid: str | None = None
    """This pod's UID (also read from POD_UID): the agent writes only to its own pod."""
    report: bool = True
    """Report to the pod (condition, annotation, Events) when running in a cluster."""


FLAGS = {"hosts": "--host", "merge": "--no-merge", "report": "--no-report"}
"""Fields whose flag is not ``--<field-name>``: a repeated --host, and the two switches that turn a
default-on behaviour off."""
ALSO_READ = {"s3_endpoint": "AWS_ENDPOINT_URL_S3", "mlflow_uri": "MLFLOW_TRACKING_URI", "pod_name": "POD_NAME",
             "pod_namespace": "POD_NAMESPACE", "pod_uid": "POD_UID"}  # fmt: skip
"""The conventional variable read when the agent's own is not set."""


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _env_value(field: str) -> str | None:
    value = os.environ.get(env_name(field))
    if value is None and field in ALSO_READ:
        value = os.environ.get(ALSO_READ[field])
    return value or None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m edgetune_agent",
        description="edgetune edge agent: serves the base model over the Open Inference Protocol and runs the "
        "adapter its pod's assignment names, verified first. Every flag also reads EDGETUNE_AGENT_<FLAG> "
        "(upper case, '-' as '_').",
    )  # fmt: skip
    for name, info in AgentSettings.model_fields.items():
        flag = FLAGS.get(name, "--" + name.replace("_", "-"))
        default = info.get_default(call_default_factory=True)
        env = env_name(name) + (f" or {ALSO_READ[name]}" if name in ALSO_READ else "")
        shown = ",".join(default) if isinstance(default, list) else ("none" if default is None else default)
        if info.is_required():
            shown = "required"
        text = f"{(info.description or '').rstrip('.')} (default: {shown}; env {env})".replace("%", "%%")
        kind: dict[str, Any] = {}
        if info.annotation is bool:
            kind = {"action": "store_false" if default else "store_true", "default": None}
            text = (f"turn off: {text[0].lower()}{text[1:]}" if default else text)
        elif name == "hosts":
            kind = {"action": "append", "metavar": "ADDRESS"}
        else:
            choices = typing.get_args(info.annotation) if typing.get_origin(info.annotation) is Literal else None
            kind = {"choices": choices} if choices else {"metavar": name.split("_")[-1].upper()}
        p.add_argument(flag, dest=name, help=text, **kind)
    return p


def parse_args(argv: list[str] | None = None) -> AgentSettings:
    """Flags first, then the environment, then the field's default; pydantic checks the result."""
    given = vars(parser().parse_args(argv))
    values: dict[str, Any] = {}
    for name, info in AgentSettings.model_fields.items():
        value = given.get(name)
        if value is None or (isinstance(value, bool) and info.annotation is bool and value == info.default):
            env = _env_value(name)
            if env is not None:
                value = env.split(",") if name == "hosts" else env
        if value is not None:
            values[name] = value
    if "base_uri" not in values:
        parser().error(f"--base-uri (or {env_name('base_uri')}) is required")
    return AgentSettings.model_validate(values)
