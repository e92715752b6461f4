"""Build the delta package from adapter weights, and upload it to S3 with verification.

The weight encodings (fp32, fp16, int8-zstd, int4-zstd) live in ``edgetune_api.codec`` (numpy), shared
with the operator and the edge agent; this module converts torch tensors at the boundary. The
trainer evaluates the *decoded* adapter and reports that metric, so the number that ships is the
number measured.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from edgetune_api import codec
from edgetune_api.codec import BLOCK, BLOCK4, WEIGHTS
from edgetune_api.delta import SIGNATURE, DeltaManifest, FileEntry, Lineage, sha256_bytes, write_manifest
from edgetune_api.trainer_config import UploadPolicy

__all__ = ["BLOCK", "BLOCK4", "WEIGHTS", "UploadError", "build", "decode", "encode", "upload", "upload_presigned"]


def encode(state: dict[str, torch.Tensor], encoding: str) -> bytes:
    """Adapter tensors -> the bytes of the weights file for ``encoding``."""
    return codec.encode({k: v.detach().float().cpu().numpy() for k, v in state.items()}, encoding)


def decode(data: bytes, encoding: str) -> dict[str, torch.Tensor]:
    """The inverse of ``encode`` (fp32 tensors out)."""
    return {k: torch.from_numpy(v.copy()) for k, v in codec.decode(data, encoding).items()}


PEFT_KEPT = ("peft_type", "r", "lora_alpha", "target_modules")
"""Kept even at their defaults: what a reader checks first (agents refuse a non-LoRA package)."""


def slim_peft_config(config: Any) -> dict[str, Any]:
    """A peft config as JSON without the fields at their defaults (``PeftConfig.from_peft_type``
    restores them: lossless). peft's own dump is ~1 KB of nulls and defaults, more than an int4
    adapter of a small model."""
    defaults: dict[str, Any] = {}
    for spec in dataclasses.fields(config):
        if spec.default is not dataclasses.MISSING:
            defaults[spec.name] = spec.default
        elif spec.default_factory is not dataclasses.MISSING:
            defaults[spec.name] = spec.default_factory()
    full, plain = (json.loads(json.dumps(d, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
                   for d in (config.to_dict(), defaults))  # fmt: skip
    return {k: v for k, v in full.items() if k in PEFT_KEPT or k not in plain or plain[k] != v}


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
    signature: str = SIGNATURE,
) -> tuple[str, DeltaManifest]:
    """Write the package into ``folder``; return (package digest, manifest). ``signature`` names the
    signature file: manifest.sig (a publisher's key), trainer.sig (a key derived for this trainer)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    weights = encode(state, encoding)
    # The peft configuration lives in the manifest only (it was also a second file, adapter_config.json:
    # the encoded weights are no PEFT folder anyway; the vLLM backend writes one from the manifest).
    files = {WEIGHTS[encoding]: weights}
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
    digest = write_manifest(folder, manifest, signing_key_pem, signature=signature)
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


def presigned_http() -> Any:
    """The HTTP pool for presigned S3 URLs (uploads and base model downloads): bounded timeouts, five
    retries with backoff on connection errors and 5xx, for POSTs too (a form upload of the same key
    is idempotent)."""
    import urllib3  # noqa: PLC0415

    return urllib3.PoolManager(timeout=urllib3.Timeout(connect=5.0, read=60.0),
                               retries=urllib3.Retry(total=5, backoff_factor=1.0, status_forcelist=(500, 502, 503, 504),
                                                     allowed_methods=None))  # fmt: skip


def upload_presigned(folder: Path, policy: UploadPolicy) -> str:
    """Upload every file of the package with the operator's presigned POST policy (no S3
    credentials here): one form POST per file, retried with backoff on connection errors and 5xx;
    S3's ETag (the MD5 of a single-part object) is checked against the local bytes when S3 sends
    one. The operator verifies every file's SHA-256 before anything is registered."""
    import urllib3  # noqa: PLC0415

    http = presigned_http()
    for path in sorted(folder.iterdir()):
        key = f"{policy.prefix}/{path.name}"
        data = path.read_bytes()
        try:
            response = http.request("POST", policy.url, fields={**policy.fields, "key": key,
                                                                "file": (path.name, data)})  # fmt: skip
        except urllib3.exceptions.HTTPError as exc:
            raise UploadError(f"uploading {key} failed: {exc}") from exc
        if response.status >= 300:
            detail = response.data[:300].decode(errors="replace")
            raise UploadError(f"uploading {key} failed: HTTP {response.status} (the upload policy expires "
                              f"{policy.expires}): {detail}")  # fmt: skip
        etag = (response.headers.get("ETag") or "").strip('"')
        if etag and "-" not in etag and etag != hashlib.md5(data, usedforsecurity=False).hexdigest():
            raise UploadError(f"S3 stored other bytes for {key} (ETag {etag})")
    return f"s3://{policy.bucket}/{policy.prefix}"
