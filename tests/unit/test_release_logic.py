"""AdapterRelease logic on its own: analysis verdicts and query templates, and the rollout plan
(shares per cluster, waves, pacing, confirmation, pods appearing, rollback)."""

from __future__ import annotations

from typing import Any

import pytest

from edgetune_api.adapter_release import AnalysisMetric
from edgetune_api.assignment import AdapterAssignment, AdapterReport, ReportError, ServedAdapter
from edgetune_api.meta import LabelSelector
from edgetune_operator.reconcile.analysis import (
    Measurement,
    TemplateError,
    combine,
    evaluate,
    render_query,
    uses,
    worst,
)
from edgetune_operator.reconcile.release import (
    ReleasedAdapter,
    RivalRelease,
    Target,
    canary_plan,
    conflicts,
    ranks,
    rollback_plan,
    shadow_plan,
    versions_by_cluster,
    versions_served,
)

# -- analysis ---------------------------------------------------------------------------------


def metric(**kw: Any) -> AnalysisMetric:
    spec = {"name": "error-rate", "query": "q", "thresholdRange": {"max": 0.05}, "count": 3, "failureLimit": 1}
    return AnalysisMetric.model_validate({**spec, **kw})


def values(*vs: float | None) -> list[Measurement]:
    return [Measurement("nodata") if v is None else Measurement("value", v) for v in vs]


@pytest.mark.parametrize(
    ("measured", "phase"),
    [
        (values(0.01), "Running"),
        (values(0.01, 0.02, 0.03), "Successful"),
        (values(0.01, 0.09, 0.02), "Successful"),  # one failure tolerated
        (values(0.09, 0.2), "Failed"),  # fails early, before count
        (values(0.01, float("nan"), 0.5), "Failed"),  # NaN never passes
    ],
)
def test_measurements_decide_a_metric(measured: list[Measurement], phase: str) -> None:
    assert evaluate(metric(), measured).phase == phase


def test_a_failure_names_the_range_the_limit_and_the_values() -> None:
    verdict = evaluate(metric(), values(0.2, 0.3))
    assert verdict.message == ("error-rate: 2 of 2 measurements outside <= 0.05 (failureLimit 1); values 0.2, 0.3")


@pytest.mark.parametrize(
    ("no_data", "phase"), [("fail", "Failed"), ("pass", "Successful"), ("inconclusive", "Inconclusive")]
)
def test_no_data_does_what_the_metric_says(no_data: str, phase: str) -> None:
    m = metric(noData=no_data, failureLimit=0, count=2)
    assert evaluate(m, values(None, 0.01)).phase == phase


def test_an_error_is_inconclusive_never_a_pass() -> None:
    verdict = evaluate(metric(noData="pass"), [*values(0.01), Measurement("error", message="parse error at char 3")])
    assert verdict.phase == "Inconclusive" and "parse error at char 3" in verdict.message


def test_ranges_with_both_bounds() -> None:
    m = metric(thresholdRange={"min": 0.9, "max": 1.0}, count=1, failureLimit=0)
    assert evaluate(m, values(0.95)).phase == "Successful" and evaluate(m, values(0.85)).phase == "Failed"
    assert "[0.9, 1]" in evaluate(m, values(0.85)).message


def test_combined_verdicts_fail_first_then_inconclusive_then_running() -> None:
    ok, bad = evaluate(metric(), values(0.01, 0.01, 0.01)), evaluate(metric(), values(0.5, 0.5))
    unknown = evaluate(metric(noData="inconclusive"), values(None))
    assert combine([ok, unknown, bad]).phase == "Failed"
    assert combine([ok, unknown]).phase == "Inconclusive"
    assert combine([ok, evaluate(metric(), values(0.01))]).phase == "Running"
    assert combine([ok, ok]).phase == "Successful"


