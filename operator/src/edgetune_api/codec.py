"""Adapter weight encodings, in numpy: one implementation for the trainer (which writes them), the
operator (which averages per-node adapters without torch) and the edge agent (which loads them).

- ``fp32`` / ``fp16``: ``adapter.safetensors`` holding the LoRA tensors in that precision.
- ``int8-zstd``: symmetric int8 quantisation in blocks of ``BLOCK`` values (int8 tensor + one fp32
  scale per block, stored as ``<name>`` and ``<name>.__scale__``), then the safetensors bytes are
  zstd-compressed into ``adapter.safetensors.zst``.
- ``int4-zstd``: 4-bit codes packed two per byte and one fp16 scale per ``BLOCK4`` (32) values;
  per tensor, evenly spaced levels (-8..7) or normal-quantile ones (``LEVELS``), whichever is
  closer; each block's scale chosen to minimise its squared error (clipping the largest values
  when that is closer overall). Tensor shapes, level tables and the block
  size travel in the safetensors metadata (packages written before those were recorded used
  blocks of 128 and evenly spaced levels, and still decode). Measured: ``bench/bench_adapters.py``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from statistics import NormalDist

import numpy as np
import numpy.typing as npt
import zstandard
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

Array = npt.NDArray[np.float32]

SCALE_SUFFIX = ".__scale__"
BLOCK = 64  # values per int8 scale: 6 % overhead, error bounded by each block's own range
BLOCK4 = 32  # values per int4 scale (fp16): 4.5 bits per value before zstd (128 until 2026-11-29: bench_adapters)
BLOCK4_LEGACY = 128  # the block size of int4 packages that do not record theirs
BLOCK4_KEY = "__int4_block__"  # safetensors metadata: the int4 block size
CLIP_CANDIDATES = np.linspace(0.55, 1.0, 10, dtype=np.float32)
"""Fractions of a block's largest magnitude tried as its clipping point (1.0: plain absmax)."""
MAX_DECODED_BYTES = 1 << 30
"""Decompressed weights are refused beyond this (1 GiB: far above any adapter, KB to MB, far below
what a small zstd frame declaring a huge size would make a reader allocate)."""
WEIGHTS = {
    "fp32": "adapter.safetensors",
    "fp16": "adapter.safetensors",
    "int8-zstd": "adapter.safetensors.zst",
    "int4-zstd": "adapter.safetensors.zst",
}


def _blocks(array: npt.NDArray[np.generic], size: int) -> npt.NDArray[np.float32]:
    flat = np.asarray(array, dtype=np.float32).reshape(-1)
    return np.pad(flat, (0, (-flat.size) % size)).reshape(-1, size)


def _unblock(blocks: npt.NDArray[np.generic], shape: tuple[int, ...]) -> npt.NDArray[np.float32]:
    numel = int(np.prod(shape, dtype=np.int64))
    return np.asarray(blocks, dtype=np.float32).reshape(-1)[:numel].reshape(shape)


def quantize_int8(array: Array) -> tuple[npt.NDArray[np.int8], Array]:
    """Symmetric int8 in blocks of ``BLOCK`` consecutive values: (int8 values in the array's shape, scales)."""
    blocks = _blocks(array, BLOCK)
    scale = np.maximum(np.abs(blocks).max(axis=1), 1e-12).astype(np.float32) / np.float32(127.0)
    q = np.clip(np.round(blocks / scale[:, None]), -127, 127).astype(np.int8)
    return q.reshape(-1)[: array.size].reshape(array.shape), scale


def dequantize_int8(q: npt.NDArray[np.int8], scale: Array) -> Array:
    return _unblock(_blocks(q, BLOCK) * scale[:, None], tuple(q.shape))


