"""How the plugin shows things: a rich tree on a terminal, the same tree as plain text when piped."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.tree import Tree

COLOURS = {"Succeeded": "green", "Promoted": "green", "Failed": "red", "RolledBack": "red", "Aborted": "red",
           "RollingBack": "yellow", "Paused": "yellow", "WaitingForData": "yellow"}  # fmt: skip
Objects = list[dict[str, Any]]


TELLING = {
    # phase -> the conditions that say most about it, in order (type, status)
    "Succeeded": [("Succeeded", "True")], "Failed": [("Failed", "True"), ("Resolved", "False"),
                                                      ("Progressing", "False")],
    "Promoted": [("Promoted", "True")], "RolledBack": [("RolledBack", "True")], "Aborted": [("RolledBack", "True")],
    "RollingBack": [("Progressing", "True")], "Paused": [("Paused", "True"), ("Progressing", "False")],
    "Analyzing": [("Analyzing", "True")], "Progressing": [("Progressing", "True")],
    "WaitingForData": [("DataSufficient", "False")], "Pending": [("DataSufficient", "False"), ("Scheduled", "False")],
    "Training": [("Training", "True")], "Packaging": [("Verified", "False"), ("Verified", "True")],
    "Registering": [("Registered", "False")],
}  # fmt: skip
TROUBLE = {("ClustersReachable", "False"), ("Reconciled", "False"), ("Scheduled", "False"), ("Degraded", "True"),
           ("Training", "True"), ("Training", "False")}  # fmt: skip
"""Conditions that outrank the phase's own while the object is not finished (something needs a look)."""
TROUBLE_REASONS = {"CredentialsUnavailable", "ClusterUnreachable", "ClusterThrottled", "ReconcileError",
                   "TargetsNotConfirming", "TrainerRetrying"}  # fmt: skip
FINISHED = {"Succeeded", "Failed", "Promoted", "RolledBack", "Aborted"}


def summary_condition(obj: dict[str, Any]) -> str:
    """The most telling condition's reason and message: for a finished object the condition that
    says how it ended; otherwise a condition that needs a look (unreachable cluster, reconcile
    error, a trainer retrying), else the one that belongs to the phase (never a stale one of an
    earlier phase, such as "Running: the release runs" on an aborted release)."""
    status = obj.get("status") or {}
    conditions = status.get("conditions") or []
    phase = status.get("phase") or "Pending"

    def first(wanted: list[tuple[str, str]]) -> dict[str, Any] | None:
        for kind, value in wanted:
            hit: dict[str, Any] | None = next(
                (c for c in conditions if c.get("type") == kind and c.get("status") == value), None)  # fmt: skip
            if hit is not None:
                return hit
        return None

    chosen = None
    if phase not in FINISHED:
        chosen = next((c for c in conditions if (c.get("type"), c.get("status")) in TROUBLE
                       and c.get("reason") in TROUBLE_REASONS), None)  # fmt: skip
    chosen = chosen or first(TELLING.get(phase, []))
    if chosen is None:
        bad = [c for c in conditions if c.get("status") == "False"]
        chosen = bad[0] if bad else (conditions[-1] if conditions else None)
    return f"{chosen.get('reason')}: {chosen.get('message', '')}".strip() if chosen else ""


def _phase(obj: dict[str, Any], rich: bool) -> str:
    phase = str((obj.get("status") or {}).get("phase") or "Pending")
    colour = COLOURS.get(phase)
    return f"[{colour}]{phase}[/]" if rich and colour else phase


def _job(obj: dict[str, Any], tree: Tree, rich: bool, ns: bool) -> None:
    status = obj.get("status") or {}
    spec = obj["spec"]
    result = status.get("result") or {}
    name = f"{obj['metadata']['namespace']}/" * ns + obj["metadata"]["name"]
    version = f"  → {result.get('mlflowModel')} v{result['mlflowVersion']}" if result.get("mlflowVersion") else ""
    node = tree.add(f"EdgeTrainingJob {name}  {_phase(obj, rich)}  {status.get('progress') or ''}  "
                    f"{spec['placement'].get('accelerator', 'any')}{version}")  # fmt: skip
    clusters: dict[str, Tree] = {}
    for t in status.get("targets") or []:
        branch = clusters.get(t["cluster"]) or node.add(f"cluster {t['cluster']}")
        clusters[t["cluster"]] = branch
        parts = [f"node {t.get('node') or '(any)'}", _phase(t | {"status": {"phase": t["phase"]}}, rich)]
        if t.get("step") is not None:
            parts.append(f"step {t['step']}")
        if t.get("loss") is not None:
            parts.append(f"loss {t['loss']:.4f}")
        if t.get("peakMemoryBytes"):
            parts.append(f"peak {t['peakMemoryBytes'] / 2**20:.0f} MiB / {spec['budgets']['memory']}")
        if t.get("mlflowVersion"):
            parts.append(f"v{t['mlflowVersion']}")
        if t.get("message") and t["phase"] == "Failed":
            parts.append(t["message"][:160])
        branch.add("  ".join(parts))