def test_templates_fill_and_escape_and_refuse_unknown_names() -> None:
    query = 'sum(rate(edgetune_agent_request_errors_total{version="{{version}}",release="{{ release }}"}[1m]))'
    rendered = render_query(query, {"version": '7"} or vector(0) #', "release": "ns/r"})
    assert (
        rendered == 'sum(rate(edgetune_agent_request_errors_total{version="7\\"} or vector(0) #",release="ns/r"}[1m]))'
    )
    with pytest.raises(TemplateError, match=r"\{\{stable\}\}, which is not one of \{\{release\}\}"):
        render_query("x{v='{{stable}}'}", {"version": "1"})


# -- rollout plan -----------------------------------------------------------------------------

CANARY = ReleasedAdapter(version="2", uri="s3://a/2", sha256="c" * 64)
STABLE = ReleasedAdapter(version="1", uri="s3://a/1", sha256="b" * 64)


def fleet(per_cluster: dict[str, int]) -> list[Target]:
    return [Target(cluster, "prod", f"{cluster}-{i}", f"uid-{cluster}-{i}") for cluster, n in per_cluster.items()
            for i in range(n)]  # fmt: skip


def served(target: Target, adapter: ReleasedAdapter | None, *, assigned: bool = True) -> Target:
    report = AdapterReport(
        state="Serving", observed_at="t",
        active=ServedAdapter(version=adapter.version, sha256=adapter.sha256) if adapter else None,
    )  # fmt: skip
    assignment = adapter.assignment("prod/r") if adapter and assigned else target.assignment
    return Target(target.cluster, target.namespace, target.name, target.uid, assignment, report)


def apply(targets: list[Target], writes: list[tuple[Target, AdapterAssignment]]) -> list[Target]:
    """The fleet after the writes, before the agents react."""
    new = {t.key: a for t, a in writes}
    return [Target(t.cluster, t.namespace, t.name, t.uid, new.get(t.key, t.assignment), t.report) for t in targets]


def plan(targets: list[Target], weight: int, **kw: Any) -> Any:
    args = {"canary": CANARY, "stable": STABLE, "weight": weight, "max_unavailable": 1000, "release": "prod/r",
            "release_key": "uid-r"}  # fmt: skip
    return canary_plan(targets, **{**args, **kw})


def test_each_step_takes_its_share_of_every_cluster() -> None:
    targets = [served(t, STABLE) for t in fleet({"a": 20, "b": 10, "c": 30})]
    step = plan(targets, 10)
    canaries = [t for t, a in step.writes if a.sha256 == CANARY.sha256]
    assert {c.cluster for c in canaries} == {"a", "b", "c"}
    assert sorted(by_cluster(canaries).items()) == [("a", 2), ("b", 1), ("c", 3)]
    assert step.wanted == 6 and step.confirmed == 0 and not step.complete


