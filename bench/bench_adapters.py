"""LoRA against its baselines, and its encodings, on several real sensor data sets: what an adapter
recovers of a site shift, and how much of it each int4 scheme keeps.

Run with ``.venv/bin/python bench/bench_adapters.py [--quick | --smoke]`` (``--smoke``: one data set,
one seed, a few steps: checks the script). For each UCR data set shipped in the
sktime wheel: a base model is trained on half the series ("site A"), the other half is distorted the
way another site's meters would (gain, offset, clock shift: "site B"). On 70 % of site B the same
number of steps trains (the trainer's own ``models.attach``): the head alone (linear probe), a LoRA
adapter (r=4, all adaptable layers), and every weight (full fine-tuning, a fifth of the learning
rate); each is scored on the other 30 %, the adapter also after each encoding's round trip.
Encoding schemes:

- ``int4-legacy``: blocks of 128, scale = absmax / 7 (the format until 2026-11-29);
- ``int4-b32``: blocks of 32, absmax;
- ``int4-b32-mse``: blocks of 32, each block's clipping point chosen for least squared error;
- ``int4-b32-mse-refit``: the above plus error feedback (``lora_B`` refitted by least squares to the
  quantised ``lora_A``, so the update ``B·A`` rather than each factor is kept close) — measured,
  not shipped;
- ``int4-b128-best`` / ``int4-b64-best``: least-squares clipping and per tensor evenly spaced or
  normal-quantile levels, whichever is closer, in blocks of 128 / 64;
- ``int4-zstd``: what the codec ships (the same in blocks of ``codec.BLOCK4``);
- ``int8-zstd`` for reference.

The last line printed is one JSON object: per data set, the accuracy of the frozen base, the head,
LoRA and full fine-tuning, and per scheme the held-out accuracy, its drop in points against fp32,
the relative error of each layer's update ``B·A`` (mean and max) and the weight bytes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA_SETS = ("ItalyPowerDemand", "GunPoint", "ArrowHead", "BasicMotions", "OSULeaf")


def load_ucr(name: str) -> tuple[np.ndarray, np.ndarray]:
    from edgetune_api.training_job import DataSpec  # noqa: PLC0415
    from edgetune_trainer.data import NodeDataset  # noqa: PLC0415

    spec = importlib.util.find_spec("sktime")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the sktime wheel (data only) is missing: run scripts/bootstrap.sh")
    root = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name
    data = NodeDataset(root, DataSpec.model_validate({"source": {"hostPath": "/d"}, "format": "ts",
                                                      "evalFraction": 0.01}))  # fmt: skip
    samples = list(data.iterate("train")) + list(data.iterate("eval"))
    x = np.stack([np.asarray(s.x) for s in samples]).astype(np.float32)
    labels = sorted({str(s.y) for s in samples})
    return x, np.array([labels.index(str(s.y)) for s in samples])


def lora_pairs(names: Any) -> dict[str, str]:
    """``lora_A`` tensor name -> its ``lora_B`` partner (peft's naming)."""
    return {
        n: n.replace(".lora_A.", ".lora_B.")
        for n in names
        if ".lora_A." in n and n.replace(".lora_A.", ".lora_B.") in names
    }


def refit_b(a: np.ndarray, b: np.ndarray, a_decoded: np.ndarray) -> np.ndarray:
    """The B' that makes B'·Â closest to B·A in least squares (conv weights flattened)."""
    rank = a.shape[0]
    a2, b2, ahat = a.reshape(rank, -1), b.reshape(b.shape[0], rank), a_decoded.reshape(rank, -1)
    gram = ahat.astype(np.float64) @ ahat.T.astype(np.float64)
    refit = (b2.astype(np.float64) @ (a2.astype(np.float64) @ ahat.T.astype(np.float64))) @ np.linalg.inv(gram)
    return refit.astype(np.float32).reshape(b.shape)


SCHEMES = ("int4-legacy", "int4-b32", "int4-b32-mse", "int4-b32-mse-refit", "int4-b128-best", "int4-b64-best",
           "int4-zstd", "int8-zstd")  # fmt: skip


def encode_variant(state: dict[str, np.ndarray], scheme: str) -> tuple[dict[str, np.ndarray], int]:
    """The decoded adapter and the encoded weight bytes (zstd-compressed as the codec does), for one
    scheme: ``int4-b<block>-<absmax|mse|best>[-refit]`` (``best``: least-squares clipping and the
    closer level table per tensor), ``int4-legacy`` (= b128 absmax), or what the codec ships."""
    import zstandard  # noqa: PLC0415
    from safetensors.numpy import save as st_save  # noqa: PLC0415

    from edgetune_api import codec  # noqa: PLC0415

    if scheme in ("int4-zstd", "int8-zstd"):
        data = codec.encode(state, scheme)
        return codec.decode(data, scheme), len(data)
    parts = ("int4-b128-absmax" if scheme == "int4-legacy" else scheme).split("-")
    block, how = int(parts[1][1:]), parts[2] if len(parts) > 2 else "absmax"
    arrays = dict(state)
    if scheme.endswith("-refit"):
        for a_name, b_name in lora_pairs(arrays).items():
            a = arrays[a_name]
            a_hat = codec.dequantize_int4(*codec.quantize_int4(a, block), a.shape, block)
            arrays[b_name] = refit_b(a, arrays[b_name], a_hat)
    out, decoded = {}, {}
    for name, array in arrays.items():
        if how == "best":
            packed, scale, table = codec.best_int4(array, block)
        else:
            (packed, scale), table = codec.quantize_int4(array, block, search=how == "mse"), "int"
        out[name], out[name + codec.SCALE_SUFFIX] = packed, scale
        decoded[name] = codec.dequantize_int4(packed, scale, array.shape, block, table)
    size = len(zstandard.ZstdCompressor(level=19).compress(st_save(out)))
    return decoded, size


def update_errors(state: dict[str, np.ndarray], decoded: dict[str, np.ndarray]) -> list[float]:
    """Relative Frobenius error of each LoRA layer's update B·A."""
    errors = []
    for a_name, b_name in lora_pairs(state).items():
        rank = state[a_name].shape[0]

        def product(s: dict[str, np.ndarray], a: str = a_name, b: str = b_name, r: int = rank) -> np.ndarray:
            return s[b].reshape(s[b].shape[0], r) @ s[a].reshape(r, -1)

        exact = product(state)
        errors.append(float(np.linalg.norm(product(decoded) - exact) / max(np.linalg.norm(exact), 1e-12)))
    return errors


def one_data_set(name: str, steps: int, seed: int) -> dict[str, Any]:
    import torch  # noqa: PLC0415

    from edgetune_api.training_job import PeftSpec  # noqa: PLC0415
    from edgetune_trainer.models import (  # noqa: PLC0415
        TimeSeriesCNN,
        adapter_state,
        attach,
        load_adapter_state,
        load_base,
        save_builtin,
    )

    torch.manual_seed(seed)
    x, y = load_ucr(name)
    classes = int(y.max()) + 1
    site_a = np.arange(len(x)) % 2 == 0
    base_net = TimeSeriesCNN(channels=x.shape[1], classes=classes)
    base_net.input_mean.fill_(float(x.mean()))
    base_net.input_std.fill_(float(x.std()))

    def fit(model: torch.nn.Module, xs: np.ndarray, ys: np.ndarray, n: int, lr: float) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr)
        tx, ty = torch.from_numpy(xs), torch.from_numpy(ys)
        model.train()
        for _ in range(n):
            idx = torch.randint(0, len(tx), (min(64, len(tx)),))
            loss = torch.nn.functional.cross_entropy(model(tx[idx]), ty[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()

    fit(base_net, x[site_a], y[site_a], 300, 3e-3)
    xb = np.roll(x[~site_a] * 1.6 - 0.8, 3, axis=-1).astype(np.float32)  # site B's meters
    yb = y[~site_a]
    order = np.random.default_rng(seed).permutation(len(xb))
    cut = int(0.7 * len(xb))
    train_i, eval_i = order[:cut], order[cut:]
    spec = PeftSpec(r=4, alpha=8, dropout=0.0)
    evaluated = torch.from_numpy(xb[eval_i])

    def accuracy(net: torch.nn.Module) -> float:
        with torch.no_grad():
            return float((net(evaluated).argmax(-1).numpy() == yb[eval_i]).mean())

    frozen = accuracy(base_net)
    baselines = {}
    with tempfile.TemporaryDirectory() as tmp:
        digest = save_builtin(base_net, Path(tmp), [str(c) for c in range(classes)])
        for baseline, lr in (("head", 5e-3), ("full", 1e-3)):
            net = attach(load_base(Path(tmp), digest), spec, baseline)
            torch.manual_seed(seed)
            fit(net, xb[train_i], yb[train_i], steps, lr)
            baselines[baseline] = accuracy(net)
        model = attach(load_base(Path(tmp), digest), spec)
    torch.manual_seed(seed)
    fit(model, xb[train_i], yb[train_i], steps, 5e-3)
    state = {k: v.numpy() for k, v in adapter_state(model).items()}
    trained = accuracy(model)
    result: dict[str, Any] = {
        "frozen_accuracy": frozen, "head_accuracy": baselines["head"], "lora_accuracy": trained,
        "full_accuracy": baselines["full"], "eval_samples": len(eval_i),
        "fp32_bytes": sum(v.nbytes for v in state.values()),
    }  # fmt: skip
    for scheme in SCHEMES:
        decoded, size = encode_variant(state, scheme)
        load_adapter_state(model, {k: torch.from_numpy(v) for k, v in decoded.items()})
        errors = update_errors(state, decoded)
        acc = accuracy(model)
        result[scheme] = {"accuracy": round(acc, 4), "drop_pt": round(100 * (trained - acc), 2), "bytes": size,
                          "update_error_mean": round(statistics.fmean(errors), 4),
                          "update_error_max": round(max(errors), 4)}  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two data sets, fewer steps")
    parser.add_argument("--seeds", type=int, default=2, help="training seeds per data set (the spread)")
    parser.add_argument("--smoke", action="store_true", help="one data set, one seed, 10 steps: checks the script")
    args = parser.parse_args()
    sys.path[:0] = [str(REPO / "operator/src"), str(REPO / "trainer-image/src")]
    names = DATA_SETS[:1] if args.smoke else DATA_SETS[:2] if args.quick else DATA_SETS
    steps = 10 if args.smoke else 60 if args.quick else 200
    if args.smoke:
        args.seeds = 1
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for name in names:
        for seed in range(args.seeds):
            results[f"{name}/seed{seed}"] = run = one_data_set(name, steps, seed)
            print(name, seed, json.dumps(run), flush=True)
    recovered = {
        name: round(statistics.fmean(r[f"{name}_accuracy"] for r in results.values()), 4)
        for name in ("frozen", "head", "lora", "full")
    }
    summary = {
        scheme: {
            "drop_pt_mean": round(statistics.fmean(r[scheme]["drop_pt"] for r in results.values()), 2),
            "drop_pt_max": max(r[scheme]["drop_pt"] for r in results.values()),
            "update_error_mean": round(statistics.fmean(r[scheme]["update_error_mean"] for r in results.values()), 4),
            "bytes_vs_fp32": round(statistics.fmean(r["fp32_bytes"] / r[scheme]["bytes"] for r in results.values()), 2),
        }
        for scheme in SCHEMES
    }  # fmt: skip
    seconds = round(time.perf_counter() - started, 1)
    print(json.dumps({"accuracy_mean": recovered, "summary": summary, "runs": results, "seconds": seconds,
                      "smoke": args.smoke}))  # fmt: skip


if __name__ == "__main__":
    main()