def _release(obj: dict[str, Any], tree: Tree, rich: bool, ns: bool) -> None:
    status = obj.get("status") or {}
    name = f"{obj['metadata']['namespace']}/" * ns + obj["metadata"]["name"]
    adapter = obj["spec"]["adapter"]
    stable = f"v{status['stableVersion']}" if status.get("stableVersion") else "base"
    canary = f"v{status['canaryVersion']}" if status.get("canaryVersion") else f"{adapter.get('version') or '?'}"
    steps = len(obj["spec"]["strategy"]["canary"]["steps"])
    node = tree.add(f"AdapterRelease {name}  {_phase(obj, rich)}  {adapter['registeredModel']} {canary} "
                    f"(stable {stable})  step {status.get('currentStep', 0)}/{steps}  "
                    f"weight {status.get('canaryWeight') or 0} %")  # fmt: skip
    for cluster, versions in sorted((status.get("targetsByCluster") or {}).items()):
        node.add(f"cluster {cluster}: " + ", ".join(f"{n} on {v if v == 'base' else 'v' + v}"
                                                    for v, n in sorted(versions.items())))  # fmt: skip
    runs = status.get("analysisRuns") or []
    if runs:
        last = runs[-1]
        node.add(f"analysis {last['metric']} {last['phase']} {[round(v, 4) for v in last.get('values', [])]}"
                 + (f" {last['message']}" if last.get("message") else ""))  # fmt: skip
    condition = summary_condition(obj)
    if condition and status.get("phase") in ("Failed", "RolledBack", "Paused", "Aborted"):
        node.add(condition[:300])


def render(jobs: Objects, releases: Objects, *, rich: bool, all_namespaces: bool = False) -> Tree:
    tree = Tree("edgetune", hide_root=True)
    for obj in jobs:
        _job(obj, tree, rich, all_namespaces)
    for obj in releases:
        _release(obj, tree, rich, all_namespaces)
    if not jobs and not releases:
        tree.add("no EdgeTrainingJobs or AdapterReleases")
    return tree


def plain(tree: Tree) -> str:
    """The tree as text without colour codes or wrapping (for pipes and logs)."""
    buffer = io.StringIO()
    Console(file=buffer, width=10_000, color_system=None, markup=False, highlight=False).print(tree)
    return buffer.getvalue()


class Out:
    def __init__(self) -> None:
        self.console = Console(highlight=False)
        self.rich = self.console.is_terminal
        self.errors = Console(stderr=True, highlight=False, soft_wrap=True)

    def tree(self, jobs: Objects, releases: Objects, *, all_namespaces: bool = False) -> None:
        tree = render(jobs, releases, rich=self.rich, all_namespaces=all_namespaces)
        if self.rich:
            self.console.print(tree)
        else:  # piped: plain text, no colour codes, no wrapping
            sys.stdout.write(plain(tree))

    @contextlib.contextmanager
    def live(self, jobs: Objects, releases: Objects) -> Iterator[Callable[[Objects, Objects], None]]:
        if not self.rich:
            last = [""]

            def printed(j: Objects, r: Objects) -> None:
                text = plain(render(j, r, rich=False))
                if text != last[0]:  # piped: a new block only when something changed
                    sys.stdout.write(text + "\n")
                    sys.stdout.flush()
                    last[0] = text

            printed(jobs, releases)
            yield printed
            return
        with Live(render(jobs, releases, rich=True), console=self.console, refresh_per_second=2) as live:
            yield lambda j, r: live.update(render(j, r, rich=True))

    def json(self, data: Any) -> None:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")

    def line(self, text: str) -> None:
        self.console.print(text, markup=False)

    def error(self, text: str) -> None:
        self.errors.print(f"kubectl edgetune: {text}", markup=False)
