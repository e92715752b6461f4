"""MLflow URIs to storage URIs over MLflow's REST API (no MLflow client library, no torch):
shared by the trainer (base models, when run by hand) and the edge agent (adapters)."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

from edgetune_api.mlflow_uri import mlflow_lookup


def resolve_mlflow_uri(uri: str, tracking: str) -> str:
    """``models:/name/version``, ``models:/name@alias`` or ``runs:/id/path`` -> the artifact's storage URI,
    through MLflow's REST API (no MLflow client library on the edge)."""
    lookup = mlflow_lookup(uri)
    url = f"{tracking.rstrip('/')}/api/2.0/mlflow/{lookup.endpoint}?{urllib.parse.urlencode(lookup.query)}"
    with urllib.request.urlopen(url, timeout=30) as resp:  # noqa: S310 - configured tracking server
        return lookup.source(json.loads(resp.read()))
