"""``python -m edgetune_dashboards write|check``: render the dashboards into the chart, or fail when stale."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgetune_api.generated import sync
from edgetune_dashboards import rendered

TARGET = Path(__file__).resolve().parents[3] / "charts" / "edgetune" / "files" / "dashboards"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgetune_dashboards")
    parser.add_argument("command", choices=["write", "check"])
    args = parser.parse_args(argv)
    root = TARGET.parents[3]
    stale = sync(TARGET, rendered(), "*.json", write=args.command == "write", root=root)
    if stale:
        sys.stderr.write(f"stale dashboards (run `python -m edgetune_dashboards write`): {', '.join(stale)}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
