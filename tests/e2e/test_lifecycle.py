"""A control plane starts, reports a crashed component by name, and tears down without leftovers."""

from __future__ import annotations

import os
import signal

import pytest

from edgetune_testenv.cluster import ControlPlane
from edgetune_testenv.errors import ComponentCrashedError
from edgetune_testenv.procs import port_in_use

pytestmark = pytest.mark.e2e


def test_crashed_component_is_named_and_teardown_leaves_nothing() -> None:
    plane = ControlPlane("lifecycle").start()
    workdir = plane.workdir
    pids = [p.pid for p in plane.processes]
    assert len(pids) == 5  # etcd, apiserver, controller-manager, scheduler, kwok
    api_port = plane.api_port
    assert plane.kubectl("get", "--raw", "/readyz").stdout == "ok"

    os.kill(plane.process("kube-scheduler").pid, signal.SIGKILL)
    plane.process("kube-scheduler").proc.wait()  # type: ignore[union-attr]
    with pytest.raises(
        ComponentCrashedError, match=r"lifecycle/kube-scheduler exited with status -9; log .*kube-scheduler\.log"
    ):
        plane.check_alive()

    plane.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not port_in_use(api_port)
    assert not workdir.exists()
