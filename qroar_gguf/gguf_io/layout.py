"""A GGUF file's layout, read fast and kept raw: every key as its stored bytes, every tensor's info.

gguf-py's GGUFReader decodes every key through numpy views, which takes seconds for a vocabulary of
100k tokens; a patch only needs to copy keys, so it reads them here as byte spans (decoding a value
only when asked) and writes them back unchanged. The format (version 2 and 3, little-endian):
header (magic, version, tensor count, key count), keys (name, type, value), tensor infos (name,
dims, type, offset), padding to the alignment, data.

A downloaded file is untrusted, so nothing it claims is believed before the file can hold it: every
count, length and offset is checked against the bytes left before anything is allocated or looped
over (an item takes at least its smallest encoding, so a claimed count can never exceed the bytes
left), arrays nest at most ``MAX_NESTING`` deep, and memory stays a small multiple of the header's
real size. Damaged input fails with one line, whatever it claims.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import gguf

from qroar_gguf.errors import QroarError

VT = gguf.GGUFValueType
_SCALARS = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
            VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d"}
_MAX_DIMS = 4  # GGML_MAX_DIMS
#: How deep arrays may nest: a key's array (1) whose items are arrays (2). llama.cpp reads no array of
#: arrays at all (gguf.cpp refuses the type), gguf-py writes them, so one level of nesting stays readable
#: for `inspect`; deeper is damage, and the limit keeps the readers' recursion a few frames deep.
MAX_NESTING = 2
#: The fewest bytes an item of each type takes: a string its 8-byte length, an array its type and count.
_SMALLEST = {**{kind: struct.calcsize(fmt) for kind, fmt in _SCALARS.items()}, VT.STRING: 8, VT.ARRAY: 12}


class _Damaged(Exception):
    """The file ends early or holds an impossible value (turned into one QroarError line)."""


class _Bytes:
    """The file's header region, read from disk as far as it is needed."""

    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size, self.buf, self.pos = f, size, bytearray(), 0

    def ensure(self, n: int) -> None:
        """The next ``n`` bytes are in the buffer (or the file ends first: damaged)."""
        if n < 0 or self.pos + n > self.size:
            raise _Damaged(f"it ends inside its header (needs byte {self.pos + n}, has {self.size})")
        if self.pos + n > len(self.buf):
            self.buf += self.f.read(max(self.pos + n - len(self.buf), 1 << 20))

    def take(self, n: int) -> bytes:
        self.ensure(n)
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out

    def skip_strings(self, count: int) -> None:
        """Past ``count`` strings without copying them (a vocabulary holds 100k and more)."""
        length, buf, pos = struct.Struct("<Q").unpack_from, self.buf, self.pos
        for _ in range(count):  # the buffer is extended only when a string runs past it (rarely)
            if pos + 8 > len(buf):
                self.pos = pos
                self.ensure(8)
                buf = self.buf
            end = pos + 8 + length(buf, pos)[0]
            if end > len(buf):
                self.pos = pos
                self.ensure(end - pos)
                buf = self.buf
            pos = end
        self.pos = pos

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> bytes:
        return self.take(self.unpack("<Q"))


@dataclass(frozen=True)
class RawKey:
    """One key: ``entry`` is its stored bytes (name, type, value), copied as they are."""

    name: str
    type: gguf.GGUFValueType
    sub_type: gguf.GGUFValueType | None
    entry: bytes
    value_at: int  # where the value starts within ``entry``

    def renamed(self, name: str) -> bytes:
        """The same entry under another name."""
        return pack_string(name) + self.entry[8 + len(self.name.encode("utf-8")):]

    @property
    def count(self) -> int | None:
        """An array's number of items, read without decoding them (None for a scalar or string)."""
        if self.type != VT.ARRAY:
            return None
        return struct.unpack_from("<Q", self.entry, self.value_at + 4)[0]

    def contents(self) -> Any:
        """The value (strings decoded as UTF-8, undecodable bytes replaced)."""
        return _decode(_Cursor(self.entry, self.value_at), self.type)


