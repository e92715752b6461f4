"""MLflow: the registry calls the operator needs, over MLflow's REST API (``/api/2.0/mlflow``).

Why not ``MlflowClient``: importing it adds ~130 MB to the operator (NOTES.md, docs/dependencies.md)
and it is synchronous anyway; the registry surface we use is nine endpoints. urllib3 is already
loaded by the Kubernetes client, so this costs no memory.

Registration is idempotent: the run and the model version carry the package digest as a tag and
are looked up by it before anything is created, so an operator restarted at any point between
the calls finishes the same registration instead of making a second one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import urllib3

from edgetune_api.mlflow_uri import mlflow_lookup
from edgetune_operator import metrics

CONNECTIONS = 16
"""Kept-alive connections to MLflow: reconcile threads call it at once (a pool of one, urllib3's
default, opened and dropped a connection per concurrent call under load, with a warning each)."""
TIMEOUT = urllib3.Timeout(connect=3.0, read=30.0)
DIGEST_TAG = "edgetune.delta_sha256"
BASE_TAG = "edgetune.base_model_sha256"


class MlflowError(RuntimeError):
    """MLflow answered with an error (``code`` is MLflow's error code, e.g. RESOURCE_DOES_NOT_EXIST)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"MLflow {status} {code}: {message}")
        self.status, self.code = status, code


class MlflowUnavailableError(ConnectionError):
    """The tracking server did not answer, or answered 5xx: retry later."""


@dataclass(frozen=True)
class Registration:
    model: str
    version: str
    run_id: str
    created: bool
    """False when an earlier (interrupted) attempt had already registered this package."""


class Mlflow:
    def __init__(self, tracking_uri: str, token: str | None = None) -> None:
        self.base = tracking_uri.rstrip("/") + "/api/2.0/mlflow"
        self.http = urllib3.PoolManager(timeout=TIMEOUT, retries=False, maxsize=CONNECTIONS)
        self.headers = {"Content-Type": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"

    def call(self, method: str, endpoint: str, body: dict[str, Any] | None = None,
             query: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
        started = time.perf_counter()
        outcome = "ok"
        try:
            response = self.http.request(
                method, f"{self.base}/{endpoint}", fields=query, headers=self.headers,
                body=json.dumps(body).encode() if body is not None else None,
            )  # fmt: skip
        except urllib3.exceptions.HTTPError as exc:
            outcome = "unreachable"
            raise MlflowUnavailableError(f"MLflow at {self.base} did not answer: {exc}") from None
        finally:
            metrics.observe_call("mlflow", endpoint, outcome, time.perf_counter() - started)
        if response.status >= 500:
            metrics.observe_call("mlflow", endpoint, str(response.status), 0)
            raise MlflowUnavailableError(f"MLflow {endpoint}: HTTP {response.status} {response.data[:300]!r}")
        payload: dict[str, Any] = json.loads(response.data or b"{}") if response.data else {}
        if response.status >= 400:
            metrics.observe_call("mlflow", endpoint, str(response.status), 0)
            raise MlflowError(response.status, payload.get("error_code", ""), payload.get("message", ""))
        return payload

    # -- lookups ----------------------------------------------------------------------------------

    def resolve(self, uri: str) -> str:
        """A ``models:/`` or ``runs:/`` URI -> the storage URI it names."""
        lookup = mlflow_lookup(uri)
        return lookup.source(self.call("GET", lookup.endpoint, query=lookup.query))

    def experiment_id(self, name: str) -> str:
        try:
            return str(self.call("GET", "experiments/get-by-name", query={"experiment_name": name})
                       ["experiment"]["experiment_id"])  # fmt: skip
        except MlflowError as exc:
            if exc.code != "RESOURCE_DOES_NOT_EXIST":
                raise
        try:
            return str(self.call("POST", "experiments/create", {"name": name})["experiment_id"])
        except MlflowError as exc:  # created concurrently
            if exc.code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.experiment_id(name)

    def find_run(self, experiment_id: str, digest: str) -> dict[str, Any] | None:
        runs = self.call("POST", "runs/search", {
            "experiment_ids": [experiment_id], "filter": f"tags.`{DIGEST_TAG}` = '{digest}'", "max_results": 1,
        }).get("runs") or []  # fmt: skip
        return runs[0] if runs else None

    def find_version(self, model: str, digest: str) -> dict[str, Any] | None:
        versions = self.call("GET", "model-versions/search", query={
            "filter": f"name = '{model}' and tags.`{DIGEST_TAG}` = '{digest}'", "max_results": "10",
        }).get("model_versions") or []  # fmt: skip
        return min(versions, key=lambda v: int(v["version"])) if versions else None

    def versions(self, model: str) -> list[dict[str, Any]]:
        return list(
            self.call("GET", "model-versions/search", query={"filter": f"name = '{model}'", "max_results": "1000"})
            .get("model_versions") or []
        )  # fmt: skip

    def ensure_registered_model(self, model: str) -> None:
        try:
            self.call("POST", "registered-models/create", {
                "name": model, "description": "LoRA adapters trained on edge nodes by edgetune",
                "tags": [{"key": "edgetune.managed", "value": "true"}],
            })  # fmt: skip
        except MlflowError as exc:
            if exc.code != "RESOURCE_ALREADY_EXISTS":
                raise

    # -- the registration ---------------------------------------------------------------------------

    def register(
        self, *, experiment: str, model: str, alias: str | None, digest: str, source: str, run_name: str,
        params: dict[str, str], metrics_: dict[str, float], tags: dict[str, str],
    ) -> Registration:  # fmt: skip
        """Run (params, metrics, lineage tags) + model version (source = the S3 package) + alias,
        each looked up by the package digest first."""
        tags = {**tags, DIGEST_TAG: digest}
        experiment_id = self.experiment_id(experiment)
        run = self.find_run(experiment_id, digest)
        if run is None:
            run = self.call("POST", "runs/create", {
                "experiment_id": experiment_id, "run_name": run_name, "start_time": int(time.time() * 1000),
                "tags": [{"key": k, "value": v[:5000]} for k, v in tags.items()],
            })["run"]  # fmt: skip
        run_id = str(run["info"]["run_id"])
        if run["info"].get("status") != "FINISHED":
            now = int(time.time() * 1000)
            self.call("POST", "runs/log-batch", {
                "run_id": run_id,
                "params": [{"key": k, "value": v[:6000]} for k, v in sorted(params.items())],
                "metrics": [{"key": k, "value": float(v), "timestamp": now, "step": 0}
                            for k, v in sorted(metrics_.items())],
            })  # fmt: skip
            self.call("POST", "runs/update", {"run_id": run_id, "status": "FINISHED", "end_time": now})
        self.ensure_registered_model(model)
        version = self.find_version(model, digest)
        created = version is None
        if version is None:
            version = self.call("POST", "model-versions/create", {
                "name": model, "source": source, "run_id": run_id,
                "tags": [{"key": k, "value": v[:5000]} for k, v in tags.items()],
                "description": f"edgetune adapter {digest[:12]} from {run_name}",
            })["model_version"]  # fmt: skip
            metrics.REGISTRATIONS.labels(model).inc()
        if alias:
            self.call("POST", "registered-models/alias", {"name": model, "alias": alias, "version": version["version"]})
        return Registration(model=model, version=str(version["version"]), run_id=run_id, created=created)

    # -- releases ---------------------------------------------------------------------------------

    def model_version(self, model: str, version: str) -> dict[str, Any] | None:
        """The model version, or None when the model or the version does not exist."""
        try:
            return dict(self.call("GET", "model-versions/get", query={"name": model, "version": version})
                        ["model_version"])  # fmt: skip
        except MlflowError as exc:
            if exc.code == "RESOURCE_DOES_NOT_EXIST" or exc.status == 404:
                return None
            raise

    def alias_version(self, model: str, alias: str) -> dict[str, Any] | None:
        """The version an alias points to, or None when the alias (or the model) does not exist."""
        try:
            return dict(self.call("GET", "registered-models/alias", query={"name": model, "alias": alias})
                        ["model_version"])  # fmt: skip
        except MlflowError as exc:
            if exc.code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") or exc.status == 404:
                return None
            raise

    def set_alias(self, model: str, alias: str, version: str) -> None:
        """Point ``alias`` at ``version`` (idempotent: setting it again to the same version is a no-op)."""
        self.call("POST", "registered-models/alias", {"name": model, "alias": alias, "version": version})

    def tag_version(self, model: str, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.call("POST", "model-versions/set-tag", {"name": model, "version": version, "key": key,
                                                         "value": value[:5000]})  # fmt: skip
