"""Start-up against a cluster without edgetune's CRDs: the operator says what to install and stops
(its pod restarts), instead of running blind: kopf reads discovery once, so a resource missing at
that moment would never be watched (edgetune_operator.discovery)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgetune_testenv.cluster import ControlPlane

pytestmark = pytest.mark.e2e


def test_without_its_crds_the_operator_stops_and_says_to_install_them(tmp_path: Path) -> None:
    with ControlPlane("no-crds", tmp_path / "plane") as plane:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGETUNE_")}
        env.update({"KUBECONFIG": str(plane.kubeconfig), "EDGETUNE_CRD_WAIT_SECONDS": "2",
                    "EDGETUNE_METRICS_PORT": "0", "EDGETUNE_HEALTH_PORT": "0"})  # fmt: skip
        done = subprocess.run([sys.executable, "-m", "edgetune_operator"], env=env, capture_output=True, text=True,
                              timeout=90, check=False)  # fmt: skip
    assert done.returncode != 0
    assert "does not serve adapterreleases, edgeclusters, edgetrainingjobs (edgetune.io/v1alpha1) after 2 s" in (
        done.stderr)  # fmt: skip
    assert "install the CRDs first" in done.stderr
    assert "will try again" not in done.stderr  # no retry loop behind the message
