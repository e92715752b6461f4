"""Build the delta package from adapter weights, and upload it to S3 with verification.

Encodings:
- ``fp32`` / ``fp16``: ``adapter.safetensors`` holding the LoRA tensors in that precision.
- ``int8-zstd``: symmetric int8 quantisation in blocks of 64 values (int8 tensor + one fp32 scale
  per block, stored as ``<name>`` and ``<name>.__scale__``), then the safetensors bytes are
  zstd-compressed into ``adapter.safetensors.zst``.
- ``int4-zstd``: the same with 4-bit levels (-7..7) packed two per byte and one fp16 scale per 128
  values; tensor shapes travel in the safetensors metadata. The trainer evaluates the *dequantised*
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
BLOCK4 = 128  # values per int4 scale (fp16), the usual 4-bit group size: 4.125 bits per value before zstd
WEIGHTS = {
    "fp32": "adapter.safetensors",
    "fp16": "adapter.safetensors",
    "int8-zstd": "adapter.safetensors.zst",
    "int4-zstd": "adapter.safetensors.zst",
}


def _blocks(tensor: torch.Tensor, size: int) -> torch.Tensor:
    flat = tensor.float().reshape(-1)
    return torch.nn.functional.pad(flat, (0, (-flat.numel()) % size)).reshape(-1, size)


def _unblock(blocks: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    numel = 1
    for dim in shape:
        numel *= dim
    return blocks.reshape(-1)[:numel].reshape(shape)


def quantize_int8(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 in blocks of ``BLOCK`` consecutive values (one fp32 scale per block):
    returns (int8 values in the tensor's shape, scales)."""
    blocks = _blocks(tensor, BLOCK)
    scale = blocks.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(blocks / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return _unblock(q, tensor.shape), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _unblock(_blocks(q, BLOCK) * scale[:, None], q.shape)


def quantize_int4(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 4-bit in blocks of ``BLOCK4`` values (one fp16 scale per block), two values per byte:
    returns (packed uint8, scales). Levels -7..7; the byte holds (low + 8) | (high + 8) << 4."""
    blocks = _blocks(tensor, BLOCK4)
    scale = (blocks.abs().amax(dim=1).clamp(min=1e-12) / 7.0).to(torch.float16)
    q = torch.round(blocks / scale.float()[:, None]).clamp(-7, 7).to(torch.int16) + 8
    pairs = q.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8), scale


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    as_int = packed.to(torch.int16)
    q = torch.stack([as_int & 0xF, as_int >> 4], dim=1).reshape(-1, BLOCK4) - 8
    return _unblock(q.float() * scale.float()[:, None], shape)


def encode(state: dict[str, torch.Tensor], encoding: str) -> bytes:
    """Adapter tensors -> the bytes of the weights file for ``encoding``."""
    if encoding == "fp32":
        return st_save({k: v.float().contiguous() for k, v in state.items()})
    if encoding == "fp16":
        return st_save({k: v.half().contiguous() for k, v in state.items()})
    out: dict[str, torch.Tensor] = {}
    shapes: dict[str, str] = {}
    for name, tensor in state.items():
        if encoding == "int8-zstd":
            out[name], out[name + SCALE_SUFFIX] = quantize_int8(tensor)
        elif encoding == "int4-zstd":
            out[name], out[name + SCALE_SUFFIX] = quantize_int4(tensor)
            shapes[name] = json.dumps(list(tensor.shape))
        else:
            raise ValueError(f"unknown encoding {encoding!r}")
    raw = st_save({k: v.contiguous() for k, v in out.items()}, metadata=shapes or None)
    return zstandard.ZstdCompressor(level=19).compress(raw)


def decode(data: bytes, encoding: str) -> dict[str, torch.Tensor]:
    """The inverse of ``encode`` (fp32 tensors out)."""
    if encoding in ("fp32", "fp16"):
        return {k: v.float() for k, v in st_load(data).items()}
    if encoding not in ("int8-zstd", "int4-zstd"):
        raise ValueError(f"unknown encoding {encoding!r}")
    raw_bytes = zstandard.ZstdDecompressor().decompress(data)
    raw = st_load(raw_bytes)
    names = [k for k in raw if not k.endswith(SCALE_SUFFIX)]
    if encoding == "int8-zstd":
        return {k: dequantize_int8(raw[k], raw[k + SCALE_SUFFIX]) for k in names}
    shapes = _metadata(raw_bytes)
    return {k: dequantize_int4(raw[k], raw[k + SCALE_SUFFIX], tuple(json.loads(shapes[k]))) for k in names}


def _metadata(safetensors_bytes: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (its JSON header)."""
    header_len = int.from_bytes(safetensors_bytes[:8], "little")
    header = json.loads(safetensors_bytes[8 : 8 + header_len])
    return dict(header.get("__metadata__") or {})


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