@dataclass(frozen=True)
class RawTensor:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is a row's length
    tensor_type: gguf.GGMLQuantizationType
    data_offset: int  # absolute position in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n

    @property
    def byte_shape(self) -> tuple[int, ...]:
        """numpy's shape of the raw bytes (rows of a row's bytes), as gguf.quants.dequantize takes them."""
        block, size = gguf.GGML_QUANT_SIZES[self.tensor_type]
        return (*reversed(self.dims[1:]), self.dims[0] // block * size)


@dataclass(frozen=True)
class GgufLayout:
    path: Path
    version: int
    fields: dict[str, RawKey]  # in the file's order (also what `field_value` and provenance read)
    tensors: list[RawTensor]
    alignment: int
    data_start: int

    def get_field(self, name: str) -> RawKey | None:
        return self.fields.get(name)


def read_layout(path: str | Path) -> GgufLayout:
    """The layout of ``path``, every length checked against the file; one QroarError line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise QroarError(f"{path} does not exist or is not a regular file: give a .gguf file")
    try:
        with open(path, "rb") as f:
            return _read(f, path)
    except _Damaged as exc:
        raise QroarError(f"{path} is not a readable GGUF file: {exc} (truncated, damaged or not GGUF)") from None


def _read(f: BinaryIO, path: Path) -> GgufLayout:
    size = path.stat().st_size
    b = _Bytes(f, size)
    if b.take(4) != b"GGUF":
        raise _Damaged("it does not start with GGUF")
    version = b.unpack("<I")
    if version not in (2, 3):
        swapped = struct.unpack(">I", struct.pack("<I", version))[0]
        if swapped in (2, 3):
            raise QroarError(f"{path} is a big-endian GGUF; patch writes little-endian files only: convert it "
                             "first (gguf-py's gguf_convert_endian.py)")
        raise _Damaged(f"GGUF version {version} (2 and 3 are read)")
    n_tensors, n_keys = b.unpack("<Q"), b.unpack("<Q")
    if n_tensors > size // 24 or n_keys > size // 12:  # every entry takes at least that many bytes
        raise _Damaged(f"it claims {n_tensors} tensors and {n_keys} keys")
    fields: dict[str, RawKey] = {}
    for _ in range(n_keys):
        start = b.pos
        name = _text(b.string())
        kind = _value_type(b.unpack("<I"))
        value_at = b.pos - start
        sub_type = _skip_value(b, kind)
        if name in fields:
            raise _Damaged(f"key {name} appears twice")
        fields[name] = RawKey(name, kind, sub_type, bytes(b.buf[start:b.pos]), value_at)
    infos = []
    for _ in range(n_tensors):
        name = _text(b.string())
        n_dims = b.unpack("<I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise _Damaged(f"tensor {name} has {n_dims} dimensions")
        dims = tuple(b.unpack("<Q") for _ in range(n_dims))
        try:
            kind = gguf.GGMLQuantizationType(b.unpack("<I"))
        except ValueError:
            raise _Damaged(f"tensor {name} has an unknown type") from None
        infos.append((name, dims, kind, b.unpack("<Q")))
    alignment = 32
    if "general.alignment" in fields:
        key = fields["general.alignment"]
        alignment = key.contents()
        # llama.cpp and gguf-py both take a UINT32 only (u64 or bool is refused there, so here too)
        if key.type != VT.UINT32 or alignment <= 0 or alignment & (alignment - 1):
            raise _Damaged(f"general.alignment is {key.type.name} {alignment!r} (a power of two, UINT32, is read)")
    data_start = -(-b.pos // alignment) * alignment
    tensors = [_tensor(name, dims, kind, offset, data_start, alignment, size) for name, dims, kind, offset in infos]
    if len({t.name for t in tensors}) != len(tensors):
        raise _Damaged("a tensor name appears twice")
    return GgufLayout(path, version, fields, tensors, alignment, data_start)


def _tensor(name, dims, kind, offset, data_start, alignment, size) -> RawTensor:
    block, type_size = gguf.GGML_QUANT_SIZES[kind]
    if any(d <= 0 for d in dims) or dims[0] % block:
        raise _Damaged(f"tensor {name} has dimensions {list(dims)} that {kind.name} cannot hold")
    n = 1
    for d in dims:
        n *= d
    n_bytes = n // block * type_size
    start = data_start + offset
    if offset % alignment or start + n_bytes > size:
        where = "is misaligned" if offset % alignment else f"ends at byte {start + n_bytes}, past the file's end {size}"
        raise _Damaged(f"tensor {name} {where}")
    return RawTensor(name, dims, kind, start, n_bytes)


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Damaged("a key or tensor name is not UTF-8") from None


def _value_type(code: int) -> gguf.GGUFValueType:
    try:
        return VT(code)
    except ValueError:
        raise _Damaged(f"a key has unknown type {code}") from None


def _skip_value(b: _Bytes, kind: gguf.GGUFValueType, depth: int = 0) -> gguf.GGUFValueType | None:
    """Move past one value; an array's item type is returned (None for scalars)."""
    if kind in _SCALARS:
        b.take(_SMALLEST[kind])
        return None
    if kind == VT.STRING:
        b.string()
        return None
    if depth >= MAX_NESTING:
        raise _Damaged(f"its arrays nest more than {MAX_NESTING} deep")
    item = _value_type(b.unpack("<I"))
    count = b.unpack("<Q")
    if count > (b.size - b.pos) // _SMALLEST[item]:  # before any loop: each item takes at least that much
        raise _Damaged(f"an array claims {count} items of {item.name}, more than the {b.size - b.pos} bytes "
                       "left can hold")
    if item in _SCALARS:
        b.ensure(count * _SMALLEST[item])
        b.pos += count * _SMALLEST[item]
    elif item == VT.STRING:
        b.skip_strings(count)
    else:
        for _ in range(count):
            _skip_value(b, item, depth + 1)
    return item


class _Cursor:
    def __init__(self, data: bytes, pos: int):
        self.data, self.pos = data, pos

    def unpack(self, fmt: str):
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value


def _decode(c: _Cursor, kind: gguf.GGUFValueType) -> Any:
    if kind in _SCALARS:
        return c.unpack(_SCALARS[kind])
    if kind == VT.STRING:
        n = c.unpack("<Q")
        c.pos += n
        return c.data[c.pos - n:c.pos].decode("utf-8", "replace")
    item, count = VT(c.unpack("<I")), c.unpack("<Q")
    return [_decode(c, item) for _ in range(count)]


# -- writing ----------------------------------------------------------------------------------------

def pack_string(text: str | bytes) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def pack_key(name: str, kind: gguf.GGUFValueType, value: Any, item: gguf.GGUFValueType | None = None) -> bytes:
    """One key entry as GGUF stores it (scalars, strings, and flat arrays of either)."""
    out = pack_string(name) + struct.pack("<I", kind)
    if kind == VT.ARRAY:
        out += struct.pack("<IQ", item, len(value))
        return out + b"".join(_pack_scalar(item, v) for v in value)
    return out + _pack_scalar(kind, value)


def _pack_scalar(kind: gguf.GGUFValueType, value: Any) -> bytes:
    return pack_string(value) if kind == VT.STRING else struct.pack(_SCALARS[kind], value)


def pack_tensor_info(name: str, dims: tuple[int, ...], kind: gguf.GGMLQuantizationType, offset: int) -> bytes:
    return (pack_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
            + struct.pack("<IQ", kind, offset))
