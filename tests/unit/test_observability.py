"""Alerts, dashboards and the chart's values: the files the chart ships agree with the code.

- every alert fires and stays silent when it should (``promtool test rules``);
- every metric an alert or a dashboard names is one the operator, trainer or agent defines;
- the chart's values are typed (``edgetune_api.chart_values``): values.yaml holds exactly the
  defaults, and helm rejects bad values with the field's path;
- the chart renders with every optional part on, and ships the rules and dashboards as they are.
Whether each dashboard panel shows data is checked by the demo on a real scenario (test_demo).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from edgetune_agent.metrics import AgentMetrics
from edgetune_api.chart_values import ChartValues
from edgetune_dashboards import BOARDS, queries, rendered
from edgetune_operator import metrics as operator_metrics
from edgetune_testenv import binaries
from edgetune_trainer.metrics import TrainerMetrics
from tests.support import CHART_EVERYTHING

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "edgetune"
RULES = CHART / "files" / "edgetune.rules.yaml"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
STANDARD = {"process_resident_memory_bytes"}  # prometheus_client's process collector


def _defined() -> set[str]:
    wrappers = [v for v in vars(operator_metrics).values() if isinstance(v, MetricWrapperBase)]
    wrappers += [v for v in vars(TrainerMetrics()).values() if isinstance(v, MetricWrapperBase)]
    wrappers += [v for v in vars(AgentMetrics()).values() if isinstance(v, MetricWrapperBase)]
    return {w._name + suffix for w in wrappers for suffix in SUFFIXES[w._type]} | STANDARD


def _named(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:edgetune|process)_[a-z_]+)\b", expr))


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing (Debian: apt-get install prometheus; scripts/bootstrap.sh does this)")
    return found


def test_every_alert_fires_and_stays_silent_as_its_promtool_test_says() -> None:
    promtool = _promtool()
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = REPO / "tests" / "promtool" / "edgetune.rules.test.yaml"
    done = subprocess.run([promtool, "test", "rules", tests.name], cwd=tests.parent, capture_output=True, text=True,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    tested = yaml.safe_load(tests.read_text())["tests"]
    firing = {t["alertname"] for case in tested for t in case["alert_rule_test"] if t["exp_alerts"]}
    silent = {t["alertname"] for case in tested for t in case["alert_rule_test"] if not t["exp_alerts"]}
    assert firing == alerts and silent == alerts  # each alert: at least one firing and one silent case


def test_alerts_and_dashboards_name_only_metrics_the_code_defines() -> None:
    defined = _defined()
    rules = [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    panels = [expr for _, _, expr in queries()]
    unknown = {name for expr in rules + panels for name in _named(expr)} - defined
    assert not unknown, f"not defined by any component: {sorted(unknown)}"
    assert len(BOARDS) == 4 and len(panels) >= 20


def test_dashboards_are_generated_and_valid_grafana_json() -> None:
    files = rendered()
    shipped = {p.name: p.read_text() for p in (CHART / "files" / "dashboards").glob("*.json")}
    assert shipped == files, "stale: run `python -m edgetune_dashboards write`"
    for text in files.values():
        board = json.loads(text)
        ids = [p["id"] for p in board["panels"]]
        assert len(set(ids)) == len(ids) and board["uid"].startswith("edgetune-")
        assert {v["name"] for v in board["templating"]["list"]} >= {"datasource"}
        for panel in board["panels"]:
            if panel["type"] != "row":
                assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_values_yaml_holds_exactly_the_typed_defaults() -> None:
    written = yaml.safe_load((CHART / "values.yaml").read_text())
    assert written == ChartValues().model_dump(by_alias=True, mode="json")


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    helm = str(binaries.binary(binaries.HELM, "helm"))
    return subprocess.run([helm, *args], capture_output=True, text=True, check=False)


def test_chart_lints_strictly_and_renders_every_optional_part() -> None:
    lint = _helm("lint", "--strict", str(CHART), *CHART_EVERYTHING)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    done = _helm("template", "edgetune", str(CHART), "--kube-version=1.36.3", "--namespace=edgetune-system",
                 *CHART_EVERYTHING)  # fmt: skip
    assert done.returncode == 0, done.stderr
    objects = [o for o in yaml.safe_load_all(done.stdout) if o]
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {("ServiceMonitor", "edgetune-operator"), ("PodMonitor", "edgetune-agents"),
            ("PrometheusRule", "edgetune")} <= kinds  # fmt: skip
    rule = next(o for o in objects if o["kind"] == "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    boards = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("edgetune-dashboard")]
    assert len(boards) == 4 and all(b["metadata"]["labels"]["grafana_dashboard"] == "1" for b in boards)
    for board in boards:
        ((name, text),) = board["data"].items()
        assert json.loads(text) == json.loads(rendered()[name])


@pytest.mark.parametrize(("value", "message"), [
    ("operator.workers=many", "at '/operator/workers': got string, want integer"),
    ("operator.wrokers=4", "additional properties 'wrokers' not allowed"),
    ("mlflow.trackingUri=mlflow:5000", "at '/mlflow/trackingUri'"),
    ("operator.image.pullPolicy=Sometimes", "at '/operator/image/pullPolicy'"),
])  # fmt: skip
def test_helm_rejects_bad_values_with_the_fields_path(value: str, message: str) -> None:
    done = _helm("template", "edgetune", str(CHART), "--kube-version=1.36.3", f"--set={value}")
    assert done.returncode != 0 and message in done.stderr, done.stderr


def test_the_observability_page_lists_every_metric_and_alert() -> None:
    page = (REPO / "docs" / "observability.md").read_text()
    listed = set(re.findall(r"`((?:edgetune)_[a-z_]+)`", page))
    counters = {n.removesuffix("_total") for n in _defined() if n.endswith("_total")}
    histograms = {n.removesuffix("_bucket") for n in _defined() if n.endswith("_bucket")}
    names = {n for n in _defined() - STANDARD if not n.endswith(("_bucket", "_sum", "_count", "_total"))
             and n not in counters} | {f"{c}_total" for c in counters} | histograms  # fmt: skip
    assert names - listed == set(), "metrics missing from docs/observability.md"
    assert listed - names == set(), "docs/observability.md names metrics no component defines"
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert all(f"`{a}`" in page for a in alerts)
