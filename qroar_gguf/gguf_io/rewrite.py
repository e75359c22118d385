"""Rewriting a GGUF file: its keys copied as stored bytes (some replaced), its tensors byte for byte.

After gguf-py's `gguf_new_metadata.py`, with what matters for large files and exact copies: keys are
never decoded and re-encoded (a token that is not UTF-8, an array of arrays, an empty array: all kept
as they are); tensor data moves from file to file in the kernel (``os.copy_file_range``; plain reads
where it cannot), never through a memory map, so resident memory stays flat whatever the file's size;
F32 tensors may be written from values (``rope_freqs.weight``).

On a copy-on-write file system (btrfs, XFS with reflink, bcachefs, OpenZFS with block cloning) the copied
tensors share the input's blocks instead, as `cp` does: the output's keys end with ``qroar.padding``, a
string of spaces whose length puts every copied tensor at the same offset modulo ``CLONE_BLOCK`` as in
the input, the tensor data is cloned as one range (``FICLONERANGE``), and what differs (the header, the
tensors written anew) is written over it. The padding is written whatever the file system, so the bytes
of an output never depend on whether its blocks could be shared.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from qroar_gguf.errors import QroarError
from qroar_gguf.gguf_io.layout import GgufLayout, RawTensor, pack_key, pack_tensor_info

VT = gguf.GGUFValueType
_CHUNK = 1 << 24  # bytes per copy call
#: The key whose length lines the copied tensors of a rewritten file up with the input's (dropped and
#: written again, last, by every rewrite).
PADDING = "qroar.padding"
#: The block a copy-on-write file system shares: 4096 bytes on btrfs, XFS and bcachefs as made by
#: default (a larger block, or ZFS's records, only means no sharing: the copy is then made as elsewhere).
CLONE_BLOCK = 4096
#: Linux's ioctl that clones a range of one file into another: _IOW(0x94, 13, struct file_clone_range).
_FICLONERANGE = 0x4020940D


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
    pending = {name: entry for name, entry in changes.items() if name != PADDING}
    entries = []
    for name, key in layout.fields.items():
        entry = pending.pop(name) if name in pending else None if name == PADDING else key.entry
        if entry is not None:
            entries.append(entry)
    entries += [entry for entry in pending.values() if entry is not None]
    infos, offsets, offset = [], [], 0
    for t in tensors:
        infos.append(t.info(offset))
        offsets.append(offset)
        offset += _padded(t.nbytes, layout.alignment)
    first = next((i for i, t in enumerate(tensors) if _copied(t)), None)
    if first is not None:  # the spaces that put the copied tensors where they lie in the input, modulo a block
        block = max(CLONE_BLOCK, layout.alignment)
        head = 24 + sum(map(len, entries)) + sum(map(len, infos)) + len(pack_key(PADDING, VT.STRING, ""))
        spaces = (tensors[first].source.data_offset - offsets[first] - head) % block
        entries.append(pack_key(PADDING, VT.STRING, " " * spaces))
    return (b"GGUF" + struct.pack("<IQQ", layout.version, len(tensors), len(entries)) + b"".join(entries)
            + b"".join(infos))


def _copied(t: TensorOut) -> bool:
    return t.source is not None and t.values is None and t.rewrite_rows is None


def write_rewritten(path: Path, layout: GgufLayout, header: bytes, tensors: list[TensorOut],
                    progress: bool = True, clone: bool = True) -> None:
    """``header`` (from :func:`rewritten_header`), then each tensor at its aligned offset, to ``path``. With
    ``clone`` the copied tensors are first cloned as one range where the file system shares blocks
    (:func:`_clone`), and only the rest is written; the bytes are the same either way."""
    alignment = layout.alignment
    total = sum(t.nbytes for t in tensors)
    at = _padded(len(header), alignment)
    offsets = []
    for t in tensors:
        offsets.append(at)
        at += _padded(t.nbytes, alignment)
    with open(layout.path, "rb") as fin, _emptied(path) as fout, \
            tqdm(total=total, desc="patch", unit="B", unit_scale=True, disable=not progress, leave=False) as bar:
        shared = _clone(fin, fout, tensors, offsets) if clone else None
        fout.write(header)
        for t, start in zip(tensors, offsets):
            _zeros_to(fin, fout, start, shared)
            if t.rewrite_rows is not None:
                fout.write(_rewritten(fin, t))
            elif t.values is None:
                _copy_range(fin, fout, t.source.data_offset, t.nbytes, shared)
            else:
                fout.write(np.ascontiguousarray(t.values, dtype="<f4").tobytes())
            bar.update(t.nbytes)
        _zeros_to(fin, fout, at, shared)
        fout.flush()
        if os.fstat(fout.fileno()).st_size != at:
            raise AssertionError(f"{path}: {os.fstat(fout.fileno()).st_size} bytes written, {at} laid out")


@dataclass(frozen=True)
class _Shared:
    """Output bytes ``[start, end)`` cloned from the input's ``[start - shift, end - shift)``."""

    start: int
    end: int
    shift: int

    def covers(self, start: int, end: int) -> bool:
        return self.start <= start and end <= self.end


