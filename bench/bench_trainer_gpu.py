"""Trainer on a GPU: our loop against a bare torch + peft loop, MFU, memory, checkpoints, energy.

Prepared for the device machine (an H200 lent to some sessions; never needed by the tests). One
call measures everything, side by side, and prints one JSON line with ``loop_overhead_vs_bare``,
``loop_overhead_vs_bare_gc``, ``mfu_6n`` (and ``mfu_4n``), ``tokens_per_s``, ``train_vs_infer_mem_gc``,
``checkpoint_overhead`` and ``energy_joules_per_1k_tokens`` (NVML's energy counter), plus the raw
figures they come from.

The model is a Llama built from config in the TinyLlama-1.1B shape (22 layers, width 2048, GQA
32/4 heads, MLP 5632, vocabulary 32000), bf16, random weights (nothing is downloaded); LoRA r=16
on every linear layer; batch 32 x 1024 tokens by default (64 x 1024 without gradient checkpointing
would need about 130 GB of activations). Every mode runs in its own process so
that peak memory is its own: ``infer`` (forward, no grad), ``bare`` / ``bare_gc`` (the plain loop:
``model(input_ids, labels=...)``, AdamW, without / with gradient checkpointing), and our trainer
as the pod runs it (``python -m edgetune_trainer`` on byte-level text, without and with a
checkpoint every step).

Here (no GPU): ``--smoke`` runs the same code on the CPU with a tiny model in seconds, to keep the
script working. On the device machine, which has torch, peft and transformers but not our other
dependencies: first, here, ``.venv/bin/python bench/bench_trainer_gpu.py --fetch-wheels`` (into
``.whl/``, ignored by git), then the ``run`` tool with ``carry: [".whl"]`` and the command that
``--print-device-command`` prints.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PEAK_BF16_FLOPS = 989e12  # H200 / H100 SXM dense bf16 tensor-core peak
SHAPES = {
    "tinyllama": {"hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
                  "intermediate_size": 5632, "vocab_size": 32000, "batch": 32, "seq": 1024, "steps": 12},
    "smoke": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "vocab_size": 512, "batch": 2, "seq": 32, "steps": 4},
}  # fmt: skip
WHEELS = ("pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
          "zstandard==0.25.0", "cryptography==50.0.2", "cffi==2.1.1", "pycparser==3.12")  # fmt: skip
"""What the trainer imports that the device image lacks (torch, peft, transformers, numpy,
safetensors, pyyaml, prometheus-client and nvidia-ml-py are there: docs/benchmarks.md)."""
DEVICE_COMMAND = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
    ".whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/operator/src:$PWD/trainer-image/src:$PWD PYTHONUNBUFFERED=1 && "
    "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; "
    "python3 -m pytest -q -p no:cacheprovider --noconftest tests/integration/test_trainer_gpu.py 2>&1 "
    "| tee $OUT/pytest_gpu.log | tail -5; "
    "python3 bench/bench_trainer_gpu.py --out $OUT/bench_trainer_gpu.json $(test -d .before && echo --before .before) "
    "2>&1 | tee $OUT/bench_trainer_gpu.log"
)
"""Installs the carried wheels, runs the GPU tests (tests/integration/test_trainer_gpu.py), then the
benchmark; with a ``.before`` folder (an older trainer: ``git archive REV trainer-image/src | tar -x
--strip-components 2 -C .before``) also that trainer, side by side, as ``ours_before``."""


def _build_model(folder: Path, shape: dict[str, int], device: str) -> int:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    config = transformers.LlamaConfig(
        hidden_size=shape["hidden_size"], num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"], num_key_value_heads=shape["num_key_value_heads"],
        intermediate_size=shape["intermediate_size"], vocab_size=shape["vocab_size"],
        max_position_embeddings=max(2048, shape["seq"]), torch_dtype="bfloat16",
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):  # random initialisation of a billion weights is minutes on a CPU
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


# -- one process per measurement -----------------------------------------------------------------


def child(mode: str, model_dir: str, shape: tuple[int, int, int], device_name: str) -> dict[str, Any]:
    """One measurement: ``shape`` is (batch, sequence length, steps)."""
    batch, seq, steps = shape
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype).to(device)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    if mode == "infer":
        model.eval()
        with torch.no_grad():
            for _ in range(steps):
                sync()
                t0 = time.perf_counter()
                model(input_ids=ids)
                sync()
                times.append(time.perf_counter() - t0)
    else:
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
        if mode == "bare_gc":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()
        for _ in range(steps):
            sync()
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            sync()
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"step_s": statistics.median(times[2:] or times), "step_s_all": [round(t, 4) for t in times],
            "peak_bytes": peak}  # fmt: skip


def _spawn(mode: str, model_dir: Path, shape: dict[str, int], device: str) -> dict[str, Any]:
    args = [sys.executable, __file__, "--child", mode, str(model_dir), str(shape["batch"]), str(shape["seq"]),
            str(shape["steps"]), device]  # fmt: skip
    out = subprocess.run(args, capture_output=True, text=True, check=False,
                         env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _our_loop(tmp: Path, model_dir: Path, shape: dict[str, int], device: str, *, checkpoint_every: int,
              gc: bool, src: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Our trainer as the pod runs it: byte-level text (one token per byte, no tokenizer files),
    ``sequenceLength`` tokens per sample, the batch fixed, evaluation out of the way. ``src``: run
    the trainer package found there instead (an older version, for a before/after in one run)."""
    from edgetune_trainer.models import weights_sha256  # noqa: PLC0415

    data = tmp / "text"
    data.mkdir(exist_ok=True)
    lines = ["".join(chr(97 + (i * 7 + j * 13) % 26) for j in range(shape["seq"]))
             for i in range(shape["batch"] * (shape["steps"] + 4))]  # fmt: skip
    (data / "lines.txt").write_text("\n".join(lines) + "\n")
    label = f"{checkpoint_every}-{gc}-{'before' if src else 'now'}"
    work = tmp / f"work-{label}"
    config = {
        "spec": {
            "baseModel": {"uri": str(model_dir), "sha256": weights_sha256(model_dir)},
            "data": {"format": "text", "evalFraction": 0.02, "sequenceLength": shape["seq"]},
            "peft": {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["all-linear"]},
            "training": {"maxSteps": shape["steps"], "batchSize": shape["batch"], "evalEvery": 10_000,
                         "checkpointEvery": checkpoint_every, "learningRate": 1e-4, "gradientCheckpointing": gc,
                         "precision": "bf16" if device == "cuda" else "fp32"},
            "budgets": {"memory": "120Gi"},
            "output": {"encoding": "fp16"},
        },
        "runtime": {"dataDir": str(data), "workDir": str(work), "terminationLog": str(work / "termination-log"),
                    "device": device},
    }  # fmt: skip
    path = tmp / f"config-{label}.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src.resolve()), *os.environ.get("PYTHONPATH", "").split(os.pathsep)])
    proc = subprocess.run([sys.executable, "-m", "edgetune_trainer", "--config", str(path)], capture_output=True,
                          text=True, check=False, env=env)  # fmt: skip
    summary = json.loads((work / "termination-log").read_text()) if (work / "termination-log").exists() else {}
    if proc.returncode != 0:
        raise RuntimeError(f"trainer failed ({proc.returncode}): {summary}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    stamps = [json.loads(line)["ts"] for line in proc.stdout.splitlines() if '"event": "step"' in line]
    gaps = [b - a for a, b in itertools.pairwise(stamps)][2:]
    return {"step_s": statistics.median(gaps), "step_s_all": [round(g, 4) for g in gaps],
            "peak_bytes": summary.get("peakMemoryBytes"), "energy_joules": summary.get("energyJoules"),
            "energy_method": summary.get("energyMethod"), "steps": summary.get("steps"),
            "duration_s": summary.get("durationSeconds")}  # fmt: skip


def _nvml_energy_j() -> float | None:
    """The GPU's energy counter (millijoules since the driver loaded), or None without NVML."""
    try:
        import pynvml  # noqa: PLC0415

        pynvml.nvmlInit()
        return float(pynvml.nvmlDeviceGetTotalEnergyConsumption(pynvml.nvmlDeviceGetHandleByIndex(0))) / 1000
    except Exception:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU (checks the script, no figures)")
    parser.add_argument("--fetch-wheels", action="store_true", help="download what the device lacks into .whl/")
    parser.add_argument("--print-device-command", action="store_true", help="the command for the run tool")
    parser.add_argument("--out", type=Path, help="also write the figures here, updated after each measurement")
    parser.add_argument("--before", type=Path, help="an older trainer package folder to measure side by side")
    parser.add_argument("--child", nargs=6, metavar=("MODE", "MODEL", "BATCH", "SEQ", "STEPS", "DEVICE"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args()
    if args.child:
        mode, model, batch, seq, steps, device = args.child
        print(json.dumps(child(mode, model, (int(batch), int(seq), int(steps)), device)))
        return
    if args.print_device_command:
        print(DEVICE_COMMAND)
        return
    if args.fetch_wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                        "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                        "-d", str(REPO / ".whl"), *WHEELS], check=True)  # fmt: skip
        return
    device = "cpu" if args.smoke else "cuda"
    shape = SHAPES["smoke" if args.smoke else "tinyllama"]
    print(json.dumps(measure(device, shape, args.out, args.before)))


def measure(device: str, shape: dict[str, int], out: Path | None, before: Path | None) -> dict[str, Any]:
    """Every measurement in turn; one that fails is recorded under ``errors`` and the rest go on
    (device time is scarce), and the figures so far are written to ``out`` after each."""
    import peft  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    runs: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    result: dict[str, Any] = {"batch": shape["batch"], "seq": shape["seq"], "device": device, "versions": {
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}}  # fmt: skip

    def attempt(name: str, fn: Any) -> None:
        started = time.monotonic()
        try:
            runs[name] = fn()
        except Exception as exc:  # recorded; the other measurements still run
            errors[name] = str(exc)[-1500:]
        print(f"{name}: {time.monotonic() - started:.0f} s{' FAILED' if name in errors else ''}", file=sys.stderr)
        result.update(summarise(runs, shape, result["model_parameters"]), runs=runs, errors=errors)
        if out is not None:
            out.write_text(json.dumps(result, indent=1))

    with tempfile.TemporaryDirectory(prefix="edgetune-gpu-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = tmp / "base"
        result["model_parameters"] = _build_model(model_dir, shape, device)
        for mode in ("infer", "bare", "bare_gc"):
            attempt(mode, lambda mode=mode: _spawn(mode, model_dir, shape, device))

        def ours_with_energy() -> dict[str, Any]:
            energy_before = _nvml_energy_j()
            ours = _our_loop(tmp, model_dir, shape, device, checkpoint_every=10_000, gc=False)
            energy_after = _nvml_energy_j()
            ours["process_energy_joules"] = (
                energy_after - energy_before if energy_before is not None and energy_after is not None else None
            )
            return ours

        attempt("ours", ours_with_energy)
        attempt("ours_gc", lambda: _our_loop(tmp, model_dir, shape, device, checkpoint_every=10_000, gc=True))
        attempt("ours_ckpt", lambda: _our_loop(tmp, model_dir, shape, device, checkpoint_every=1, gc=False))
        if before is not None:
            attempt("ours_before", lambda: _our_loop(tmp, model_dir, shape, device, checkpoint_every=10_000,
                                                     gc=False, src=before))  # fmt: skip
    return result


def summarise(runs: dict[str, dict[str, Any]], shape: dict[str, int], params: int) -> dict[str, Any]:
    """The headline figures from whichever measurements succeeded (None where one is missing)."""

    def ratio(a: str, b: str, key: str = "step_s") -> float | None:
        x, y = runs.get(a, {}).get(key), runs.get(b, {}).get(key)
        return round(x / y, 4) if x and y else None

    def less_one(value: float | None) -> float | None:
        return round(value - 1, 4) if value is not None else None

    tokens_per_step = shape["batch"] * shape["seq"]
    ours = runs.get("ours", {})
    tokens_per_s = tokens_per_step / ours["step_s"] if ours.get("step_s") else None
    trained_tokens = tokens_per_step * (ours.get("steps") or 0)
    energy = ours.get("energy_joules") if ours.get("energy_method") == "nvml" else None
    return {
        "loop_overhead_vs_bare": less_one(ratio("ours", "bare")),
        "loop_overhead_vs_bare_gc": less_one(ratio("ours_gc", "bare_gc")),
        "loop_overhead_before_vs_bare": less_one(ratio("ours_before", "bare")),
        "tokens_per_s": round(tokens_per_s, 1) if tokens_per_s else None,
        "mfu_6n": round(6 * params * tokens_per_s / PEAK_BF16_FLOPS, 4) if tokens_per_s and params else None,
        "mfu_4n": round(4 * params * tokens_per_s / PEAK_BF16_FLOPS, 4) if tokens_per_s and params else None,
        "train_vs_infer_mem": ratio("bare", "infer", "peak_bytes"),
        "train_vs_infer_mem_gc": ratio("bare_gc", "infer", "peak_bytes"),
        "ours_vs_infer_mem": ratio("ours", "infer", "peak_bytes"),
        "ours_vs_infer_mem_gc": ratio("ours_gc", "infer", "peak_bytes"),
        "checkpoint_overhead": less_one(ratio("ours_ckpt", "ours")),
        # the trainer's own NVML meter: from the start of training to its end (evaluation and the
        # end-of-run checkpoint included, model loading not)
        "energy_joules_per_1k_tokens": round(energy / trained_tokens * 1000, 3) if energy and trained_tokens else None,
    }


if __name__ == "__main__":
    main()
