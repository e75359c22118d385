"""The model families the converter knows, by the Hugging Face architecture names they read.

Like llama.cpp's converter registry (ModelBase.register): config.json's `architectures` picks the
family; a new family is a new module under arch/ and one entry here.
"""

from __future__ import annotations

from pathlib import Path

from qroar_gguf.arch.base import ModelFamily, config_architectures, unsupported
from qroar_gguf.arch.llama import LlamaFamily
from qroar_gguf.arch.qwen2 import Qwen2Family
from qroar_gguf.arch.qwen3 import Qwen3Family
from qroar_gguf.source.checkpoint import open_checkpoint

FAMILIES: tuple[type[ModelFamily], ...] = (LlamaFamily, Qwen2Family, Qwen3Family)


def supported_architectures() -> tuple[str, ...]:
    return tuple(name for family in FAMILIES for name in family.hf_architectures)


def checkpoint_hparams(path: str | Path):
    """The validated hyperparameters of the checkpoint at `path` (reads config.json and headers only)."""
    return family_for(open_checkpoint(path).config).hparams


def family_for(config: dict) -> ModelFamily:
    """The family that converts this config.json, with its validated hyperparameters."""
    archs = config_architectures(config)
    for family in FAMILIES:
        if any(a in family.hf_architectures for a in archs):
            return family(config)
    raise unsupported(config, archs, supported_architectures())
