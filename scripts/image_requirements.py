"""Print the requirements of the named extras of pyproject.toml, one per line (self-references such as
``edgetune[trainer]`` expanded), so that an image installs its dependencies in a layer of their own,
before the sources are copied: editing the code then does not download torch again.

Usage (inside an image build): ``python image_requirements.py [--exclude NAME ...] EXTRA ... > requirements.txt``
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path
from typing import Any


def requirements(project: dict[str, Any], extras: list[str], exclude: set[str]) -> list[str]:
    optional: dict[str, list[str]] = project.get("optional-dependencies") or {}
    name = str(project["name"])
    out: list[str] = []
    seen: set[str] = set()

    def add(items: list[str]) -> None:
        for item in items:
            own = re.fullmatch(rf"{re.escape(name)}\[([^\]]+)\]", item.replace(" ", ""))
            if own:
                for extra in own.group(1).split(","):
                    if extra not in seen:
                        seen.add(extra)
                        add(list(optional[extra]))
                continue
            distribution = re.split(r"[<>=!~;\[ ]", item, maxsplit=1)[0].lower()
            if distribution not in exclude and item not in out:
                out.append(item)

    add(list(project.get("dependencies") or []))
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra {extra!r} (it has: {', '.join(sorted(optional))})")
        seen.add(extra)
        add(list(optional[extra]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", nargs="+")
    parser.add_argument("--exclude", action="append", default=[], help="a distribution installed otherwise (torch)")
    parser.add_argument("--pyproject", default="pyproject.toml")
    args = parser.parse_args()
    project = tomllib.loads(Path(args.pyproject).read_text())["project"]
    sys.stdout.write("".join(f"{r}\n" for r in requirements(project, args.extras, set(args.exclude))))


if __name__ == "__main__":
    main()