def _clone(fin, fout, tensors: list[TensorOut], offsets: list[int]) -> _Shared | None:
    """The copied tensors' data cloned from the input as one range of whole blocks (the blocks shared, as
    `cp` shares them on btrfs or XFS), or None where it cannot be: the tensors do not lie at one shift of
    whole blocks from the input's, or the file system (or the kernel) cannot clone."""
    copied = [(t.source, at) for t, at in zip(tensors, offsets) if _copied(t)]
    if not copied:
        return None
    shift = copied[0][1] - copied[0][0].data_offset
    if shift % CLONE_BLOCK or any(at - source.data_offset != shift for source, at in copied):
        return None
    start = _padded(copied[0][0].data_offset, CLONE_BLOCK)
    end = copied[-1][0].data_offset + copied[-1][0].n_bytes
    if end != os.fstat(fin.fileno()).st_size:  # a range ending inside a block must end at the file's end
        end -= end % CLONE_BLOCK
    if end <= start:
        return None
    try:
        fcntl.ioctl(fout.fileno(), _FICLONERANGE, struct.pack("<qQQQ", fin.fileno(), start, end - start, start + shift))
    except OSError:  # EOPNOTSUPP (ext4, tmpfs), EXDEV (two file systems), EINVAL (another block size)
        return None
    return _Shared(start + shift, end + shift, shift)


def _zeros_to(fin, fout, end: int, shared: _Shared | None) -> None:
    """Zeros from the output's position to ``end`` (padding); cloned bytes already zero are kept."""
    start = fout.tell()
    if start >= end:
        return
    if shared is not None and shared.covers(start, end):
        fin.seek(start - shared.shift)
        if not any(fin.read(end - start)):
            fout.seek(end)
            return
    fout.write(b"\0" * (end - start))


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


def _copy_range(fin, fout, offset: int, count: int, shared: _Shared | None = None) -> None:
    """``count`` bytes of ``fin`` from ``offset`` to ``fout``'s position, in the kernel where it can;
    what ``shared`` already cloned there (the same bytes) is skipped."""
    out_offset = fout.tell()
    if shared is not None and out_offset - offset == shared.shift:
        head = max(0, min(count, shared.start - out_offset))  # before the cloned range
        tail_from = max(head, min(count, shared.end - out_offset))  # after it
        if head:
            _copy_range(fin, fout, offset, head)
        fout.seek(out_offset + tail_from)
        if count > tail_from:
            _copy_range(fin, fout, offset + tail_from, count - tail_from)
        return
    fout.flush()
    out_fd, in_fd = fout.fileno(), fin.fileno()
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
