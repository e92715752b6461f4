"""Secrets a custom resource names, read on the hub in the resource's own namespace."""

from __future__ import annotations

import base64
from typing import Any

from edgetune_operator.clients.kube import SECRETS, Kube, KubeError

S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


class ConfigurationError(RuntimeError):
    """Something a resource names is missing or refused (a Secret, the bucket, MLflow's
    configuration): reported on the resource; retried, since a person may create it."""


def read_secret(hub: Kube, namespace: str, name: str) -> dict[str, Any] | None:
    """A Secret by name (None when missing); one the operator may not read is a ConfigurationError
    that says how to allow it."""
    try:
        return hub.get_or_none(SECRETS, name, namespace)
    except KubeError as exc:
        if exc.status != 403:
            raise
        raise ConfigurationError(f"the operator may not read Secret {namespace}/{name}: add {namespace} to the "
                                 "chart's operator.secretNamespaces") from None  # fmt: skip


def secret_value(hub: Kube, namespace: str, name: str, key: str) -> bytes:
    secret = read_secret(hub, namespace, name)
    if secret is None or key not in (secret.get("data") or {}):
        raise ConfigurationError(f"Secret {namespace}/{name} (key {key}) does not exist")
    return base64.b64decode(secret["data"][key])


def s3_credentials(hub: Kube, namespace: str, name: str | None) -> dict[str, str]:
    """AWS keys from the named Secret; empty (the operator's own credentials) without a name."""
    if not name:
        return {}
    return {key: secret_value(hub, namespace, name, key).decode() for key in S3_KEYS}
