"""Reading a GGUF file: open it, read a key, read the model's shape through gguf-py's key names.

The bottom of the GGUF side: it imports nothing of the package but errors, so the RoPE measurements,
provenance, `inspect` and the evaluators can all read files through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from qroar_gguf.errors import QroarError

ARCHITECTURE = gguf.Keys.General.ARCHITECTURE
LLAMA_ROPE_THETA_DEFAULT = 10000.0  # llama.cpp's value when <arch>.rope.freq_base is absent


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    path = Path(path)
    if not path.exists():
        raise QroarError(f"{path} does not exist")
    if not path.is_file():
        raise QroarError(f"{path} is not a regular file: give a .gguf file")
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # GGUFReader raises ValueError/struct/numpy errors on non-GGUF input
        raise QroarError(f"{path} is not a readable GGUF file: it is truncated, damaged or not GGUF ({exc})") from None


def field_value(reader: gguf.GGUFReader, key: str) -> Any:
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


@dataclass(frozen=True)
class GgufHparams:
    """What a RoPE model GGUF says about its shape (llama.cpp's defaults where a key is optional)."""

    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    n_rot: int
    rope_theta: float
    context_length: int


def read_hparams(reader: gguf.GGUFReader, path: str | Path) -> GgufHparams:
    """The model's shape from `<arch>.*` keys; one QroarError line when a required key is missing or odd."""
    arch = field_value(reader, ARCHITECTURE)
    if not isinstance(arch, str):
        raise QroarError(f"{path} has no {ARCHITECTURE}: not a model GGUF")
    keys = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope

    def count(key: str, default: int | None = None) -> int:
        value = field_value(reader, key.format(arch=arch))
        if value is None and default is not None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise QroarError(f"{path}: {key.format(arch=arch)} is {value!r}; a RoPE model GGUF needs a positive "
                             "whole number there")
        return value

    n_embd, n_head = count(keys[0].EMBEDDING_LENGTH), count(keys[1].HEAD_COUNT)
    theta = field_value(reader, keys[2].FREQ_BASE.format(arch=arch))
    if theta is not None and not (isinstance(theta, (int, float)) and theta > 1):
        raise QroarError(f"{path}: {keys[2].FREQ_BASE.format(arch=arch)} is {theta!r}, not a RoPE base")
    return GgufHparams(
        architecture=arch,
        n_layer=count(keys[0].BLOCK_COUNT),
        n_embd=n_embd,
        n_head=n_head,
        n_kv_head=count(keys[1].HEAD_COUNT_KV, default=n_head),
        # llama.cpp's default: the key head size, which need not be n_embd / n_head
        n_rot=count(keys[2].DIMENSION_COUNT, default=count(keys[1].KEY_LENGTH, default=n_embd // n_head)),
        rope_theta=LLAMA_ROPE_THETA_DEFAULT if theta is None else float(theta),
        context_length=count(keys[0].CONTEXT_LENGTH),
    )
