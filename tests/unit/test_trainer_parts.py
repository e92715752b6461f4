"""Checkpoints, energy/battery readers, and the delta package — each on its own."""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zstandard
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from peft import LoraConfig, get_peft_model
from safetensors.numpy import save as st_save
from torch import nn

from edgetune_api import codec
from edgetune_api.delta import DeltaVerificationError, Lineage, read_folder, verify_package
from edgetune_api.delta import sign as package_sign
from edgetune_testenv.procs import free_port
from edgetune_trainer import checkpoint as ckpt
from edgetune_trainer import package
from edgetune_trainer.energy import EstimateMeter, JetsonMeter, RaplMeter, battery_percent, best_meter, on_ac_power
from edgetune_trainer.loop import causal_lm_loss
from edgetune_trainer.models import cast_frozen_weights
from edgetune_trainer.report import Reporter, write_termination
from tests.support import eventually
from tests.trainer_support import config

# -- checkpoints -----------------------------------------------------------------------------


def _state(step: int) -> ckpt.TrainState:
    return ckpt.TrainState(step, ckpt.Cursor(1, step * 4), 0.5, 0, [{"step": step, "loss": 1.0 / step}], 1.5, 2.5)


def _save(root: Path, step: int, keep: int = 2) -> Path:
    adapter = {"w": torch.full((2,), float(step))}
    return ckpt.save(
        root, _state(step), adapter=adapter, optimizer={"opt": step}, scheduler={"sched": step}, extra_rng={}, keep=keep
    )


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    _save(tmp_path, 3)
    loaded, skipped = ckpt.load_latest(tmp_path)
    assert loaded is not None and skipped == []
    assert loaded.state.step == 3
    assert loaded.state.cursor == ckpt.Cursor(1, 12)
    assert torch.equal(loaded.adapter["w"], torch.full((2,), 3.0))
    assert loaded.optimizer == {"opt": 3}
    assert "torch" in loaded.rng


