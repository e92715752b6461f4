"""The demo's sensor data: ItalyPowerDemand (UCR archive, shipped inside the sktime wheel).

The story it tells: a base model is trained in the lab on the old meters (half of the series). The
fleet's meters were then replaced — 1.6x gain, -0.8 offset, a clock three readings late — and the
frozen base is no better than chance on them. The other half of the series, read through the new
meters, is split between the two sites: most of it stays on the nodes as training data, the rest
is the labelled check set the inference workloads score every candidate adapter on. One node's
sensor on the farm was wired the wrong way round: its labels are inverted.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DATASET = "ItalyPowerDemand"
MISWIRED_NODE = "farm-npu-1"


def meters_replaced(x: np.ndarray) -> np.ndarray:
    """What the new meters read for the same demand: 1.6x gain, -0.8 offset, three readings late."""
    return np.roll(x * 1.6 - 0.8, 3, axis=-1).astype(np.float32)


@dataclass(frozen=True)
class Site:
    name: str
    cluster: str
    train_x: np.ndarray
    train_y: np.ndarray
    check_x: np.ndarray
    check_y: np.ndarray


@dataclass(frozen=True)
class SensorData:
    lab_x: np.ndarray
    lab_y: np.ndarray
    sites: dict[str, Site]

    def write_lab(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "lab.npz", x=self.lab_x, y=self.lab_y)
        return folder

    def write_node(self, folder: Path, site: str, node: str) -> int:
        """A node's own share of its site's data (a seeded 85 % sample, so nodes differ); the miswired
        node's labels are inverted. Returns the number of samples."""
        s = self.sites[site]
        rng = np.random.default_rng(_seed(node))
        keep = np.sort(rng.choice(len(s.train_x), size=int(len(s.train_x) * 0.85), replace=False))
        y = s.train_y[keep]
        if node == MISWIRED_NODE:
            y = np.where(y == "1", "2", "1")
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "meter.npz", x=s.train_x[keep], y=y)
        return len(keep)

    def write_check(self, folder: Path, site: str) -> Path:
        s = self.sites[site]
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "check.npz", x=s.check_x, y=s.check_y)
        return folder


def inference_request(x: np.ndarray) -> dict[str, list[dict[str, Any]]]:
    """An Open Inference Protocol request (JSON tensors) for a batch of series, as the agent takes it."""
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}]}


def _seed(node: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(node))


def dataset_folder() -> Path:
    spec = importlib.util.find_spec("sktime")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the sktime wheel (its data sets) is missing: run scripts/bootstrap.sh")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / DATASET


def _read_ts(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows, labels = [], []
    in_data = False
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.lower() == "@data":
            in_data = True
            continue
        if in_data:
            *dims, label = line.split(":")
            rows.append([[float(v) for v in d.split(",")] for d in dims])
            labels.append(label)
    return np.asarray(rows, dtype=np.float32), np.asarray(labels)


def load(sites: dict[str, str]) -> SensorData:
    """``sites``: site name -> cluster name, in the order the fleet's half is split between them."""
    folder = dataset_folder()
    parts = [_read_ts(folder / f"{DATASET}_{split}.ts") for split in ("TRAIN", "TEST")]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    lab = np.arange(len(x)) % 2 == 0
    fleet_x, fleet_y = meters_replaced(x[~lab]), y[~lab]
    out: dict[str, Site] = {}
    for i, (site, cluster) in enumerate(sites.items()):
        share = slice(i * len(fleet_x) // len(sites), (i + 1) * len(fleet_x) // len(sites))
        sx, sy = fleet_x[share], fleet_y[share]
        cut = int(len(sx) * 0.7)
        out[site] = Site(site, cluster, sx[:cut], sy[:cut], sx[cut:], sy[cut:])
    return SensorData(x[lab], y[lab], out)
