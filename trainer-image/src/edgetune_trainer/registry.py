"""MLflow URIs to storage URIs over MLflow's REST API (no MLflow client library, no torch):
shared by the trainer (base models) and the edge agent (adapters)."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from typing import Any


def resolve_mlflow_uri(uri: str, tracking: str) -> str:
    """``models:/name/version``, ``models:/name@alias`` or ``runs:/id/path`` -> the artifact's storage URI,
    through MLflow's REST API (no MLflow client library on the edge)."""

    def get(path: str, **query: str) -> dict[str, Any]:
        url = f"{tracking.rstrip('/')}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=30) as resp:  # noqa: S310 - configured tracking server
            return json.loads(resp.read())  # type: ignore[no-any-return]

    if uri.startswith("models:/"):
        ref = uri.removeprefix("models:/")
        if "@" in ref:  # models:/name@alias
            name, _, alias = ref.partition("@")
            version = get("registered-models/alias", name=name, alias=alias)["model_version"]
        else:  # models:/name/version
            name, _, number = ref.partition("/")
            if not number.isdigit():
                raise ValueError(f"{uri}: expected models:/<name>/<version> or models:/<name>@<alias>")
            version = get("model-versions/get", name=name, version=number)["model_version"]
        return str(version["source"])
    run_id, _, path = uri.removeprefix("runs:/").partition("/")
    root = get("runs/get", run_id=run_id)["run"]["info"]["artifact_uri"]
    return f"{root.rstrip('/')}/{path}"
