"""Lazy, validating reader for one .safetensors file.

We parse the format ourselves (8-byte little-endian header length, JSON header, raw data) rather
than use `safetensors.safe_open`: numpy has no bfloat16, and reading the header ourselves lets us
check every offset against the file size up front, so a truncated or corrupt file fails with one
clear message before anything is written. Tensors are read one at a time with plain file reads (not a memory map: pages of a map count
towards the process's resident memory until unmapped, so peak RSS would grow to the model's size).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qroar_gguf.errors import QroarError

# safetensors dtype name -> (numpy dtype of the stored bytes, bytes per element)
_STORED_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # viewed as uint16, widened to float32 on load
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lives in its file."""

    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """One .safetensors file: its header is validated on open, tensors are read on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tensors, self.metadata = _read_header(self.path)

    def load(self, name: str) -> np.ndarray:
        """The tensor as a numpy array: float16/float32 as stored, bfloat16 widened exactly to float32."""
        info = self.tensors[name]
        stored = _STORED_DTYPES[info.dtype]
        with open(self.path, "rb") as f:
            f.seek(info.begin)
            values = np.fromfile(f, dtype=stored, count=info.nbytes // stored.itemsize)
        if values.nbytes != info.nbytes:
            raise QroarError(f"{self.path}: tensor {name!r} could not be read in full; the file changed or is "
                             "truncated")
        if info.dtype == "BF16":
            values = (values.astype(np.uint32) << 16).view(np.float32)
        return values.reshape(info.shape)

    def close(self) -> None:
        """Nothing is held open between reads; kept so callers can release sources uniformly."""


def _read_header(path: Path) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """Parse and validate the header; every failure names the file and says it is damaged."""
    damaged = f"{path} is not a valid safetensors file"
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise QroarError(f"{damaged} (only {size} bytes): re-download or re-save it")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise QroarError(f"{damaged} (header length {header_len} does not fit in {size} bytes): "
                             "the file is truncated or corrupt, re-download it")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise QroarError(f"{damaged} (header is not JSON: {exc}): re-download it") from None
    if not isinstance(header, dict):
        raise QroarError(f"{damaged} (header is not a JSON object): re-download it")

    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, StoredTensor] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise QroarError(f"{damaged} (tensor {name!r} has a malformed entry): re-download it") from None
        if dtype not in _STORED_DTYPES:
            raise QroarError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        expected = _STORED_DTYPES[dtype].itemsize * int(np.prod(shape, dtype=np.int64))
        if end - begin != expected or begin < 0:
            raise QroarError(f"{damaged} (tensor {name!r}: {end - begin} bytes for shape {list(shape)} {dtype}): "
                             "re-download it")
        if data_start + end > size:
            raise QroarError(f"{damaged}: tensor {name!r} ends at byte {data_start + end} but the file has {size} "
                             "bytes; the file is truncated, re-download it")
        tensors[name] = StoredTensor(name, dtype, shape, data_start + begin, data_start + end)
    return tensors, metadata
