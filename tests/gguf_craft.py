"""GGUF files built byte by byte, so that a test can say anything a hostile file can: counts and
lengths that differ from what follows, arrays nested any depth, unknown types, any dims and offsets.

A file is a list of keys and a list of tensors; `craft` packs them. Every value carries its GGUF type;
`claimed` replaces a count or length as written (the bytes that follow stay what they are).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

import gguf
import numpy as np

VT = gguf.GGUFValueType
QT = gguf.GGMLQuantizationType
_FORMATS = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
            VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d"}


@dataclass(frozen=True)
class Value:
    """A typed value: a scalar, a string (bytes or str) or an array (``items`` of ``item_type``)."""

    type: int
    value: object = None
    item_type: int | None = None
    claimed: int | None = None  # the count (array) or length (string) written instead of the true one


@dataclass(frozen=True)
class Key:
    name: bytes | str
    value: Value
    claimed_name: int | None = None


@dataclass(frozen=True)
class Tensor:
    name: bytes | str
    dims: tuple[int, ...]
    type: int
    data: bytes = b""
    offset: int | None = None  # None: packed after the previous tensor, aligned
    claimed_dims: int | None = None


@dataclass
class Gguf:
    keys: list[Key]
    tensors: list[Tensor]
    version: int = 3
    magic: bytes = b"GGUF"
    claimed_keys: int | None = None
    claimed_tensors: int | None = None
    alignment: int = 32  # where the data section starts (and default offsets align)
    extra: dict = field(default_factory=dict)


def _raw(text: bytes | str) -> bytes:
    return text.encode("utf-8") if isinstance(text, str) else text


def _string(text: bytes | str, claimed: int | None = None) -> bytes:
    raw = _raw(text)
    return struct.pack("<Q", len(raw) if claimed is None else claimed) + raw


def _value(v: Value, with_type: bool = True) -> bytes:
    out = struct.pack("<I", v.type) if with_type else b""
    if v.type == VT.STRING:
        return out + _string(v.value, v.claimed)
    if isinstance(v.value, bytes) and v.type != VT.STRING:  # a body given as bytes (`nested`, odd types)
        return out + v.value
    if v.type == VT.ARRAY:
        items = list(v.value)
        out += struct.pack("<IQ", v.item_type, len(items) if v.claimed is None else v.claimed)
        for item in items:
            if isinstance(item, Value):  # nested array or string with its own claims
                out += _value(item, with_type=False)
            elif v.item_type == VT.STRING:
                out += _string(item)
            else:
                out += struct.pack(_FORMATS[VT(v.item_type)], item)
        return out
    if v.type in _FORMATS:
        return out + struct.pack(_FORMATS[VT(v.type)], v.value)
    return out + (v.value or b"")  # an unknown type: whatever bytes the test gives


def craft(g: Gguf) -> bytes:
    """The file's bytes: header, keys, tensor infos, padding, data."""
    out = g.magic + struct.pack("<I", g.version)
    out += struct.pack("<QQ", len(g.tensors) if g.claimed_tensors is None else g.claimed_tensors,
                       len(g.keys) if g.claimed_keys is None else g.claimed_keys)
    for k in g.keys:
        out += _string(k.name, k.claimed_name) + _value(k.value)
    data, offsets = b"", []
    for t in g.tensors:
        data += b"\0" * (-len(data) % g.alignment)
        offsets.append(len(data) if t.offset is None else t.offset)
        data += t.data
    for t, offset in zip(g.tensors, offsets):
        out += _string(t.name) + struct.pack("<I", len(t.dims) if t.claimed_dims is None else t.claimed_dims)
        out += b"".join(struct.pack("<Q", d) for d in t.dims) + struct.pack("<IQ", t.type, offset)
    out += b"\0" * (-len(out) % g.alignment)
    return out + data


# -- a small valid model: the seed that tests and the fuzzer change --------------------------------------

def u32(n: int) -> Value:
    return Value(VT.UINT32, n)


def text(s: bytes | str) -> Value:
    return Value(VT.STRING, s)


def f32(x: float) -> Value:
    return Value(VT.FLOAT32, x)


def small_model(arch: str = "llama", *, n_embd: int = 64, n_head: int = 2, n_kv_head: int = 2, n_rot: int = 32,
                extra_keys: tuple[Key, ...] = ()) -> Gguf:
    """One layer, attn_q in F16 and attn_k in Q8_0 (so qroar can measure them), a vocabulary with a
    byte-level token that is not UTF-8: enough for patch and inspect, not for llama.cpp."""
    rng = np.random.default_rng(0)
    head = n_rot
    q = rng.standard_normal((n_head * head, n_embd)).astype("<f2")
    k = gguf.quants.quantize(rng.standard_normal((n_kv_head * head, n_embd)).astype(np.float32), QT.Q8_0)
    keys = [
        Key("general.architecture", text(arch)),
        Key("general.name", text("small")),
        Key(f"{arch}.context_length", u32(256)),
        Key(f"{arch}.embedding_length", u32(n_embd)),
        Key(f"{arch}.block_count", u32(1)),
        Key(f"{arch}.attention.head_count", u32(n_head)),
        Key(f"{arch}.attention.head_count_kv", u32(n_kv_head)),
        Key(f"{arch}.rope.dimension_count", u32(n_rot)),
        Key(f"{arch}.rope.freq_base", f32(10000.0)),
        Key("tokenizer.ggml.tokens", Value(VT.ARRAY, [b"a", b"\xff\xfe", "é"], VT.STRING)),
        Key("tokenizer.ggml.token_type", Value(VT.ARRAY, [1, 1, 3], VT.INT32)),
        *extra_keys,
    ]
    tensors = [
        Tensor("token_embd.weight", (n_embd, 4), QT.F32, rng.standard_normal((4, n_embd)).astype("<f4").tobytes()),
        Tensor("blk.0.attn_q.weight", (n_embd, n_head * head), QT.F16, q.tobytes()),
        Tensor("blk.0.attn_k.weight", (n_embd, n_kv_head * head), QT.Q8_0, k.tobytes()),
    ]
    return Gguf(keys, tensors)


def with_key(g: Gguf, name: str, value: Value | None) -> Gguf:
    """``g`` with key ``name`` set to ``value`` (in place, or appended), or removed (None)."""
    keys = [k for k in g.keys if _raw(k.name) != _raw(name)] if value is None else None
    if keys is None:
        keys = [replace(k, value=value) if _raw(k.name) == _raw(name) else k for k in g.keys]
        if all(_raw(k.name) != _raw(name) for k in g.keys):
            keys.append(Key(name, value))
    return replace(g, keys=keys)


def with_tensor(g: Gguf, name: str, /, **changes) -> Gguf:
    return replace(g, tensors=[replace(t, **changes) if _raw(t.name) == _raw(name) else t for t in g.tensors])


def nested(depth: int) -> Value:
    """An array nested ``depth`` deep (1: an array of two u8), written flat (any depth, no recursion)."""
    body = struct.pack("<IQ", VT.ARRAY, 1) * (depth - 1) + struct.pack("<IQ", VT.UINT8, 2) + b"\x01\x02"
    return Value(VT.ARRAY, body)
