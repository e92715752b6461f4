"""Build the delta package from adapter weights, and upload it to S3 with verification.

Encodings:
- ``fp32`` / ``fp16``: ``adapter.safetensors`` holding the LoRA tensors in that precision.
- ``int8-zstd``: symmetric int8 quantisation in blocks of 64 values (int8 tensor + one fp32 scale
  per block, stored as ``<name>`` and ``<name>.__scale__``), then the safetensors bytes are
  zstd-compressed into ``adapter.safetensors.zst``. The trainer evaluates the *dequantised*
  adapter and reports that metric, so the number that ships is the number measured.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import zstandard
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from edgetune_api.delta import DeltaManifest, FileEntry, Lineage, sha256_bytes, write_manifest

SCALE_SUFFIX = ".__scale__"
BLOCK = 64  # values per int8 scale: 6 % overhead, error bounded by each block's own range
WEIGHTS = {"fp32": "adapter.safetensors", "fp16": "adapter.safetensors", "int8-zstd": "adapter.safetensors.zst"}


def quantize_int8(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 in blocks of ``BLOCK`` consecutive values (one fp32 scale per block):
    returns (int8 values in the tensor's shape, scales)."""
    flat = tensor.float().reshape(-1)
    padded = torch.nn.functional.pad(flat, (0, (-flat.numel()) % BLOCK)).reshape(-1, BLOCK)
    scale = padded.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(padded / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(-1)[: flat.numel()].reshape(tensor.shape), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    flat = q.float().reshape(-1)
    padded = torch.nn.functional.pad(flat, (0, (-flat.numel()) % BLOCK)).reshape(-1, BLOCK)
    return (padded * scale[:, None]).reshape(-1)[: flat.numel()].reshape(q.shape)


def encode(state: dict[str, torch.Tensor], encoding: str) -> bytes:
    """Adapter tensors -> the bytes of the weights file for ``encoding``."""
    if encoding == "fp32":
        return st_save({k: v.float().contiguous() for k, v in state.items()})
    if encoding == "fp16":
        return st_save({k: v.half().contiguous() for k, v in state.items()})
    if encoding == "int8-zstd":
        out: dict[str, torch.Tensor] = {}
        for name, tensor in state.items():
            q, scale = quantize_int8(tensor)
            out[name], out[name + SCALE_SUFFIX] = q.contiguous(), scale.contiguous()
        return zstandard.ZstdCompressor(level=19).compress(st_save(out))
    raise ValueError(f"unknown encoding {encoding!r}")


def decode(data: bytes, encoding: str) -> dict[str, torch.Tensor]:
    """The inverse of ``encode`` (fp32 tensors out)."""
    if encoding in ("fp32", "fp16"):
        return {k: v.float() for k, v in st_load(data).items()}
    if encoding == "int8-zstd":
        raw = st_load(zstandard.ZstdDecompressor().decompress(data))
        return {k: dequantize_int8(v, raw[k + SCALE_SUFFIX]) for k, v in raw.items() if not k.endswith(SCALE_SUFFIX)}
    raise ValueError(f"unknown encoding {encoding!r}")


def build(
    folder: Path,
    state: dict[str, torch.Tensor],
    *,
    encoding: str,
    peft_config: dict[str, Any],
    lineage: Lineage,
    steps: int,
    duration_s: float,
    metrics: dict[str, float],
    energy_joules: float | None,
    energy_method: str | None,
    peak_memory_bytes: int | None,
    signing_key_pem: bytes | None,
) -> tuple[str, DeltaManifest]:
    """Write the package into ``folder``; return (package digest, manifest)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    weights = encode(state, encoding)
    files = {
        WEIGHTS[encoding]: weights,
        "adapter_config.json": json.dumps(peft_config, sort_keys=True, indent=1).encode(),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    manifest = DeltaManifest(
        encoding=encoding,  # type: ignore[arg-type]
        files={name: FileEntry(sha256=sha256_bytes(data), bytes=len(data)) for name, data in files.items()},
        peft=peft_config,
        lineage=lineage,
        steps=steps,
        duration_s=round(duration_s, 3),
        metrics=metrics,
        energy_joules=energy_joules,
        energy_method=energy_method,
        peak_memory_bytes=peak_memory_bytes,
        adapter_bytes=len(weights),
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    digest = write_manifest(folder, manifest, signing_key_pem)
    return digest, manifest


class UploadError(RuntimeError):
    """The package could not be stored in S3 (after retries), or S3 returned other bytes."""


def upload(folder: Path, client: Any, bucket: str, prefix: str) -> str:
    """Upload every file of the package (multipart for large ones, retried by botocore), then
    check each object's SHA-256 as S3 reports it against the local file. Returns the S3 URI."""
    from boto3.s3.transfer import TransferConfig  # noqa: PLC0415
    from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

    prefix = prefix.strip("/")
    transfer = TransferConfig(multipart_threshold=8 * 2**20, multipart_chunksize=8 * 2**20)
    try:
        for path in sorted(folder.iterdir()):
            key = f"{prefix}/{path.name}" if prefix else path.name
            client.upload_file(str(path), bucket, key, Config=transfer, ExtraArgs={"ChecksumAlgorithm": "SHA256"})
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            local = path.read_bytes()
            if hashlib.sha256(body).digest() != hashlib.sha256(local).digest():
                raise UploadError(f"s3://{bucket}/{key} does not hold the bytes that were uploaded")
    except (BotoCoreError, ClientError) as exc:
        raise UploadError(f"uploading the package to s3://{bucket}/{prefix} failed: {exc}") from exc
    return f"s3://{bucket}/{prefix}"
