"""Wait, at start-up, until the API server's discovery serves edgetune's resources.

kopf learns which resources exist from discovery (``/apis``, then ``/apis/<group>/<version>``) once
when it starts, and afterwards only from *changes* of CustomResourceDefinitions. A CRD that is
``Established`` can still be missing from discovery for a moment (the API server publishes it
asynchronously): an operator started in that moment never watched the resource, logged nothing
and did nothing until restarted (seen once in ten fresh test environments). So the operator asks
discovery itself before kopf does, and stops with a clear message if the CRDs are not installed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection

from edgetune_api.meta import GROUP, VERSION
from edgetune_operator.clients.kube import (
    ADAPTER_RELEASES,
    EDGE_CLUSTERS,
    TRAINING_JOBS,
    Kube,
    KubeError,
    UnreachableError,
)

log = logging.getLogger("edgetune.discovery")

RESOURCES = tuple(r.plural for r in (TRAINING_JOBS, ADAPTER_RELEASES, EDGE_CLUSTERS))


class ResourcesNotServedError(RuntimeError):
    """edgetune's CRDs are not installed (or not served) on the cluster the operator runs against."""


def missing(kube: Kube, wanted: Collection[str] = RESOURCES) -> list[str]:
    """The plurals of ``wanted`` that discovery does not list (both levels kopf reads)."""
    groups = kube.call("GET", "/apis").get("groups") or []
    group = next((g for g in groups if g.get("name") == GROUP), None)
    if group is None or VERSION not in {v.get("version") for v in group.get("versions") or []}:
        return sorted(wanted)
    try:
        listed = kube.call("GET", f"/apis/{GROUP}/{VERSION}").get("resources") or []
    except KubeError as exc:
        if exc.status == 404:
            return sorted(wanted)
        raise
    served = {r.get("name") for r in listed}
    return sorted(set(wanted) - served)


def wait_until_served(kube: Kube, timeout: float, wanted: Collection[str] = RESOURCES, poll: float = 0.5) -> None:
    """Return once discovery lists every resource in ``wanted``; raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    said = 0.0
    absent: list[str] = list(wanted)
    while True:
        try:
            absent = missing(kube, wanted)
        except (KubeError, UnreachableError) as exc:
            absent = [f"(discovery failed: {exc})"]
        if not absent:
            return
        now = time.monotonic()
        if now >= deadline:
            raise ResourcesNotServedError(
                f"the API server does not serve {', '.join(absent)} ({GROUP}/{VERSION}) after {timeout:.0f} s: "
                "install the CRDs first (kubectl apply --server-side -f crds/, or the chart's crds/)"
            )
        if now - said >= 10:
            log.warning("waiting for the API server to serve %s (%s/%s)", ", ".join(absent), GROUP, VERSION)
            said = now
        time.sleep(poll)
