"""``python -m edgetune_trainer evaluate``: score a base model, with or without an adapter package,
on a labelled data set — the way to check a shipped package on data of your own.

    python -m edgetune_trainer evaluate --base BASE_DIR --base-sha256 SHA --data DATA_DIR --format npy \\
        [--package PACKAGE_DIR] [--label-field label] [--split all|eval]

Prints one JSON object: samples, eval_loss, eval_accuracy (classification), the base digest, and
the package digest when one was given. The package is verified first (manifest, every file's
SHA-256; its signature too when ``--trusted-key`` names a public key) and must have been trained on
this base. Exit 0 on success, 2 when something given is unusable (with the reason on stderr).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgetune_trainer import tool

SPLITS = ("all", "eval", "train")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m edgetune_trainer evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--base", required=True, help="base model folder (config.json + safetensors)")
    p.add_argument("--base-sha256", required=True, help="the base's digest (as in spec.baseModel.sha256)")
    p.add_argument("--package", help="adapter package folder (manifest.json, weights, signature)")
    p.add_argument("--trusted-key", help="Ed25519 public key (PEM) the package must be signed with")
    tool.data_arguments(p, ["csv", "jsonl", "npy", "text", "ts"])
    p.add_argument("--split", choices=SPLITS, default="all",
                   help="all samples (default), or the trainer's own held-out/training split")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward pass (default: %(default)s)")
    return p.parse_args(argv)


def score(args: argparse.Namespace) -> dict[str, Any]:
    import torch  # noqa: PLC0415 - heavy

    from edgetune_api.delta import MANIFEST, read_folder, sha256_bytes, verify_package  # noqa: PLC0415
    from edgetune_trainer import models, package  # noqa: PLC0415
    from edgetune_trainer.loop import Task, evaluate  # noqa: PLC0415

    dataset = tool.dataset(args)
    spec, info = dataset.spec, dataset.scan()
    base = models.load_base(Path(args.base), args.base_sha256,
                            num_labels=len(info.labels) if info.kind == "series" and info.labels else None)  # fmt: skip
    model: torch.nn.Module = base.model
    result: dict[str, Any] = {"base_sha256": base.sha256, "split": args.split}
    if args.package:
        public = Path(args.trusted_key).read_bytes() if args.trusted_key else None
        manifest = verify_package(read_folder(Path(args.package)), public_key_pem=public)
        if manifest.lineage.base_model_sha256 not in (None, base.sha256):
            raise ValueError(f"the package was trained on base {manifest.lineage.base_model_sha256}, not {base.sha256}")
        from peft import PeftConfig, get_peft_model, set_peft_model_state_dict  # noqa: PLC0415

        config = PeftConfig.from_peft_type(**{**manifest.peft, "inference_mode": True})  # type: ignore[no-untyped-call]
        model = get_peft_model(base.model, config)
        weights = (Path(args.package) / package.WEIGHTS[manifest.encoding]).read_bytes()
        set_peft_model_state_dict(model, package.decode(weights, manifest.encoding))
        digest = sha256_bytes((Path(args.package) / MANIFEST).read_bytes())
        result.update(package_sha256=digest, encoding=manifest.encoding, steps=manifest.steps)
    task = Task(base, info, torch.device("cpu"), spec)
    scores = evaluate(model, task, dataset, args.batch_size, spec.augmentation, split=args.split)
    if not scores:
        raise ValueError(f"no samples in the {args.split!r} split of {args.data}")
    samples = {"all": info.samples, "eval": info.eval_samples, "train": info.train_samples}[args.split]
    return {**result, "samples": samples, **{k: round(v, 6) for k, v in scores.items()}}


def main(argv: list[str]) -> int:
    return tool.run("evaluate", score, parse(argv))