def test_corrupt_newest_checkpoint_is_skipped_and_older_kept(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    (newest / "adapter.pt").write_bytes(b"torn write")
    (tmp_path / ".tmp-step-00000003").mkdir()  # an interrupted save: never considered
    loaded, skipped = ckpt.load_latest(tmp_path)
    assert loaded is not None and loaded.state.step == 1
    assert skipped == ["step-00000002"]


def test_only_the_newest_checkpoints_are_kept(tmp_path: Path) -> None:
    for step in range(1, 6):
        _save(tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000005"]


def test_no_checkpoint_is_none(tmp_path: Path) -> None:
    assert ckpt.load_latest(tmp_path / "absent") == (None, [])


# -- energy and battery ----------------------------------------------------------------------


def _rapl(root: Path, energies: dict[str, int], max_uj: int = 1000) -> None:
    for domain, value in energies.items():
        d = root / domain
        d.mkdir(parents=True, exist_ok=True)
        (d / "energy_uj").write_text(f"{value}\n")
        (d / "max_energy_range_uj").write_text(f"{max_uj}\n")


def test_rapl_sums_top_level_domains_and_handles_wraparound(tmp_path: Path) -> None:
    _rapl(tmp_path, {"intel-rapl:0": 900, "intel-rapl:1": 100, "intel-rapl:0:0": 50})
    meter = RaplMeter(tmp_path)
    assert [p.name for p in meter.domains] == ["intel-rapl:0", "intel-rapl:1"]  # subdomains are inside :0
    _rapl(tmp_path, {"intel-rapl:0": 100, "intel-rapl:1": 300})  # :0 wrapped: +200 µJ; :1 +200 µJ
    assert meter.joules() == pytest.approx(400e-6)
    assert meter.method == "rapl"


def test_jetson_rails_integrate_power(tmp_path: Path) -> None:
    rail = tmp_path / "1-0040" / "iio:device0" / "in_power0_input"
    rail.parent.mkdir(parents=True)
    rail.write_text("5000\n")  # 5 W
    meter = JetsonMeter(tmp_path)
    meter._last_t -= 2.0  # two seconds ago
    assert meter.joules() == pytest.approx(10.0, rel=0.05)


def test_without_counters_the_estimate_is_labelled(tmp_path: Path) -> None:
    meter = best_meter(tmp_path / "no-powercap", watts_estimate=10.0, use_gpu=False)
    assert isinstance(meter, EstimateMeter)
    assert meter.method == "estimate"
    sum(i * i for i in range(300_000))  # burn some CPU
    assert meter.joules() > 0


def test_battery_and_mains_from_sysfs_layout(tmp_path: Path) -> None:
    assert battery_percent(tmp_path) is None
    bat, ac = tmp_path / "BAT0", tmp_path / "AC"
    bat.mkdir()
    ac.mkdir()
    (bat / "type").write_text("Battery\n")
    (bat / "capacity").write_text("37\n")
    (ac / "type").write_text("Mains\n")
    (ac / "online").write_text("0\n")
    assert battery_percent(tmp_path) == 37
    assert not on_ac_power(tmp_path)
    (ac / "online").write_text("1\n")
    assert on_ac_power(tmp_path)


# -- package ---------------------------------------------------------------------------------


def _adapter() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "base.layer.lora_A.weight": torch.randn(8, 64) * 0.02,
        "base.layer.lora_B.weight": torch.randn(32, 8) * 0.01,
    }


def test_int8_encoding_round_trips_within_quantisation_error() -> None:
    state = _adapter()
    for encoding in ("fp32", "fp16", "int8-zstd"):
        decoded = package.decode(package.encode(state, encoding), encoding)
        for name, tensor in state.items():
            error = (decoded[name] - tensor).abs()
            if encoding == "int8-zstd":  # at most half a quantisation step of its block's scale
                blocks = tensor.reshape(-1, package.BLOCK).abs().amax(dim=1, keepdim=True) / 254
                assert torch.all(error.reshape(-1, package.BLOCK) <= blocks * 1.0001), name
            else:
                assert torch.allclose(decoded[name], tensor, atol=1e-4 if encoding == "fp16" else 0.0), (encoding, name)
    torch.manual_seed(1)
    layer = {"lora_A.weight": torch.randn(8, 512) * 0.02, "lora_B.weight": torch.randn(512, 8) * 0.01}
    ratio = len(package.encode(layer, "fp32")) / len(package.encode(layer, "int8-zstd"))
    assert ratio > 3.5  # 4x from int8, less the per-block scales and headers


def test_int4_blocks_are_never_worse_than_absmax_scaling_and_old_packages_still_decode() -> None:
    torch.manual_seed(2)
    layer = {"a": torch.randn(8, 512) * 0.02, "b": torch.randn(512, 8) * 0.01, "odd": torch.randn(3, 7)}
    layer["a"][0, :4] = 0.2  # outliers: clipping them is closer overall
    data = package.encode(layer, "int4-zstd")
    decoded = package.decode(data, "int4-zstd")
    for name, tensor in layer.items():
        array = tensor.numpy()
        assert decoded[name].shape == tensor.shape, name
        plain = codec.dequantize_int4(*codec.quantize_int4(array, search=False), array.shape)
        ours = ((decoded[name].numpy() - array) ** 2).sum()
        assert ours <= ((plain - array) ** 2).sum() * 1.0001, name
    outliers = layer["a"].numpy()
    clipped = ((decoded["a"].numpy() - outliers) ** 2).sum()
    plain = codec.dequantize_int4(*codec.quantize_int4(outliers, search=False), outliers.shape)
    absmax = ((plain - outliers) ** 2).sum()
    assert clipped < 0.8 * absmax  # the search finds a better clipping point where outliers stretch a block
    assert len(package.encode(layer, "fp32")) / len(data) > 6  # 4.5 bits per value before zstd
    # A package from before the block size was recorded: blocks of 128, no metadata.
    packed, scale = codec.quantize_int4(outliers, codec.BLOCK4_LEGACY, search=False)
    raw = st_save({"a": packed, "a" + codec.SCALE_SUFFIX: scale}, metadata={"a": json.dumps(list(outliers.shape))})
    legacy = codec.decode(zstandard.ZstdCompressor().compress(raw), "int4-zstd")["a"]
    assert np.allclose(legacy, codec.dequantize_int4(packed, scale, outliers.shape, codec.BLOCK4_LEGACY))


def _lineage() -> Lineage:
    return Lineage(
        base_model_uri="builtin:timeseries-cnn",
        data_sha256="0" * 64,
        samples=10,
        data_format="npy",
        trainer_version="t",
    )


def _key() -> tuple[bytes, bytes]:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def _build(folder: Path, key: bytes | None) -> str:
    digest, _ = package.build(
        folder, _adapter(), encoding="int8-zstd", peft_config={"r": 8}, lineage=_lineage(), steps=5, duration_s=1.0,
        metrics={"eval_loss": 0.5}, energy_joules=1.0, energy_method="estimate", peak_memory_bytes=1,
        signing_key_pem=key,
    )  # fmt: skip
    return digest


def test_signed_package_verifies_and_tampering_is_named(tmp_path: Path) -> None:
    private, public = _key()
    digest = _build(tmp_path, private)
    files = read_folder(tmp_path)
    assert sorted(files) == ["adapter.safetensors.zst", "manifest.json", "manifest.sig"]
    manifest = verify_package(files, public, expected_digest=digest)
    assert manifest.lineage.samples == 10 and manifest.encoding == "int8-zstd"

    tampered = dict(files)
    tampered["adapter.safetensors.zst"] = files["adapter.safetensors.zst"][:-1] + b"\x00"
    with pytest.raises(DeltaVerificationError, match=r"adapter\.safetensors\.zst has SHA-256 .* the manifest says"):
        verify_package(tampered, public)
    forged = json.loads(files["manifest.json"])
    forged["metrics"]["eval_loss"] = 0.01
    with pytest.raises(DeltaVerificationError, match="signature does not verify"):
        verify_package({**files, "manifest.json": json.dumps(forged).encode()}, public)
    _, other_public = _key()
    with pytest.raises(DeltaVerificationError, match="signature does not verify"):
        verify_package(files, other_public)
    with pytest.raises(DeltaVerificationError, match="digest is"):
        verify_package(files, public, expected_digest="f" * 64)
    with pytest.raises(DeltaVerificationError, match="files the manifest does not list"):
        verify_package({**files, "extra.bin": b"x"}, public)


def test_unsigned_package_fails_when_a_key_is_required(tmp_path: Path) -> None:
    _build(tmp_path, None)
    files = read_folder(tmp_path)
    verify_package(files)  # fine without a key
    _, public = _key()
    with pytest.raises(DeltaVerificationError, match="unsigned"):
        verify_package(files, public)


@pytest.mark.parametrize("name", ["../escape.bin", "sub/dir.bin", ".hidden", "/abs.bin", "a" * 200])
def test_a_manifest_naming_files_outside_a_flat_package_is_refused(tmp_path: Path, name: str) -> None:
    """Even correctly signed: names are plain files (no separators, no `..`, nothing hidden), so no
    reader can be led to write or read outside the package folder."""
    private, public = _key()
    _build(tmp_path, private)
    files = read_folder(tmp_path)
    forged = json.loads(files["manifest.json"])
    forged["files"][name] = forged["files"].pop("adapter.safetensors.zst")
    raw = json.dumps(forged, sort_keys=True, separators=(",", ":")).encode()
    signed = {**files, "manifest.json": raw, "manifest.sig": package_sign(raw, private)}
    signed[name] = signed.pop("adapter.safetensors.zst")
    with pytest.raises(DeltaVerificationError, match=r"not a valid edgetune\.delta/v1 manifest") as refused:
        verify_package(signed, public)
    assert refused.value.reason == "InvalidManifest"


def test_a_manifest_declaring_an_oversized_file_is_refused(tmp_path: Path) -> None:
    _build(tmp_path, None)
    files = read_folder(tmp_path)
    forged = json.loads(files["manifest.json"])
    forged["files"]["adapter.safetensors.zst"]["bytes"] = 2**31
    with pytest.raises(DeltaVerificationError, match="less than or equal to 1073741824"):
        verify_package({**files, "manifest.json": json.dumps(forged).encode()})


# -- chunked language-model loss -------------------------------------------------------------


def test_frozen_base_weights_are_cast_and_the_adapter_and_buffers_keep_their_precision() -> None:
    """On a GPU with bf16/fp16 autocast the frozen base is stored in that dtype (as a bare loop
    loads it); LoRA's weights, created afterwards, stay float32 and buffers are not touched."""
    transformers = pytest.importorskip("transformers")
    llama = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                     intermediate_size=64, vocab_size=64)  # fmt: skip
    model = transformers.LlamaForCausalLM(llama)
    for param in model.parameters():
        param.requires_grad_(False)
    buffers = {name: b.dtype for name, b in model.named_buffers()}
    total = sum(p.numel() for p in model.parameters())
    assert cast_frozen_weights(model, torch.bfloat16) == total
    assert cast_frozen_weights(model, torch.bfloat16) == 0  # already cast
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    kinds = {(p.requires_grad, p.dtype) for p in peft_model.parameters()}
    assert kinds == {(False, torch.bfloat16), (True, torch.float32)}
    assert {name: b.dtype for name, b in model.named_buffers()} == buffers and torch.float32 in buffers.values()
    ids = torch.randint(0, 64, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = causal_lm_loss(peft_model, ids, torch.ones_like(ids))
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in peft_model.parameters() if p.requires_grad)


