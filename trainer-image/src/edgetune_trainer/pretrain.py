"""``python -m edgetune_trainer pretrain``: build a base model folder from a labelled data set.

    python -m edgetune_trainer pretrain --data DATA_DIR --format npy --out BASE_DIR \\
        [--label-field label] [--steps 300] [--width 64 --depth 3 --hidden 64] [--seed 0]

Trains the built-in sensor model (``TimeSeriesCNN``) fully, input normalisation included (per
channel, from the training split), on every sample but the held-out split, and writes the folder
an EdgeTrainingJob names in ``baseModel`` (``config.json`` + safetensors). Prints one JSON object
with the folder, its SHA-256 (``baseModel.sha256``), the labels, the series length, and the
held-out accuracy. Exit 0 on success, 2 when the data is unusable (reason on stderr).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgetune_trainer import tool


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m edgetune_trainer pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    tool.data_arguments(p, ["csv", "jsonl", "npy", "ts"])
    p.add_argument("--out", required=True, help="where to write the base model folder")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per step (default: %(default)s)")
    p.add_argument("--learning-rate", type=float, default=3e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--width", type=int, default=64, help="channels of each convolution (default: %(default)s)")
    p.add_argument("--depth", type=int, default=3, help="convolution blocks (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=64, help="units of the hidden layer before the head "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data order (default: %(default)s)")
    return p.parse_args(argv)


def pretrain(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from edgetune_trainer.data import DataError, fit_length  # noqa: PLC0415
    from edgetune_trainer.models import TimeSeriesCNN, load_base, save_builtin  # noqa: PLC0415

    dataset = tool.dataset(args)
    spec, info = dataset.spec, dataset.scan()
    if info.kind != "series" or not info.length or not info.channels:
        raise DataError("pretrain builds the built-in sensor model: it needs labelled series")
    if len(info.labels) < 2:
        raise DataError(f"pretrain needs at least two labels, found {info.labels}")
    index = {label: i for i, label in enumerate(info.labels)}

    channels, length = info.channels, info.length

    def arrays(split: str) -> tuple[Any, Any]:
        samples = list(dataset.iterate(split))
        rows = [fit_length(np.asarray(s.x, dtype=np.float32), length, spec.length_policy) for s in samples]
        x = np.stack(rows) if rows else np.zeros((0, channels, length), np.float32)
        return torch.from_numpy(x), torch.tensor([index[str(s.y)] for s in samples], dtype=torch.long)

    x, y = arrays("train")
    if len(x) == 0:
        raise DataError("no training samples (all went to the held-out split)")
    torch.manual_seed(args.seed)
    model = TimeSeriesCNN(channels, len(info.labels), args.width, args.depth, args.hidden)
    model.input_mean.copy_(x.mean(dim=(0, 2)).unsqueeze(-1))
    model.input_std.copy_(x.std(dim=(0, 2)).clamp(min=1e-6).unsqueeze(-1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    for _ in range(args.steps):
        idx = torch.randint(0, len(x), (min(args.batch_size, len(x)),), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    model.eval()
    digest = save_builtin(model, Path(args.out), info.labels)
    load_base(Path(args.out), digest)  # what a job will do: the folder loads and verifies
    held_x, held_y = arrays("eval")
    accuracy = None
    if len(held_x):
        with torch.no_grad():
            accuracy = round(float((model(held_x).argmax(-1) == held_y).float().mean()), 4)
    return {"out": str(Path(args.out)), "sha256": digest, "labels": info.labels, "channels": info.channels,
            "length": info.length, "train_samples": len(x), "eval_samples": len(held_x),
            "eval_accuracy": accuracy, "steps": args.steps}  # fmt: skip


def main(argv: list[str]) -> int:
    return tool.run("pretrain", pretrain, parse(argv))
