"""Parts of the Helm chart, rendered for a test cluster that runs no Helm release (the agents' or
trainers' RBAC and admission policies, applied with ``ControlPlane.kubectl``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from edgetune_testenv import binaries

CHART = Path(__file__).resolve().parents[3] / "charts" / "edgetune"
KUBE_VERSION = "1.36.3"


def render(template: str, *sets: str) -> str:
    """``templates/<template>`` of the chart with ``--set`` values ``sets`` (``key=value``)."""
    helm = binaries.binary(binaries.HELM, "helm")
    command = [str(helm), "template", "edgetune", str(CHART), f"--show-only=templates/{template}",
               f"--kube-version={KUBE_VERSION}", *(f"--set={s}" for s in sets)]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout
