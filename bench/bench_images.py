"""Image builds: cold (empty cache: base from Debian's packages, then operator, trainer, agent, all
dependencies downloaded), warm (everything cached: nothing to do) and after a source change (only
the layers after the sources are copied). Prints one JSON line; results go to docs/benchmarks.md.

    .venv/bin/python bench/bench_images.py            # into a fresh temporary cache (~7 min, ~14 GB disk)
    .venv/bin/python bench/bench_images.py --smoke    # no build: copy the inputs, time their cache keys

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

from edgetune_testenv.images import RECIPES, ImageBuilder, copy_inputs, input_key

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


def smoke() -> dict[str, object]:
    """What decides whether an image is rebuilt, without building: the build context copied, each
    image's input key computed on it (same as on the checkout), and a source change moving the keys
    of the images that copy that source."""
    with tempfile.TemporaryDirectory(prefix="edgetune-images-") as tmp:
        repo = Path(tmp) / "repo"
        started = time.monotonic()
        copy_inputs(repo)
        copy_s = round(time.monotonic() - started, 2)
        key_ms, moved = {}, {}
        for name, recipe in RECIPES.items():
            started = time.monotonic()
            key = input_key(repo, recipe, [])
            key_ms[name] = round(1000 * (time.monotonic() - started), 1)
            if key != input_key(Path(__file__).resolve().parents[1], recipe, []):
                raise SystemExit(f"the copied build context of {name} hashes differently from the checkout")
            marker = repo / "trainer-image/src/edgetune_trainer/__init__.py"
            original = marker.read_text()
            marker.write_text(original + "\n# a source change\n")
            moved[name] = input_key(repo, recipe, []) != key
            marker.write_text(original)
    if not moved["trainer"]:
        raise SystemExit("a change to the trainer's sources did not change the trainer image's key")
    return {"smoke": True, "copy_inputs_s": copy_s, "input_key_ms": key_ms, "key_moves_on_trainer_change": moved}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="no build: copy the inputs and time their cache keys")
    if parser.parse_args().smoke:
        print(json.dumps(smoke()))
        return 0
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
