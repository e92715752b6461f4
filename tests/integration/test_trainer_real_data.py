"""Real sensor data: ItalyPowerDemand (UCR archive, as shipped inside the sktime wheel).

Story: a base model is trained at site A. Site B's meters are different (gain, offset, a clock
three readings off), so the frozen base is no better than chance there. The trainer adapts it on
site B's own data with LoRA only, and the adapter must recover the accuracy.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from edgetune_api.training_job import DataSpec
from edgetune_trainer.__main__ import main
from edgetune_trainer.data import NodeDataset
from edgetune_trainer.models import TimeSeriesCNN, load_base, save_builtin
from tests.trainer_support import config, events, termination, write_config

pytestmark = pytest.mark.slow


def _ucr(name: str) -> tuple[np.ndarray, np.ndarray]:
    spec = importlib.util.find_spec("sktime")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the sktime wheel (data only) is missing: run scripts/bootstrap.sh")
    root = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name
    data = NodeDataset(
        root, DataSpec.model_validate({"source": {"hostPath": "/d"}, "format": "ts", "evalFraction": 0.01})
    )
    samples = list(data.iterate("train")) + list(data.iterate("eval"))
    x = np.stack([np.asarray(s.x) for s in samples]).astype(np.float32)
    labels = sorted({str(s.y) for s in samples})
    return x, np.array([labels.index(str(s.y)) for s in samples])


def site_b(x: np.ndarray) -> np.ndarray:
    """Other meters: 1.6x gain, -0.8 offset, clock three readings off."""
    return np.roll(x * 1.6 - 0.8, 3, axis=-1).astype(np.float32)


def _train_base(x: np.ndarray, y: np.ndarray, folder: Path) -> str:
    torch.manual_seed(0)
    model = TimeSeriesCNN(channels=x.shape[1], classes=2)
    model.input_mean.fill_(float(x.mean()))
    model.input_std.fill_(float(x.std()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(300):
        idx = torch.randint(0, len(xs), (64,))
        loss = torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_builtin(model, folder, ["0", "1"])


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path, float]:
    """A base trained at site A, site B's data, and the frozen base's accuracy on B's held-out split."""
    tmp = tmp_path_factory.mktemp("sites")
    x, y = _ucr("ItalyPowerDemand")
    assert x.shape == (1096, 1, 24)
    site_a = np.arange(len(x)) % 2 == 0
    digest = _train_base(x[site_a], y[site_a], tmp / "base")
    data = tmp / "site-b"
    data.mkdir()
    np.savez(data / "meter.npz", x=site_b(x[~site_a]), y=y[~site_a].astype(str))
    base = load_base(tmp / "base", digest)
    dataset = NodeDataset(
        data, DataSpec.model_validate({"source": {"hostPath": "/d"}, "format": "npy", "evalFraction": 0.3})
    )
    held_out = list(dataset.iterate("eval"))
    with torch.no_grad():
        logits = base.model(torch.from_numpy(np.stack([np.asarray(s.x) for s in held_out])))
    frozen = float((logits.argmax(-1) == torch.tensor([int(s.y) for s in held_out])).float().mean())
    return tmp / "base", digest, data, frozen


@pytest.mark.parametrize("encoding", ["int8-zstd", "int4-zstd"])
def test_lora_adapts_a_site_a_model_to_site_b(
    tmp_path: Path, sites: tuple[Path, str, Path, float], encoding: str
) -> None:
    base_dir, digest, data, frozen_accuracy = sites
    cfg = config(
        tmp_path, data,
        baseModel={"uri": str(base_dir), "sha256": digest},
        data={"evalFraction": 0.3},
        peft={"r": 4, "alpha": 8, "dropout": 0.0},
        training={"maxSteps": 120, "batchSize": 32, "learningRate": 0.005, "evalEvery": 40, "checkpointEvery": 40},
        output={"encoding": encoding},
    )  # fmt: skip
    assert main(["--config", str(write_config(tmp_path, cfg))]) == 0
    summary = termination(tmp_path)
    adapted = summary["metrics"]["eval_accuracy"]
    shipped = summary["metrics"]["eval_accuracy_encoded"]
    shipped_bytes = sum(p.stat().st_size for p in (tmp_path / "work" / "package").iterdir())
    print(
        f"site B accuracy: frozen base {frozen_accuracy:.3f}, LoRA {adapted:.3f}, LoRA {encoding} {shipped:.3f}; "
        f"adapter {summary['adapterBytes']} bytes, package {shipped_bytes} bytes (weights + manifest; unsigned here)"
    )
    assert frozen_accuracy < 0.65  # the shift really hurts
    assert adapted >= frozen_accuracy + 0.2  # and the adapter recovers
    assert abs(shipped - adapted) <= 0.01  # quantising and compressing costs at most a point
    assert summary["adapterBytes"] < 20_000


@pytest.mark.parametrize("policy", ["resample", "padZero"])
def test_unequal_length_series_are_fitted_by_the_declared_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], policy: str
) -> None:
    """JapaneseVowels (UEA, in the sktime wheel): 12 channels, training series of 7 to 26 readings. The
    policy is explicit, the data event says what it did, and training works on the result."""
    spec = importlib.util.find_spec("sktime")
    assert spec is not None and spec.submodule_search_locations
    source = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "JapaneseVowels"
    data = tmp_path / "vowels"
    data.mkdir()
    (data / "train.ts").write_bytes((source / "JapaneseVowels_TRAIN.ts").read_bytes())
    cfg = config(
        tmp_path, data, data={"format": "ts", "evalFraction": 0.2, "lengthPolicy": policy},
        training={"maxSteps": 40, "batchSize": 32, "learningRate": 0.01, "evalEvery": 40, "checkpointEvery": 40},
    )  # fmt: skip
    assert main(["--config", str(write_config(tmp_path, cfg))]) == 0, termination(tmp_path)
    event = next(e for e in events(capsys.readouterr().out.splitlines()) if e["event"] == "data")
    assert (event["shortest"], event["longest"], event["length"]) == (7, 26, 26)
    assert event["length_policy"] == policy and 0 < event["refitted"] < event["samples"] == 270
    summary = termination(tmp_path)
    assert summary["status"] == "Succeeded" and summary["metrics"]["eval_accuracy"] > 1 / 9
