"""Node-local data: read csv, jsonl, npy/npz, text and UCR/UEA ``.ts`` files as a stream.

Design:
- Files are read lazily, one sample at a time; nothing holds the whole data set. A first pass
  (``scan``) counts samples, learns the label set and the series shape, and hashes the samples'
  content (after privacy filters) for lineage. Training passes stream again, through a bounded
  shuffle buffer seeded by (seed, epoch), so a resumed run replays the same order.
- Privacy filters run first, on the raw record (a csv row, a jsonl object, the named arrays of an
  npz file), before anything else sees it: dropped fields are gone, hashed fields are replaced by a
  salted SHA-256. A hashed field is an id, not a feature: it **groups** samples (a person, a
  machine, a meter), and a group is never split between training and evaluation.
- The evaluation split is chosen per sample from its content hash, or per group from the hashed
  ids: stable across runs and streaming-friendly.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgetune_api.training_job import Augmentation, DataSpec

SUFFIXES = {"csv": (".csv",), "jsonl": (".jsonl", ".json"), "npy": (".npy", ".npz"), "text": (".txt",), "ts": (".ts",)}


class DataError(ValueError):
    """The data on the node cannot be used; the message says which file and why."""


@dataclass
class Sample:
    """One training example: a series (channels x length, float32) or a text, and a label."""

    x: np.ndarray | str
    y: str | None
    group: str | None = None
    """The salted hashes of the record's hashFields: samples of one group share a side of the split."""


@dataclass
class DataInfo:
    """What the first pass learned. Contains no sample values."""

    samples: int
    train_samples: int
    eval_samples: int
    sha256: str
    labels: list[str]
    channels: int | None
    length: int | None
    """Readings every series is brought to (``seriesLength``, else the longest)."""
    kind: str  # "series" or "text"
    files: list[str] = field(default_factory=list)
    shortest: int | None = None
    longest: int | None = None
    refitted: int = 0
    """Series whose length differs from ``length`` (resampled, padded or cropped)."""
    eval_sha256: str | None = None
    """Digest of a separate evaluation set (``data.evalSource``); its samples are not in ``sha256``."""


class PrivacyFilter:
    """Drop or salt-hash named fields of a record before it is used for anything."""

    def __init__(self, drop: Sequence[str], hashed: Sequence[str], salt: bytes | None) -> None:
        if hashed and not salt:
            raise DataError("privacy.hashFields needs a salt (privacy.saltSecretRef)")
        self.drop = set(drop)
        self.hashed = set(hashed)
        self.salt = salt or b""

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in record.items():
            if key in self.drop:
                continue
            out[key] = self.hash(value) if key in self.hashed else value
        return out

    def hash(self, value: Any) -> str:
        return hashlib.sha256(self.salt + str(value).encode()).hexdigest()

    def group(self, record: dict[str, Any]) -> str | None:
        """The group of a filtered record: its hashed fields' values, in field order (None without any)."""
        values = [str(record[k]) for k in sorted(self.hashed) if k in record]
        return "/".join(values) if values else None


def _files(root: Path, fmt: str) -> list[Path]:
    if not root.exists():
        raise DataError(f"data folder {root} does not exist on this node")
    if root.is_file():
        return [root]
    found = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES[fmt])
    if fmt == "npy":
        found = [p for p in found if not p.name.startswith("labels")]
    if not found:
        raise DataError(f"no {fmt} files ({', '.join(SUFFIXES[fmt])}) under {root}")
    return found


