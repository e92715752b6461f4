"""``python -m edgetune_api write|check``: regenerate the CRDs and the chart's values schema, or fail
when the files are stale.

The CRDs live in ``crds/`` and, as a copy, in ``charts/edgetune/crds/``; the values schema
(``edgetune_api.chart_values``) in ``charts/edgetune/values.schema.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgetune_api import chart_values
from edgetune_api.crd import rendered

REPO = Path(__file__).resolve().parents[3]
TARGETS = (REPO / "crds", REPO / "charts" / "edgetune" / "crds")
VALUES_SCHEMA = REPO / "charts" / "edgetune" / "values.schema.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgetune_api")
    parser.add_argument("command", choices=["write", "check"])
    args = parser.parse_args(argv)
    files = rendered()
    stale = []
    for target in TARGETS:
        if args.command == "write":
            target.mkdir(parents=True, exist_ok=True)
            for old in target.glob("*.yaml"):
                if old.name not in files:
                    old.unlink()
        for name, text in files.items():
            path = target / name
            if args.command == "write":
                path.write_text(text)
            elif not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(REPO)))
    schema = chart_values.render()
    if args.command == "write":
        VALUES_SCHEMA.write_text(schema)
    elif not VALUES_SCHEMA.exists() or VALUES_SCHEMA.read_text() != schema:
        stale.append(str(VALUES_SCHEMA.relative_to(REPO)))
    if stale:
        sys.stderr.write(f"stale generated files (run `python -m edgetune_api write`): {', '.join(stale)}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
