"""The node-local data pipeline: formats, privacy filters, splits, order, augmentation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from edgetune_api.training_job import Augmentation, DataSpec
from edgetune_trainer.data import DataError, NodeDataset, augment, fit_length

TS = """# a comment
@problemName Tiny
@timeStamps false
@univariate false
@dimensions 2
@equalLength true
@seriesLength 4
@classLabel true up down
@data
1,2,3,4:10,20,30,40:up
4,3,2,1:40,30,20,10:down
1,2,?,4:1,1,1,1:up
"""


def spec(fmt: str, **extra: object) -> DataSpec:
    return DataSpec.model_validate({"source": {"hostPath": "/data"}, "format": fmt, **extra})


def test_ts_files_parse_multivariate_with_labels_and_missing_values(tmp_path: Path) -> None:
    (tmp_path / "tiny.ts").write_text(TS)
    data = NodeDataset(tmp_path, spec("ts", evalFraction=0.01))
    info = data.scan()
    assert (info.samples, info.channels, info.length, info.labels) == (3, 2, 4, ["down", "up"])
    samples = list(data.iterate("train")) + list(data.iterate("eval"))
    first = next(s for s in samples if s.y == "down")
    assert first.x.tolist() == [[4, 3, 2, 1], [40, 30, 20, 10]]
    assert any(np.all(s.x[0] == [1, 2, 0, 4]) for s in samples)  # '?' became 0


def test_csv_privacy_filters_drop_and_hash_before_use(tmp_path: Path) -> None:
    (tmp_path / "shop.csv").write_text(
        "customer,loyalty_id,temp,vib,label\nAlice Smith,L-991,21.5,0.3,ok\nBob,L-992,80.1,2.9,fault\n"
    )
    data = NodeDataset(
        tmp_path,
        spec(
            "csv",
            labelField="label",
            privacy={
                "dropFields": ["customer"],
                "hashFields": ["loyalty_id"],
                "saltSecretRef": {"name": "s", "key": "k"},
            },
        ),
        salt=b"pepper",
    )
    record = data.privacy({"customer": "Alice Smith", "loyalty_id": "L-991", "temp": "21.5"})
    assert "customer" not in record
    assert record["loyalty_id"] != "L-991" and len(record["loyalty_id"]) == 64
    samples = list(data.iterate("train")) + list(data.iterate("eval"))
    rows = sorted(s.x.tolist()[0] for s in samples)
    assert np.allclose(rows, [[21.5, 0.3], [80.1, 2.9]])  # the numeric fields only, as float32
    assert {s.y for s in samples} == {"ok", "fault"}


PRIVATE = {"hashFields": ["meter_id"], "dropFields": ["owner"], "saltSecretRef": {"name": "s", "key": "k"}}


def _sides(data: NodeDataset) -> tuple[dict[str | None, int], dict[str | None, int]]:
    train: dict[str | None, int] = {}
    held: dict[str | None, int] = {}
    for side, split in ((train, "train"), (held, "eval")):
        for sample in data.iterate(split):
            side[sample.group] = side.get(sample.group, 0) + 1
    return train, held


def test_hashed_ids_group_samples_and_a_group_never_straddles_the_split(tmp_path: Path) -> None:
    """A hashed field is an id, usable as one: every reading of one meter lands on the same side of
    the split (no meter in both training and evaluation), and the hash never becomes a feature."""
    rng = np.random.default_rng(0)
    rows = ["owner,meter_id,kwh,volts,label"] + [
        f"Household {m},MTR-{m:04d},{rng.normal():.3f},{rng.normal():.3f},{m % 2}" for m in range(40) for _ in range(5)
    ]
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "meters.csv").write_text("\n".join(rows) + "\n")
    data = NodeDataset(tmp_path / "csv", spec("csv", labelField="label", evalFraction=0.3, privacy=PRIVATE),
                       salt=b"pepper")  # fmt: skip
    train, held = _sides(data)
    assert not set(train) & set(held) and held and train  # whole meters on each side
    assert all(count == 5 for count in (*train.values(), *held.values()))
    expected = {hashlib.sha256(b"pepper" + f"MTR-{m:04d}".encode()).hexdigest() for m in range(40)}
    assert set(train) | set(held) == expected  # the salted hash of each id, never the id itself
    assert all(s.x.shape == (1, 2) for s in data.iterate("train"))  # kwh, volts: no id, no owner
    # The same filters apply to the named arrays of an npz file.
    (tmp_path / "npz").mkdir()
    meters = np.repeat(np.arange(40), 5)
    np.savez(tmp_path / "npz" / "meters.npz", x=rng.normal(size=(200, 1, 8)).astype(np.float32), y=meters % 2,
             meter_id=meters, owner=np.array([f"Household {m}" for m in meters]))  # fmt: skip
    data = NodeDataset(tmp_path / "npz", spec("npy", evalFraction=0.3, privacy=PRIVATE), salt=b"pepper")
    train, held = _sides(data)
    assert not set(train) & set(held) and len(set(train) | set(held)) == 40
    assert hashlib.sha256(b"pepper" + b"7").hexdigest() in set(train) | set(held)
    np.savez(tmp_path / "npz" / "meters.npz", x=np.zeros((3, 1, 4)), owner=np.zeros(3))
    with pytest.raises(DataError, match=r"after privacy\.dropFields"):
        NodeDataset(tmp_path / "npz", spec("npy", privacy={"dropFields": ["x"]})).scan()


def test_hash_fields_without_salt_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("id,x\n1,2\n")
    with pytest.raises(DataError, match="needs a salt"):
        NodeDataset(tmp_path, spec("csv", privacy={"hashFields": ["id"], "saltSecretRef": {"name": "s", "key": "k"}}))


def test_jsonl_series_and_text(tmp_path: Path) -> None:
    (tmp_path / "s.jsonl").write_text(
        json.dumps({"series": [[1, 2, 3]], "label": 1})
        + "\n\n"
        + json.dumps({"series": [[3, 2, 1]], "label": 0})
        + "\n"
    )
    info = NodeDataset(tmp_path, spec("jsonl", labelField="label")).scan()
    assert (info.samples, info.channels, info.length, info.labels) == (2, 1, 3, ["0", "1"])
    text_dir = tmp_path / "t"
    text_dir.mkdir()
    (text_dir / "notes.jsonl").write_text(json.dumps({"text": "valve stuck"}) + "\n")
    data = NodeDataset(text_dir, spec("jsonl", textField="text"))
    assert data.scan().kind == "text"
    assert [s.x for s in data.iterate("train")] + [s.x for s in data.iterate("eval")] == ["valve stuck"]


def test_bad_json_line_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "s.jsonl").write_text('{"series": [1]}\n{oops\n')
    with pytest.raises(DataError, match=r"s\.jsonl:2: not valid JSON"):
        NodeDataset(tmp_path, spec("jsonl")).scan()


def test_npy_with_labels_file_and_npz(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((5, 2, 8), dtype=np.float32))
    np.save(tmp_path / "labels.npy", np.array([0, 1, 0, 1, 1]))
    info = NodeDataset(tmp_path, spec("npy")).scan()
    assert (info.samples, info.channels, info.length, info.labels) == (5, 2, 8, ["0", "1"])
    other = tmp_path / "z"
    other.mkdir()
    np.savez(other / "d.npz", x=np.zeros((3, 10)), y=np.array(["a", "b", "a"]))
    assert NodeDataset(other, spec("npy")).scan().labels == ["a", "b"]
    np.savez(other / "bad.npz", features=np.zeros(3))
    with pytest.raises(DataError, match="npz needs an array named x"):
        NodeDataset(other, spec("npy")).scan()


def test_missing_and_empty_folders_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist on this node"):
        NodeDataset(tmp_path / "nope", spec("csv"))
    with pytest.raises(DataError, match=r"no text files \(\.txt\)"):
        NodeDataset(tmp_path, spec("text"))


def _series_dir(tmp_path: Path, n: int = 200) -> Path:
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(n, 1, 16)).astype(np.float32), y=rng.integers(0, 2, n))
    return tmp_path


def test_eval_split_is_stable_and_disjoint(tmp_path: Path) -> None:
    data = NodeDataset(_series_dir(tmp_path), spec("npy", evalFraction=0.25))
    info = data.scan()
    train = [s.x.tobytes() for s in data.iterate("train")]
    evals = [s.x.tobytes() for s in data.iterate("eval")]
    assert len(train) == info.train_samples and len(evals) == info.eval_samples
    assert not set(train) & set(evals)
    assert 0.15 < len(evals) / info.samples < 0.35
    again = NodeDataset(tmp_path, spec("npy", evalFraction=0.25))
    assert [s.x.tobytes() for s in again.iterate("eval")] == evals
    assert again.scan().sha256 == info.sha256


def test_shuffle_is_deterministic_per_epoch_and_complete(tmp_path: Path) -> None:
    data = NodeDataset(_series_dir(tmp_path), spec("npy"))
    a = [s.x.tobytes() for s in data.shuffled(seed=7, epoch=0, buffer=16)]
    b = [s.x.tobytes() for s in data.shuffled(seed=7, epoch=0, buffer=16)]
    c = [s.x.tobytes() for s in data.shuffled(seed=7, epoch=1, buffer=16)]
    assert a == b
    assert a != c
    assert sorted(a) == sorted(s.x.tobytes() for s in data.iterate("train"))


def test_augmentation_keeps_shape_and_changes_values() -> None:
    x = np.sin(np.linspace(0, 6, 50, dtype=np.float32))[None, :].repeat(3, axis=0)
    out = augment(x, Augmentation(noise_std=0.1, jitter_steps=3, crop_fraction=0.2), np.random.default_rng(0))
    assert out.shape == x.shape and out.dtype == np.float32
    assert not np.allclose(out, x)
    assert np.array_equal(augment(x, Augmentation(), np.random.default_rng(0)), x)
    assert fit_length(x, 40).shape == (3, 40)
    assert fit_length(x, 60, "padZero")[:, 50:].sum() == 0


def test_series_of_other_lengths_follow_the_declared_policy() -> None:
    from edgetune_trainer.data import fit_length  # noqa: PLC0415

    x = np.array([[0.0, 1.0, 2.0]], dtype=np.float32)
    assert fit_length(x, 5, "resample").tolist() == [[0.0, 0.5, 1.0, 1.5, 2.0]]  # shape kept
    assert fit_length(x, 5, "padLast").tolist() == [[0.0, 1.0, 2.0, 2.0, 2.0]]
    assert fit_length(x, 5, "padZero").tolist() == [[0.0, 1.0, 2.0, 0.0, 0.0]]
    assert fit_length(x, 2, "padLast").tolist() == [[0.0, 1.0]]  # longer ones are cropped
    assert fit_length(x, 2, "resample").tolist() == [[0.0, 2.0]]  # or resampled