def test_chunked_lm_loss_equals_the_full_loss_and_trains_lora() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=64)
    model = get_peft_model(transformers.GPT2LMHeadModel(config), LoraConfig(r=4, target_modules=["c_attn"]))
    model.eval()  # no dropout: both losses see the same network
    ids = torch.randint(0, 1000, (3, 50))
    mask = torch.ones_like(ids)
    mask[0, 40:] = 0  # padding is not scored
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    full = nn.functional.cross_entropy(logits.reshape(-1, 1000), target.reshape(-1))
    full.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    chunked = causal_lm_loss(model, ids, mask, chunk=7)
    assert float(chunked) == pytest.approx(float(full), rel=1e-5)
    chunked.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert got.keys() == expected.keys() and len(got) == 4  # LoRA A and B of both layers
    for name, grad in got.items():
        assert torch.allclose(grad, expected[name], rtol=1e-4, atol=1e-7), name


# -- reporting -------------------------------------------------------------------------------


def test_metrics_are_served_and_the_termination_message_fits_4kib(tmp_path: Path) -> None:
    port = free_port()
    reporter = Reporter(job="j", namespace="ns", cluster="edge-a", node="n1", metrics_port=port)
    try:
        reporter.gauge("loss", 0.25)
        reporter.gauge("energy", 12.5, method="rapl")
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        reporter.close()
    assert 'edgetune_trainer_loss{cluster="edge-a",job="j",namespace="ns",node="n1"} 0.25' in body
    assert (
        'edgetune_trainer_energy_joules{cluster="edge-a",job="j",method="rapl",namespace="ns",node="n1"} 12.5' in body
    )

    path = tmp_path / "termination-log"
    write_termination(path, {"status": "Failed", "reason": "InvalidInput", "message": "x" * 10_000})
    written = json.loads(path.read_text())
    assert len(path.read_bytes()) <= 4096
    assert written["reason"] == "InvalidInput" and written["message"].startswith("xxx")


