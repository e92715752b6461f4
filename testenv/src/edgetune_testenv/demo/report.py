"""The demo's results: ``summary.json`` and PNG plots, from what the run recorded and from Prometheus.

- ``loss.png``: training loss per trainer over time (the trainers' pushed metric, via Prometheus);
- ``memory-energy.png``: each trainer's peak memory against its budget, and its energy;
- ``rollout.png``: per release, the share of live requests each version answered and its error rate
  on the sites' labelled traffic, with the moments the release promoted or rolled back.
"""

from __future__ import annotations

import json
import math
import urllib.parse
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib as mpl

mpl.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from edgetune_api.meta import parse_quantity

if TYPE_CHECKING:
    from edgetune_testenv.demo.story import Demo

GiB = 2**30
BIN_SECONDS = 1.0


def trainer_rows(demo: Demo) -> list[dict[str, Any]]:
    rows = []
    for name, obj in demo.record.jobs.items():
        status = obj.get("status") or {}
        result = status.get("result") or {}
        for t in status.get("targets") or []:
            version = t.get("mlflowVersion") or (result.get("mlflowVersion") if result.get("participants") else None)
            rows.append({
                "job": name, "where": f"{t['cluster']}/{t.get('node')}", "phase": t["phase"],
                "encoding": obj["spec"]["output"]["encoding"], "version": version,
                "package_bytes": demo.record.package_bytes.get(str(version)) if version else None,
                "peak_memory_bytes": t.get("peakMemoryBytes"), "budget": obj["spec"]["budgets"]["memory"],
                "budget_bytes": int(parse_quantity(obj["spec"]["budgets"]["memory"])),
                "energy_joules": t.get("energyJoules"), "energy_method": t.get("energyMethod"),
                "steps": t.get("step"), "loss": t.get("loss"),
            })  # fmt: skip
    return rows


def query_range(demo: Demo, query: str, start: float, end: float, step: float = 1) -> list[dict[str, Any]]:
    if demo.prometheus is None:
        return []
    params = urllib.parse.urlencode({"query": query, "start": start, "end": end, "step": str(step)})
    try:
        with urllib.request.urlopen(f"{demo.prometheus.url}/api/v1/query_range?{params}", timeout=20) as resp:  # noqa: S310
            body = json.loads(resp.read())
    except OSError:
        return []
    return list(body.get("data", {}).get("result", []))