def _series(values: Any, where: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: not a numeric series") from exc
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.size == 0:
        raise DataError(f"{where}: expected a series of shape (channels, length), got {arr.shape}")
    return np.nan_to_num(arr)


def _read_ts(path: Path) -> Iterator[Sample]:
    """UCR/UEA .ts: '@' header lines, then '@data', then 'dim1,...:dim2,...:label' per line."""
    in_data = False
    has_labels = True
    with path.open(encoding="utf-8", errors="replace") as fh:
        for number, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if not in_data:
                lower = line.lower()
                if lower.startswith("@classlabel"):
                    has_labels = lower.split()[1] == "true"
                elif lower.startswith("@data"):
                    in_data = True
                continue
            parts = line.split(":")
            label = parts.pop().strip() if has_labels else None
            where = f"{path.name}:{number}"
            try:
                dims = [[float(v) if v not in ("?", "NaN") else np.nan for v in p.split(",")] for p in parts]
            except ValueError as exc:
                raise DataError(f"{where}: not a .ts data line") from exc
            if len({len(d) for d in dims}) != 1:
                raise DataError(f"{where}: dimensions of unequal length are not supported")
            yield Sample(_series(dims, where), label)
    if not in_data:
        raise DataError(f"{path.name}: no @data section (not a UCR/UEA .ts file)")


def _record_sample(raw: dict[str, Any], spec: DataSpec, privacy: PrivacyFilter, where: str) -> Sample:
    record = privacy(raw)
    group = privacy.group(record)
    label = record.pop(spec.label_field, None) if spec.label_field else None
    label = None if label is None else str(label)
    if spec.text_field:
        if spec.text_field not in record:
            raise DataError(f"{where}: no field {spec.text_field!r}")
        return Sample(str(record[spec.text_field]), label, group)
    for key in ("series", "values", "x"):
        if key in record:
            return Sample(_series(record[key], where), label, group)
    numeric = []
    for key, value in record.items():
        if key in privacy.hashed:
            continue  # an id groups samples; it is never a feature
        try:
            numeric.append(float(value))
        except (TypeError, ValueError):
            continue  # other ids, free text: not features
    if not numeric:
        raise DataError(f"{where}: no numeric fields to train on")
    return Sample(_series(numeric, where), label, group)


def _read_text(path: Path) -> Iterator[Sample]:
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.strip():
                yield Sample(line.rstrip("\n"), None)


def _read_csv(path: Path, spec: DataSpec, privacy: PrivacyFilter) -> Iterator[Sample]:
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        for number, row in enumerate(csv.DictReader(fh), start=2):
            yield _record_sample(dict(row), spec, privacy, f"{path.name}:{number}")


def _read_jsonl(path: Path, spec: DataSpec, privacy: PrivacyFilter) -> Iterator[Sample]:
    with path.open(encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path.name}:{number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise DataError(f"{path.name}:{number}: expected a JSON object per line")
            yield _record_sample(record, spec, privacy, f"{path.name}:{number}")


def _read(path: Path, spec: DataSpec, privacy: PrivacyFilter) -> Iterator[Sample]:
    if spec.format == "ts":
        return _read_ts(path)
    if spec.format == "text":
        return _read_text(path)
    if spec.format == "csv":
        return _read_csv(path, spec, privacy)
    if spec.format == "jsonl":
        return _read_jsonl(path, spec, privacy)
    return _read_numpy(path, privacy)


def _read_numpy(path: Path, privacy: PrivacyFilter) -> Iterator[Sample]:
    """``.npy`` (plus ``labels.npy`` beside it) or ``.npz``, whose named arrays are fields: the
    privacy filters apply to them (a dropped array is never read, a hashed one groups its rows)."""
    groups = None
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                keys = set(archive.files) - privacy.drop
                x_key = next((k for k in ("x", "X", "data") if k in keys), None)
                if x_key is None:
                    raise DataError(f"{path.name}: npz needs an array named x, X or data (found {sorted(keys)}, "
                                    "after privacy.dropFields)")  # fmt: skip
                xs = archive[x_key]
                ys = archive["y"] if "y" in keys else None
                # Each hashed array read once: ``archive[name]`` reads and decompresses it on every access.
                ids = {k: archive[k] for k in sorted(privacy.hashed & keys) if k not in (x_key, "y")}
                for key, values in ids.items():
                    if len(values) != len(xs):
                        raise DataError(f"{path.name}: {len(xs)} samples but {len(values)} values of {key}")
                groups = ["/".join(privacy.hash(values[i]) for values in ids.values()) for i in range(len(xs))] \
                    if ids else None  # fmt: skip
        else:
            xs = np.load(path, mmap_mode="r", allow_pickle=False)  # memory-mapped: read row by row
            labels = path.with_name("labels.npy")
            ys = np.load(labels, allow_pickle=False) if labels.exists() else None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path.name}: cannot be read as a numpy array ({exc})") from exc
    if ys is not None and len(ys) != len(xs):
        raise DataError(f"{path.name}: {len(xs)} samples but {len(ys)} labels")
    for i in range(len(xs)):
        yield Sample(_series(xs[i], f"{path.name}[{i}]"), None if ys is None else str(ys[i]),
                     groups[i] if groups else None)  # fmt: skip


def _content_digest(sample: Sample) -> bytes:
    if isinstance(sample.x, str):
        body = sample.x.encode()
    else:
        body = np.ascontiguousarray(sample.x, dtype=np.float32).tobytes() + str(sample.x.shape).encode()
    return hashlib.sha256(body + b"\x00" + (sample.y or "").encode()).digest()


def is_eval(digest: bytes, fraction: float) -> bool:
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


class NodeDataset:
    """The data set on this node, as a re-iterable stream."""

    def __init__(self, root: Path, spec: DataSpec, salt: bytes | None = None, eval_root: Path | None = None) -> None:
        """``eval_root``: a separate labelled evaluation set (``data.evalSource``); then every sample
        under ``root`` trains and every one under ``eval_root`` is held out (no hash split)."""
        self.root = root
        self.spec = spec
        self.privacy = PrivacyFilter(spec.privacy.drop_fields, spec.privacy.hash_fields, salt)
        self.files = _files(root, spec.format)
        self.eval_files = _files(eval_root, spec.format) if eval_root is not None else None
        self._info: DataInfo | None = None

    def _stream(self) -> Iterator[tuple[Sample, bytes, bool]]:
        """Every sample with its content digest and whether it is held out."""
        for path in self.files:
            for sample in _read(path, self.spec, self.privacy):
                content = _content_digest(sample)
                # A group (hashed ids) goes to one side of the split as a whole: no id in both.
                by = hashlib.sha256(sample.group.encode()).digest() if sample.group else content
                yield sample, content, self.eval_files is None and is_eval(by, self.spec.eval_fraction)
        for path in self.eval_files or []:
            for sample in _read(path, self.spec, self.privacy):
                yield sample, _content_digest(sample), True

    def scan(self) -> DataInfo:
        """Count, hash and shape the data in one streaming pass."""
        if self._info is not None:
            return self._info
        digest = hashlib.sha256()
        held_digest = hashlib.sha256()
        labels: set[str] = set()
        total = evals = 0
        channels = None
        lengths: Counter[int] = Counter()
        kind = "text" if self.spec.format == "text" or self.spec.text_field else "series"
        for sample, content, held_out in self._stream():
            separate = held_out and self.eval_files is not None
            (held_digest if separate else digest).update(content)  # lineage: the node's own data
            total += 1
            evals += held_out
            if sample.y is not None:
                labels.add(sample.y)
            if isinstance(sample.x, str):
                continue
            if channels is None:
                channels = int(sample.x.shape[0])
            elif sample.x.shape[0] != channels:
                raise DataError(f"samples disagree on the channel count ({sample.x.shape[0]} vs {channels})")
            lengths[int(sample.x.shape[1])] += 1
        length = (self.spec.series_length or max(lengths)) if lengths else None
        self._info = DataInfo(
            samples=total,
            train_samples=total - evals,
            eval_samples=evals,
            sha256=digest.hexdigest(),
            labels=sorted(labels, key=_label_key),
            channels=channels,
            length=length,
            kind=kind,
            files=[str(p.relative_to(self.root)) if p != self.root else p.name for p in self.files],
            shortest=min(lengths) if lengths else None,
            longest=max(lengths) if lengths else None,
            refitted=sum(n for size, n in lengths.items() if size != length),
            eval_sha256=held_digest.hexdigest() if self.eval_files is not None else None,
        )
        return self._info

    def iterate(self, split: str) -> Iterator[Sample]:
        """Samples of the ``train`` or ``eval`` split (or ``all``), in file order."""
        want_eval = split == "eval"
        for sample, _, held_out in self._stream():
            if split == "all" or held_out == want_eval:
                yield sample

    def shuffled(self, seed: int, epoch: int, buffer: int = 1024) -> Iterator[Sample]:
        """Training samples through a bounded shuffle buffer; the same (seed, epoch) gives the same order."""
        rng = random.Random(seed * 1_000_003 + epoch)  # noqa: S311 - data order, not security
        pool: list[Sample] = []
        for sample in self.iterate("train"):
            pool.append(sample)
            if len(pool) >= buffer:
                yield pool.pop(rng.randrange(len(pool)))
        while pool:
            yield pool.pop(rng.randrange(len(pool)))


def local_dataset(folder: Path, data_format: str, *, label_field: str | None = None,
                  eval_fraction: float = 0.1) -> NodeDataset:  # fmt: skip
    """A labelled folder read the way a job reads its node's data (tools, the agent's eval data)."""
    spec = DataSpec.model_validate({"source": {"hostPath": str(folder)}, "format": data_format,
                                    "labelField": label_field, "evalFraction": eval_fraction})  # fmt: skip
    return NodeDataset(folder, spec, None)


def _label_key(label: str) -> tuple[int, float | str]:
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)


