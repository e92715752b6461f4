"""``python -m edgetune_dashboards write|check``: render the dashboards into the chart, or fail when stale."""

from __future__ import annotations

import sys
from pathlib import Path

from edgetune_api.generated import command, sync
from edgetune_dashboards import rendered

TARGET = Path(__file__).resolve().parents[3] / "charts" / "edgetune" / "files" / "dashboards"


def main(argv: list[str] | None = None) -> int:
    root = TARGET.parents[3]
    return command("python -m edgetune_dashboards", argv,
                   lambda write: sync(TARGET, rendered(), "*.json", write=write, root=root))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
