"""Files generated from code (CRDs, values schema, reference pages, dashboards): write them, or list
the stale ones so a check can fail."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def sync(folder: Path, files: dict[str, str], pattern: str, *, write: bool, root: Path) -> list[str]:
    """Write ``files`` into ``folder`` (removing others matching ``pattern``), or return the paths
    (relative to ``root``) that are missing, different or left over."""
    if write:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob(pattern):
            if old.name not in files:
                old.unlink()
        for name, text in files.items():
            (folder / name).write_text(text)
        return []
    stale = [n for n, t in files.items() if not (folder / n).exists() or (folder / n).read_text() != t]
    stale += sorted(p.name for p in folder.glob(pattern) if p.name not in files)
    return [str((folder / n).relative_to(root)) for n in stale]


def command(prog: str, argv: list[str] | None, syncs: Callable[[bool], list[str]]) -> int:
    """``prog write|check``: ``syncs(write)`` writes every file (or lists the stale ones); exit 1
    with the list when something is stale."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("command", choices=["write", "check"])
    stale = syncs(parser.parse_args(argv).command == "write")
    if stale:
        sys.stderr.write(f"stale generated files (run `{prog} write`): {', '.join(stale)}\n")
        return 1
    return 0
