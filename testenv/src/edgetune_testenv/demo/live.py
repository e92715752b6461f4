"""What the demo shows while it runs: a live table (rich) on a terminal, plain lines otherwise.

Headless (``--headless``, or output not a terminal) prints one line per change, so a CI log reads
as a timeline; the terminal view redraws per-node training progress and the rollout in place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

if TYPE_CHECKING:
    from edgetune_testenv.demo.story import Demo

GiB = 2**30


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{unit}"


class Display:
    def __init__(self, console: Console | None = None, *, live: bool | None = None) -> None:
        if console is None:
            console = Console()
            if not console.is_terminal:  # a CI log: wide lines that never wrap mid-value
                console = Console(width=160, soft_wrap=True)
        self.console = console
        self.live_enabled = self.console.is_terminal if live is None else live
        self._live: Live | None = None
        self._last: dict[str, str] = {}

    # -- plain steps -------------------------------------------------------------------------------

    def _end_live(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def stage(self, title: str) -> None:
        self._end_live()
        self.console.rule(f"[bold]{title}")

    def check(self, name: str, passed: bool, detail: str) -> None:
        self._end_live()
        mark = "[green]PASS[/]" if passed else "[red]FAIL[/]"
        self.console.print(f"{mark} {name}: {detail}", highlight=False)

    def text(self, text: str) -> None:
        self._end_live()
        self.console.print(text, markup=False, highlight=False, end="")

    def failure(self, message: str, operator_log: str) -> None:
        self._end_live()
        self.console.print(f"[red bold]The demo stopped:[/] {message}", highlight=False)
        if operator_log:
            self.console.print("[dim]operator log (last lines):[/]")
            self.console.print(operator_log, markup=False, highlight=False)

    def _show(self, key: str, table: Table, lines: list[str]) -> None:
        if self.live_enabled:
            if self._live is None:
                self._live = Live(table, console=self.console, refresh_per_second=4, transient=False)
                self._live.start()
            else:
                self._live.update(table)
            return
        for line in lines:  # headless: only what changed
            name = line.split(" ", 1)[0]
            if self._last.get(f"{key}/{name}") != line:
                self._last[f"{key}/{name}"] = line
                self.console.print(line, highlight=False, markup=False)

    # -- training ------------------------------------------------------------------------------------

    def training(self, jobs: dict[str, dict[str, Any]], metrics: dict[tuple[str, str], dict[str, float]]) -> None:
        table = Table(title="EdgeTrainingJobs (live: trainer metrics via the Pushgateway)", expand=False)
        for column in ("job", "cluster", "node", "phase", "step", "loss", "eval acc", "peak memory", "energy"):
            table.add_column(column, justify="right" if column in ("step", "loss", "eval acc") else "left")
        lines = []
        for name, obj in jobs.items():
            status = obj.get("status") or {}
            max_steps = obj["spec"]["training"]["maxSteps"]
            budget = obj["spec"]["budgets"]["memory"]
            targets = status.get("targets") or []
            if not targets:
                table.add_row(name, "", "", status.get("phase") or "Pending", "", "", "", "", "")
                lines.append(f"{name} {status.get('phase') or 'Pending'}")
            for t in targets:
                m = metrics.get((t["cluster"], t.get("node") or ""), {})
                step = t.get("step") or m.get("step")
                memory = t.get("peakMemoryBytes") or m.get("peak_memory")
                energy = t.get("energyJoules") or m.get("energy")
                row = (name, t["cluster"], t.get("node") or "", t["phase"],
                       f"{_fmt(step, '.0f')}/{max_steps}", _fmt(t.get("loss") or m.get("loss"), ".3f"),
                       _fmt(m.get("eval_accuracy"), ".3f"),
                       f"{_fmt(memory and memory / GiB, '.2f', ' GiB')} / {budget}",
                       _fmt(energy, '.1f', ' J'))  # fmt: skip
                table.add_row(*row)
                lines.append(f"{name}/{t['cluster']}/{t.get('node')} {t['phase']}")
        self._show("training", table, lines)

    # -- releases ------------------------------------------------------------------------------------

    def release(self, name: str, obj: dict[str, Any], serving: dict[str, str]) -> None:
        status = obj.get("status") or {}
        table = Table(title=f"AdapterRelease {name}: {status.get('phase') or 'Pending'}", expand=False)
        for column in ("step", "canary weight", "canary", "stable", "analysis", "targets"):
            table.add_column(column)
        runs = status.get("analysisRuns") or []
        analysis = "; ".join(
            f"{r['metric']} {r['phase']} {[round(v, 3) for v in r.get('values', [])]}" for r in runs[-2:]
        )
        stable = status.get("stableVersion")
        serving_text = ", ".join(f"{k}: {v if v == 'base' else 'v' + v}" for k, v in sorted(serving.items()))
        table.add_row(str(status.get("currentStep")), f"{status.get('canaryWeight') or 0} %",
                      f"v{status.get('canaryVersion')}", f"v{stable}" if stable else "base", analysis or "—",
                      serving_text)  # fmt: skip
        line = (f"{name} {status.get('phase') or 'Pending'} step={status.get('currentStep')} "
                f"weight={status.get('canaryWeight') or 0}% analysis={analysis or '-'}")  # fmt: skip
        self._show("release", table, [line])

    # -- the end ---------------------------------------------------------------------------------------

    def summary(self, summary: dict[str, Any], results: Any) -> None:
        self._end_live()
        self.console.rule("[bold]Summary")
        acc = Table(title="Accuracy on each site's labelled check data (the agents' eval gate)")
        for column in ("site", "base model", "released adapter", "miswired adapter"):
            acc.add_column(column)
        for row in summary.get("accuracy", []):
            acc.add_row(row["cluster"], _fmt(row.get("base"), ".3f"), _fmt(row.get("good"), ".3f"),
                        _fmt(row.get("miswired"), ".3f"))  # fmt: skip
        self.console.print(acc)
        trainers = Table(title="Trainers: adapter size, peak memory vs budget, energy")
        for column in ("job", "cluster/node", "encoding", "package", "peak memory", "budget", "energy", "MLflow"):
            trainers.add_column(column)
        for row in summary.get("trainers", []):
            trainers.add_row(row["job"], row["where"], row["encoding"], _fmt(row.get("package_bytes"), ",", " B"),
                             _fmt(row.get("peak_memory_bytes") and row["peak_memory_bytes"] / GiB, ".2f", " GiB"),
                             row["budget"], _fmt(row.get("energy_joules"), ".1f", f" J ({row.get('energy_method')})"),
                             f"v{row['version']}" if row.get("version") else "—")  # fmt: skip
        self.console.print(trainers)
        timeline = Table(title="Rollout timeline (seconds since the demo started)")
        for column in ("t", "what", "state"):
            timeline.add_column(column)
        for t, what, detail in summary.get("timeline", []):
            timeline.add_row(f"{t:7.1f}", what, detail)
        self.console.print(timeline)
        checks = summary.get("checks", [])
        passed = sum(1 for c in checks if c["passed"])
        colour = "green" if checks and passed == len(checks) else "red"
        self.console.print(f"[{colour} bold]{passed}/{len(checks)} checks passed[/]; plots and summary.json in "
                           f"{results}")  # fmt: skip

    def hold(self, demo: Demo) -> None:
        self.console.rule("[bold]Holding: everything stays up until Ctrl-C")
        for name, plane in demo.planes.items():
            self.console.print(f"kubectl --kubeconfig {plane.kubeconfig} get nodes   # {name}", highlight=False)
        hub = demo.planes["hub"].kubeconfig
        self.console.print(f"kubectl --kubeconfig {hub} -n demo get edgetrainingjobs,adapterreleases", highlight=False)
        if demo.mlflow is not None:
            self.console.print(f"MLflow       {demo.mlflow.url}", highlight=False)
        if demo.prometheus is not None:
            self.console.print(f"Prometheus   {demo.prometheus.url}", highlight=False)
        if demo.s3 is not None:
            self.console.print(f"S3           {demo.s3.endpoint}", highlight=False)
