"""An analysis step across reconciles (``reconcile.analysis.analyse_step``): metrics of different
intervals and counts, reconciles at arbitrary times, a finished verdict holding for its step, and
what measuring again after an inconclusive pause means."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from edgetune_api.adapter_release import AnalysisMetric, AnalysisRun
from edgetune_operator.reconcile.analysis import Measurement, analyse_step

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def metric(name: str, interval: int, count: int, **kw: Any) -> AnalysisMetric:
    spec = {"name": name, "query": f"q_{name}", "thresholdRange": {"max": 1.0}, "interval": f"{interval}s",
            "count": count, "failureLimit": 0}  # fmt: skip
    return AnalysisMetric.model_validate({**spec, **kw})


class Prom:
    """Answers every query with the value given for its metric; counts the queries."""

    def __init__(self, values: dict[str, Measurement]) -> None:
        self.values, self.asked = values, dict.fromkeys(values, 0)

    def __call__(self, m: AnalysisMetric) -> Measurement:
        self.asked[m.name] += 1
        return self.values[m.name]


def test_two_metrics_finishing_at_different_reconciles_pass_the_step() -> None:
    """The example release's step: error-rate (30 s x 4) and p95-latency (30 s x 3). On today's
    main the finished p95 run got a new run at the next reconcile, so the step never passed."""
    metrics = [metric("error-rate", 30, 4), metric("p95-latency", 30, 3)]
    prom = Prom({"error-rate": Measurement("value", 0.0), "p95-latency": Measurement("value", 0.1)})
    runs: list[AnalysisRun] = []
    now, phases = T0, []
    for _ in range(10):
        out = analyse_step(runs, 2, metrics, now, prom)
        runs = out.runs
        phases.append(out.verdict.phase)
        if out.verdict.phase != "Running":
            break
        assert out.wake_in is not None
        now += timedelta(seconds=out.wake_in)
    assert phases[-1] == "Successful"
    assert prom.asked == {"error-rate": 4, "p95-latency": 3}
    assert now - T0 == timedelta(seconds=120)
    assert len(runs) == 2  # one run per metric: nothing was started again


@settings(max_examples=150, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 90), st.integers(1, 5)), min_size=1, max_size=4),
    extra=st.lists(st.floats(0.0, 200.0), max_size=20),
    failing=st.one_of(st.none(), st.integers(0, 3)),
)
def test_any_intervals_and_counts_conclude_once_every_metric_has_its_count(
    shapes: list[tuple[int, int]], extra: list[float], failing: int | None,
) -> None:  # fmt: skip
    """Reconciles when the step asks (wake_in) and at arbitrary other times (watch events): each
    metric is measured exactly ``count`` times when all pass, the step passes when the slowest
    metric is done, and one failing metric fails the step at its first measurement."""
    metrics = [metric(f"m{i}", interval, count) for i, (interval, count) in enumerate(shapes)]
    bad = f"m{failing}" if failing is not None and failing < len(metrics) else None
    prom = Prom({m.name: Measurement("value", 2.0 if m.name == bad else 0.5) for m in metrics})
    pending = sorted(T0 + timedelta(seconds=s) for s in extra)
    runs: list[AnalysisRun] = []
    now = T0
    for _ in range(1000):
        out = analyse_step(runs, 0, metrics, now, prom)
        runs = out.runs
        if out.verdict.phase != "Running":
            break
        assert out.wake_in is not None
        due = now + timedelta(seconds=out.wake_in)
        pending = [t for t in pending if t > now]
        now = min([due, *pending])
    else:
        raise AssertionError("the step never concluded")
    if bad is None:
        assert out.verdict.phase == "Successful"
        assert prom.asked == {m.name: int(m.count) for m in metrics}
        elapsed = (now - T0).total_seconds()  # a measurement may be taken up to 50 ms early
        assert max((i - 0.05) * c for i, c in shapes) - 1e-6 <= elapsed <= max(i * c for i, c in shapes)
        assert len(runs) == len(metrics)
    else:
        interval = shapes[int(bad[1:])][0]
        assert out.verdict.phase == "Failed"
        assert prom.asked[bad] == 1 and (now - T0).total_seconds() <= interval


def test_after_an_inconclusive_pause_every_metric_is_measured_afresh() -> None:
    """One metric errs (Prometheus down) while another has passed and a third still runs: the step
    pauses. Resumed, all three start new runs; the one left running is closed and says why."""
    metrics = [metric("fast", 10, 1), metric("flaky", 20, 1), metric("slow", 30, 2)]
    prom = Prom({"fast": Measurement("value", 0.1), "flaky": Measurement("error", message="connection refused"),
                 "slow": Measurement("value", 0.1)})  # fmt: skip
    runs = analyse_step([], 1, metrics, T0, prom).runs
    runs = analyse_step(runs, 1, metrics, T0 + timedelta(seconds=10), prom).runs  # fast passes
    out = analyse_step(runs, 1, metrics, T0 + timedelta(seconds=20), prom)  # flaky errs
    assert out.verdict.phase == "Inconclusive" and "connection refused" in out.verdict.message
    prom.values["flaky"] = Measurement("value", 0.1)
    resumed = T0 + timedelta(minutes=5)
    out = analyse_step(out.runs, 1, metrics, resumed, prom)
    assert out.verdict.phase == "Running"
    assert len(out.runs) == 6
    old_slow = out.runs[2]
    assert old_slow.phase == "Inconclusive" and old_slow.finished_at == resumed
    assert "measured afresh" in (old_slow.message or "")
    assert [r.started_at for r in out.runs[3:]] == [resumed] * 3
    assert prom.asked["fast"] == 1  # nothing measured yet in the new attempt: one interval first


def test_runs_of_other_steps_are_left_alone() -> None:
    m = metric("fast", 10, 1)
    earlier = AnalysisRun(step=0, metric="fast", phase="Failed", finished_at=T0)
    out = analyse_step([earlier], 3, [m], T0, Prom({"fast": Measurement("value", 0.1)}))
    assert out.runs[0] is earlier and earlier.phase == "Failed"
    assert [r.step for r in out.runs] == [0, 3]
