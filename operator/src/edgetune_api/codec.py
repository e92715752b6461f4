"""Adapter weight encodings, in numpy: one implementation for the trainer (which writes them), the
operator (which averages per-node adapters without torch) and the edge agent (which loads them).

- ``fp32`` / ``fp16``: ``adapter.safetensors`` holding the LoRA tensors in that precision.
- ``int8-zstd``: symmetric int8 quantisation in blocks of ``BLOCK`` values (int8 tensor + one fp32
  scale per block, stored as ``<name>`` and ``<name>.__scale__``), then the safetensors bytes are
  zstd-compressed into ``adapter.safetensors.zst``.
- ``int4-zstd``: the same with 4-bit levels (-7..7) packed two per byte and one fp16 scale per
  ``BLOCK4`` values; tensor shapes travel in the safetensors metadata.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
import zstandard
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

Array = npt.NDArray[np.float32]

SCALE_SUFFIX = ".__scale__"
BLOCK = 64  # values per int8 scale: 6 % overhead, error bounded by each block's own range
BLOCK4 = 128  # values per int4 scale (fp16), the usual 4-bit group size: 4.125 bits per value before zstd
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


def quantize_int4(array: Array) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float16]]:
    """Symmetric 4-bit in blocks of ``BLOCK4`` values, two values per byte: (packed uint8, fp16 scales).
    Levels -7..7; a byte holds (low + 8) | (high + 8) << 4."""
    blocks = _blocks(array, BLOCK4)
    scale = (np.maximum(np.abs(blocks).max(axis=1), 1e-12) / np.float32(7.0)).astype(np.float16)
    q = np.clip(np.round(blocks / scale.astype(np.float32)[:, None]), -7, 7).astype(np.int16) + 8
    pairs = q.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).astype(np.uint8), scale


def dequantize_int4(packed: npt.NDArray[np.uint8], scale: npt.NDArray[np.float16], shape: tuple[int, ...]) -> Array:
    as_int = packed.astype(np.int16)
    q = np.stack([as_int & 0xF, as_int >> 4], axis=1).reshape(-1, BLOCK4) - 8
    return _unblock(q.astype(np.float32) * scale.astype(np.float32)[:, None], shape)


def encode(state: Mapping[str, Array], encoding: str) -> bytes:
    """Adapter tensors (float arrays) -> the bytes of the weights file for ``encoding``."""
    if encoding == "fp32":
        return st_save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()})
    if encoding == "fp16":
        return st_save({k: np.ascontiguousarray(v, dtype=np.float16) for k, v in state.items()})
    out: dict[str, npt.NDArray[np.generic]] = {}
    shapes: dict[str, str] = {}
    for name, array in state.items():
        if encoding == "int8-zstd":
            out[name], out[name + SCALE_SUFFIX] = quantize_int8(array)
        elif encoding == "int4-zstd":
            out[name], out[name + SCALE_SUFFIX] = quantize_int4(array)
            shapes[name] = json.dumps(list(array.shape))
        else:
            raise ValueError(f"unknown encoding {encoding!r}")
    raw = st_save({k: np.ascontiguousarray(v) for k, v in out.items()}, metadata=shapes or None)
    return bytes(zstandard.ZstdCompressor(level=19).compress(raw))


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
        return {k: dequantize_int4(raw[k], raw[k + SCALE_SUFFIX], tuple(json.loads(shapes[k]))) for k in names}
    except DecodeError:
        raise
    except (SafetensorError, ValueError, KeyError, IndexError, TypeError) as exc:  # malformed content
        raise DecodeError(f"not {encoding} adapter weights: {type(exc).__name__}: {exc}") from None


def _metadata(safetensors_bytes: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (its JSON header)."""
    header_len = int.from_bytes(safetensors_bytes[:8], "little")
    header = json.loads(safetensors_bytes[8 : 8 + header_len])
    return dict(header.get("__metadata__") or {})
