"""The adapter delta package: what leaves the edge node, and how anyone verifies it.

A package is a folder (and, once uploaded, an S3 prefix) holding the adapter's files and a
``manifest.json`` that lists every file with its SHA-256 and size, plus lineage (base model,
data hash, node, job) and results (metrics, energy, peak memory). ``manifest.sig``, when a
signing key is configured, is an Ed25519 signature over the exact bytes of ``manifest.json``
made by the hub (the operator counter-signs after verifying); ``trainer.sig`` is the trainer's
own signature with a key derived for that one trainer (``derive_trainer_key``), which only the
operator checks. The package's identity is the SHA-256 of ``manifest.json``.

No torch here: the operator and the edge agent verify packages without it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

FORMAT: Final = "edgetune.delta/v1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
TRAINER_SIGNATURE = "trainer.sig"
Encoding = Literal["fp32", "fp16", "int8-zstd", "int4-zstd"]


class DeltaVerificationError(ValueError):
    """A package failed verification; the message says which file or check and what was found.

    ``reason`` names the check in CamelCase (``HashMismatch``, ``Unsigned``, ``SignatureInvalid``,
    ``InvalidManifest``), for conditions, Events and metric labels."""

    def __init__(self, message: str, reason: str = "HashMismatch") -> None:
        super().__init__(message)
        self.reason = reason


MAX_PACKAGE_BYTES = 1 << 30
"""A package (every file together) larger than this is refused: adapters are KB to MB."""
FileName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
"""A plain file name: packages are flat, so no separators, no `..`, nothing hidden."""


class FileEntry(BaseModel):
    sha256: Annotated[str, Field(pattern=r"^[a-f0-9]{64}$")]
    bytes: Annotated[int, Field(ge=0, le=MAX_PACKAGE_BYTES)]


class Lineage(BaseModel):
    """Where the adapter came from; becomes MLflow tags."""

    model_config = ConfigDict(extra="forbid")

    base_model_uri: str
    base_model_sha256: str | None = None
    base_model_revision: str | None = None
    """The job's baseModel.revision (free-form: the base model's own version or commit)."""
    data_sha256: str
    """SHA-256 over the content of the training samples after privacy filters (never the samples)."""
    samples: int
    data_format: str
    job_namespace: str | None = None
    job_name: str | None = None
    job_uid: str | None = None
    cluster: str | None = None
    node: str | None = None
    trainer_version: str
    device: str | None = None
    """What the trainer trained on: gpu or cpu (for a fedavg package, the devices of its sources, comma-separated)."""


class DeltaManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["edgetune.delta/v1"] = FORMAT
    encoding: Encoding
    files: Annotated[dict[FileName, FileEntry], Field(max_length=32)]
    peft: dict[str, Any]
    lineage: Lineage
    steps: int
    duration_s: float
    metrics: dict[str, float]
    energy_joules: float | None = None
    energy_method: str | None = None
    peak_memory_bytes: int | None = None
    adapter_bytes: int
    """Bytes of the encoded adapter weights."""
    created_at: str
    sources: list[dict[str, Any]] = Field(default_factory=list)
    """For an aggregated adapter: the packages averaged into it (digest, uri, cluster, node, samples)."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def manifest_bytes(manifest: DeltaManifest) -> bytes:
    """Canonical JSON: sorted keys, no whitespace variance, so the digest is reproducible."""
    return json.dumps(manifest.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


def sign(data: bytes, private_key_pem: bytes) -> bytes:
    """Ed25519 signature of ``data``, base64-encoded."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415
    from cryptography.hazmat.primitives.serialization import load_pem_private_key  # noqa: PLC0415

    key = load_pem_private_key(private_key_pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise TypeError(f"signing key must be an Ed25519 private key (PEM), got {type(key).__name__}")
    return base64.b64encode(key.sign(data))


def verify_signature(data: bytes, signature_b64: bytes, public_key_pem: bytes) -> None:
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey  # noqa: PLC0415
    from cryptography.hazmat.primitives.serialization import load_pem_public_key  # noqa: PLC0415

    key = load_pem_public_key(public_key_pem)
    if not isinstance(key, Ed25519PublicKey):
        raise DeltaVerificationError(
            f"verification key must be an Ed25519 public key, got {type(key).__name__}", "SignatureInvalid"
        )
    try:
        key.verify(base64.b64decode(signature_b64, validate=True), data)
    except (InvalidSignature, ValueError) as exc:
        raise DeltaVerificationError(
            "manifest signature does not verify with the configured public key", "SignatureInvalid"
        ) from exc


def derive_trainer_key(private_key_pem: bytes, context: str) -> bytes:
    """An Ed25519 private key (PEM) for one trainer, derived from the hub's signing key and
    ``context`` (job uid and trainer name) with HKDF-SHA256. The hub can re-derive its public half
    at any time (nothing to store), and a trainer's key says nothing about the hub key or any
    other trainer's key, so a compromised edge node can sign only as itself."""
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF  # noqa: PLC0415

    key = serialization.load_pem_private_key(private_key_pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise TypeError(f"signing key must be an Ed25519 private key (PEM), got {type(key).__name__}")
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())  # fmt: skip
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=b"edgetune trainer key v1\x00" + context.encode()).derive(seed)  # fmt: skip
    return Ed25519PrivateKey.from_private_bytes(derived).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_pem(private_key_pem: bytes) -> bytes:
    """The public half (SubjectPublicKeyInfo PEM) of a private key (PEM)."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    key = serialization.load_pem_private_key(private_key_pem, password=None)
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def write_manifest(
    folder: Path, manifest: DeltaManifest, private_key_pem: bytes | None = None, *, signature: str = SIGNATURE
) -> str:
    """Write manifest.json (and its signature as ``signature``: manifest.sig, or trainer.sig for a
    trainer's derived key); return the package digest (SHA-256 of manifest.json)."""
    data = manifest_bytes(manifest)
    (folder / MANIFEST).write_bytes(data)
    if private_key_pem is not None:
        (folder / signature).write_bytes(sign(data, private_key_pem))
    return sha256_bytes(data)


def verify_package(
    files: Mapping[str, bytes], public_key_pem: bytes | None = None, expected_digest: str | None = None, *,
    signature: str = SIGNATURE,
) -> DeltaManifest:  # fmt: skip
    """Verify a package given as ``{file name: content}``; return its manifest.

    Checks, in order: the manifest digest (when expected), the signature file ``signature`` (when a
    key is given: a missing signature fails), then the size and SHA-256 of every listed file; files
    that the manifest does not list (other than the two signatures) are refused too.
    """
    if MANIFEST not in files:
        raise DeltaVerificationError(f"package has no {MANIFEST}", "InvalidManifest")
    raw = files[MANIFEST]
    digest = sha256_bytes(raw)
    if expected_digest is not None and digest != expected_digest:
        raise DeltaVerificationError(f"{MANIFEST} digest is {digest}, expected {expected_digest}")
    if public_key_pem is not None:
        if signature not in files:
            raise DeltaVerificationError(
                f"package is unsigned ({signature} missing) but a verification key is set", "Unsigned"
            )
        verify_signature(raw, files[signature], public_key_pem)
    try:
        manifest = DeltaManifest.model_validate_json(raw)
    except ValueError as exc:
        raise DeltaVerificationError(f"{MANIFEST} is not a valid {FORMAT} manifest: {exc}", "InvalidManifest") from exc
    extra = sorted(set(files) - set(manifest.files) - {MANIFEST, SIGNATURE, TRAINER_SIGNATURE})
    if extra:
        raise DeltaVerificationError(f"package holds files the manifest does not list: {extra}")
    for name, entry in manifest.files.items():
        if name not in files:
            raise DeltaVerificationError(f"{name} is listed in the manifest but missing from the package")
        content = files[name]
        if len(content) != entry.bytes:
            raise DeltaVerificationError(f"{name} has {len(content)} bytes, the manifest says {entry.bytes}")
        actual = sha256_bytes(content)
        if actual != entry.sha256:
            raise DeltaVerificationError(f"{name} has SHA-256 {actual}, the manifest says {entry.sha256}")
    return manifest


def read_folder(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
