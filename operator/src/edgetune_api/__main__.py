"""``python -m edgetune_api write|check``: regenerate the CRDs, or fail when the files are stale.

The CRDs live in ``crds/`` and, as a copy, in ``charts/edgetune/crds/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgetune_api.crd import rendered

REPO = Path(__file__).resolve().parents[3]
TARGETS = (REPO / "crds", REPO / "charts" / "edgetune" / "crds")


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
    if stale:
        sys.stderr.write(f"stale CRDs (run `python -m edgetune_api write`): {', '.join(stale)}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
