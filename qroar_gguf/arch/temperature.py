"""Where a GGUF's attention temperature lives, and whether a context shift re-applies it.

llama.cpp multiplies every rotated query and key by ``cparams.yarn_attn_factor`` (which holds
``<arch>.rope.scaling.attn_factor``), and ggml's ``rope_yarn`` multiplies by ``1 + 0.1*ln(factor)`` on top
wherever the scaling type is yarn. A context shift (llama-server ``--context-shift``, Ollama's default)
re-ropes every cached key with the same factors, so each shift multiplies the cache by that product again
(``shift_factor``). A file is exact under shifts when the product is 1: its temperature then lives in
the weights (W_Q/W_K rows, their biases, or the q/k norm weights that follow them), which a shift never
touches. ``temperature_targets`` says which rows of which tensors carry it (where the arch's family
says: its q/k norms, its split or fused projections); ``gguf_io.blockscale`` scales them in place,
quantized or not.

The rules follow llama.cpp's ``llama_context`` constructor (the YaRN block) and ggml-cpu's ``rope_yarn``
in the pinned source; the arch-specific exceptions are refused with their reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gguf
import numpy as np

from qroar_gguf.arch.base import GgufFamily
from qroar_gguf.arch.families import gguf_family
from qroar_gguf.errors import QroarError
from qroar_gguf.gguf_io.layout import GgufLayout, RawTensor
from qroar_gguf.gguf_io.reader import GgufHparams


def _key(layout: GgufLayout, name: str):
    key = layout.get_field(name)
    return None if key is None else key.contents()


@dataclass(frozen=True)
class ShiftState:
    """What the file asks of llama.cpp's RoPE, and what a context shift does with it."""

    arch: str
    scaling_type: str  # rope.scaling.type as stored ("none" when absent)
    scaling_factor: float  # rope.scaling.factor (1 when absent)
    attn_factor: float  # rope.scaling.attn_factor (1 when absent)
    context_scale: float  # what llama.cpp's context puts into yarn_attn_factor before attn_factor (1 unless yarn)
    kernel_scale: float  # what ggml's rope_yarn multiplies in (1 + 0.1 ln factor with yarn, else 1)
    shifted: bool = True  # Ollama starts llama-server with --context-shift for the arch (its family says)

    @property
    def shift_factor(self) -> float:
        """What every cached key's rotated part is multiplied by at each context shift."""
        return self.context_scale * self.attn_factor * self.kernel_scale

    @property
    def exact(self) -> bool:
        return abs(self.shift_factor - 1.0) < 1e-6

    def describe(self) -> str:
        """One line for inspect: shift-safe or not, and why."""
        if not self.shifted:
            what = ("" if self.exact else f" (a llama-server --context-shift would multiply cached keys' rotary part "
                                          f"by {self.shift_factor:.6g} at each shift)")
            return f"not shifted: Ollama runs {self.arch} without --context-shift{what}"
        if self.exact:
            where = "" if self.scaling_type != "yarn" else " (yarn's own factor cancelled by attn_factor)"
            return f"exact: a context shift only rotates cached keys{where}"
        parts = []
        if self.attn_factor != 1.0:
            parts.append(f"rope.scaling.attn_factor {self.attn_factor:.6g}")
        if self.kernel_scale * self.context_scale != 1.0:
            parts.append(f"yarn's {self.kernel_scale * self.context_scale:.6g} in the kernel")
        return (f"drifts: every context shift multiplies cached keys by {self.shift_factor:.6g} again "
                f"({' and '.join(parts)}); `qroar-gguf patch --fix-shift` folds it into the weights")


def shift_state(layout: GgufLayout, arch: str, context_length: int | None, shifted: bool = True) -> ShiftState:
    """The file's RoPE scaling keys, checked against each other and its context; one QroarError line for
    a factor that is not finite and positive, or YaRN keys that contradict the context. ``shifted``: the
    arch's family's ``context_shift``."""
    where = layout.path
    rope = gguf.Keys.Rope
    kind = _key(layout, rope.SCALING_TYPE.format(arch=arch))
    kind = "none" if kind is None else kind
    if not isinstance(kind, str):
        raise QroarError(f"{where}: {arch}.rope.scaling.type is {kind!r}, not a name")
    attn = _positive(layout, rope.SCALING_ATTN_FACTOR.format(arch=arch), 1.0)
    factor = _positive(layout, rope.SCALING_FACTOR.format(arch=arch), 1.0)
    context_scale = kernel_scale = 1.0
    if kind == "yarn":
        original = _key(layout, rope.SCALING_ORIG_CTX_LEN.format(arch=arch))
        if original is not None and (isinstance(original, bool) or not isinstance(original, int) or original <= 0
                                     or (context_length is not None and original > context_length)):
            raise QroarError(f"{where}: its YaRN keys contradict its context: original context {original!r} for a "
                             f"context of {context_length}")
        if factor > 1.0:
            kernel_scale = float(np.float32(1.0 + 0.1 * math.log(factor)))
            log_mul = _key(layout, rope.SCALING_YARN_LOG_MUL.format(arch=arch))
            if log_mul:  # llama-context.cpp: get_mscale(f, mscale) / get_mscale(f, mscale_all_dims)
                family = gguf_family(arch)
                mscale = float(log_mul) if family is not None and family.mscale_from_log_multiplier else 1.0
                context_scale = _mscale(factor, mscale) / _mscale(factor, float(log_mul)) / kernel_scale
            else:
                context_scale = _mscale(factor, 1.0) / kernel_scale
    return ShiftState(arch, kind, factor, attn, context_scale, kernel_scale, shifted)


