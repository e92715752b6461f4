"""Trainer benchmark: memory, loop overhead, checkpoint overhead, delta size and compression.

Run with ``.venv/bin/python bench/bench_trainer.py [--quick | --smoke]``; the last line printed is one JSON object
with the keys ``train_vs_infer_rss_ratio``, ``full_ft_vs_infer_rss_ratio``, ``loop_overhead_vs_bare``,
``checkpoint_overhead``, ``delta_bytes_pct_of_base``, ``compressed_vs_fp32_ratio``,
``compressed_metric_drop_pt`` (plus the raw measurements they come from).

Each memory figure is the peak RSS of a fresh process doing one thing, so imports count the same
in all of them. The language-model figures use a GPT-2-shaped model built from config (4 layers,
width 256, vocabulary 50257; ``--quick``: 2 layers, width 128, vocabulary 8192) on random tokens;
the compression metric drop uses real sensor data (ItalyPowerDemand, shipped in the sktime wheel).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SIZES = {
    "full": {"n_layer": 4, "n_embd": 256, "n_head": 4, "vocab": 50257, "batch": 8, "seq": 128, "steps": 8},
    "quick": {"n_layer": 2, "n_embd": 128, "n_head": 2, "vocab": 8192, "batch": 4, "seq": 64, "steps": 6},
    "smoke": {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab": 512, "batch": 2, "seq": 16, "steps": 3},
}
UCR_STEPS = {"full": 120, "quick": 40, "smoke": 8}


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- child processes: one measurement each ------------------------------------------------------


def child(mode: str, model_dir: str, batch: int, seq: int, steps: int) -> dict[str, Any]:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    vocab = model.config.vocab_size
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq))
    times = []
    if mode == "infer":
        model.eval()
        with torch.no_grad():
            for _ in range(steps):
                t0 = time.perf_counter()
                model(input_ids=ids)
                times.append(time.perf_counter() - t0)
    else:
        if mode == "lora_bare":  # the plain torch + peft loop: labels=..., full logits
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        model.train()
        for _ in range(steps):
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - t0)
    return {"peak_rss": _peak_rss(), "step_s": statistics.median(times[1:])}


def _spawn_child(mode: str, model_dir: Path, size: dict[str, int]) -> dict[str, Any]:
    args = [
        sys.executable,
        __file__,
        "--child",
        mode,
        str(model_dir),
        str(size["batch"]),
        str(size["seq"]),
        str(size["steps"]),
    ]
    out = subprocess.run(
        args, capture_output=True, text=True, check=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# -- our trainer, as the pod runs it ------------------------------------------------------------


def _our_loop(tmp: Path, model_dir: Path, size: dict[str, int], checkpoint_every: int, encoding: str) -> dict[str, Any]:
    from edgetune_trainer.models import weights_sha256  # noqa: PLC0415

    data = tmp / "text"
    data.mkdir(exist_ok=True)
    # Byte-level tokens (no tokenizer files): `seq` bytes per line gives `seq` tokens per sample.
    lines = [
        "".join(chr(97 + (i * 7 + j * 13) % 26) for j in range(size["seq"]))
        for i in range(size["batch"] * (size["steps"] + 4))
    ]
    (data / "lines.txt").write_text("\n".join(lines) + "\n")
    work = tmp / f"work-{checkpoint_every}-{encoding}"
    config = {
        "spec": {
            "baseModel": {"uri": str(model_dir), "sha256": weights_sha256(model_dir)},
            "data": {"source": {"hostPath": "/data"}, "format": "text", "evalFraction": 0.05},
            "peft": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["all-linear"]},
            "training": {"maxSteps": size["steps"], "batchSize": size["batch"], "evalEvery": 10_000,
                         "checkpointEvery": checkpoint_every, "learningRate": 1e-3},
            "budgets": {"memory": "16Gi"},
            "output": {"s3": {"bucket": "bench"}, "mlflow": {"registeredModel": "bench"}, "encoding": encoding},
        },
        "runtime": {"dataDir": str(data), "workDir": str(work), "terminationLog": str(work / "termination-log"),
                    "threads": os.cpu_count() or 1},
    }  # fmt: skip
    cfg = tmp / f"config-{checkpoint_every}-{encoding}.json"
    cfg.write_text(json.dumps(config))
    proc = subprocess.run(
        [sys.executable, "-m", "edgetune_trainer", "--config", str(cfg)], capture_output=True, text=True, check=False,
        env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
    )  # fmt: skip
    if not (work / "termination-log").exists():
        raise RuntimeError(
            f"trainer wrote no summary (exit {proc.returncode}):\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}"
        )
    summary = json.loads((work / "termination-log").read_text())
    if proc.returncode != 0:
        raise RuntimeError(f"trainer failed: {summary}\n{proc.stdout[-2000:]}")
    stamps = [json.loads(line)["ts"] for line in proc.stdout.splitlines() if '"event": "step"' in line]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return {"summary": summary, "step_s": statistics.median(gaps), "package": work / "package"}


def _compression_metric_drop(tmp: Path, steps: int, encoding: str) -> float:
    """Accuracy points lost by ``encoding`` on the real-data adaptation (ItalyPowerDemand site shift)."""
    sys.path.insert(0, str(REPO))
    import numpy as np  # noqa: PLC0415
    from tests.integration.test_trainer_real_data import _train_base, _ucr, site_b  # noqa: PLC0415
    from tests.trainer_support import config  # noqa: PLC0415

    tmp.mkdir(parents=True, exist_ok=True)
    x, y = _ucr("ItalyPowerDemand")
    site_a = np.arange(len(x)) % 2 == 0
    digest = _train_base(x[site_a], y[site_a], tmp / "ucr-base")
    data = tmp / "ucr-b"
    data.mkdir()
    np.savez(data / "meter.npz", x=site_b(x[~site_a]), y=y[~site_a].astype(str))
    cfg = config(
        tmp / "ucr", data, baseModel={"uri": str(tmp / "ucr-base"), "sha256": digest}, data={"evalFraction": 0.3},
        peft={"r": 4, "alpha": 8, "dropout": 0.0}, output={"encoding": encoding},
        training={"maxSteps": steps, "batchSize": 32, "learningRate": 0.005, "evalEvery": 40},
    )  # fmt: skip
    (tmp / "ucr").mkdir(exist_ok=True)
    path = tmp / "ucr" / "config.json"
    path.write_text(json.dumps(cfg))
    subprocess.run([sys.executable, "-m", "edgetune_trainer", "--config", str(path)], capture_output=True, check=True)
    metrics = json.loads((tmp / "ucr" / "termination-log").read_text())["metrics"]
    return round((metrics["eval_accuracy"] - metrics["eval_accuracy_encoded"]) * 100, 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller model and fewer steps (under a minute)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, a few steps: checks the script")
    args = parser.parse_args()
    scale = "smoke" if args.smoke else "quick" if args.quick else "full"
    size = SIZES[scale]
    import transformers  # noqa: PLC0415

    from edgetune_trainer import package  # noqa: PLC0415
    from edgetune_trainer.package import decode  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="edgetune-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = tmp / "base"
        config = transformers.GPT2Config(
            n_layer=size["n_layer"], n_embd=size["n_embd"], n_head=size["n_head"], vocab_size=size["vocab"],
            n_positions=max(256, size["seq"]), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        transformers.GPT2LMHeadModel(config).save_pretrained(model_dir, safe_serialization=True)
        base_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))

        infer = _spawn_child("infer", model_dir, size)
        bare = _spawn_child("lora_bare", model_dir, size)
        full_ft = _spawn_child("full_ft", model_dir, size)
        ours = _our_loop(tmp, model_dir, size, checkpoint_every=10_000, encoding="fp32")
        ours_ckpt = _our_loop(tmp, model_dir, size, checkpoint_every=1, encoding="fp32")
        fp32 = (ours["package"] / "adapter.safetensors").read_bytes()
        adapter = decode(fp32, "fp32")
        int8 = package.encode(adapter, "int8-zstd")
        int4 = package.encode(adapter, "int4-zstd")
        drop_int8 = _compression_metric_drop(tmp / "int8", UCR_STEPS[scale], "int8-zstd")
        drop_int4 = _compression_metric_drop(tmp / "int4", UCR_STEPS[scale], "int4-zstd")

    train_rss = ours["summary"]["peakMemoryBytes"]
    result = {
        "scale": scale,
        "train_vs_infer_rss_ratio": round(train_rss / infer["peak_rss"], 3),
        "full_ft_vs_infer_rss_ratio": round(full_ft["peak_rss"] / infer["peak_rss"], 3),
        "loop_overhead_vs_bare": round(ours["step_s"] / bare["step_s"] - 1, 4),
        "checkpoint_overhead": round(ours_ckpt["step_s"] / ours["step_s"] - 1, 4),
        "delta_bytes_pct_of_base": round(100 * len(fp32) / base_bytes, 3),
        # The smallest encoding, and what it costs in accuracy on real data.
        "compressed_vs_fp32_ratio": round(len(fp32) / len(int4), 2),
        "compressed_metric_drop_pt": drop_int4,
        "raw": {
            "size": size, "threads": os.cpu_count(), "infer_peak_rss_mb": infer["peak_rss"] >> 20,
            "lora_train_peak_rss_mb": train_rss >> 20, "bare_lora_peak_rss_mb": bare["peak_rss"] >> 20,
            "full_ft_peak_rss_mb": full_ft["peak_rss"] >> 20, "bare_step_s": round(bare["step_s"], 4),
            "our_step_s": round(ours["step_s"], 4), "our_step_s_checkpoint_every_step": round(ours_ckpt["step_s"], 4),
            "infer_step_s": round(infer["step_s"], 4), "adapter_fp32_bytes": len(fp32),
            "adapter_int8_zstd_bytes": len(int8), "adapter_int4_zstd_bytes": len(int4),
            "int8_vs_fp32_ratio": round(len(fp32) / len(int8), 2), "int8_metric_drop_pt": drop_int8,
            "base_bytes": base_bytes,
        },
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, model_dir, batch, seq, steps = sys.argv[2:7]
        print(json.dumps(child(mode, model_dir, int(batch), int(seq), int(steps))))
    else:
        main()
