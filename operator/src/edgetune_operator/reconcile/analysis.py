"""Analysis of a canary, pure: PromQL templates in, measurements in, a verdict out.

A metric of ``spec.analysis.metrics`` is measured ``count`` times, ``interval`` apart (the first one
interval after the analysis step begins, so new series have reached Prometheus). Each
measurement is one of: a value inside ``thresholdRange`` (pass), a value outside it (fail), no
data, or an error (the query was rejected, Prometheus was down). The verdict:

- ``Failed`` as soon as failures exceed ``failureLimit`` (no need to wait for the rest);
- ``Inconclusive`` as soon as a measurement has no data under ``noData: inconclusive``, or an
  error happens: a release never passes on what it could not measure; it pauses with the reason;
- ``Successful`` once ``count`` measurements are in and the failures stayed within the limit;
- ``Running`` otherwise, with the time the next measurement is due.

No I/O here: the controller runs the queries (``clients/prometheus.py``) and records each
measurement in status, so a restarted operator continues the same analysis.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from edgetune_api.adapter_release import AnalysisMetric

Verdict = Literal["Running", "Successful", "Failed", "Inconclusive"]
Kind = Literal["value", "nodata", "error"]

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z][A-Za-z0-9_]*)\s*\}\}")
TEMPLATE_VARIABLES = ("release", "namespace", "version", "stableVersion", "cluster", "model")


class TemplateError(ValueError):
    """A query names a placeholder the release does not provide."""


def render_query(query: str, variables: dict[str, str]) -> str:
    """Replace ``{{name}}`` placeholders. Values are escaped for PromQL string literals (a version
    label cannot close the quotes it is placed in); an unknown placeholder is an error, not an
    empty string that would silently widen the query."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in variables:
            known = ", ".join("{{" + v + "}}" for v in TEMPLATE_VARIABLES)
            raise TemplateError(f"query uses {{{{{name}}}}}, which is not one of {known}")
        return variables[name].replace("\\", "\\\\").replace('"', '\\"')

    return _PLACEHOLDER.sub(replace, query)


def uses(query: str, name: str) -> bool:
    """Whether ``query`` has the placeholder ``{{name}}``."""
    return any(m.group(1) == name for m in _PLACEHOLDER.finditer(query))


@dataclass(frozen=True)
class Measurement:
    kind: Kind
    value: float | None = None
    message: str = ""


def worst(metric: AnalysisMetric, by_cluster: dict[str, Measurement]) -> Measurement:
    """One measurement from a query run once per cluster (``{{cluster}}``): the worst of them, so
    a canary that is bad on one site fails even when the fleet average looks fine. Worst first:
    an error, a value outside the range, no data, then the value nearest the range's edge."""
    if not by_cluster:
        return Measurement("nodata", message="no cluster to measure")

    def rank(item: tuple[str, Measurement]) -> tuple[int, float]:
        _, m = item
        if m.kind == "error":
            return 0, 0.0
        if m.kind == "nodata":
            return 2, 0.0
        value = m.value if m.value is not None else math.nan
        if not passes(metric, value):
            return 1, 0.0
        bounds = metric.threshold_range
        margins = [value - bounds.min] if bounds.min is not None else []
        margins += [bounds.max - value] if bounds.max is not None else []
        return 3, min(margins)

    cluster, m = min(sorted(by_cluster.items()), key=rank)
    return Measurement(m.kind, m.value, f"cluster {cluster}: {m.message}" if m.message else f"cluster {cluster}")


@dataclass
class MetricVerdict:
    phase: Verdict
    failures: int
    values: list[float] = field(default_factory=list)
    message: str = ""


def passes(metric: AnalysisMetric, value: float) -> bool:
    bounds = metric.threshold_range
    if math.isnan(value):
        return False
    if bounds.min is not None and value < bounds.min:
        return False
    return not (bounds.max is not None and value > bounds.max)


def _range(metric: AnalysisMetric) -> str:
    bounds = metric.threshold_range
    if bounds.min is not None and bounds.max is not None:
        return f"[{bounds.min:g}, {bounds.max:g}]"
    return f">= {bounds.min:g}" if bounds.min is not None else f"<= {bounds.max:g}"


def evaluate(metric: AnalysisMetric, measurements: list[Measurement]) -> MetricVerdict:
    """The verdict for one metric from the measurements taken so far (oldest first)."""
    failures = 0
    values: list[float] = []
    for index, m in enumerate(measurements, start=1):
        if m.kind == "error":
            return MetricVerdict("Inconclusive", failures, values,
                                 f"{metric.name}: measurement {index} could not be taken: {m.message}")  # fmt: skip
        if m.kind == "nodata":
            if metric.no_data == "inconclusive":
                message = f"{metric.name}: measurement {index} returned no data (noData: inconclusive)"
                return MetricVerdict("Inconclusive", failures, values, message)
            if metric.no_data == "fail":
                failures += 1
        else:
            value = m.value if m.value is not None else math.nan
            values.append(value)
            if not passes(metric, value):
                failures += 1
        if failures > metric.failure_limit:
            shown = ", ".join(f"{v:.4g}" for v in values[-5:]) or "no data"
            return MetricVerdict("Failed", failures, values,
                                 f"{metric.name}: {failures} of {index} measurements outside {_range(metric)} "
                                 f"(failureLimit {metric.failure_limit}); values {shown}")  # fmt: skip
    if len(measurements) >= metric.count:
        return MetricVerdict("Successful", failures, values,
                             f"{metric.name}: {len(measurements) - failures} of {len(measurements)} measurements "
                             f"within {_range(metric)}")  # fmt: skip
    return MetricVerdict("Running", failures, values, f"{metric.name}: {len(measurements)} of {metric.count} measured")


def combine(verdicts: list[MetricVerdict]) -> MetricVerdict:
    """One verdict for an analysis step: any failure fails it, then any inconclusive metric makes
    it inconclusive, then it runs until every metric succeeded."""
    order: tuple[Verdict, ...] = ("Failed", "Inconclusive", "Running")
    for phase in order:
        hits = [v for v in verdicts if v.phase == phase]
        if hits:
            return MetricVerdict(phase, sum(v.failures for v in hits), message="; ".join(v.message for v in hits))
    return MetricVerdict("Successful", 0, message="; ".join(v.message for v in verdicts))
