"""S3: fetch an adapter package as the operator sees it, to verify it before anything is registered."""

from __future__ import annotations

import functools
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from edgetune_api.delta import DeltaManifest, verify_package

MAX_PACKAGE_BYTES = 512 * 2**20  # a delta is KB to MB; anything near this is not one


@dataclass(frozen=True)
class Verified:
    """A package fetched from S3 and verified: where, its digest, manifest and files."""

    uri: str
    digest: str
    manifest: DeltaManifest
    files: dict[str, bytes]


class PackageNotFoundError(LookupError):
    """No package at the URI."""


@functools.cache
def ambient_credentials() -> bool:
    """Whether the operator has S3 credentials of its own (environment, files, instance role),
    looked up once. Without them and without a Secret named by the resource, botocore would sign a
    presigned POST with nothing and fail with an AttributeError deep inside: better to say which
    field to set before trying."""
    import boto3  # noqa: PLC0415 - the operator imports boto3 lazily (start-up memory)

    return boto3.Session().get_credentials() is not None


def split_uri(uri: str) -> tuple[str, str]:
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"expected s3://bucket/prefix, got {uri!r}")
    return parsed.netloc, parsed.path.strip("/")


def list_objects(client: Any, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
    """Every object under ``prefix/`` (``Key``, ``Size``, …), page by page."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        yield from page.get("Contents", [])


def fetch_package(client: Any, uri: str) -> dict[str, bytes]:
    """Every object directly under the package prefix, by file name."""
    bucket, prefix = split_uri(uri)
    files: dict[str, bytes] = {}
    total = 0
    for obj in list_objects(client, bucket, prefix):
        name = obj["Key"][len(prefix) + 1 :]
        if "/" in name:
            continue  # not part of this package
        total += int(obj["Size"])
        if total > MAX_PACKAGE_BYTES:
            raise ValueError(f"{uri} holds more than {MAX_PACKAGE_BYTES >> 20} MiB: not an adapter package")
        files[name] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    if not files:
        raise PackageNotFoundError(f"no package at {uri}")
    return files


def fetch_and_verify(
    client: Any, uri: str, *, expected_digest: str | None, public_key_pem: bytes | None
) -> tuple[DeltaManifest, dict[str, bytes]]:
    """Download and verify (digest, signature, every file's size and SHA-256); raises
    ``DeltaVerificationError`` with the failing file or check named."""
    files = fetch_package(client, uri)
    return verify_package(files, public_key_pem, expected_digest=expected_digest), files


def put_json(client: Any, bucket: str, key: str, body: bytes) -> None:
    """One small JSON object (a published revocation)."""
    client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json")
