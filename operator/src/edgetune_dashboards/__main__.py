"""``python -m edgetune_dashboards write|check``: render the dashboards into the chart, or fail when stale."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgetune_dashboards import rendered

TARGET = Path(__file__).resolve().parents[3] / "charts" / "edgetune" / "files" / "dashboards"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgetune_dashboards")
    parser.add_argument("command", choices=["write", "check"])
    args = parser.parse_args(argv)
    files = rendered()
    if args.command == "write":
        TARGET.mkdir(parents=True, exist_ok=True)
        for old in TARGET.glob("*.json"):
            if old.name not in files:
                old.unlink()
        for name, text in files.items():
            (TARGET / name).write_text(text)
        return 0
    present = {p.name for p in TARGET.glob("*.json")}
    stale = [n for n, t in files.items() if not (TARGET / n).exists() or (TARGET / n).read_text() != t]
    stale += sorted(present - files.keys())
    if stale:
        sys.stderr.write(f"stale dashboards (run `python -m edgetune_dashboards write`): {', '.join(stale)}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
