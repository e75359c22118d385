"""Reading a GGUF file: open it, read a key, read the model's shape through gguf-py's key names.

The bottom of the GGUF side: it imports nothing of the package but errors and the bounded layout
reader, so the RoPE measurements, provenance, `inspect` and the evaluators can all read files through
it. The shape is checked the way llama.cpp's loader reads it (llama-model.cpp's load_hparams), before
anything believes it: a downloaded file's keys can claim any size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from qroar_gguf.errors import QroarError
from qroar_gguf.gguf_io.layout import GgufLayout, RawTensor, read_layout

ARCHITECTURE = gguf.Keys.General.ARCHITECTURE
LLAMA_ROPE_THETA_DEFAULT = 10000.0  # llama.cpp's value when <arch>.rope.freq_base is absent


def open_gguf(path: str | Path) -> GgufLayout:
    """The file's keys and tensor infos through the bounded reader (gguf_io/layout.py): a downloaded
    file is untrusted, and gguf-py's GGUFReader believes its counts."""
    return read_layout(path)


def field_value(reader: gguf.GGUFReader | GgufLayout, key: str) -> Any:
    """The key's value (a number, string or list), None when the file lacks it."""
    field = reader.get_field(key)
    if field is None:
        return None
    try:
        return field.contents()
    except UnicodeDecodeError:  # a string that is not UTF-8 (a byte-level token): shown with replacements
        if field.types[0] == gguf.GGUFValueType.STRING:
            return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
        return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]


#: llama.cpp's LLAMA_MAX_LAYERS: its loader refuses more blocks, so a larger claim never sizes anything here.
MAX_LAYERS = 512


def scalar_value(reader: GgufLayout, key: str) -> Any:
    """The key's value where a single number or string belongs: None when absent, and an array is never
    decoded (a file can make one as long as itself) but described, e.g. "<array of 4000000 UINT8>"."""
    field = reader.get_field(key)
    length = getattr(field, "count", None)
    if length is not None:
        return f"<array of {length} {field.sub_type.name}>"
    return field_value(reader, key)


@dataclass(frozen=True)
class GgufHparams:
    """What a RoPE model GGUF says about its shape (llama.cpp's defaults where a key is optional),
    checked against itself as llama.cpp's loader reads it."""

    architecture: str
    n_layer: int
    n_embd: int
    n_head: int  # layer 0's, as llama.cpp's n_head()
    n_kv_head: int
    n_rot: int
    rope_theta: float
    context_length: int
    head_size: int = 0  # key_length where the file has it, else n_embd // n_head
    n_head_layers: tuple[int, ...] = ()  # per layer (head_count may be an array of one per layer)
    n_kv_head_layers: tuple[int, ...] = ()

    def heads(self, layer: int, kind: str) -> int:
        """Query ("q") or key ("k") heads of one layer."""
        layers = self.n_head_layers if kind == "q" else self.n_kv_head_layers
        return layers[layer] if layers else (self.n_head if kind == "q" else self.n_kv_head)


