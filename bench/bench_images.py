"""Image builds: cold (empty cache: base from Debian's packages, then operator, trainer, agent, all
dependencies downloaded), warm (everything cached: nothing to do) and after a source change (only
the layers after the sources are copied). Prints one JSON line; results go to docs/benchmarks.md.

    .venv/bin/python bench/bench_images.py            # into a fresh temporary cache (~7 min, ~14 GB disk)

Needs buildah, runc, mmdebstrap (scripts/bootstrap.sh) and PyPI (the trainer's CUDA torch: ~4 GB).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgetune_testenv.images import ImageBuilder, copy_inputs

NAMES = ("operator", "trainer", "agent")


def _timed(builder: ImageBuilder, names: tuple[str, ...], sizes: dict[str, int] | None = None) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in names:
        started = time.monotonic()
        image = builder.build(name)
        out[name] = round(time.monotonic() - started, 1)
        if sizes is not None:
            sizes[name] = round(image.size_bytes / 1e6)
    return out


def main() -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    with tempfile.TemporaryDirectory(prefix="edgetune-images-") as tmp:
        root, repo = Path(tmp) / "cache", Path(tmp) / "repo"
        copy_inputs(repo)
        builder = ImageBuilder(repo=repo, root=root)
        started = time.monotonic()
        builder.base()
        base_s = round(time.monotonic() - started, 1)
        cold = _timed(builder, NAMES)  # the agent's figure excludes the trainer it builds on (already there)
        warm = _timed(builder, NAMES)
        marker = repo / "trainer-image/src/edgetune_trainer/__init__.py"
        marker.write_text(marker.read_text() + "\n# a source change\n")
        sizes: dict[str, int] = {}
        changed = _timed(builder, NAMES, sizes)
        try:
            builder.prune()
        finally:
            subprocess.run(["umount", "-R", str(root / "storage" / "overlay")], capture_output=True, check=False)
    print(json.dumps({
        "base_cold_s": base_s, "cold_s": cold, "warm_s": warm, "after_source_change_s": changed,
        "total_cold_s": round(base_s + sum(cold.values()), 1), "size_mb": sizes,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
