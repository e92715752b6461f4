"""MLflow model URIs (``models:/name/version``, ``models:/name@alias``, ``runs:/id/path``): which
REST lookup resolves one to its storage URI. Shared by the operator (base models it presigns for
trainers) and the edge agent (adapters); each side makes the HTTP call with its own client."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MlflowLookup:
    """One GET on ``/api/2.0/mlflow/<endpoint>`` and where the answer names the artifact."""

    endpoint: str
    query: dict[str, str]
    run_path: str | None = None
    """For ``runs:/``: the path under the run's artifact root."""

    def source(self, payload: dict[str, Any]) -> str:
        if self.run_path is None:
            return str(payload["model_version"]["source"])
        return f"{str(payload['run']['info']['artifact_uri']).rstrip('/')}/{self.run_path}"


def mlflow_lookup(uri: str) -> MlflowLookup:
    """The lookup that resolves ``uri``; ValueError for anything else."""
    if uri.startswith("models:/"):
        ref = uri.removeprefix("models:/")
        if "@" in ref:
            name, _, alias = ref.partition("@")
            return MlflowLookup("registered-models/alias", {"name": name, "alias": alias})
        name, _, number = ref.partition("/")
        if not number.isdigit():
            raise ValueError(f"{uri}: expected models:/<name>/<version> or models:/<name>@<alias>")
        return MlflowLookup("model-versions/get", {"name": name, "version": number})
    if uri.startswith("runs:/"):
        run_id, _, path = uri.removeprefix("runs:/").partition("/")
        return MlflowLookup("runs/get", {"run_id": run_id}, run_path=path)
    raise ValueError(f"{uri} is not an MLflow model URI (models:/… or runs:/…)")