def _normal_float_levels() -> npt.NDArray[np.float32]:
    """16 levels at equal-probability quantiles of a standard normal, zero exact, scaled to +-7: the
    "NormalFloat" construction of QLoRA (Dettmers et al., 2023), computed here. Closer than evenly
    spaced levels for bell-shaped weights (a trained ``lora_B``), farther for flat ones (``lora_A`` near
    its uniform initialisation): the encoder picks per tensor."""
    normal = NormalDist()
    edge = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
    positive = [normal.inv_cdf(float(p)) for p in np.linspace(0.5, edge, 9)[1:]]
    negative = [-normal.inv_cdf(float(p)) for p in np.linspace(0.5, edge, 8)[1:]]
    levels: npt.NDArray[np.float32] = np.array(sorted([*negative, 0.0, *positive]), dtype=np.float32)
    return levels / np.float32(np.abs(levels).max()) * np.float32(7)


LEVELS: dict[str, npt.NDArray[np.float32]] = {
    "int": np.arange(-8, 8, dtype=np.float32),  # index i is the level i - 8 (the original int4 code)
    "nf": _normal_float_levels(),
}
"""int4 level tables: a 4-bit code ``i`` decodes to ``LEVELS[table][i] * scale``."""
LEVELS_SUFFIX = ".__levels__"  # safetensors metadata: a tensor's level table when it is not "int"
_CHUNK = 1 << 15  # blocks searched at once: bounds the search's memory for adapters of millions of values


def _int4(
    array: Array, block: int, search: bool, table: str
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float16], float]:
    """4-bit codes packed two per byte, fp16 scales, and the squared error they leave."""
    levels = LEVELS[table]
    midpoints = (levels[1:] + levels[:-1]) / 2
    blocks = _blocks(array, block)
    fractions = CLIP_CANDIDATES if search else np.ones(1, dtype=np.float32)
    codes = np.empty(blocks.shape, dtype=np.uint8)
    scales = np.empty(blocks.shape[0], dtype=np.float16)
    error = 0.0
    for start in range(0, blocks.shape[0], _CHUNK):
        part = blocks[start : start + _CHUNK]
        top = np.maximum(np.abs(part).max(axis=1), 1e-12)
        # (candidates, blocks): each candidate scale as stored (fp16), each block's codes and error with it.
        tried = (fractions[:, None] * top[None, :] / np.float32(7.0)).astype(np.float16).astype(np.float32)
        tried = np.maximum(tried, np.float32(np.finfo(np.float16).tiny))
        index = np.searchsorted(midpoints, part[None] / tried[:, :, None]).astype(np.uint8)
        errors = ((levels[index] * tried[:, :, None] - part[None]) ** 2).sum(axis=2)
        best = errors.argmin(axis=0)
        rows = np.arange(part.shape[0])
        codes[start : start + _CHUNK] = index[best, rows]
        scales[start : start + _CHUNK] = tried[best, rows].astype(np.float16)
        error += float(errors[best, rows].sum())
    pairs = codes.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).astype(np.uint8), scales, error


def quantize_int4(
    array: Array, block: int = BLOCK4, *, search: bool = True, levels: str = "int"
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float16]]:
    """4-bit codes in blocks of ``block`` values, two per byte ((low) | (high) << 4), and one fp16
    scale per block: (packed uint8, scales). With ``search``, each block's scale is the one among
    ``CLIP_CANDIDATES`` x absmax / 7 that leaves the least squared error."""
    packed, scales, _ = _int4(np.asarray(array, dtype=np.float32), block, search, levels)
    return packed, scales


def dequantize_int4(
    packed: npt.NDArray[np.uint8], scale: npt.NDArray[np.float16], shape: tuple[int, ...], block: int = BLOCK4,
    levels: str = "int",
) -> Array:  # fmt: skip
    codes = np.stack([packed & 0xF, packed >> 4], axis=1).reshape(-1, block)
    return _unblock(LEVELS[levels][codes] * scale.astype(np.float32)[:, None], shape)


