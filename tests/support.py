"""Helpers shared by the test suites."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: The image name our tests give pods that the executor runs with this interpreter.
TEST_IMAGE = "edgetune.io/test-python:dev"


def eventually(fn: Callable[[], T | None], timeout: float = 60.0, what: str = "condition") -> T:
    """Poll ``fn`` until it returns something truthy; fail with what was awaited and the last value."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last value: {last!r}")


def new_namespace(core: Any, prefix: str = "t") -> str:
    """Create a uniquely named namespace and wait until pods can be created in it."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    eventually(
        lambda: any(sa.metadata.name == "default" for sa in core.list_namespaced_service_account(name).items),
        what=f"default ServiceAccount in {name}",
    )
    return name


#: The image name the operator's settings give trainer pods in tests; the executor runs it as
#: `python -m edgetune_trainer` with this interpreter.
TRAINER_IMAGE = "edgetune.io/trainer:test"

#: The edge agent's image in tests; the executor runs it as `python -m edgetune_agent`.
AGENT_IMAGE = "edgetune.io/agent:test"


CHART_EVERYTHING = ["--set=operator.serviceMonitor.enabled=true", "--set=prometheusRule.enabled=true",
                    "--set=agent.namespaces={factory}", "--set=agent.podMonitor.enabled=true",
                    "--set=dashboards.enabled=true", "--set=edgeAccess.enabled=true"]  # fmt: skip
"""helm --set flags that turn on every optional part of the chart."""
