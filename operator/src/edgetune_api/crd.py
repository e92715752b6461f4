"""Generate CustomResourceDefinitions from the typed models: one source of truth for the API.

Pydantic's JSON Schema is turned into a Kubernetes *structural* schema: references inlined,
``Optional`` unwrapped, int-or-string marked as such, titles and ``additionalProperties: false``
dropped (unknown fields are rejected by the apiserver's strict field validation instead), CEL
rules kept under ``x-kubernetes-validations``, defaults kept, and a description on every field.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from edgetune_api.adapter_release import AdapterRelease
from edgetune_api.edge_cluster import EdgeCluster
from edgetune_api.meta import (
    CATEGORY,
    DNS_LABEL_PATTERN,
    DURATION_PATTERN,
    GROUP,
    QUANTITY_PATTERN,
    SHA256_PATTERN,
    VERSION,
    ApiModel,
)
from edgetune_api.training_job import EdgeTrainingJob

_DROP = {"title", "examples"}

# A failed `pattern` makes the apiserver print the regular expression; for the formats people
# type every day a CEL rule says instead what is expected, in words. The pattern stays in the
# Python models, so both sides accept exactly the same strings.
PATTERN_MESSAGES: dict[str, str] = {
    DURATION_PATTERN: "must be a duration such as 90s, 15m or 1h30m (units ms, s, m, h)",
    QUANTITY_PATTERN: "must be a Kubernetes quantity such as 512Mi, 2Gi or 1.5",
    SHA256_PATTERN: "must be a SHA-256 digest: 64 lowercase hex digits",
    DNS_LABEL_PATTERN: (
        "must be a DNS label: lowercase letters, digits and '-', starting and ending with a letter or digit"
    ),
    r"^(models:/|runs:/|s3://|file://|/|builtin:).+": (
        "must start with models:/, runs:/, s3://, file://, / (a path on the node) or builtin:"
    ),
    r"^/.*": "must be an absolute path on the node, starting with /",
    r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$": "must be an S3 bucket name: lowercase letters, digits, '.' and '-'",
    r"^[A-Za-z0-9][A-Za-z0-9._-]*$": "must be an MLflow model name: letters, digits, '.', '_' and '-'",
    r"^[a-z][a-z0-9_-]*$": "must be an MLflow alias: lowercase letters, digits, '_' and '-', starting with a letter",
    r"^[1-9][0-9]*$": "must be a model version number such as 3",
    r"^https?://.+": "must be an http:// or https:// URL",
}


def _pattern_rule(pattern: str) -> dict[str, str]:
    # Quantities have a CEL library of their own; every other pattern is matched as a raw string.
    rule = "isQuantity(self)" if pattern == QUANTITY_PATTERN else f"self.matches(r'{pattern}')"
    return {"rule": rule, "message": PATTERN_MESSAGES[pattern]}


@dataclass(frozen=True)
class CrdInfo:
    """Everything about a resource that is not its schema."""

    model: type[ApiModel]
    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    scope: str
    printer_columns: tuple[dict[str, Any], ...] = field(default=())

    @property
    def name(self) -> str:
        return f"{self.plural}.{GROUP}"

    @property
    def filename(self) -> str:
        return f"{GROUP}_{self.plural}.yaml"


def _age() -> dict[str, Any]:
    return {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


RESOURCES: tuple[CrdInfo, ...] = (
    CrdInfo(
        EdgeCluster,
        "EdgeCluster",
        "edgeclusters",
        "edgecluster",
        ("ec",),
        "Cluster",
        (
            {"name": "Reachable", "type": "boolean", "jsonPath": ".status.reachable"},
            {"name": "Paused", "type": "boolean", "jsonPath": ".spec.paused"},
            {"name": "Version", "type": "string", "jsonPath": ".status.kubernetesVersion"},
            {"name": "Nodes", "type": "integer", "jsonPath": ".status.nodes"},
            {"name": "GPU", "type": "integer", "jsonPath": ".status.nodesByAccelerator.gpu", "priority": 1},
            {"name": "NPU", "type": "integer", "jsonPath": ".status.nodesByAccelerator.npu", "priority": 1},
            {"name": "Heartbeat", "type": "date", "jsonPath": ".status.lastHeartbeatTime", "priority": 1},
            _age(),
        ),
    ),
    CrdInfo(
        EdgeTrainingJob,
        "EdgeTrainingJob",
        "edgetrainingjobs",
        "edgetrainingjob",
        ("etj", "edgejob"),
        "Namespaced",
        (
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Accelerator", "type": "string", "jsonPath": ".spec.placement.accelerator"},
            {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
            {"name": "Model", "type": "string", "jsonPath": ".status.result.mlflowModel"},
            {"name": "Version", "type": "string", "jsonPath": ".status.result.mlflowVersion"},
            {"name": "Bytes", "type": "integer", "jsonPath": ".status.result.bytes", "priority": 1},
            {"name": "Energy", "type": "string", "jsonPath": ".status.energy"},
            {"name": "Device", "type": "string", "jsonPath": ".status.devices", "priority": 1},
            _age(),
        ),
    ),
    CrdInfo(
        AdapterRelease,
        "AdapterRelease",
        "adapterreleases",
        "adapterrelease",
        ("ar", "release"),
        "Namespaced",
        (
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Model", "type": "string", "jsonPath": ".spec.adapter.registeredModel"},
            {"name": "Canary", "type": "string", "jsonPath": ".status.canaryVersion"},
            {"name": "Stable", "type": "string", "jsonPath": ".status.stableVersion"},
            {"name": "Weight", "type": "integer", "jsonPath": ".status.canaryWeight"},
            {"name": "Step", "type": "integer", "jsonPath": ".status.currentStep", "priority": 1},
            _age(),
        ),
    ),
)


class SchemaError(ValueError):
    """The models produced a schema Kubernetes would not accept as structural."""


def _unwrap(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    """Inline ``$ref`` and single ``allOf``; reduce ``anyOf`` to one type or int-or-string."""
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").rsplit("/", 1)[-1]])
        target.update(node)  # field-level keys (description, default) win over the type's own
        node = target
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**_unwrap(dict(node.pop("allOf")[0]), defs, path), **node}
    if "anyOf" in node:
        options = [_unwrap(dict(o), defs, path) for o in node.pop("anyOf") if o != {"type": "null"}]
        types = sorted({o.get("type", "") for o in options})
        if len(options) == 1:
            node = {**options[0], **node}
        elif node.get("x-kubernetes-int-or-string") or types == ["integer", "string"]:
            node["x-kubernetes-int-or-string"] = True
        else:
            raise SchemaError(f"{path}: a union of {types} cannot be expressed in a structural schema")
    return node


def _resolve(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    """One pydantic JSON Schema node -> one structural OpenAPI v3 node (recursively)."""
    out: dict[str, Any] = {}
    for key, value in _unwrap(dict(node), defs, path).items():
        if key in _DROP or (key == "default" and value is None):
            continue
        if key == "additionalProperties" and value is False:
            continue  # unknown fields: rejected by strict field validation, pruned otherwise
        if key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            # JSON Schema 2020 writes the bound itself; OpenAPI v3.0 (Kubernetes) a flag beside it.
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "description":
            out[key] = " ".join(value.split())  # docstrings wrap lines; kubectl explain re-wraps
        elif key == "properties":
            out[key] = {name: _resolve(sub, defs, f"{path}.{name}") for name, sub in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = _resolve(value, defs, f"{path}[]")
        else:
            out[key] = value
    if out.get("type") == "string" and out.get("pattern") in PATTERN_MESSAGES:
        out.setdefault("x-kubernetes-validations", []).insert(0, _pattern_rule(out.pop("pattern")))
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if "properties" in out or ("additionalProperties" in out and "type" not in out):
        out.setdefault("type", "object")
    return out


def _check_descriptions(node: dict[str, Any], path: str) -> None:
    for name, sub in (node.get("properties") or {}).items():
        if not sub.get("description"):
            raise SchemaError(f"{path}.{name} has no description (write a docstring under the field)")
        _check_descriptions(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        _check_descriptions(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        _check_descriptions(node["additionalProperties"], f"{path}{{}}")


class _FactoryDefaults(GenerateJsonSchema):
    """Also publish defaults made by ``default_factory`` (lists, maps), so the apiserver fills in
    exactly what the models would; pydantic leaves them out of the schema by default."""

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            schema = {**schema, "default": factory()}  # type: ignore[call-arg]
            del schema["default_factory"]
        return super().default_schema(schema)


def _part(model: type[ApiModel], name: str) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode="validation", schema_generator=_FactoryDefaults)
    defs = schema.pop("$defs", {})
    prop = schema["properties"][name]
    return _resolve(prop, defs, f".{name}")


def openapi_schema(info: CrdInfo) -> dict[str, Any]:
    """The structural ``openAPIV3Schema`` of one resource."""
    spec = _part(info.model, "spec")
    status = _part(info.model, "status")
    status.pop("default", None)
    _check_descriptions(spec, ".spec")
    _check_descriptions(status, ".status")
    return {
        "type": "object",
        "description": (info.model.__doc__ or "").strip().replace("\n    ", " ").replace("\n", " "),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object: edgetune.io/v1alpha1."},
            "kind": {"type": "string", "description": f"Kind of this object: {info.kind}."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def crd(info: CrdInfo) -> dict[str, Any]:
    """The CustomResourceDefinition manifest of one resource."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": info.name,
            "labels": {"app.kubernetes.io/name": "edgetune", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": GROUP,
            "scope": info.scope,
            "names": {
                "kind": info.kind,
                "listKind": f"{info.kind}List",
                "plural": info.plural,
                "singular": info.singular,
                "shortNames": list(info.short_names),
                "categories": [CATEGORY],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [dict(c) for c in info.printer_columns],
                    "schema": {"openAPIV3Schema": openapi_schema(info)},
                }
            ],
        },
    }


HEADER = "# Generated from edgetune_api by `python -m edgetune_api write`; do not edit by hand.\n"


def render(info: CrdInfo) -> str:
    return HEADER + yaml.safe_dump(crd(info), sort_keys=False, width=100, allow_unicode=True)


def rendered() -> dict[str, str]:
    """File name -> YAML text, for every resource."""
    return {info.filename: render(info) for info in RESOURCES}
