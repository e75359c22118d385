"""What a model family gives the converter: the hooks of llama.cpp's converter model classes.

convert.py runs the same stages for every family and asks the family, through these hooks, for what
differs: which Hugging Face architectures it reads, its validated hyperparameters, the tensors it
must have (names and shapes), its GGUF arch and keys, each tensor's GGUF name, and any change of a
tensor's layout (Q/K rows reordered for llama.cpp's rotary pairs). A new family is a new module
with a subclass, listed in arch/families.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import gguf
import numpy as np

from qroar_gguf.errors import QroarError


def config_architectures(config: dict) -> list:
    """config.json's `architectures` as a list (a hand-written config may give the one name as a string)."""
    archs = config.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    if not isinstance(archs, list):
        raise QroarError(f"config.json: architectures must be a list of class names, got {archs!r}")
    return archs


def _listed(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def unsupported(config: dict, archs: list, supported: tuple[str, ...]) -> QroarError:
    """The one line for a config whose architecture no family converts."""
    if not archs:
        return QroarError(f"config.json names no architectures (model_type {config.get('model_type')!r}): add the "
                          f"model's class, e.g. \"architectures\": [\"{supported[0]}\"], if it is one of "
                          f"{_listed(supported)}")
    return QroarError(f"unsupported architecture {', '.join(map(str, archs))}: qroar-gguf converts "
                      f"{_listed(supported)}")


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]  # Hugging Face layout [out, in]
    required: bool


class ModelFamily:
    """One family of Hugging Face checkpoints written as one GGUF arch. Subclasses fill every hook."""

    #: config.json `architectures` names this family converts.
    hf_architectures: ClassVar[tuple[str, ...]] = ()
    #: The GGUF arch the file declares (its runtime must load rope_freqs).
    gguf_arch: ClassVar[gguf.MODEL_ARCH]
    #: None when stock llama.cpp loads rope_freqs for the arch; else the patches/ file its runtime needs
    #: (such files are written only when asked for, and say so in their metadata).
    needs_patch: ClassVar[str | None] = None
    #: Whether per-band row scales (--band-scales) can be folded: their rows are in llama's pair layout.
    folds_band_scales: ClassVar[bool] = True

    def __init__(self, config: dict):
        self.config = config
        self.hparams = self.read_hparams(config)

    @property
    def gguf_arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def read_hparams(self, config: dict) -> Any:
        """Validated hyperparameters (n_head, n_kv_head, head_dim, n_rot, rope_theta, context_length, ...);
        one QroarError line for anything missing or of the wrong kind."""
        raise NotImplementedError

    def expected_tensors(self) -> dict[str, TensorSpec]:
        """Every tensor the GGUF arch's loader takes, by Hugging Face name, with the shape the config implies."""
        raise NotImplementedError

    def set_gguf_parameters(self, writer: gguf.GGUFWriter, context_length: int) -> None:
        """The arch's `<arch>.*` keys, the context length being the target one."""
        raise NotImplementedError

    def gguf_name(self, hf_name: str) -> str | None:
        """The tensor's GGUF name; None for a tensor the file does not carry (e.g. rotary buffers)."""
        raise NotImplementedError

    def rotary_kind(self, hf_name: str) -> str | None:
        """"q" or "k" for the rotary projections (weights and biases) whose rows form RoPE pairs, else None."""
        raise NotImplementedError

    def scale_kind(self, hf_name: str) -> str | None:
        """"q" or "k" for the tensors an attention scale multiplies (YaRN's, folded at conversion): the
        rotary projections themselves unless a norm follows them (then the norm's weight)."""
        return self.rotary_kind(hf_name)

    def layer_of(self, hf_name: str) -> int | None:
        """The block a layer tensor belongs to; None for global tensors."""
        raise NotImplementedError

    def modify_tensor(self, hf_name: str, values: np.ndarray) -> np.ndarray:
        """The tensor's values in the GGUF arch's layout (rows of Q/K reordered into llama.cpp's pairs)."""
        raise NotImplementedError