def test_metrics_are_pushed_while_training_not_only_at_the_end() -> None:
    """A trainer on an edge cluster cannot be scraped: the Pushgateway must see its progress as it
    happens, so Prometheus (and the live views built on it) follow the run."""
    bodies: list[str] = []

    class Gateway(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])).decode())
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    reporter = Reporter(job="j", namespace="ns", cluster="edge-a", node="n1", pushgateway_url=url, push_interval=0.1)
    try:
        reporter.gauge("step", 3)
        eventually(lambda: any('edgetune_trainer_step{cluster="edge-a"' in b and "} 3.0" in b for b in bodies),
                   timeout=5, what="a push with step 3")  # fmt: skip
        reporter.gauge("step", 7)
        eventually(lambda: any("} 7.0" in b for b in bodies), timeout=5, what="a later push with step 7")
    finally:
        reporter.close()
        server.shutdown()
    pushed = len(bodies)
    time.sleep(0.3)
    assert len(bodies) == pushed  # closed: no more pushes


def _run_cli(tmp_path: Path, cfg: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    from edgetune_trainer.__main__ import main  # noqa: PLC0415

    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    code = main(["--config", str(path)])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.skipif(Path("/dev/termination-log").exists(), reason="inside a container the kubelet's file is used")
def test_an_invalid_config_is_explained_on_stdout_never_in_dev(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.delenv("EDGETUNE_TERMINATION_LOG", raising=False)
    cfg = config(tmp_path, tmp_path / "data")
    cfg["spec"]["training"]["learningRate"] = -1
    cfg["spec"]["budgets"]["colour"] = "red"
    code, summary = _run_cli(tmp_path, cfg, capsys)
    assert code != 0 and summary["status"] == "Failed" and summary["reason"] == "InvalidInput"
    message = summary["message"]
    assert message.startswith("invalid trainer configuration: ")
    assert "spec.training.learningRate: must be greater than 0" in message
    assert "spec.budgets.colour: is not a known field" in message
    assert "pydantic" not in message and "errors.pydantic.dev" not in message
    assert not Path("/dev/termination-log").exists()


def test_the_trainer_refuses_an_unpinned_base_model(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Only the apiserver's rule stopped an unpinned base before; a config that bypasses it must
    not train on unverified weights either."""
    monkeypatch.setenv("EDGETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))
    cfg = config(tmp_path, tmp_path / "data")
    cfg["spec"]["baseModel"] = {"uri": str(tmp_path / "some-base")}
    from edgetune_trainer.__main__ import main  # noqa: PLC0415

    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert main(["--config", str(path)]) != 0
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["reason"] == "InvalidInput"
    assert f"spec.baseModel.sha256 is required for {tmp_path / 'some-base'}" in summary["message"]


def test_the_encoding_gate_falls_back_until_the_bound_holds() -> None:
    from edgetune_trainer import encoding_gate  # noqa: PLC0415

    generator = torch.Generator().manual_seed(0)
    state = {"a.lora_A.weight": torch.randn(8, 64, generator=generator),
             "a.lora_B.weight": torch.randn(64, 8, generator=generator) * 0.01}  # fmt: skip
    reference = {"eval_accuracy": 0.8, "eval_loss": 0.5}
    scores = {"int4-zstd": 0.55, "int8-zstd": 0.79, "fp16": 0.8}
    seen: list[float] = []

    def score(decoded: dict[str, torch.Tensor]) -> dict[str, float]:
        error = encoding_gate.weight_error(state, decoded)
        seen.append(error)
        name = "int4-zstd" if error > 0.02 else "int8-zstd" if error > 1e-3 else "fp16"
        return {"eval_accuracy": scores[name], "eval_loss": 0.5}

    choice = encoding_gate.choose("int4-zstd", state, reference, 0.02, score)
    assert choice.encoding == "int8-zstd" and choice.fell_back
    assert [(a.encoding, a.ok) for a in choice.attempts] == [("int4-zstd", False), ("int8-zstd", True)]
    assert choice.attempts[0].degradation == pytest.approx(0.25) and choice.metrics["eval_accuracy"] == 0.79
    assert seen[0] > 10 * seen[1]  # int4 is much coarser than int8
    strict = encoding_gate.choose("int4-zstd", state, reference, 0.0, score)
    assert strict.encoding == "fp16"
    # No held-out data: the decoded weights' own error decides (int4 here is over 5 %).
    blind = encoding_gate.choose("int4-zstd", state, {}, 0.02, score)
    assert blind.attempts[0].weight_error > encoding_gate.MAX_WEIGHT_ERROR and blind.encoding == "int8-zstd"
    # Loss-only tasks: loss may rise by the fraction.
    assert encoding_gate.degradation({"eval_loss": 2.0}, {"eval_loss": 2.1}) == pytest.approx(0.05)


def test_a_fallback_encodes_the_trained_adapter_not_the_coarser_weights_scored_before_it() -> None:
    """The gate loads each decoded candidate into the model to score it; the state it encodes must be
    a snapshot, or int4's decoded weights would become what int8 re-encodes and ships."""
    from edgetune_api.training_job import PeftSpec  # noqa: PLC0415
    from edgetune_trainer import encoding_gate, models  # noqa: PLC0415

    model = models.attach(models.builtin_random("timeseries-cnn", 2, 3, 0), PeftSpec(r=4))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # a trained adapter, not peft's zero initialisation
    state = models.adapter_state(model)
    trained = {k: v.clone() for k, v in state.items()}

    def score(decoded: dict[str, torch.Tensor]) -> dict[str, float]:
        models.load_adapter_state(model, decoded)  # as __main__.run scores a candidate
        error = encoding_gate.weight_error(trained, decoded)
        return {"eval_accuracy": 0.5 if error > 0.02 else 0.8}

    choice = encoding_gate.choose("int4-zstd", state, {"eval_accuracy": 0.8}, 0.02, score)
    assert choice.encoding == "int8-zstd"
    assert all(torch.equal(state[k], trained[k]) for k in trained)  # untouched by the candidates loaded
    shipped = package.decode(package.encode(state, choice.encoding), choice.encoding)
    assert encoding_gate.weight_error(trained, shipped) < 0.01  # int8 of the trained weights


def test_text_sequences_have_the_declared_length_and_can_be_packed() -> None:
    from edgetune_api.training_job import DataSpec  # noqa: PLC0415
    from edgetune_trainer.data import DataInfo  # noqa: PLC0415
    from edgetune_trainer.loop import Task  # noqa: PLC0415
    from edgetune_trainer.models import BaseModel  # noqa: PLC0415

    base = BaseModel(nn.Linear(1, 1), "transformers", None, [])  # no tokenizer: byte-level ids
    info = DataInfo(samples=2, train_samples=2, eval_samples=0, sha256="0" * 64, labels=[], channels=None,
                    length=None, kind="text")  # fmt: skip
    texts = ["abc", "defghij"]

    def task(**data: Any) -> Task:
        spec = DataSpec.model_validate({"source": {"hostPath": "/d"}, "format": "text", **data})
        return Task(base, info, torch.device("cpu"), spec)

    plain = task(sequenceLength=8)._text_batch(texts)
    assert plain["input_ids"].tolist() == [[97, 98, 99, 0, 0, 0, 0], [100, 101, 102, 103, 104, 105, 106]]
    assert plain["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0], [1] * 7]
    cut = task(sequenceLength=8)._text_batch(["x" * 300])
    assert cut["input_ids"].shape == (1, 8)  # truncated at the declared length (it was fixed at 128)
    assert "attention_mask" not in cut  # nothing padded, no mask: attention takes the plain causal path
    packed = task(sequenceLength=8, packing=True)._text_batch(texts)
    assert packed["input_ids"].tolist() == [[97, 98, 99, 0, 100, 101, 102, 103], [104, 105, 106, 0, 0, 0, 0, 0]]
    assert packed["attention_mask"].tolist() == [[1] * 8, [1, 1, 1, 1, 0, 0, 0, 0]]


def test_a_saved_base_model_is_readable_by_the_non_root_trainer_and_agent(tmp_path: Path) -> None:
    from edgetune_trainer import models  # noqa: PLC0415

    models.save_builtin(models.TimeSeriesCNN(3, 2), tmp_path / "base", ["a", "b"])
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "base" / name).stat().st_mode & 0o444 == 0o444, name  # safetensors alone writes 0600


def test_the_peft_configuration_is_stored_once_without_its_defaults_and_restores_losslessly() -> None:
    import peft  # noqa: PLC0415

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["conv1", "conv2"], lora_dropout=0.1)
    slim = package.slim_peft_config(config)
    assert slim == {"peft_type": "LORA", "peft_version": slim["peft_version"], "r": 4, "lora_alpha": 8,
                    "target_modules": ["conv1", "conv2"], "lora_dropout": 0.1}  # fmt: skip
    assert len(json.dumps(slim)) < 200 < len(json.dumps(config.to_dict(), default=str))  # was ~1 KB, twice
    restored = peft.PeftConfig.from_peft_type(**slim)
    assert json.dumps(restored.to_dict(), default=sorted) == json.dumps(config.to_dict(), default=sorted)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root (as the init container runs)")
def test_prepare_work_dir_hands_the_checkpoint_folder_to_the_trainers_user(tmp_path: Path) -> None:
    from edgetune_trainer.__main__ import main  # noqa: PLC0415

    work = tmp_path / "work"
    work.mkdir(mode=0o755)
    assert main(["prepare-work-dir", str(work), "--owner", "10001:10001"]) == 0
    assert (work.stat().st_uid, work.stat().st_gid) == (10001, 10001)
    assert main(["prepare-work-dir", str(work), "--owner", "10001:10001"]) == 0  # idempotent (a retried pod)


def test_checkpointing_the_builtin_model_block_by_block_lowers_the_training_peak() -> None:
    """One checkpoint segment per conv block: the backward pass rebuilds one block's activations at a
    time (one segment for the whole stack rebuilt them all at once and saved almost nothing)."""
    from edgetune_api.training_job import PeftSpec  # noqa: PLC0415
    from edgetune_trainer import models  # noqa: PLC0415
    from edgetune_trainer.energy import peak_rss_bytes, reset_peak_rss, trim_heap  # noqa: PLC0415

    base = models.builtin_random("timeseries-cnn", 3, 3, 0)
    model = models.attach(base, PeftSpec(r=8))
    x = torch.randn(32, 3, 4096)

    def peak(checkpointing: bool) -> int:
        base.model.gradient_checkpointing = checkpointing
        trim_heap()
        assert reset_peak_rss()
        start = peak_rss_bytes()
        model(x).sum().backward()
        model.zero_grad(set_to_none=True)
        return peak_rss_bytes() - start

    peak(False)  # warm-up: the first pass allocates torch's own buffers
    plain, checkpointed = peak(False), peak(True)
    assert checkpointed < 0.85 * plain, (plain, checkpointed)  # measured 0.73 (whole stack as one segment: 1.08)


@pytest.mark.parametrize(
    ("accelerator", "fallback", "runtime", "cuda", "expected"),
    [
        ("gpu", False, "auto", True, "gpu"),
        ("gpu", False, "auto", False, "AcceleratorUnavailable"),
        ("gpu", True, "auto", False, "cpu+warning"),
        ("gpu", False, "cpu", True, "AcceleratorUnavailable"),  # forced to the CPU by hand: still not silent
        ("npu", False, "auto", True, "AcceleratorUnavailable"),  # no NPU backend
        ("npu", True, "auto", True, "cpu+warning"),
        ("cpu", False, "auto", True, "cpu"),  # a cpu placement never takes a GPU it did not reserve
        ("any", False, "auto", True, "gpu"),
        ("any", False, "auto", False, "cpu"),
        ("any", False, "cuda", False, "AcceleratorUnavailable"),
    ],
)
def test_the_trainer_uses_the_accelerator_it_reserved_or_says_why_not(
    accelerator: str, fallback: bool, runtime: str, cuda: bool, expected: str
) -> None:
    from edgetune_trainer.accelerator import AcceleratorUnavailableError, choose  # noqa: PLC0415

    if expected == "AcceleratorUnavailable":
        with pytest.raises(AcceleratorUnavailableError, match=r"placement|runtime\.device") as caught:
            choose(accelerator, allow_cpu_fallback=fallback, runtime_device=runtime, cuda=cuda)
        if accelerator in ("gpu", "npu"):
            assert "allowCpuFallback" in str(caught.value)
        return
    choice = choose(accelerator, allow_cpu_fallback=fallback, runtime_device=runtime, cuda=cuda)
    assert choice.device == expected.removesuffix("+warning")
    assert (choice.warning is not None) == expected.endswith("+warning")


class _ApiServer(http.server.ThreadingHTTPServer):
    """Answers PATCHes of pods with ``status`` and records them (the writer's side of the protocol;
    the API server's side, with RBAC and the admission policy, is proven in tests/e2e/test_operator.py)."""

    def __init__(self, status: int) -> None:
        self.status, self.patches = status, list[dict[str, Any]]()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PATCH(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.patches.append({"path": self.path, "body": body, "type": self.headers["Content-Type"],
                                       "auth": self.headers["Authorization"]})  # fmt: skip
                self.send_response(server.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        server = self
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_progress_is_written_on_the_own_pod_at_most_every_interval_with_the_newest_values(tmp_path: Path) -> None:
    from edgetune_api.own_pod import OwnPod  # noqa: PLC0415
    from edgetune_api.trainer_config import PROGRESS_ANNOTATION, TrainerProgress  # noqa: PLC0415
    from edgetune_trainer.progress import ProgressWriter  # noqa: PLC0415

    (tmp_path / "token").write_text("tok-1\n")
    api = _ApiServer(200)
    own = OwnPod(namespace="ns", name="trainer-x", user_agent="t", server=f"http://127.0.0.1:{api.server_port}",
                 sa_dir=tmp_path)  # fmt: skip
    events: list[tuple[str, dict[str, Any]]] = []
    writer = ProgressWriter(own, 0.5, lambda name, **fields: events.append((name, fields)))
    writer.gauge("device_info", 1, device="cpu", requested="gpu")
    started = time.monotonic()
    for step in range(1, 31):  # 30 steps in ~1.5 s: three or four writes, not thirty
        writer.gauge("step", step)
        writer.gauge("loss", float("nan") if step == 30 else 1 / step)
        writer.gauge("energy", step * 0.5, method="estimate")
        time.sleep(0.05)

    def newest() -> dict[str, Any]:
        return dict(json.loads(api.patches[-1]["body"]["metadata"]["annotations"][PROGRESS_ANNOTATION]))

    eventually(lambda: api.patches and newest()["step"] == 30, timeout=5, what="step 30 written")
    writer.close()
    elapsed = time.monotonic() - started
    assert 2 <= len(api.patches) <= elapsed / 0.5 + 2, len(api.patches)
    last = api.patches[-1]
    assert last["path"] == "/api/v1/namespaces/ns/pods/trainer-x"
    assert last["type"] == "application/strategic-merge-patch+json" and last["auth"] == "Bearer tok-1"
    progress = TrainerProgress.model_validate_json(last["body"]["metadata"]["annotations"][PROGRESS_ANNOTATION])
    assert (progress.step, progress.loss, progress.device, progress.energy_method) == (30, round(1 / 29, 6), "cpu",
                                                                                      "estimate")  # fmt: skip
    assert progress.energy_joules == 15.0 and not events
    api.shutdown()


def test_a_refused_progress_write_is_said_once_and_never_retried(tmp_path: Path) -> None:
    from edgetune_api.own_pod import OwnPod  # noqa: PLC0415
    from edgetune_trainer.progress import ProgressWriter  # noqa: PLC0415

    (tmp_path / "token").write_text("tok")
    api = _ApiServer(403)  # an older chart: no RoleBinding or no policy
    own = OwnPod(namespace="ns", name="p", user_agent="t", server=f"http://127.0.0.1:{api.server_port}",
                 sa_dir=tmp_path)  # fmt: skip
    events: list[str] = []
    writer = ProgressWriter(own, 0.05, lambda name, **fields: events.append(name))
    for step in range(20):
        writer.gauge("step", step)
        time.sleep(0.02)
    writer.close()
    assert len(api.patches) == 1 and events == ["progress_unreportable"]
    api.shutdown()


def test_an_unreadable_token_stops_progress_writes_without_stopping_training(tmp_path: Path) -> None:
    from edgetune_api.own_pod import OwnPod  # noqa: PLC0415
    from edgetune_trainer.progress import ProgressWriter  # noqa: PLC0415

    (tmp_path / "token").mkdir()  # reading it fails as an unreadable file does (the test runs as root)
    own = OwnPod(namespace="ns", name="p", user_agent="t", server="http://127.0.0.1:9", sa_dir=tmp_path)
    events: list[str] = []
    writer = ProgressWriter(own, 0.01, lambda name, **fields: events.append(name))
    writer.gauge("step", 1)
    eventually(lambda: events, timeout=5, what="an event")
    writer.gauge("step", 2)  # the thread is gone: nothing raises here
    writer.close()
    assert events == ["progress_unreportable"] and writer.writes == 0
