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
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from edgetune_api.adapter_release import AnalysisMetric, AnalysisRun
from edgetune_api.meta import parse_duration

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


# -- one analysis step, across reconciles ---------------------------------------------------------


@dataclass
class StepOutcome:
    """What one reconcile of an analysis step found: the combined verdict and when to come back."""

    verdict: MetricVerdict
    runs: list[AnalysisRun]
    """Every run of the release (this step's updated in place, new ones appended)."""
    wake_in: float | None
    """Seconds until the next measurement is due, or None when nothing is left to measure."""


def _verdict_of(run: AnalysisRun) -> MetricVerdict:
    return MetricVerdict(run.phase, run.failures, list(run.values), run.message or "")


def analyse_step(
    runs: list[AnalysisRun], step: int, metrics: list[AnalysisMetric], now: datetime,
    measure: Callable[[AnalysisMetric], Measurement], *, keep: int = 256,
) -> StepOutcome:  # fmt: skip
    """Measure what is due of one analysis step's metrics and combine their verdicts.

    Each metric of the step has one run per attempt. A metric whose run has finished keeps its
    verdict until the step's analysis as a whole concludes: a step with two metrics of different
    intervals or counts passes once both have passed, whichever finished first. An attempt ends
    when the combined verdict is Successful (the step advances), Failed (rollback, or a pause when
    rollback is not automatic) or Inconclusive (a pause). Measuring again after such a pause means
    a new attempt for *every* metric of the step: verdicts from before the pause are stale (the
    fleet went on serving while it lasted), and a run left running when another metric ended the
    attempt is closed as Inconclusive with a message that says so.
    """
    names = [m.name for m in metrics]
    latest: dict[str, AnalysisRun] = {}
    for run in runs:
        if run.step == step and run.metric in names:
            latest[run.metric] = run
    if any(r.finished_at is not None and r.phase in ("Failed", "Inconclusive") for r in latest.values()):
        for run in latest.values():  # the previous attempt concluded without passing: start afresh
            if run.finished_at is None:
                run.phase, run.finished_at = "Inconclusive", now
                run.message = (f"{run.metric}: not finished, the step's analysis ended on another metric; "
                               "measured afresh after the resume")  # fmt: skip
        latest = {}
    fresh = [AnalysisRun(step=step, metric=m.name, phase="Running", started_at=now)
             for m in metrics if m.name not in latest]  # fmt: skip
    latest.update({r.metric: r for r in fresh})
    runs = [*runs, *fresh][-keep:] if fresh else runs
    verdicts: list[MetricVerdict] = []
    waits: list[float] = []
    for metric in metrics:
        run = latest[metric.name]
        if run.finished_at is not None:  # its verdict holds until the step concludes
            verdicts.append(_verdict_of(run))
            continue
        verdict, wait = measure_run(run, metric, now, measure)
        verdicts.append(verdict)
        if wait is not None:
            waits.append(wait)
    overall = combine(verdicts)
    return StepOutcome(overall, runs, min(waits) if waits and overall.phase == "Running" else None)


def measure_run(
    run: AnalysisRun, metric: AnalysisMetric, now: datetime, measure: Callable[[AnalysisMetric], Measurement],
) -> tuple[MetricVerdict, float | None]:  # fmt: skip
    """Take the measurement of ``metric`` that is due (if one is) into ``run`` and judge what it
    holds. The first measurement comes one interval after the run starts (the agents' new series
    need a scrape or two to reach Prometheus), then every interval. Returns the verdict and the
    seconds until the next measurement (None when all are taken)."""
    interval = parse_duration(metric.interval)

    def since() -> float:
        return (now - (run.last_measured_at or run.started_at or now)).total_seconds()

    errors: list[Measurement] = []
    if since() >= interval - 0.05 and run.measured < metric.count:
        m = measure(metric)
        run.measured += 1
        run.last_measured_at = now
        if m.kind == "value" and m.value is not None:
            run.values = [*run.values, m.value][-100:]
        elif m.kind == "nodata":
            run.no_data += 1
        else:
            errors.append(m)
    wait = max(0.0, interval - since()) if run.measured < metric.count else None
    measured = [Measurement("value", v) for v in run.values] + [Measurement("nodata")] * run.no_data
    verdict = evaluate(metric, measured + errors)
    run.phase, run.failures, run.message = verdict.phase, verdict.failures, verdict.message[:4000]
    if verdict.phase != "Running":
        run.finished_at = now
    return verdict, wait
