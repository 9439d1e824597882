"""Minimal streaming safetensors reader and writer (numpy + ml_dtypes; no torch, no unpickling).

Reading validates the whole header up front (so a truncated or corrupt file fails before any
output is written) and then maps tensors lazily from disk one at a time. Writing streams: the
header is computed from (key, shape, dtype) declarations, then each tensor's bytes are written
as it is produced, so only one tensor needs to be in memory.

Format: 8-byte little-endian header length N, N bytes of JSON
{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the
data buffer; offsets are relative to the buffer start.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

from qwen_jax.conversion.errors import ConversionError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_MAX_HEADER = 100 * 2**20  # the format's own limit on header size


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    key: str
    path: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def refuse_pickle(path: Path) -> None:
    """Raises for pickle-based checkpoints (by suffix or content): loading them can run code."""
    path = Path(path)
    head = b""
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(4)
    if path.suffix.lower() in PICKLE_SUFFIXES or head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        raise ConversionError(
            f"{path}: refusing a pickle-based checkpoint (unpickling can run code); convert it to safetensors first"
        )


class SafetensorsFile:
    """Header of one .safetensors file, validated; tensors are read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        refuse_pickle(self.path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ConversionError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise ConversionError(
                    f"{self.path}: corrupt or truncated safetensors file (header of {n} bytes, file of {size})")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConversionError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise ConversionError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        for key, entry in header.items():
            self.tensors[key] = self._validate(key, entry, size)

    def _validate(self, key, entry, size) -> TensorInfo:
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{self.path}: corrupt safetensors entry for tensor {key!r}: {entry!r}") from None
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or begin < 0:
            raise ConversionError(f"{self.path}: corrupt safetensors entry for {key!r}: offsets do not match shape")
        if self.data_start + end > size:
            raise ConversionError(
                f"{self.path}: truncated safetensors file: tensor {key!r} ends at byte {self.data_start + end}"
                f" but the file has {size} bytes")
        return TensorInfo(key, self.path, dtype, shape, self.data_start + begin, self.data_start + end)


def read_tensor(info: TensorInfo) -> np.ndarray:
    """The tensor's values as a read-only array mapped from disk (no copy until used)."""
    if info.nbytes == 0:
        return np.zeros(info.shape, info.dtype)
    mm = np.memmap(info.path, dtype=np.uint8, mode="r", offset=info.begin, shape=(info.nbytes,))
    return mm.view(info.dtype).reshape(info.shape)


def write_safetensors(
    path: str | os.PathLike,
    declarations: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes tensors declared as (key, shape, dtype), asking `produce(key)` for each in turn."""
    declarations = list(declarations)
    header, offset = {}, 0
    for key, shape, dtype in declarations:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data buffer 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, shape, dtype in declarations:
            arr = np.ascontiguousarray(produce(key))
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise ValueError(f"{key}: produced {arr.shape} {arr.dtype}, declared {tuple(shape)} {np.dtype(dtype)}")
            if arr.size:
                f.write(arr.reshape(-1).view(np.uint8).data)  # no extra copy
