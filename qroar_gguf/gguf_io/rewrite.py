"""Rewriting a GGUF file: its keys copied as stored bytes (some replaced), its tensors byte for byte.

After gguf-py's `gguf_new_metadata.py`, with what matters for large files and exact copies: keys are
never decoded and re-encoded (a token that is not UTF-8, an array of arrays, an empty array: all kept
as they are); tensor data moves from file to file in the kernel (``os.copy_file_range``; plain reads
where it cannot), never through a memory map, so resident memory stays flat whatever the file's size;
F32 tensors may be written from values (``rope_freqs.weight``).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm
from qroar_gguf.errors import QroarError
from qroar_gguf.gguf_io.layout import GgufLayout, RawTensor, pack_tensor_info

_CHUNK = 1 << 24  # bytes per copy call


@dataclass(frozen=True)
class TensorOut:
    """One tensor of the output: copied from the input (``source``), with its rows rewritten by
    ``rewrite_rows`` when given (rows as bytes, ``[rows, bytes per row]`` in and out: quantized blocks never
    straddle rows, so rows can be reordered or their block scales multiplied), or written from ``values``
    (F32, 1-D)."""

    name: str
    source: RawTensor | None = None
    values: np.ndarray | None = None
    rewrite_rows: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def nbytes(self) -> int:
        return self.source.n_bytes if self.values is None else int(self.values.size) * 4

    def info(self, offset: int) -> bytes:
        if self.values is None:
            return pack_tensor_info(self.name, self.source.dims, self.source.tensor_type, offset)
        return pack_tensor_info(self.name, (int(self.values.size),), gguf.GGMLQuantizationType.F32, offset)


def rewritten_header(layout: GgufLayout, changes: dict[str, bytes | None], tensors: list[TensorOut]) -> bytes:
    """Header, keys and tensor infos of the output. ``changes``: key name -> its new stored entry
    (replacing the old one where it stands, or added at the end), or None to drop it."""
    pending = dict(changes)
    entries = []
    for name, key in layout.fields.items():
        entry = pending.pop(name) if name in pending else key.entry
        if entry is not None:
            entries.append(entry)
    entries += [entry for entry in pending.values() if entry is not None]
    infos, offset = [], 0
    for t in tensors:
        infos.append(t.info(offset))
        offset += _padded(t.nbytes, layout.alignment)
    return (b"GGUF" + struct.pack("<IQQ", layout.version, len(tensors), len(entries)) + b"".join(entries)
            + b"".join(infos))


def write_rewritten(path: Path, layout: GgufLayout, header: bytes, tensors: list[TensorOut],
                    progress: bool = True) -> None:
    """``header`` (from :func:`rewritten_header`), then each tensor at its aligned offset, to ``path``."""
    alignment = layout.alignment
    total = sum(t.nbytes for t in tensors)
    with open(layout.path, "rb") as fin, _emptied(path) as fout, \
            tqdm(total=total, desc="patch", unit="B", unit_scale=True, disable=not progress, leave=False) as bar:
        fout.write(header)
        for t in tensors:
            fout.write(b"\0" * (-fout.tell() % alignment))
            if t.rewrite_rows is not None:
                fout.write(_rewritten(fin, t))
            elif t.values is None:
                _copy_range(fin, fout, t.source.data_offset, t.nbytes)
            else:
                fout.write(np.ascontiguousarray(t.values, dtype="<f4").tobytes())
            bar.update(t.nbytes)
        fout.write(b"\0" * (-fout.tell() % alignment))


def _emptied(path: Path):
    """``path`` opened for writing, empty. An empty file (the temporary ``mkstemp`` made) is not truncated
    again: on ext4 truncating a file to nothing marks it as replaced in place (``auto_da_alloc``), and
    closing it then starts writing back every byte of it while we wait (0.3 s for 0.5 GiB here), a cost
    `cp`, which creates its output, does not pay."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    try:
        if os.fstat(fd).st_size:
            os.ftruncate(fd, 0)
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


def _rewritten(fin, t: TensorOut) -> bytes:
    """The tensor's bytes with its rows rewritten (one tensor in memory, twice at most)."""
    dims = t.source.dims
    rows = dims[0] if len(dims) == 1 else t.source.n_elements // dims[0]
    fin.seek(t.source.data_offset)
    raw = np.frombuffer(fin.read(t.nbytes), dtype=np.uint8)
    if raw.size != t.nbytes or t.nbytes % rows:
        raise QroarError(f"{fin.name}: tensor {t.name} cannot be read as {rows} whole rows")
    out = t.rewrite_rows(raw.reshape(rows, t.nbytes // rows))
    if out.shape != (rows, t.nbytes // rows):
        raise AssertionError(f"{t.name}: rewriting its rows changed the shape")
    return np.ascontiguousarray(out).tobytes()


def _padded(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _copy_range(fin, fout, offset: int, count: int) -> None:
    """``count`` bytes of ``fin`` from ``offset`` to ``fout``'s position, in the kernel where it can."""
    fout.flush()
    out_fd, in_fd = fout.fileno(), fin.fileno()
    out_offset = fout.tell()
    done = 0
    try:
        while done < count:
            n = os.copy_file_range(in_fd, out_fd, min(_CHUNK, count - done), offset + done, out_offset + done)
            if n == 0:
                break
            done += n
    except (AttributeError, OSError):  # no copy_file_range here, or not between these file systems
        pass
    fin.seek(offset + done)
    fout.seek(out_offset + done)
    while done < count:
        chunk = fin.read(min(_CHUNK, count - done))
        if not chunk:
            raise QroarError(f"{fin.name} ended inside a tensor: it is truncated or changed while being read")
        fout.write(chunk)
        done += len(chunk)
