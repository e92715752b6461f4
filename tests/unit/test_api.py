"""The API models, the CRD generator and the checked-in CRDs agree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from edgetune_api import AdapterRelease, EdgeCluster, EdgeTrainingJob, parse_duration, parse_quantity
from edgetune_api.crd import RESOURCES, SchemaError, _resolve, openapi_schema, rendered

REPO = Path(__file__).resolve().parents[2]
KINDS: dict[str, type[Any]] = {
    "EdgeTrainingJob": EdgeTrainingJob,
    "AdapterRelease": AdapterRelease,
    "EdgeCluster": EdgeCluster,
}


@pytest.mark.parametrize("folder", ["crds", "charts/edgetune/crds"])
def test_checked_in_crds_are_generated_from_the_models(folder: str) -> None:
    files = rendered()
    on_disk = {p.name: p.read_text() for p in (REPO / folder).glob("*.yaml")}
    assert sorted(on_disk) == sorted(files), f"{folder} holds other files than the generator writes"
    for name, text in files.items():
        assert on_disk[name] == text, f"{folder}/{name} is stale: run `.venv/bin/python -m edgetune_api write`"


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_parse_with_the_models(path: Path) -> None:
    # Examples applied through envsubst name the base model's digest as ${BASE_SHA256}.
    for doc in yaml.safe_load_all(path.read_text().replace("${BASE_SHA256}", "ab" * 32)):
        KINDS[doc["kind"]].model_validate(doc)


def _walk(node: dict[str, Any]) -> list[dict[str, Any]]:
    found = [node]
    for sub in (node.get("properties") or {}).values():
        found += _walk(sub)
    if isinstance(node.get("items"), dict):
        found += _walk(node["items"])
    return found


@pytest.mark.parametrize("info", RESOURCES, ids=lambda i: i.kind)
def test_schemas_are_structural(info: Any) -> None:
    for node in _walk(openapi_schema(info)):
        assert not {"$ref", "anyOf", "allOf", "oneOf", "title", "const"} & node.keys()
        assert node.get("additionalProperties") is not False
        assert "type" in node or node.get("x-kubernetes-int-or-string")
        assert not isinstance(node.get("exclusiveMinimum"), float | int) or isinstance(node["exclusiveMinimum"], bool)


def test_unrepresentable_union_is_refused() -> None:
    with pytest.raises(SchemaError, match=r"\.x: a union of \['boolean', 'integer'\]"):
        _resolve({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, {}, ".x")


def test_python_defaults_fill_a_minimal_job() -> None:
    job = EdgeTrainingJob.model_validate(
        {
            "spec": {
                "baseModel": {"uri": "builtin:timeseries-cnn"},
                "data": {"source": {"hostPath": "/data"}, "format": "csv"},
                "budgets": {"memory": "1Gi"},
                "output": {"s3": {"bucket": "adapters"}, "mlflow": {"registeredModel": "m"}},
            }
        }
    )
    assert job.spec.peft.r == 8
    assert job.spec.training.batch_size == "auto"
    assert job.spec.placement.accelerator == "any"
    assert job.spec.output.mlflow.alias == "candidate"


def test_models_reject_unknown_fields_and_bad_formats() -> None:
    with pytest.raises(ValidationError, match="rank"):
        EdgeTrainingJob.model_validate({"spec": {"peft": {"rank": 8}}})
    with pytest.raises(ValidationError, match="should match pattern"):
        EdgeCluster.model_validate(
            {"spec": {"kubeconfigSecretRef": {"name": "k", "namespace": "n"}, "heartbeatInterval": "soon"}}
        )


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("1h30m", 5400), ("250ms", 0.25), ("1.5h", 5400)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "value"),
    [("512Mi", 512 * 2**20), ("2Gi", 2 * 2**30), ("1.5", 1.5), ("100m", 0.1), ("1e3", 1000), ("2k", 2000)],
)
def test_parse_quantity(text: str, value: float) -> None:
    assert parse_quantity(text) == pytest.approx(value)


@pytest.mark.parametrize("bad", ["", "2 Gi", "lots", "1Gb"])
def test_parse_quantity_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        parse_quantity(bad)
