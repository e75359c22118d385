"""What a model family answers, on the GGUF side and the Hugging Face side, and the registry of families.

A family owns everything about its arch (docs/architecture.md, "one owner per architecture"):

* GGUF side (``GgufFamily``, read by `patch`, `inspect`, `plot` and `--fix-shift`): the GGUF arch names
  it answers for; how llama.cpp's loader takes a factor per rotary pair (``pair_route``: ``rope_freqs.weight``,
  phi3's ``rope_factors_long``/``_short``, or none: llama.cpp's generic rope keys only); the row order of
  its rotary pairs (llama.cpp's rope type: ``adjacent`` for NORM, ``neox``); its q/k tensors (split
  ``attn_q``/``attn_k`` or a fused ``attn_qkv``); where an attention temperature is folded (the
  projections' rotary rows, or the q/k norms that follow them); the arch its files are rewritten as
  (qwen2 -> llama); the ``patches/`` file its loader needs for rope_freqs; the refusals.
* Hugging Face side (``ModelFamily``, read by `convert`): the hooks of llama.cpp's converter model
  classes: the architectures it reads, validated hyperparameters, the tensors it must have, its GGUF
  keys, each tensor's GGUF name and layout, and its vocabulary (``read_vocab``, llama.cpp's ``set_vocab``).

Families register themselves with ``@register(...)``, as llama.cpp's converter classes do with
``ModelBase.register``; adding a family is adding one module under arch/ (``arch/families.py`` imports
them all and answers lookups).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import gguf
import numpy as np

from qroar_gguf.display import printable
from qroar_gguf.errors import QroarError

if TYPE_CHECKING:
    from qroar_gguf.arch.vocab import Vocab


def config_architectures(config: dict) -> list:
    """config.json's `architectures` as a list (a hand-written config may give the one name as a string)."""
    archs = config.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise QroarError(f"config.json: architectures must be a list of class names, got {printable(repr(archs)[:200])}")
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


#: The per-pair tensors llama.cpp's loaders read, by gguf-py's names (one F32 value per rotary pair).
ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
ROPE_FACTORS_LONG = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight"
ROPE_FACTORS_SHORT = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight"

#: How a loader takes a factor per rotary pair: the tensors a per-pair plan is written to.
PAIR_ROUTES = {
    "rope_freqs": (ROPE_FREQS,),
    # phi3: the long set when the context per sequence exceeds rope.scaling.original_context_length, else the
    # short one (llama_model::get_rope_factors); both are written with the plan's factors, so they act at
    # every context as rope_freqs does, where the folded temperature acts too
    "rope_factors": (ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT),
    "keys": (),  # none: llama.cpp's generic rope keys only (rope/scaling_keys.py)
}
#: llama.cpp's rope types -> rope.layout's names for which rows form pair k ("gguf": (2k, 2k+1); "hf": (k, k+P)).
ROW_ORDERS = {"adjacent": "gguf", "neox": "hf"}