def plot_loss(demo: Demo, path: Path) -> bool:
    window = demo.record.windows.get("training")
    if not window:
        return False
    series = query_range(demo, 'edgetune_trainer_loss{namespace="demo"}', window[0], window[1] + 5)
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for s in sorted(series, key=lambda s: (s["metric"].get("job", ""), s["metric"].get("node", ""))):
        t0 = window[0]
        xs = [float(v[0]) - t0 for v in s["values"]]
        ys = [float(v[1]) for v in s["values"]]
        job = s["metric"].get("job", "").removeprefix("edgetune-trainer-")
        ax.plot(xs, ys, label=f"{job} {s['metric'].get('node')}")
    ax.set_xlabel("seconds since the jobs were created (trainers push every 5 s)")
    ax.set_ylabel("training loss")
    ax.set_title("LoRA training loss per edge trainer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_memory_energy(rows: list[dict[str, Any]], path: Path) -> bool:
    rows = [r for r in rows if r.get("peak_memory_bytes")]
    if not rows:
        return False
    fig, (mem, energy) = plt.subplots(1, 2, figsize=(11, 4.5))
    labels = [f"{r['where'].split('/')[-1]}\n{r['job'].removeprefix('meters-')}" for r in rows]
    mem.bar(labels, [r["peak_memory_bytes"] / GiB for r in rows], color="tab:blue", label="peak")
    mem.plot(labels, [r["budget_bytes"] / GiB for r in rows], "r_", markersize=30, label="budget")
    mem.set_ylabel("GiB")
    mem.set_title("Peak memory vs budget")
    mem.legend()
    energy.bar(labels, [r.get("energy_joules") or 0 for r in rows], color="tab:orange")
    energy.set_ylabel("joules")
    methods = sorted({str(r.get("energy_method")) for r in rows})
    energy.set_title(f"Energy per trainer ({', '.join(methods)})")
    for ax in (mem, energy):
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def rollout_series(demo: Demo, release: str) -> dict[str, Any]:
    """Binned traffic of one release window: per version, the share of requests and the error rate."""
    window = demo.record.windows.get(release)
    if not window:
        return {}
    start, end = window[0] - 2, window[1]
    bins: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for t, _, version, n, wrong in demo.record.traffic:
        if start <= t <= end:
            cell = bins[int((t - start) // BIN_SECONDS)][version]
            cell[0] += n
            cell[1] += wrong
    versions = sorted({v for b in bins.values() for v in b})
    times = sorted(bins)
    out: dict[str, Any] = {"t": [start - window[0] + (i + 0.5) * BIN_SECONDS for i in times], "versions": {}}
    for v in versions:
        share, error = [], []
        for i in times:
            total = sum(c[0] for c in bins[i].values())
            n, wrong = bins[i].get(v, [0, 0])
            share.append(n / total if total else 0.0)
            error.append(wrong / n if n else math.nan)
        out["versions"][v] = {"share": share, "error": error}
    moments = ("Promoted", "RolledBack", "RollingBack")
    out["events"] = [(t - window[0], what, detail) for t, what, detail in demo.record.timeline
                     if what == release and detail.split(" ")[0] in moments]  # fmt: skip
    return out


def label_heights(times: list[float], span: float, *, top: float = 1.02, step: float = 0.09,
                  gap: float = 0.12) -> list[float]:  # fmt: skip
    """Where each phase label goes on the share axis: a label closer than ``gap`` of the x range to an
    earlier one at the same height moves one ``step`` down, so labels of moments seconds apart
    (RollingBack, then RolledBack) never print over each other."""
    placed: list[tuple[float, float]] = []
    heights = []
    for t in times:
        y = top
        while any(abs(t - u) < gap * max(span, 1e-9) and abs(y - v) < 1e-9 for u, v in placed):
            y -= step
        placed.append((t, y))
        heights.append(y)
    return heights


def plot_rollout(demo: Demo, path: Path) -> bool:
    releases = [r for r in demo.record.releases if r in demo.record.windows]
    if not releases:
        return False
    fig, axes = plt.subplots(2, len(releases), figsize=(6 * len(releases), 6), squeeze=False)
    versions = demo.record.versions
    colours = {"base": "tab:gray", versions.get("good"): "tab:green", versions.get("miswired"): "tab:red"}
    for col, release in enumerate(releases):
        data = rollout_series(demo, release)
        share_ax, error_ax = axes[0][col], axes[1][col]
        for version, s in data.get("versions", {}).items():
            label = "base" if version == "base" else f"v{version}"
            colour = colours.get(version)
            share_ax.plot(data["t"], s["share"], label=label, color=colour)
            error_ax.plot(data["t"], s["error"], marker=".", label=label, color=colour)
        events = data.get("events", [])
        span = max([*data.get("t", []), *(t for t, _, _ in events), 1.0])
        for (t, _, detail), y in zip(events, label_heights([t for t, _, _ in events], span), strict=True):
            for ax in (share_ax, error_ax):
                ax.axvline(t, color="red" if "Roll" in detail else "green", linestyle="--", linewidth=1)
            share_ax.annotate(detail.split(" ")[0], (t, y), xytext=(3, 0), textcoords="offset points", fontsize=7,
                              color="dimgray", backgroundcolor="white")  # fmt: skip
        share_ax.set_title(f"{release}: share of live requests by version")
        share_ax.set_ylim(0, 1.1)
        error_ax.set_title("error rate on the sites' labelled traffic")
        error_ax.set_ylim(-0.02, 1.02)
        error_ax.set_xlabel("seconds since the release was created")
        share_ax.legend(fontsize=7)
        error_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(demo: Demo, results: Path) -> dict[str, Any]:
    rows = trainer_rows(demo)
    versions = demo.record.versions
    accuracy = [
        {"cluster": cluster, "base": acc.get("base"), "good": acc.get(versions.get("good", "")),
         "miswired": acc.get(versions.get("miswired", ""))}
        for cluster, acc in sorted(demo.record.accuracy.items()) if cluster != "lab"
    ]  # fmt: skip
    plots = {
        "loss.png": plot_loss(demo, results / "loss.png"),
        "memory-energy.png": plot_memory_energy(rows, results / "memory-energy.png"),
        "rollout.png": plot_rollout(demo, results / "rollout.png"),
    }
    started = demo.record.started
    summary = {
        "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in demo.checks],
        "accuracy": accuracy,
        "lab_base_accuracy": demo.record.accuracy.get("lab", {}).get("base"),
        "versions": versions,
        "trainers": rows,
        "timeline": [(round(t - started, 1), what, detail) for t, what, detail in demo.record.timeline],
        "releases": {name: (obj.get("status") or {}).get("phase") for name, obj in demo.record.releases.items()},
        "plots": [name for name, made in plots.items() if made],
        "dashboard_series": demo.record.dashboard_series,
        "duration_seconds": round(max([t for t, *_ in demo.record.timeline] or [started]) - started, 1),
    }
    (results / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
