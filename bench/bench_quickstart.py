"""Time the documented path: from an empty local environment to a promoted adapter (and an abort)
by ``docs/quickstart.md``, its ``sh`` blocks run as written (``localenv.run_quickstart``).

Run with ``.venv/bin/python bench/bench_quickstart.py [--runs N]``; each run brings up a fresh
local environment (``python -m edgetune_testenv env``), runs the quickstart and tears it down.
Prints each run's figures, then one JSON line: ``env_up_s`` (environment up), ``quickstart_s``
(first block to last, the goal is <= 600 s) and ``total_s``, each as min/median/max over the runs.
``--smoke`` only parses the quickstart into its script (no environment; what the unit tests run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from edgetune_testenv.localenv import QUICKSTART, LocalEnvironment, quickstart_script, run_quickstart, shell_blocks


def spread(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 1), "median": round(statistics.median(values), 1), "max": round(max(values), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="fresh environments to run it in (default 3)")
    parser.add_argument("--smoke", action="store_true", help="parse the quickstart only (seconds, no environment)")
    args = parser.parse_args()
    if args.smoke:  # the parsing and the spread, on three parses of the page instead of three environments
        parses = []
        for _ in range(3):
            started = time.monotonic()
            blocks = shell_blocks(QUICKSTART.read_text())
            parses.append(time.monotonic() - started)
        print(json.dumps({"smoke": True, "blocks": len(blocks), "script_lines": quickstart_script().count("\n"),
                          "parse_s": spread(parses)}))  # fmt: skip
        return 0
    up, quick, total = [], [], []
    for run in range(args.runs):
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="edgetune-qs-") as tmp, LocalEnvironment(Path(tmp) / "env") as env:
            up.append(time.monotonic() - started)
            code, took, text = run_quickstart(env, Path(tmp) / "reader")
            if code != 0:
                print(text[-4000:], file=sys.stderr)
                print(f"run {run + 1}: the quickstart failed (exit {code}) after {took:.0f} s", file=sys.stderr)
                return 1
            quick.append(took)
        total.append(time.monotonic() - started)
        print(f"run {run + 1}: environment up {up[-1]:.1f} s, quickstart {quick[-1]:.1f} s, "
              f"total with teardown {total[-1]:.1f} s", flush=True)  # fmt: skip
    print(json.dumps({"runs": args.runs, "env_up_s": spread(up), "quickstart_s": spread(quick),
                      "total_s": spread(total)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
