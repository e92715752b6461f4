"""AdapterRelease rollout logic, pure: which targets should run which adapter at a given weight,
which annotations to write now, and what the agents' reports confirm.

Targets are agent pods across clusters. What each should run is decided per target, not per
count, so the plan is stable while pods come and go:

- Every target has a **rank** in [0, 1): its quantile position inside its cluster when the
  cluster's targets are ordered by a hash of (release key, pod uid). A step at weight *w* wants
  the canary on every target whose rank is below *w*/100, so each step takes the same share of
  every cluster (10 % touches every cluster). With ``waves`` the clusters are taken one after the
  other instead: rank = (cluster index + quantile) / number of clusters.
- The canary set only grows while a release progresses: a target that already runs (or was told
  to run) the canary keeps it even if new pods shift the ranks; only a rollback takes it back.
- At most ``maxUnavailable`` targets are *switching* at once: told to run a version (the canary,
  the stable adapter or the bare base) and not yet confirming it. The limit holds for every write
  of a step, towards the canary and back to stable alike (a new pod told to run stable is switching
  until it confirms); canary writes go first. A rollback is exempt: it takes every target back at
  once, for speed (docs/releases.md).
- A target **confirms** a version when its agent reports ``state: Serving`` with that package
  digest active. A target whose agent refused the canary is reported, not retried.

A shadow step (before any setWeight step) tells every target to run the canary in *shadow*
mode: the agent keeps serving what it serves and compares the canary's answers with it. A
target confirms a shadow when its report names the canary as its shadow. The next setWeight step
replaces those assignments (canary or stable, served), which ends the shadows.

A rollback assigns the stable adapter (or the bare base model when there was none) to every
target at once, with the canary's digest in ``revoked`` so agents refuse it from then on.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from edgetune_api.assignment import AdapterAssignment, AdapterReport, ReportError
from edgetune_api.delta import Encoding
from edgetune_api.meta import LabelSelector


@dataclass(frozen=True)
class ReleasedAdapter:
    """An adapter resolved from the registry: what goes into the assignment annotation."""

    version: str
    uri: str
    sha256: str
    encoding: Encoding | None = None
    signer: str | None = None

    def assignment(self, release: str, revoked: tuple[str, ...] = (), *,
                   mode: Literal["serve", "shadow"] = "serve") -> AdapterAssignment:  # fmt: skip
        return AdapterAssignment(version=self.version, uri=self.uri, sha256=self.sha256, release=release,
                                 encoding=self.encoding, signer=self.signer, revoked=list(revoked),
                                 mode=mode)  # fmt: skip


def base_assignment(release: str, revoked: tuple[str, ...] = ()) -> AdapterAssignment:
    return AdapterAssignment(version="base", base=True, release=release, revoked=list(revoked))


@dataclass(frozen=True)
class Target:
    """One agent pod as observed: its current assignment and its agent's report (parsed)."""

    cluster: str
    namespace: str
    name: str
    uid: str
    assignment: AdapterAssignment | None = None
    report: AdapterReport | None = None

    @property
    def key(self) -> str:
        return f"{self.cluster}/{self.namespace}/{self.name}"

    def assigned(self, sha256: str) -> bool:
        """Told to serve the package ``sha256`` (a shadow assignment serves nothing)."""
        a = self.assignment
        return a is not None and not a.base and a.mode == "serve" and a.sha256 == sha256

    def shadowing(self, sha256: str) -> bool:
        """Told to run the package ``sha256`` in shadow."""
        a = self.assignment
        return a is not None and a.mode == "shadow" and a.sha256 == sha256

    def confirms_shadow(self, sha256: str) -> bool:
        report = self.report
        return report is not None and report.state == "Serving" and report.shadow is not None and (
            report.shadow.sha256 == sha256)  # fmt: skip

    @property
    def switching(self) -> bool:
        """Told to run a version (served or shadowed) it does not confirm (yet)."""
        a = self.assignment
        if a is None:
            return False
        if a.mode == "shadow":
            return not self.confirms_shadow(a.sha256)
        return not self.confirms("" if a.base else a.sha256)

    def serving(self) -> str | None:
        """The package digest the agent reports active ("" for the bare base); None before any report."""
        report = self.report
        if report is None:
            return None
        return (report.active.sha256 or "") if report.active else ""

    def confirms(self, sha256: str) -> bool:
        report = self.report
        return report is not None and report.state == "Serving" and self.serving() == sha256

    def refusal(self, sha256: str) -> ReportError | None:
        report = self.report
        if report is None or report.state != "Refused" or report.error is None:
            return None
        return report.error if report.error.sha256 == sha256 else None


def ranks(targets: list[Target], release_key: str, *, waves: bool) -> dict[str, float]:
    """Rank in [0, 1) of every target (see the module docstring)."""
    by_cluster: dict[str, list[Target]] = {}
    for t in targets:
        by_cluster.setdefault(t.cluster, []).append(t)
    clusters = sorted(by_cluster)
    result: dict[str, float] = {}
    for index, cluster in enumerate(clusters):
        members = sorted(by_cluster[cluster], key=lambda t: hashlib.sha256(f"{release_key}/{t.uid}".encode()).digest())
        for position, t in enumerate(members):
            quantile = position / len(members)
            result[t.key] = (index + quantile) / len(clusters) if waves else quantile
    return result


