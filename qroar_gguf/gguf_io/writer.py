"""Streaming GGUF writer: tensor infos first, then each tensor produced, written and dropped.

gguf-py's GGUFWriter can write a tensor's data after the header (`add_tensor_info` +
`write_tensor_data`), so only the tensor being converted is ever in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from qroar_gguf.errors import QroarError

Q = gguf.GGMLQuantizationType

_BYTES_PER_ELEMENT = {Q.F32: 4, Q.F16: 2, Q.BF16: 2}


@dataclass(frozen=True)
class PlannedTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order, e.g. (rows, cols)
    qtype: gguf.GGMLQuantizationType  # F32, F16 or BF16
    produce: Callable[[], np.ndarray]  # returns the float32/float16 values to store

    @property
    def nbytes(self) -> int:
        return _BYTES_PER_ELEMENT[self.qtype] * int(np.prod(self.shape, dtype=np.int64))


def encode(values: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Values -> the exact bytes GGUF stores for an unquantized type (round to nearest even)."""
    if qtype == Q.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if qtype == Q.F16:
        with np.errstate(over="ignore"):  # values beyond float16 become Inf: write_streaming refuses them
            return np.ascontiguousarray(values, dtype=np.float16)
    if qtype == Q.BF16:
        return gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), Q.BF16)
    raise ValueError(f"not an unquantized GGUF type: {qtype.name}")


def all_finite(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether stored values (as `encode` returns them) are all finite; BF16 arrives as raw uint16."""
    if qtype == Q.BF16:
        return not np.any((data.view(np.uint16) & 0x7F80) == 0x7F80)  # exponent all ones: Inf or NaN
    return bool(np.isfinite(data).all())


def write_streaming(path: Path, writer: gguf.GGUFWriter, tensors: list[PlannedTensor],
                    progress: bool = True) -> None:
    """Write metadata already added to `writer`, then every tensor in order, to `path`."""
    for t in tensors:
        # dtype float16 stands for "2-byte element" here; raw_dtype carries the real type (BF16 too).
        stand_in = np.float32 if t.qtype == Q.F32 else np.float16
        writer.add_tensor_info(t.name, t.shape, np.dtype(stand_in), t.nbytes, raw_dtype=t.qtype)
    writer.open_output_file(path)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = sum(t.nbytes for t in tensors)
    with tqdm(total=total, desc="convert", unit="B", unit_scale=True, disable=not progress, leave=False) as bar:
        for t in tensors:
            data = encode(t.produce(), t.qtype)
            if data.nbytes != t.nbytes:
                raise AssertionError(f"{t.name}: produced {data.nbytes} bytes, planned {t.nbytes}")
            if not all_finite(data, t.qtype):
                raise QroarError(f"{t.name} would hold NaN or Inf as {t.qtype.name}: the checkpoint holds them, or a "
                                 f"scale pushed values beyond {t.qtype.name}'s range; nothing was written")
            writer.write_tensor_data(data)
            bar.update(t.nbytes)
            del data
    writer.close()
