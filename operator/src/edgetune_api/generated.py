"""Files generated from code (CRDs, values schema, reference pages, dashboards): write them, or list
the stale ones so a check can fail."""

from __future__ import annotations

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
