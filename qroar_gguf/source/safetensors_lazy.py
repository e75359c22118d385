"""Lazy, validating reader for one .safetensors file.

We parse the format ourselves (8-byte little-endian header length, JSON header, raw data) rather
than use `safetensors.safe_open`: numpy has no bfloat16, and reading the header ourselves lets us
check every offset against the file size up front, so a truncated or corrupt file fails with one
clear message before anything is written. Tensors are read one at a time with plain file reads (not a memory map: pages of a map count
towards the process's resident memory until unmapped, so peak RSS would grow to the model's size).
"""

from __future__ import annotations

import json
import math
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

#: The stored types a weight may have; the others (integers, bool) are refused by the converter.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

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
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise QroarError(f"{damaged} (header is not JSON: {exc}): re-download it") from None
    if not isinstance(header, dict):
        raise QroarError(f"{damaged} (header is not a JSON object): re-download it")

    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise QroarError(f"{damaged} (__metadata__ is not a JSON object): re-download it")
    tensors: dict[str, StoredTensor] = {}
    for name, entry in header.items():
        dtype, shape, begin, end = _entry(entry, damaged, name)
        if dtype not in _STORED_DTYPES:
            raise QroarError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        expected = _STORED_DTYPES[dtype].itemsize * math.prod(shape)
        if end - begin != expected:
            raise QroarError(f"{damaged} (tensor {name!r}: {end - begin} bytes for shape {list(shape)} {dtype}): "
                             "re-download it")
        if data_start + end > size:
            raise QroarError(f"{damaged}: tensor {name!r} ends at byte {data_start + end} but the file has {size} "
                             "bytes; the file is truncated, re-download it")
        tensors[name] = StoredTensor(name, dtype, shape, data_start + begin, data_start + end)
    _check_no_overlap(tensors, damaged)
    return tensors, metadata


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(entry: object, damaged: str, name: str) -> tuple[str, tuple[int, ...], int, int]:
    """dtype, shape and data offsets of one header entry, each of the right JSON type."""
    malformed = QroarError(f"{damaged} (tensor {name!r} has a malformed entry): re-download it")
    if not isinstance(entry, dict):
        raise malformed
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(offsets, list):
        raise malformed
    if len(offsets) != 2 or not all(_is_count(v) for v in (*shape, *offsets)) or offsets[0] > offsets[1]:
        raise malformed
    return dtype, tuple(shape), offsets[0], offsets[1]


def _check_no_overlap(tensors: dict[str, StoredTensor], damaged: str) -> None:
    """Two tensors sharing bytes means a forged or corrupt header: each would read the other's data."""
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise QroarError(f"{damaged} (tensors {first!r} and {second!r} overlap in the file): re-download it")