def fit_length(x: np.ndarray, length: int, policy: str = "resample") -> np.ndarray:
    """Bring a (channels, L) series to ``length`` readings (``DataSpec.length_policy``)."""
    current = x.shape[1]
    if current == length:
        return x
    if policy == "resample":
        if current == 1:
            return np.repeat(x, length, axis=1).astype(np.float32, copy=False)
        grid = np.linspace(0.0, current - 1.0, length)
        return np.stack([np.interp(grid, np.arange(current), ch) for ch in x]).astype(np.float32)
    if current > length:
        return x[:, :length]
    if policy == "padLast":
        return np.pad(x, ((0, 0), (0, length - current)), mode="edge")
    return np.pad(x, ((0, 0), (0, length - current)))


def augment(x: np.ndarray, aug: Augmentation, rng: np.random.Generator) -> np.ndarray:
    """Noise, jitter (time shift) and crop-and-resize, each only when configured."""
    out = x
    if aug.crop_fraction > 0:
        length = out.shape[1]
        keep = max(2, round(length * (1 - rng.uniform(0, aug.crop_fraction))))
        start = int(rng.integers(0, length - keep + 1))
        window = out[:, start : start + keep]
        grid = np.linspace(0, keep - 1, length)
        out = np.stack([np.interp(grid, np.arange(keep), ch) for ch in window]).astype(np.float32)
    if aug.jitter_steps > 0:
        out = np.roll(out, int(rng.integers(-aug.jitter_steps, aug.jitter_steps + 1)), axis=1)
    if aug.noise_std > 0:
        scale = float(np.std(out)) or 1.0
        out = out + rng.normal(0.0, aug.noise_std * scale, size=out.shape).astype(np.float32)
    return out.astype(np.float32, copy=False)