def _mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def _positive(layout: GgufLayout, name: str, default: float) -> float:
    value = _key(layout, name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise QroarError(f"{layout.path}: {name} is {value!r}, not a finite positive number")
    return float(value)


@dataclass(frozen=True)
class RowScale:
    """Rows of one tensor to multiply: ``row_factors[i]`` for stored row ``i`` (a 1-D tensor's rows are its
    values)."""

    tensor: RawTensor
    row_factors: np.ndarray


def _rows(t: RawTensor) -> int:
    return t.dims[0] if len(t.dims) == 1 else t.n_elements // t.dims[0]


def _rotary_mask(n_rows: int, head_dim: int, n_rot: int) -> np.ndarray:
    """Which of ``n_rows`` rows (whole heads of ``head_dim``) ggml rotates: the first ``n_rot`` of each head."""
    return (np.arange(n_rows) % head_dim) < n_rot


def temperature_targets(layout: GgufLayout, hp: GgufHparams, scale: float,
                        family: type[GgufFamily] | None = None) -> list[RowScale]:
    """The rows that carry an attention temperature ``scale`` on queries and keys, layer by layer: the q/k
    norm weights where the arch normalises after the projection (a scale on W_Q/W_K would be normalised
    away), else W_Q/W_K and their biases, else the Q and K rows of a fused QKV; only rotary rows, since
    llama.cpp's factor multiplies only what it rotates. ``family``: the arch's, which says which of those
    its files hold (None, for an arch no family answers for: whichever the file holds). One QroarError
    line where a layer has none."""
    names = {t.name: t for t in layout.tensors}
    targets: list[RowScale] = []
    head_dim = hp.head_size

    def add(name: str, factors: np.ndarray) -> None:
        t = names[name]
        if _rows(t) != factors.size:
            raise QroarError(f"{layout.path}: {name} has {_rows(t)} rows where {factors.size} were expected "
                             f"(heads of {head_dim})")
        targets.append(RowScale(t, factors))

    def rotary(n_rows: int) -> np.ndarray:
        return np.where(_rotary_mask(n_rows, head_dim, hp.n_rot), scale, 1.0)

    norms = family is None or family.temperature_in == "qk_norm"
    split = family is None or (family.temperature_in == "projections" and family.qk_tensors == "split")
    fused = family is None or (family.temperature_in == "projections" and family.qk_tensors == "fused")
    for layer in range(hp.n_layer):
        blk = f"blk.{layer}."
        n_q, n_k = hp.heads(layer, "q") * head_dim, hp.heads(layer, "k") * head_dim
        if norms and blk + "attn_q_norm.weight" in names and blk + "attn_k_norm.weight" in names:
            for part in ("attn_q_norm", "attn_k_norm"):
                name = blk + part + ".weight"
                n = _rows(names[name])  # one head's size (shared by the heads) or all heads'
                if n % head_dim:
                    raise QroarError(f"{layout.path}: {name} has {n} values, not whole heads of {head_dim}")
                add(name, rotary(n))
        elif split and blk + "attn_q.weight" in names and blk + "attn_k.weight" in names:
            for part, n in (("attn_q", n_q), ("attn_k", n_k)):
                for suffix in (".weight", ".bias"):
                    if blk + part + suffix in names:
                        add(blk + part + suffix, rotary(n))
        elif fused and blk + "attn_qkv.weight" in names:
            rows = _rows(names[blk + "attn_qkv.weight"])
            factors = np.concatenate([rotary(n_q), rotary(n_k), np.ones(max(rows - n_q - n_k, 0))])
            for suffix in (".weight", ".bias"):
                if blk + "attn_qkv" + suffix in names:
                    add(blk + "attn_qkv" + suffix, factors)
        else:
            where = ("attn_q/attn_k, q/k norm or attn_qkv" if family is None else "q/k norm"
                     if norms else "attn_q/attn_k" if split else "attn_qkv")
            raise QroarError(f"{layout.path}: layer {layer} has no {where} tensors to carry the attention temperature")
    return targets
