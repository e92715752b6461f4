"""Secrets and endpoints a custom resource names: Secrets read on the hub in the resource's own
namespace; endpoints only from the operator's allow-list (it must not become a proxy)."""

from __future__ import annotations

import base64
import fnmatch
import time
from typing import Any

from edgetune_operator.clients import object_store
from edgetune_operator.clients.kube import SECRETS, Kube, KubeError
from edgetune_operator.settings import Settings

S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


class ConfigurationError(RuntimeError):
    """Something a resource names is missing or refused (a Secret, the bucket, MLflow's
    configuration): reported on the resource; retried, since a person may create it."""


SECRET_TTL_SECONDS = 10.0
"""A Secret read is reused this long (a job's reconciles read its signing key, S3 keys and salt
each time; a rotated key is picked up within as much). A missing Secret is not remembered."""
_read: dict[tuple[int, str, str], tuple[float, dict[str, Any]]] = {}


def read_secret(hub: Kube, namespace: str, name: str) -> dict[str, Any] | None:
    """A Secret by name (None when missing); one the operator may not read is a ConfigurationError
    that says how to allow it."""
    key = (id(hub), namespace, name)
    hit = _read.get(key)
    if hit is not None and time.monotonic() - hit[0] < SECRET_TTL_SECONDS:
        return hit[1]
    try:
        secret = hub.get_or_none(SECRETS, name, namespace)
    except KubeError as exc:
        if exc.status != 403:
            raise
        raise ConfigurationError(f"the operator may not read Secret {namespace}/{name}: add {namespace} to the "
                                 "chart's operator.secretNamespaces") from None  # fmt: skip
    if secret is None:
        _read.pop(key, None)
    else:
        _read[key] = (time.monotonic(), secret)
    return secret


def secret_value(hub: Kube, namespace: str, name: str, key: str, *, field: str) -> bytes:
    """One key of a Secret a resource names in ``field`` (its path in the spec, for the message)."""
    secret = read_secret(hub, namespace, name)
    if secret is None:
        raise ConfigurationError(f"{field} names Secret {namespace}/{name}, which does not exist: create it "
                                 f"(key {key}) or correct {field}")  # fmt: skip
    if key not in (secret.get("data") or {}):
        have = ", ".join(sorted(secret.get("data") or {})) or "none"
        raise ConfigurationError(f"{field} names key {key} of Secret {namespace}/{name}, which has no such key "
                                 f"(its keys: {have})")  # fmt: skip
    return base64.b64decode(secret["data"][key])


def s3_credentials(hub: Kube, namespace: str, name: str | None, *, field: str) -> dict[str, str]:
    """AWS keys from the Secret named in ``field``; empty (the operator's own credentials) without
    a name — and a ConfigurationError naming the field when the operator has none of its own."""
    if not name:
        if not object_store.ambient_credentials():
            raise ConfigurationError(
                f"{field} is not set and the operator has no S3 credentials of its own: create a Secret in "
                f"{namespace} with keys {' and '.join(S3_KEYS)} and name it in {field}"
            )
        return {}
    return {key: secret_value(hub, namespace, name, key, field=field).decode() for key in S3_KEYS}


def s3_endpoint(settings: Settings, named: str | None) -> str | None:
    """The S3 endpoint the operator may call for a resource that names ``named``: its own
    (``s3_endpoint``), or one matching ``s3_endpoints_allowed``. Anything else — an in-cluster
    service, the cloud metadata address — is refused: the operator's ambient credentials and
    network position must not serve whatever endpoint a namespace user writes into a spec."""
    if not named or named.rstrip("/") == (settings.s3_endpoint or "").rstrip("/"):
        return settings.s3_endpoint
    if any(fnmatch.fnmatchcase(named, pattern) for pattern in settings.s3_endpoints_allowed):
        return named
    raise ConfigurationError(
        f"S3 endpoint {named} is not one the operator may call (its own is "
        f"{settings.s3_endpoint or 'AWS'}; others must match the chart's s3.allowedEndpoints)"
    )