class GgufFamily:
    """What llama.cpp's loader and graph do with a GGUF arch's RoPE, as `patch`, `inspect` and `plot` need
    it (from the pinned source: ``src/models/<arch>.cpp`` and ``llama_model_rope_type``)."""

    #: The GGUF arch names (general.architecture) this family answers for; set by ``register``.
    gguf_arches: ClassVar[tuple[str, ...]] = ()
    #: Where a per-pair plan goes (a key of PAIR_ROUTES); None: the arch is not patched (``refusal`` says why).
    pair_route: ClassVar[str | None] = "keys"
    #: The row order of rotary pairs in W_Q/W_K (a key of ROW_ORDERS); None: no RoPE.
    row_order: ClassVar[str | None] = "neox"
    #: "split" (attn_q/attn_k, with optional biases), "fused" (attn_qkv: Q rows, then K, then V) or "mla"
    #: (deepseek2's latent attention: rotary query rows in attn_q/attn_q_b, one shared key part in attn_kv_a_mqa).
    qk_tensors: ClassVar[str] = "split"
    #: Where an attention temperature is folded: "projections" (the rotary rows of the q/k tensors and their
    #: biases), "qk_norm" (the attn_q_norm/attn_k_norm weights, which would normalise a projection's scale away)
    #: or "kq_scale" (nowhere: llama.cpp's graph builds it from the rope keys themselves, deepseek2).
    temperature_in: ClassVar[str] = "projections"
    #: The arch its files are rewritten as (keys renamed, Q/K rows reordered), or None.
    rewrite_as: ClassVar[str | None] = None
    #: The loader refuses partly rotary heads (llama's "invalid n_rot").
    whole_heads: ClassVar[bool] = False
    #: The patches/ file that makes its loader read rope_freqs (per-pair plans in our own build only), or None.
    needs_patch: ClassVar[str | None] = None
    #: Why YaRN's temperature cannot be exact under a context shift on its sliding-window layers, or None.
    sliding_yarn: ClassVar[str | None] = None
    #: Whether Ollama starts llama-server with --context-shift for it.
    context_shift: ClassVar[bool] = True
    #: Whether llama.cpp takes YaRN's mscale from ``rope.scaling.yarn_log_multiplier`` (deepseek2's
    #: get_mscale(f, mscale) in llama-context.cpp) rather than 1, where the file has that key.
    mscale_from_log_multiplier: ClassVar[bool] = False
    #: Why files of this arch are not patched (with pair_route None).
    refusal: ClassVar[str | None] = None
    #: Plans llama.cpp's rope keys express (yarn, linear, ntk) are written as those keys even though the arch
    #: has a per-pair route (phi3: the form llama.cpp's converter writes, read by every runtime).
    key_plans_as_keys: ClassVar[bool] = False

    @classmethod
    def route(cls, allow_patched_runtime: bool = False, per_pair: bool = True) -> str | None:
        """The route a plan takes (a key of PAIR_ROUTES): a patched runtime, where allowed and carried, reads
        rope_freqs; ``per_pair`` False (a plan llama.cpp's keys express: yarn, linear, ntk) takes the keys
        where the family prefers them."""
        if cls.pair_route == "keys" and cls.needs_patch and allow_patched_runtime:
            return "rope_freqs"
        if cls.pair_route is not None and cls.key_plans_as_keys and not per_pair:
            return "keys"
        return cls.pair_route

    @classmethod
    def pair_layout(cls) -> str:
        """rope.layout's name for the row order of the arch's W_Q/W_K (as the file stores them)."""
        if cls.row_order is None:
            raise QroarError(f"{'/'.join(cls.gguf_arches)} has no RoPE: no rotary pairs to measure")
        return ROW_ORDERS[cls.row_order]

    @classmethod
    def qk_rows(cls, layer: int, n_q: int, n_k: int) -> dict[str, tuple[str, int, int]]:
        """"q"/"k" -> (tensor name, first row, rows): where layer ``layer``'s query and key projections
        are, for ``n_q``/``n_k`` rows (heads x head size)."""
        if cls.qk_tensors == "fused":
            name = f"blk.{layer}.attn_qkv.weight"
            return {"q": (name, 0, n_q), "k": (name, n_q, n_k)}
        return {"q": (f"blk.{layer}.attn_q.weight", 0, n_q), "k": (f"blk.{layer}.attn_k.weight", 0, n_k)}

    @classmethod
    def projection_kind(cls, name: str) -> str | None:
        """"q" or "k" for a GGUF tensor that holds query or key rows of one layer (weight or bias of a split
        projection), "qkv" for a fused one, else None."""
        parts = name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[3] not in ("weight", "bias"):
            return None
        if cls.qk_tensors == "fused":
            return "qkv" if parts[2] == "attn_qkv" else None
        return {"attn_q": "q", "attn_k": "k"}.get(parts[2])

    @classmethod
    def to_output_rows(cls, rows: np.ndarray, n_head: int, head_size: int) -> np.ndarray:
        """W_Q/W_K rows (or a bias) in the order of the arch its files are rewritten as: NEOX pairs into
        llama's adjacent pairs, whole rows moved (quantized rows move as bytes)."""
        return to_adjacent(rows, n_head, head_size) if cls.rewrite_as and cls.row_order == "neox" else rows


def to_adjacent(w: np.ndarray, n_head: int, head_size: int) -> np.ndarray:
    """Rows in rotate_half (NEOX) order -> llama.cpp's adjacent-pair order, per head (weights and biases):
    GGUF row ``h*d + 2k + t`` takes row ``h*d + t*d/2 + k``. Whole heads rotate (callers check)."""
    if w.shape[0] != n_head * head_size or head_size % 2:
        raise QroarError(f"{w.shape[0]} rows are not {n_head} heads of an even {head_size}")
    return w.reshape(n_head, 2, head_size // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_BY_HF: dict[str, type] = {}
_BY_GGUF: dict[str, type] = {}


def register(*gguf_arches: str, hf: tuple[str, ...] = ()):
    """Class decorator, like llama.cpp's ``ModelBase.register``: the family answers for these GGUF arches
    (patch, inspect, plot) and converts these Hugging Face architectures (a ``ModelFamily``)."""

    def add(cls):
        for table, names in ((_BY_GGUF, gguf_arches), (_BY_HF, hf)):
            for name in names:
                if name in table and table[name] is not cls:
                    raise RuntimeError(f"{name} is registered by {table[name].__name__} and {cls.__name__}")
                table[name] = cls
        cls.gguf_arches = tuple(gguf_arches)
        if hf:
            cls.hf_architectures = tuple(hf)
        return cls

    return add


def registered_gguf() -> dict[str, type[GgufFamily]]:
    return dict(_BY_GGUF)


def registered_hf() -> dict[str, type]:
    return dict(_BY_HF)


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]  # Hugging Face layout [out, in]
    required: bool


class ModelFamily(GgufFamily):
    """One family of Hugging Face checkpoints written as one GGUF arch, and the GGUF arch it reads
    (``GgufFamily``). Subclasses fill every hook."""

    #: config.json `architectures` names this family converts.
    hf_architectures: ClassVar[tuple[str, ...]] = ()
    #: The GGUF arch `convert` writes (its runtime must load rope_freqs; ``needs_patch``: a patched one).
    gguf_arch: ClassVar[gguf.MODEL_ARCH]
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

    def read_vocab(self, directory: Path) -> Vocab:
        """The checkpoint's tokenizer as the file's ``tokenizer.ggml.*`` keys hold it (llama.cpp's ``set_vocab``):
        SentencePiece or byte-level BPE, whichever the checkpoint ships, sized to the config's vocab_size
        (vocab.py). A family whose tokenizer needs more than that overrides this."""
        from qroar_gguf.arch.vocab import read_vocab  # here: `patch` and `inspect` need no tokenizer libraries

        return read_vocab(directory, self.hparams.vocab_size)

    def modify_tensor(self, hf_name: str, values: np.ndarray) -> np.ndarray:
        """The tensor's values in the GGUF arch's layout (rows of Q/K reordered into llama.cpp's pairs)."""
        raise NotImplementedError
