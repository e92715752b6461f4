"""Types shared by every edgetune resource: the model base class, conditions, selectors,
and the string formats Kubernetes users expect (durations like ``90s``, quantities like ``2Gi``).

Field docstrings are the API documentation: they become the CRD descriptions that
``kubectl explain`` prints, so they are written for the person applying a manifest.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

GROUP = "edgetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "edgetune"

DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
SHA256_PATTERN = r"^[a-f0-9]{64}$"

Duration = Annotated[str, StringConstraints(pattern=DURATION_PATTERN, max_length=32)]
"""A Go-style duration such as ``90s``, ``15m`` or ``1h30m``."""

Quantity = Annotated[str, StringConstraints(pattern=QUANTITY_PATTERN, max_length=32)]
"""A Kubernetes resource quantity such as ``512Mi``, ``2Gi`` or ``1.5``."""

Name = Annotated[str, StringConstraints(pattern=DNS_LABEL_PATTERN, min_length=1, max_length=63)]


def cel(rule: str, message: str, field_path: str | None = None, reason: str | None = None) -> dict[str, str]:
    """One ``x-kubernetes-validations`` entry (a CEL rule the apiserver enforces)."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    if reason:
        entry["reason"] = reason
    return entry


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


class ApiModel(BaseModel):
    """Base of every API type: camelCase on the wire, unknown fields rejected, docstrings as docs."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as the apiserver stores it: camelCase, unset optional fields omitted."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def nested(factory: type[ApiModel]) -> Any:
    """A sub-object that always exists with its own defaults; the CRD carries them in full as the
    field's default, so the apiserver fills in exactly what the model would."""
    return Field(default_factory=factory, json_schema_extra={"default": factory().to_wire()})


class Condition(ApiModel):
    """A standard Kubernetes condition: the latest observation of one aspect of the object's state."""

    type: Annotated[str, StringConstraints(max_length=316, pattern=r"^([A-Z][A-Za-z0-9]*)$")]
    """Type of condition in CamelCase, e.g. `Succeeded` or `Registered`."""
    status: Literal["True", "False", "Unknown"]
    """Status of the condition: True, False or Unknown."""
    reason: Annotated[str, StringConstraints(max_length=1024, pattern=r"^([A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?)$")]
    """Machine-readable CamelCase reason for the last transition."""
    message: Annotated[str, StringConstraints(max_length=32768)] = ""
    """Human-readable details about the last transition."""
    last_transition_time: datetime
    """When the condition last changed status."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The `.metadata.generation` this condition was computed from."""


class LabelSelectorRequirement(ApiModel):
    """One expression of a label selector."""

    key: Annotated[str, StringConstraints(min_length=1, max_length=317)]
    """The label key the expression applies to."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    """How the key relates to the values."""
    values: Annotated[list[Annotated[str, StringConstraints(max_length=63)]], Field(max_length=64)] = Field(
        default_factory=list
    )
    """Values for In and NotIn; must be empty for Exists and DoesNotExist."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.operator in ['In', 'NotIn'] ? size(self.values) > 0 : size(self.values) == 0",
                "values must be non-empty for In and NotIn, and empty for Exists and DoesNotExist",
            )
        )
    )


class LabelSelector(ApiModel):
    """A Kubernetes label selector; an empty selector matches everything."""

    match_labels: dict[str, Annotated[str, StringConstraints(max_length=63)]] | None = None
    """Labels that must all be present with exactly these values."""
    match_expressions: Annotated[list[LabelSelectorRequirement], Field(max_length=32)] | None = None
    """Expressions that must all hold."""

    def matches(self, labels: dict[str, str]) -> bool:
        """Kubernetes semantics: every matchLabels pair and every expression must hold; empty matches all."""
        if any(labels.get(k) != v for k, v in (self.match_labels or {}).items()):
            return False
        for req in self.match_expressions or []:
            present = req.key in labels
            if req.operator == "In" and not (present and labels[req.key] in req.values):
                return False
            if req.operator == "NotIn" and present and labels[req.key] in req.values:
                return False
            if req.operator == "Exists" and not present:
                return False
            if req.operator == "DoesNotExist" and present:
                return False
        return True


class SecretKeyRef(ApiModel):
    """A key of a Secret in the resource's own namespace."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=253)]
    """Name of the Secret."""
    key: Annotated[str, StringConstraints(min_length=1, max_length=253)]
    """Key inside the Secret."""


class Toleration(ApiModel):
    """A pod toleration, passed through to trainer pods unchanged."""

    key: Annotated[str, StringConstraints(max_length=317)] | None = None
    """Taint key the toleration applies to; empty with operator Exists matches every taint."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """Exists matches any value; Equal matches `value`."""
    value: Annotated[str, StringConstraints(max_length=63)] | None = None
    """Taint value to match with operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; empty matches all effects."""
    toleration_seconds: int | None = None
    """For NoExecute: how long the pod stays bound after the taint appears."""


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str) -> float:
    """``1h30m`` -> 5400.0 seconds. The CRD pattern guarantees the format; this checks it again."""
    if not re.fullmatch(DURATION_PATTERN, value):
        raise ValueError(f"not a duration (expected e.g. 90s, 15m, 1h30m): {value!r}")
    return sum(
        float(num) * _DURATION_UNITS[unit] for num, _, unit in re.findall(r"([0-9]+(\.[0-9]+)?)(ms|s|m|h)", value)
    )


_QUANTITY_SUFFIX = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
}  # fmt: skip


def parse_quantity(value: str) -> float:
    """``512Mi`` -> 536870912.0. Accepts every form of ``QUANTITY_PATTERN``."""
    if not re.fullmatch(QUANTITY_PATTERN, value):
        raise ValueError(f"not a Kubernetes quantity (expected e.g. 512Mi, 2Gi, 1.5): {value!r}")
    match = re.fullmatch(r"([+-]?[0-9.]+)([eE][+-]?[0-9.]+|[KMGTPE]i|[numkMGTPE])?", value)
    if match is None:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    number, suffix = match.group(1), match.group(2) or ""
    if suffix[:1] in ("e", "E"):
        return float(number + suffix)
    return float(number) * _QUANTITY_SUFFIX[suffix]