@dataclass
class StepPlan:
    """What to write now and how far the step is."""

    writes: list[tuple[Target, AdapterAssignment]] = field(default_factory=list)
    wanted: int = 0
    """Targets that should run the canary at this weight."""
    confirmed: int = 0
    """Of those, how many confirm it."""
    switching: int = 0
    """Told to run it, not confirming yet."""
    refused: list[tuple[Target, ReportError]] = field(default_factory=list)
    total: int = 0

    @property
    def complete(self) -> bool:
        return self.confirmed >= self.wanted and not self.refused


def canary_plan(
    targets: list[Target], *, canary: ReleasedAdapter, stable: ReleasedAdapter | None, weight: int,
    max_unavailable: int, release: str, release_key: str, waves: bool = False,
) -> StepPlan:  # fmt: skip
    """The writes that move the fleet towards ``weight`` % on the canary, and the step's progress.

    Targets outside the canary share are kept on (or told to run) the stable adapter, so a pod
    that appears mid-release gets the version its share says."""
    plan = StepPlan(total=len(targets))
    if not targets:
        return plan
    rank = ranks(targets, release_key, waves=waves)
    limit = weight / 100.0
    wanted = [t for t in targets if t.assigned(canary.sha256) or rank[t.key] < limit - 1e-12]
    if weight >= 100:
        wanted = list(targets)
    wanted_keys = {t.key for t in wanted}
    plan.wanted = len(wanted)
    plan.confirmed = sum(1 for t in wanted if t.confirms(canary.sha256))
    plan.refused = [(t, err) for t in wanted if (err := t.refusal(canary.sha256)) is not None]
    plan.switching = sum(1 for t in targets if t.switching)
    budget = max(0, max_unavailable - plan.switching)
    for t in sorted(wanted, key=lambda t: rank[t.key]):
        if not t.assigned(canary.sha256) and budget > 0:
            plan.writes.append((t, canary.assignment(release)))
            budget -= 1
    stable_assignment = stable.assignment(release) if stable else base_assignment(release)
    for t in targets:
        if t.key in wanted_keys or budget <= 0:
            continue
        if stable is None and (t.assignment is None or t.assignment.base):
            continue  # without a stable adapter, an unassigned pod already serves the bare base
        if stable is not None and t.assigned(stable.sha256):
            continue
        plan.writes.append((t, stable_assignment))
        budget -= 1
    return plan


def shadow_plan(targets: list[Target], *, canary: ReleasedAdapter, max_unavailable: int,
                release: str) -> StepPlan:  # fmt: skip
    """Every target told to run the canary in shadow, at most ``max_unavailable`` switching at once."""
    plan = StepPlan(total=len(targets), wanted=len(targets))
    plan.confirmed = sum(1 for t in targets if t.confirms_shadow(canary.sha256))
    plan.refused = [(t, err) for t in targets if (err := t.refusal(canary.sha256)) is not None]
    plan.switching = sum(1 for t in targets if t.switching)
    budget = max(0, max_unavailable - plan.switching)
    for t in targets:
        if budget > 0 and not t.shadowing(canary.sha256) and not t.confirms_shadow(canary.sha256):
            plan.writes.append((t, canary.assignment(release, mode="shadow")))
            budget -= 1
    return plan


def rollback_plan(targets: list[Target], *, canary: ReleasedAdapter, stable: ReleasedAdapter | None,
                  release: str) -> StepPlan:  # fmt: skip
    """Every target back on stable at once; the canary's digest revoked so no agent runs it again."""
    revoked = (canary.sha256,)
    wanted = stable.assignment(release, revoked) if stable else base_assignment(release, revoked)
    plan = StepPlan(total=len(targets), wanted=len(targets))
    stable_sha = stable.sha256 if stable else ""
    for t in targets:
        if t.serving() == stable_sha and t.report is not None and t.report.state == "Serving":
            plan.confirmed += 1
        if t.assignment != wanted:
            plan.writes.append((t, wanted))
    plan.switching = len(targets) - plan.confirmed
    return plan


def versions_served(targets: list[Target]) -> dict[str, int]:
    """Targets per version their agents report active ("base" for the bare base, "unknown" when a
    target has not reported)."""
    counts: Counter[str] = Counter()
    for t in targets:
        report = t.report
        if report is None:
            counts["unknown"] += 1
        else:
            counts[report.active.version if report.active else "base"] += 1
    return dict(counts)


def versions_by_cluster(targets: list[Target]) -> dict[str, dict[str, int]]:
    clusters: dict[str, list[Target]] = {}
    for t in targets:
        clusters.setdefault(t.cluster, []).append(t)
    return {cluster: versions_served(members) for cluster, members in sorted(clusters.items())}


@dataclass(frozen=True)
class RivalRelease:
    """Another unfinished release that has precedence (started or created first)."""

    name: str
    phase: str
    clusters: frozenset[str]
    selector: LabelSelector
    namespace: str
    """The namespace its targets are in (on every cluster it selects)."""


def conflicts(targets: list[Target], labels: dict[str, dict[str, str]],
              rivals: list[RivalRelease]) -> tuple[RivalRelease, list[str]] | None:  # fmt: skip
    """The first rival that selects some of ``targets`` (by cluster, namespace and pod labels), with
    the keys of the shared pods; None when no pod is shared."""
    for rival in rivals:
        shared = [t.key for t in targets if t.cluster in rival.clusters and t.namespace == rival.namespace
                  and rival.selector.matches(labels.get(t.key, {}))]  # fmt: skip
        if shared:
            return rival, sorted(shared)
    return None
