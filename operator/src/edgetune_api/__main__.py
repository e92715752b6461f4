"""``python -m edgetune_api write|check``: regenerate every file generated from the models, or fail
when one is stale.

The CRDs live in ``crds/`` and, as a copy, in ``charts/edgetune/crds/``; the values schema
(``edgetune_api.chart_values``) in ``charts/edgetune/values.schema.json``; a reference page per CRD
(``edgetune_api.reference``) in ``docs/reference/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from edgetune_api import chart_values, reference
from edgetune_api.crd import rendered
from edgetune_api.generated import command, sync

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "edgetune"


def _sync(write: bool) -> list[str]:
    crds = rendered()
    stale = sync(REPO / "crds", crds, "*.yaml", write=write, root=REPO)
    stale += sync(CHART / "crds", crds, "*.yaml", write=write, root=REPO)
    stale += sync(REPO / "docs" / "reference", reference.pages(), "*.md", write=write, root=REPO)
    stale += sync(CHART, {"values.schema.json": chart_values.render()}, "values.schema.json", write=write, root=REPO)
    return stale


def main(argv: list[str] | None = None) -> int:
    return command("python -m edgetune_api", argv, _sync)


if __name__ == "__main__":
    sys.exit(main())
