"""What the trainer's commands for people (``evaluate``, ``pretrain``) share: the data arguments,
and one way to end: a JSON line on stdout and exit 0, or one clear line on stderr and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgetune_trainer.data import NodeDataset, local_dataset


def data_arguments(p: argparse.ArgumentParser, formats: list[str]) -> None:
    p.add_argument("--data", required=True, help="folder with the labelled data")
    p.add_argument("--format", required=True, choices=formats, help="the data's format, as spec.data.format")
    p.add_argument("--label-field", help="label column/key (csv, jsonl; default: none)")
    p.add_argument("--eval-fraction", type=float, default=0.1,
                   help="held-out share, as spec.data.evalFraction (default: %(default)s)")  # fmt: skip


def dataset(args: argparse.Namespace) -> NodeDataset:
    return local_dataset(Path(args.data), args.format, label_field=args.label_field, eval_fraction=args.eval_fraction)


def run(name: str, work: Callable[[argparse.Namespace], dict[str, Any]], args: argparse.Namespace) -> int:
    try:
        result = work(args)
    except Exception as exc:  # a tool for people: one clear line, not a traceback
        sys.stderr.write(f"{name}: {type(exc).__name__}: {exc}\n")
        return 2
    sys.stdout.write(json.dumps(result) + "\n")
    return 0