def by_cluster(targets: list[Target]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in targets:
        counts[t.cluster] = counts.get(t.cluster, 0) + 1
    return counts


def test_waves_go_cluster_by_cluster() -> None:
    targets = [served(t, STABLE) for t in fleet({"a": 10, "b": 10, "c": 10})]
    step = plan(targets, 30, waves=True)
    assert by_cluster([t for t, a in step.writes if a.sha256 == CANARY.sha256]) == {"a": 9}  # 30 % of 30
    assert by_cluster([t for t, a in plan(targets, 50, waves=True).writes]) == {"a": 10, "b": 5}


def test_pacing_confirmation_and_completion() -> None:
    targets = [served(t, STABLE) for t in fleet({"a": 5, "b": 5})]
    step = plan(targets, 100, max_unavailable=3)
    assert len(step.writes) == 3 and step.wanted == 10
    targets = apply(targets, step.writes)
    again = plan(targets, 100, max_unavailable=3)
    assert again.switching == 3 and again.writes == []  # nobody new until those confirm
    targets = [served(t, CANARY) if t.assigned(CANARY.sha256) else t for t in targets]
    third = plan(targets, 100, max_unavailable=3)
    assert third.confirmed == 3 and len(third.writes) == 3
    for _ in range(5):
        targets = [served(t, CANARY) for t in apply(targets, plan(targets, 100, max_unavailable=3).writes)]
    final = plan(targets, 100, max_unavailable=3)
    assert final.complete and final.confirmed == 10 and final.writes == []
    assert versions_served(targets) == {"2": 10}


def test_the_canary_set_only_grows_when_pods_come_and_go() -> None:
    targets = [served(t, STABLE) for t in fleet({"a": 10})]
    first = plan(targets, 20)
    targets = [served(t, CANARY) for t in apply(targets, first.writes) if t.assigned(CANARY.sha256)] + [
        t for t in apply(targets, first.writes) if not t.assigned(CANARY.sha256)
    ]
    canaries = {t.key for t in targets if t.assigned(CANARY.sha256)}
    newcomers = [Target("a", "prod", f"new-{i}", f"uid-new-{i}") for i in range(10)]
    step = plan(targets + newcomers, 20)
    kept = {t.key for t in targets + newcomers if t.assigned(CANARY.sha256)}
    assert canaries <= kept  # nobody taken back
    # every newcomer is told something: the canary if its share says so, the stable version otherwise
    told = {t.key: a.version for t, a in step.writes}
    assert all(n.key in told for n in newcomers)
    assert step.wanted == len(canaries) + sum(1 for n in newcomers if told[n.key] == "2")


def test_refusals_are_reported_not_retried() -> None:
    on_stable = [served(t, STABLE) for t in fleet({"a": 4})]
    targets = apply(on_stable, plan(on_stable, 100).writes)
    bad = targets[0]
    report = AdapterReport(state="Refused", observed_at="t", active=ServedAdapter(version="1", sha256=STABLE.sha256),
                           error=ReportError(reason="SignatureInvalid", message="m", sha256=CANARY.sha256))  # fmt: skip
    targets[0] = Target(bad.cluster, bad.namespace, bad.name, bad.uid, bad.assignment, report)
    step = plan(targets, 100)
    assert [(t.name, e.reason) for t, e in step.refused] == [(bad.name, "SignatureInvalid")] and not step.complete


def test_without_a_stable_adapter_the_rest_stays_on_the_base() -> None:
    targets = fleet({"a": 10})
    step = plan(targets, 30, stable=None)
    assert all(a.sha256 == CANARY.sha256 for _, a in step.writes) and len(step.writes) == 3


def test_rollback_puts_everyone_back_at_once_and_revokes_the_canary() -> None:
    targets = [served(t, CANARY) for t in fleet({"a": 6, "b": 4})]
    back = rollback_plan(targets, canary=CANARY, stable=STABLE, release="prod/r")
    assert len(back.writes) == 10 and {a.sha256 for _, a in back.writes} == {STABLE.sha256}
    assert all(a.revoked == [CANARY.sha256] for _, a in back.writes) and back.confirmed == 0
    done = [served(t, STABLE, assigned=False) for t in apply(targets, back.writes)]
    again = rollback_plan(done, canary=CANARY, stable=STABLE, release="prod/r")
    assert again.writes == [] and again.confirmed == 10 and again.complete
    assert versions_by_cluster(done) == {"a": {"1": 6}, "b": {"1": 4}}
    base = rollback_plan(targets, canary=CANARY, stable=None, release="prod/r")
    assert all(a.base and a.revoked == [CANARY.sha256] for _, a in base.writes)


def shadowed(target: Target, adapter: ReleasedAdapter, active: ReleasedAdapter) -> Target:
    """The agent runs ``adapter`` in shadow beside ``active``, as it was told."""
    report = AdapterReport(state="Serving", observed_at="t",
                           active=ServedAdapter(version=active.version, sha256=active.sha256),
                           shadow=ServedAdapter(version=adapter.version, sha256=adapter.sha256))  # fmt: skip
    return Target(target.cluster, target.namespace, target.name, target.uid, target.assignment, report)


def test_a_shadow_step_shadows_every_target_paced_and_the_next_weight_step_ends_the_shadows() -> None:
    targets = [served(t, STABLE) for t in fleet({"a": 3, "b": 2})]
    first = shadow_plan(targets, canary=CANARY, max_unavailable=2, release="prod/r")
    assert len(first.writes) == 2 and all(a.mode == "shadow" and a.sha256 == CANARY.sha256 for _, a in first.writes)
    targets = apply(targets, first.writes)
    assert shadow_plan(targets, canary=CANARY, max_unavailable=2, release="prod/r").writes == []  # 2 switching
    for _ in range(3):
        targets = [shadowed(t, CANARY, STABLE) if t.shadowing(CANARY.sha256) else t for t in targets]
        targets = apply(targets, shadow_plan(targets, canary=CANARY, max_unavailable=2, release="prod/r").writes)
    targets = [shadowed(t, CANARY, STABLE) if t.shadowing(CANARY.sha256) else t for t in targets]
    done = shadow_plan(targets, canary=CANARY, max_unavailable=2, release="prod/r")
    assert done.complete and done.confirmed == 5 and done.writes == []
    assert versions_served(targets) == {"1": 5}  # a shadow serves nothing
    # A shadowed target is not on the canary: the next step takes its share and puts the rest
    # back on stable (served), which ends their shadows.
    step = plan(targets, 40)
    canary = [t.key for t, a in step.writes if a.sha256 == CANARY.sha256 and a.mode == "serve"]
    back = [t.key for t, a in step.writes if a.sha256 == STABLE.sha256 and a.mode == "serve"]
    assert step.wanted == 3 and len(canary) == 3 and len(back) == 2 and not set(canary) & set(back)
    refused = Target("a", "prod", "x", "ux", CANARY.assignment("prod/r", mode="shadow"), AdapterReport(
        state="Refused", observed_at="t", error=ReportError(reason="EvalRegression", message="worse",
                                                           sha256=CANARY.sha256)))  # fmt: skip
    assert shadow_plan([refused], canary=CANARY, max_unavailable=1, release="prod/r").refused


def test_ranks_are_deterministic_and_spread() -> None:
    targets = fleet({"a": 4, "b": 4})
    assert ranks(targets, "k", waves=False) == ranks(list(reversed(targets)), "k", waves=False)
    assert sorted(ranks(targets, "k", waves=False).values()) == [0, 0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75]
    assert ranks(targets, "k", waves=False) != ranks(targets, "other-release", waves=False)


def test_per_cluster_measurements_keep_the_worst() -> None:
    m = metric(thresholdRange={"min": 0.8})
    assert uses('min(x{cluster="{{ cluster }}"})', "cluster") and not uses("min(x)", "cluster")
    ok = {"a": Measurement("value", 0.95), "b": Measurement("value", 0.85)}
    assert worst(m, ok) == Measurement("value", 0.85, "cluster b")  # nearest the edge
    bad = {**ok, "c": Measurement("value", 0.4)}
    assert worst(m, bad).value == 0.4 and worst(m, bad).message == "cluster c"
    assert worst(m, {**bad, "d": Measurement("nodata")}).value == 0.4  # a failing value beats no data
    broken = {**bad, "e": Measurement("error", message="Prometheus down")}
    assert worst(m, broken) == Measurement("error", None, "cluster e: Prometheus down")
    assert worst(m, {}).kind == "nodata"


def test_a_release_may_not_take_pods_another_release_drives() -> None:
    targets = fleet({"a": 2, "b": 2})
    labels = {t.key: {"app": "sensor", "tier": "gold" if t.name.endswith("0") else "std"} for t in targets}
    gold = RivalRelease("gold", "Progressing", frozenset({"a", "b"}),
                        LabelSelector.model_validate({"matchLabels": {"tier": "gold"}}), "prod")  # fmt: skip
    elsewhere = RivalRelease("c-only", "Paused", frozenset({"c"}),
                             LabelSelector.model_validate({"matchLabels": {"app": "sensor"}}), "prod")  # fmt: skip
    sensors = LabelSelector.model_validate({"matchLabels": {"app": "sensor"}})
    other_namespace = RivalRelease("staging", "Progressing", frozenset({"a", "b"}), sensors, "staging")
    assert conflicts(targets, labels, [elsewhere]) is None  # other clusters: no pod shared
    assert conflicts(targets, labels, [other_namespace]) is None  # same clusters, pods of another namespace
    hit = conflicts(targets, labels, [elsewhere, gold])
    assert hit is not None and hit[0].name == "gold" and hit[1] == ["a/prod/a-0", "b/prod/b-0"]