def encode(state: Mapping[str, Array], encoding: str) -> bytes:
    """Adapter tensors (float arrays) -> the bytes of the weights file for ``encoding``."""
    if encoding == "fp32":
        return st_save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()})
    if encoding == "fp16":
        return st_save({k: np.ascontiguousarray(v, dtype=np.float16) for k, v in state.items()})
    if encoding not in WEIGHTS:
        raise ValueError(f"unknown encoding {encoding!r}")
    out: dict[str, npt.NDArray[np.generic]] = {}
    shapes: dict[str, str] = {}
    if encoding == "int8-zstd":
        for name, array in state.items():
            out[name], out[name + SCALE_SUFFIX] = quantize_int8(array)
    else:
        for name, array in state.items():
            out[name], out[name + SCALE_SUFFIX], table = best_int4(np.asarray(array, dtype=np.float32))
            shapes[name] = json.dumps(list(array.shape))
            if table != "int":
                shapes[name + LEVELS_SUFFIX] = table
        shapes[BLOCK4_KEY] = str(BLOCK4)
    raw = st_save({k: np.ascontiguousarray(v) for k, v in out.items()}, metadata=shapes or None)
    return bytes(zstandard.ZstdCompressor(level=19).compress(raw))


def best_int4(array: Array, block: int = BLOCK4) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float16], str]:
    """The tensor in whichever level table leaves the smaller squared error: (packed, scales, table)."""
    tried = {table: _int4(array, block, True, table) for table in LEVELS}
    table = min(tried, key=lambda t: tried[t][2])
    return tried[table][0], tried[table][1], table


class DecodeError(ValueError):
    """The weights cannot be decoded safely (too large once decompressed, or not a zstd frame)."""


def decompress(data: bytes, limit: int = MAX_DECODED_BYTES) -> bytes:
    """zstd-decompress with a bound: a frame that declares (or turns out) larger than ``limit`` is
    refused before the memory is spent, however small the frame itself is."""
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise DecodeError(f"not a zstd frame: {exc}") from None
    if declared > limit:
        raise DecodeError(f"the weights declare {declared} bytes once decompressed, more than the limit {limit}")
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
            while chunk := reader.read(min(1 << 20, limit + 1 - len(out))):
                out += chunk
                if len(out) > limit:
                    raise DecodeError(f"the weights decompress to more than the limit of {limit} bytes")
    except zstandard.ZstdError as exc:
        raise DecodeError(f"corrupt zstd data: {exc}") from None
    return bytes(out)


def decode(data: bytes, encoding: str, limit: int = MAX_DECODED_BYTES) -> dict[str, Array]:
    """The inverse of ``encode`` (fp32 arrays out); compressed encodings are bounded by ``limit``.
    Bytes that are not what ``encoding`` says raise ``DecodeError``, whatever the parser's complaint."""
    if encoding not in WEIGHTS:
        raise ValueError(f"unknown encoding {encoding!r}")
    try:
        if encoding in ("fp32", "fp16"):
            return {k: v.astype(np.float32) for k, v in st_load(data).items()}
        raw_bytes = decompress(data, limit)
        raw = st_load(raw_bytes)
        names = [k for k in raw if not k.endswith(SCALE_SUFFIX)]
        if encoding == "int8-zstd":
            return {k: dequantize_int8(raw[k], raw[k + SCALE_SUFFIX]) for k in names}
        shapes = _metadata(raw_bytes)
        block = int(shapes.get(BLOCK4_KEY, BLOCK4_LEGACY))  # a nonsensical one fails the reshape below
        return {
            k: dequantize_int4(raw[k], raw[k + SCALE_SUFFIX], tuple(json.loads(shapes[k])), block,
                               shapes.get(k + LEVELS_SUFFIX, "int"))
            for k in names
        }  # fmt: skip
    except DecodeError:
        raise
    except (SafetensorError, ValueError, KeyError, IndexError, TypeError) as exc:  # malformed content
        raise DecodeError(f"not {encoding} adapter weights: {type(exc).__name__}: {exc}") from None


def _metadata(safetensors_bytes: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (its JSON header)."""
    header_len = int.from_bytes(safetensors_bytes[:8], "little")
    header = json.loads(safetensors_bytes[8 : 8 + header_len])
    return dict(header.get("__metadata__") or {})
