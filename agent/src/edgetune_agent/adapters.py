"""Fetch, verify and decode delta packages: nothing reaches the model before every check passed.

Order of checks (each failure is an ``AdapterRefused`` with a CamelCase reason):
revoked → fetched (``NotFound``/``StorageUnavailable``/``DiskFull``, the last two retried) →
manifest digest equals the assignment's (``HashMismatch``) → signature by a locally trusted key
(``Unsigned``/``SignatureInvalid``) → every file's size and SHA-256 (``HashMismatch``) → encoding
→ trained on this base (``IncompatibleBase``) → weights decode (``DecodeFailed``).

Packages are cached on disk by digest (``<cache>/packages/<sha256>``), written to a temporary
folder and renamed into place, and re-verified every time they are used: a cache entry that a
disk error or a person changed is discarded and fetched again.
"""

from __future__ import annotations

import errno
import json
import shutil
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetune_api import codec
from edgetune_api.assignment import (
    RETRYABLE_REASONS,
    AdapterAssignment,
    Revocation,
    key_fingerprint,
    revocation_location,
)
from edgetune_api.delta import MAX_PACKAGE_BYTES, DeltaManifest, DeltaVerificationError, read_folder, verify_package

COMPLETE = ".complete"  # marker of a fully downloaded cache entry (not part of the package)
ORIGIN = ".origin"  # the s3:// URI a cache entry came from (where its revocation would be published)


class AdapterRefused(Exception):  # noqa: N818 - a refusal is an outcome, not a bug
    """The assigned adapter cannot run here; ``reason`` is one of ``REFUSAL_REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.reason in RETRYABLE_REASONS


@dataclass
class Delta:
    """A verified, decoded adapter, ready to be loaded next to the base."""

    assignment: AdapterAssignment
    manifest: DeltaManifest
    tensors: dict[str, np.ndarray]
    peft_config: dict[str, Any]
    folder: Path
    downloaded_bytes: int
    """0 when the package came from the local cache."""

    @property
    def nbytes(self) -> int:
        return int(sum(t.nbytes for t in self.tensors.values()))


@dataclass(frozen=True)
class BaseIdentity:
    """What an adapter must have been trained on: the base's weights digest (or builtin URI)."""

    uri: str
    sha256: str | None


def s3_client(endpoint: str | None) -> Any:
    """An S3 client for edge links: path-style addressing (MinIO, versitygw, Ceph), short timeouts,
    few retries (the assignment loop retries with its own backoff)."""
    import boto3  # noqa: PLC0415 - only agents that download need it
    from botocore.config import Config  # noqa: PLC0415

    config = Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=3, read_timeout=20,
                    s3={"addressing_style": "path"})  # fmt: skip
    return boto3.client("s3", endpoint_url=endpoint, config=config)


def load_trusted_keys(folder: Path | None) -> dict[str, bytes]:
    """``{fingerprint: PEM}`` of every public key in ``folder`` (files that are not keys are skipped)."""
    keys: dict[str, bytes] = {}
    if folder is None:
        return keys
    for path in sorted(folder.iterdir()) if folder.exists() else []:
        if not path.is_file() or path.name.startswith("."):
            continue
        pem = path.read_bytes()
        try:
            keys[key_fingerprint(pem)] = pem
        except ValueError:
            continue
    return keys


