"""``python -m edgetune_api write|check``: regenerate every file generated from the models, or fail
when one is stale.

The CRDs live in ``crds/`` and, as a copy, in ``charts/edgetune/crds/``; the values schema
(``edgetune_api.chart_values``) in ``charts/edgetune/values.schema.json``; a reference page per CRD
(``edgetune_api.reference``) in ``docs/reference/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgetune_api import chart_values, reference
from edgetune_api.crd import rendered
from edgetune_api.generated import sync

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "edgetune"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgetune_api")
    parser.add_argument("command", choices=["write", "check"])
    write = parser.parse_args(argv).command == "write"
    crds = rendered()
    stale = sync(REPO / "crds", crds, "*.yaml", write=write, root=REPO)
    stale += sync(CHART / "crds", crds, "*.yaml", write=write, root=REPO)
    stale += sync(REPO / "docs" / "reference", reference.pages(), "*.md", write=write, root=REPO)
    stale += sync(CHART, {"values.schema.json": chart_values.render()}, "values.schema.json", write=write, root=REPO)
    if stale:
        sys.stderr.write(f"stale generated files (run `python -m edgetune_api write`): {', '.join(stale)}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