def read_hparams(reader: GgufLayout, path: str | Path) -> GgufHparams:
    """The model's shape from `<arch>.*` keys, each checked against the others the way llama.cpp reads
    them; one QroarError line when a required key is missing or odd."""
    arch = scalar_value(reader, ARCHITECTURE)
    if not isinstance(arch, str) or reader.get_field(ARCHITECTURE).type != gguf.GGUFValueType.STRING:
        raise QroarError(f"{path} has no {ARCHITECTURE}: not a model GGUF")
    keys = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope

    def count(key: str, default: int | None = None, limit: int | None = None) -> int:
        name = key.format(arch=arch)
        value = scalar_value(reader, name)
        if value is None and default is not None:
            return default
        if not _whole(value) or value <= 0:
            raise QroarError(f"{path}: {name} is {_shown(value)}; a RoPE model GGUF needs a positive whole number "
                             "there")
        if limit is not None and value > limit:
            raise QroarError(f"{path}: {name} is {value}; llama.cpp reads at most {limit}")
        return value

    n_layer = count(keys[0].BLOCK_COUNT, limit=MAX_LAYERS)
    n_embd = count(keys[0].EMBEDDING_LENGTH)
    heads = _per_layer(reader, keys[1].HEAD_COUNT.format(arch=arch), n_layer, None, path)
    kv_heads = _per_layer(reader, keys[1].HEAD_COUNT_KV.format(arch=arch), n_layer, heads, path)
    for layer, (q, k) in enumerate(zip(heads, kv_heads)):
        if k > q or q % k:
            raise QroarError(f"{path}: layer {layer} has {q} query heads and {k} key/value heads; llama.cpp "
                             "shares each key/value head among a whole number of query heads")
        if q > n_embd:
            raise QroarError(f"{path}: {q} heads in layer {layer} but an embedding of {n_embd}: fewer dimensions "
                             "than heads")
    head_size = count(keys[1].KEY_LENGTH, default=max(n_embd // heads[0], 1))
    n_rot = count(keys[2].DIMENSION_COUNT, default=head_size)
    if n_rot > head_size or n_rot % 2:
        raise QroarError(f"{path}: {keys[2].DIMENSION_COUNT.format(arch=arch)} is {n_rot} for heads of {head_size} "
                         "dimensions; rotary dimensions are an even number no larger than the head")
    theta = scalar_value(reader, keys[2].FREQ_BASE.format(arch=arch))
    if theta is not None and not (isinstance(theta, (int, float)) and not isinstance(theta, bool)
                                  and math.isfinite(theta) and theta > 1):
        raise QroarError(f"{path}: {keys[2].FREQ_BASE.format(arch=arch)} is {_shown(theta)}, not a RoPE base")
    return GgufHparams(
        architecture=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=heads[0],
        n_kv_head=kv_heads[0],
        n_rot=n_rot,
        rope_theta=LLAMA_ROPE_THETA_DEFAULT if theta is None else float(theta),
        context_length=count(keys[0].CONTEXT_LENGTH),
        head_size=head_size,
        n_head_layers=heads,
        n_kv_head_layers=kv_heads,
    )


def _per_layer(reader, name: str, n_layer: int, default: tuple[int, ...] | None, path) -> tuple[int, ...]:
    """A head count as llama.cpp's get_key_or_arr reads it: one number for every layer, or an array of
    exactly one per layer."""
    field = reader.get_field(name)
    if field is None and default is not None:
        return default
    length = getattr(field, "count", None)
    if length is not None and length != n_layer:  # checked before the array is decoded
        raise QroarError(f"{path}: {name} has {length} values for {n_layer} layers")
    value = field_value(reader, name)
    values = value if isinstance(value, list) else [value] * n_layer
    if len(values) != n_layer or not all(_whole(v) and v > 0 for v in values):
        raise QroarError(f"{path}: {name} is {_shown(value)}; a RoPE model GGUF needs a positive whole number "
                         "there (or one per layer)")
    return tuple(values)


def check_attention_shapes(hp: GgufHparams, tensors: list[RawTensor], path: str | Path) -> None:
    """Every layer's attn_q and attn_k as llama.cpp creates them from the keys: an embedding's columns
    and heads x head size rows; one QroarError line for the first that is missing or differs."""
    names = {t.name: t for t in tensors}
    for layer in range(hp.n_layer):
        for kind, tensor in (("q", gguf.MODEL_TENSOR.ATTN_Q), ("k", gguf.MODEL_TENSOR.ATTN_K)):
            name = gguf.TENSOR_NAMES[tensor].format(bid=layer) + ".weight"
            if name not in names:
                raise QroarError(f"{path} has no {name}: a {hp.architecture} file with {hp.n_layer} layers needs "
                                 "one per layer (split attention projections), and llama.cpp would not load it")
            want = (hp.n_embd, hp.heads(layer, kind) * hp.head_size)
            if names[name].dims != want:
                raise QroarError(f"{path}: {name} has shape {list(names[name].dims)} but the keys imply "
                                 f"{list(want)} ({hp.heads(layer, kind)} heads of {hp.head_size}, embedding "
                                 f"{hp.n_embd}); llama.cpp would refuse or misread it")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value) -> str:
    """A value for an error line, cut short (a file's array can be long)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