class PackageStore:
    """Resolves, downloads, caches and verifies packages. Blocking: call it from a worker thread."""

    def __init__(
        self,
        cache_dir: Path,
        *,
        trusted_keys: dict[str, bytes],
        require_signature: bool,
        s3_endpoint: str | None = None,
        mlflow_uri: str | None = None,
        s3_client: Any = None,
    ) -> None:
        self.root = cache_dir / "packages"
        self.root.mkdir(parents=True, exist_ok=True)
        self.trusted_keys = trusted_keys
        self.require_signature = require_signature or bool(trusted_keys)
        self.s3_endpoint = s3_endpoint
        self.mlflow_uri = mlflow_uri
        self._s3 = s3_client
        self.origins: dict[str, str] = {}
        """Package digest → the s3:// URI it was fetched from."""
        self.revoked_path = cache_dir / "revoked.json"
        self.revoked: set[str] = set()
        if self.revoked_path.exists():
            try:
                self.revoked = set(json.loads(self.revoked_path.read_text()))
            except ValueError:
                self.revoked = set()

    # -- revocation ------------------------------------------------------------------------------

    def remember_revoked(self, digests: list[str]) -> None:
        """Revocations are sticky: once told, the agent refuses the digest even after a restart."""
        new = set(digests) - self.revoked
        if not new:
            return
        self.revoked |= new
        tmp = self.revoked_path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(sorted(self.revoked)))
            tmp.replace(self.revoked_path)
        except OSError:
            pass  # still refused in memory; persisted next time the disk allows

    def published_revocation(self, sha256: str) -> Revocation | None:
        """The revocation the operator published in S3 for this package (``revocation_location``),
        or None: none published, the package did not come from S3, or S3 did not answer (the next
        poll tries again; the assignment remains the primary channel)."""
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        where = revocation_location(self.origins.get(sha256, ""), sha256)
        if where is None:
            return None
        try:
            body = self._client().get_object(Bucket=where[0], Key=where[1])["Body"].read()
        except (ClientError, BotoCoreError, OSError):
            return None
        try:
            record = Revocation.model_validate_json(body)
        except ValueError:
            return None
        return record if record.sha256 == sha256 else None

    # -- the pipeline ----------------------------------------------------------------------------

    def refuse_if_revoked(self, assignment: AdapterAssignment) -> None:
        self.remember_revoked(assignment.revoked)
        if assignment.sha256 in self.revoked:
            raise AdapterRefused("Revoked", f"package {assignment.sha256[:12]} (version {assignment.version}) "
                                 "was revoked by a rollback and must not run")  # fmt: skip

    def load(self, assignment: AdapterAssignment, base: BaseIdentity) -> Delta:
        self.refuse_if_revoked(assignment)
        folder, downloaded = self._fetch(assignment)
        cached = folder.parent == self.root
        try:
            manifest = self._verify(assignment, folder)
        except AdapterRefused:
            if cached:
                shutil.rmtree(folder, ignore_errors=True)  # never keep what failed verification
            if downloaded or not cached:
                raise
            folder, downloaded = self._fetch(assignment)  # a damaged cache entry: fetch once more
            try:
                manifest = self._verify(assignment, folder)
            except AdapterRefused:
                shutil.rmtree(folder, ignore_errors=True)
                raise
        if assignment.encoding is not None and manifest.encoding != assignment.encoding:
            raise AdapterRefused("InvalidAssignment", f"the assignment says encoding {assignment.encoding}, "
                                 f"the package is {manifest.encoding}")  # fmt: skip
        self._check_base(manifest, base)
        weights = folder / codec.WEIGHTS[manifest.encoding]
        try:
            tensors = codec.decode(weights.read_bytes(), manifest.encoding)
        except Exception as exc:  # zstd, safetensors and numpy raise a variety of types
            raise AdapterRefused(
                "DecodeFailed", f"{weights.name} does not decode as {manifest.encoding}: {exc}"
            ) from exc
        if not tensors or any(not np.all(np.isfinite(t)) for t in tensors.values()):
            raise AdapterRefused("DecodeFailed", f"{weights.name} holds no tensors or non-finite values")
        return Delta(assignment, manifest, tensors, dict(manifest.peft), folder, downloaded)

    def _check_base(self, manifest: DeltaManifest, base: BaseIdentity) -> None:
        lineage = manifest.lineage
        if base.sha256 is not None:
            if lineage.base_model_sha256 != base.sha256:
                raise AdapterRefused(
                    "IncompatibleBase",
                    f"adapter was trained on base {str(lineage.base_model_sha256)[:12]} ({lineage.base_model_uri}), "
                    f"this agent serves base {base.sha256[:12]} ({base.uri})",
                )
        elif lineage.base_model_uri != base.uri or lineage.base_model_sha256 is not None:
            raise AdapterRefused(
                "IncompatibleBase", f"adapter was trained on {lineage.base_model_uri}, this agent serves {base.uri}"
            )

    def _verify(self, assignment: AdapterAssignment, folder: Path) -> DeltaManifest:
        files = {name: data for name, data in read_folder(folder).items() if name not in (COMPLETE, ORIGIN)}
        keys: list[bytes | None] = [None]
        if self.require_signature:
            if assignment.signer is not None:
                if assignment.signer not in self.trusted_keys:
                    raise AdapterRefused("SignatureInvalid", f"signer {assignment.signer[:12]} is not among the "
                                         f"{len(self.trusted_keys)} keys this agent trusts")  # fmt: skip
                keys = [self.trusted_keys[assignment.signer]]
            elif self.trusted_keys:
                keys = list(self.trusted_keys.values())
            else:
                raise AdapterRefused("SignatureInvalid", "signatures are required but no trusted key is configured")
        failure = DeltaVerificationError("no key to verify with", "SignatureInvalid")
        for key in keys:
            try:
                return verify_package(files, key, expected_digest=assignment.sha256)
            except DeltaVerificationError as exc:
                failure = exc
                if exc.reason != "SignatureInvalid":
                    break
        raise AdapterRefused(failure.reason, str(failure)) from failure

    # -- fetching --------------------------------------------------------------------------------

    def _fetch(self, assignment: AdapterAssignment) -> tuple[Path, int]:
        """The package folder (cached by digest) and the bytes downloaded to get it (0: cache hit)."""
        target = self.root / assignment.sha256
        if (target / COMPLETE).exists():
            origin = target / ORIGIN
            if assignment.sha256 not in self.origins and origin.exists():
                self.origins[assignment.sha256] = origin.read_text().strip()
            return target, 0
        uri = assignment.uri
        if uri.startswith(("/", "file://")):
            source = Path(urllib.parse.urlparse(uri).path if uri.startswith("file://") else uri)
            if not source.is_dir():
                raise AdapterRefused("NotFound", f"no package folder at {source}")
            return source, 0  # local folders are verified where they are, never copied
        if uri.startswith("models:/"):
            uri = self._resolve_mlflow(uri)
        if not uri.startswith("s3://"):
            raise AdapterRefused("InvalidAssignment", f"cannot fetch {uri!r}: expected s3://, models:/ or a path")
        tmp: Path | None = None
        try:
            tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".partial-"))
            total = self._download_s3(uri, tmp)
            (tmp / ORIGIN).write_text(uri)
            (tmp / COMPLETE).touch()
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
            tmp = None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise AdapterRefused("DiskFull", f"no space left in {self.root} to download {uri}") from exc
            raise AdapterRefused("StorageUnavailable", f"downloading {uri} failed: {exc}") from exc
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        self.origins[assignment.sha256] = uri
        return target, total

    def _client(self) -> Any:
        if self._s3 is None:
            self._s3 = s3_client(self.s3_endpoint)
        return self._s3

    def _download_s3(self, uri: str, dest: Path) -> int:
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        parsed = urllib.parse.urlparse(uri)
        bucket, prefix = parsed.netloc, parsed.path.strip("/") + "/"
        client = self._client()
        total = 0
        try:
            keys = []
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                keys += [(o["Key"], o["Size"]) for o in page.get("Contents", [])]
            if not keys:
                raise AdapterRefused("NotFound", f"no package under {uri}")
            if (size := sum(int(s) for _, s in keys)) > MAX_PACKAGE_BYTES:  # before any byte lands on disk
                raise AdapterRefused("InvalidManifest", f"{uri} holds {size} bytes, more than a package may "
                                     f"({MAX_PACKAGE_BYTES})")  # fmt: skip
            for key, size in keys:
                name = key[len(prefix) :]
                if "/" in name or name.startswith("."):
                    continue  # packages are flat; anything else is not ours
                client.download_file(bucket, key, str(dest / name))
                total += int(size)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchBucket", "NoSuchKey", "404"):
                raise AdapterRefused("NotFound", f"{uri}: {code}") from exc
            raise AdapterRefused("StorageUnavailable", f"S3 refused {uri}: {exc}") from exc
        except BotoCoreError as exc:
            raise AdapterRefused("StorageUnavailable", f"S3 unreachable for {uri}: {exc}") from exc
        return total

    def _resolve_mlflow(self, uri: str) -> str:
        if not self.mlflow_uri:
            raise AdapterRefused("InvalidAssignment", f"{uri} is an MLflow URI but no MLflow tracking URI is set")
        import urllib.error  # noqa: PLC0415

        from edgetune_trainer.registry import resolve_mlflow_uri  # noqa: PLC0415

        started = time.monotonic()
        try:
            return resolve_mlflow_uri(uri, self.mlflow_uri)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise AdapterRefused("NotFound", f"MLflow has no {uri}") from exc
            raise AdapterRefused("StorageUnavailable", f"MLflow answered {exc.code} for {uri}") from exc
        except ValueError as exc:
            raise AdapterRefused("InvalidAssignment", str(exc)) from exc
        except (OSError, KeyError) as exc:
            waited = time.monotonic() - started
            raise AdapterRefused("StorageUnavailable", f"MLflow unreachable for {uri} ({waited:.1f} s): {exc}") from exc
