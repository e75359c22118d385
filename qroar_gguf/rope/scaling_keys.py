"""A plan as llama.cpp's own rope keys, for arches whose loader reads no per-pair factors
(families whose ``pair_route`` is "keys"): what `patch` writes for them, as pure functions.

llama.cpp computes linear and YaRN scaling from ``<arch>.rope.scaling.type``/``.factor``/
``.original_context_length`` exactly as transformers does, and NTK is a change of ``<arch>.rope.freq_base``.
Per-pair plans (llama3, qroar, band factors) have no key form and are refused with what works instead.

YaRN's temperature must survive a context shift, which re-ropes every cached key with the context's
attention factor: the kernel's own ``1 + 0.1 ln factor`` (``m``) is cancelled by ``rope.scaling.attn_factor =
1/m``, and the plan's temperature (with any attn_factor the file had) is folded into the q/k rows instead
(``fold``), so a shift only rotates. Families whose graph builds the temperature from the keys themselves
(``temperature_in`` "kq_scale": deepseek2) get the keys alone, the file's attn_factor kept: what llama.cpp's
runtime flags compute, by the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gguf
import numpy as np

from qroar_gguf.arch.base import GgufFamily
from qroar_gguf.errors import QroarError
from qroar_gguf.rope.plans import YARN_BETA_FAST, YARN_BETA_SLOW, RopeFacts, RopePlan
from qroar_gguf.rope.spec import PlanSpec

KEYS_METHODS = ("none", "linear", "yarn", "ntk")
VT = gguf.GGUFValueType


@dataclass(frozen=True)
class FileRope:
    """What a keys-only file already asks of llama.cpp's RoPE."""

    arch: str
    scaling_type: str  # "none" or "linear" (a patch refuses the others before)
    scaling_factor: float  # 1 when absent
    attn_factor: float  # 1 when absent
    sliding: bool  # it declares a sliding window (interleaved sliding layers)
    sections: bool  # it declares rope.dimension_sections (multimodal RoPE)


@dataclass(frozen=True)
class KeysPlan:
    keys: dict[str, tuple[VT, object]]  # key name -> (type, value) to write
    attn_factor: float | None  # rope.scaling.attn_factor to write (None: drop it)
    fold: float  # multiplied into the rotary q/k rows (1: none)
    kept_attn_factor: bool = False  # attn_factor is the file's own, kept (the graph builds the temperature)

    def describe(self) -> str:
        """One line for the command line: the keys as written."""
        parts = [f"{name.split('.', 1)[1]} {value:.6g}" if isinstance(value, float) else f"{name.split('.', 1)[1]} {value}"
                 for name, (_, value) in self.keys.items()]
        if self.attn_factor is not None:
            why = "the file's own, kept" if self.kept_attn_factor else "cancels the kernel's YaRN factor"
            parts.append(f"rope.scaling.attn_factor {self.attn_factor:.6g} ({why})")
        return ", ".join(parts) or "none (the context only)"


def has_key_form(spec: PlanSpec) -> bool:
    """Whether llama.cpp's rope keys express the plan (no factor per pair)."""
    return spec.method in KEYS_METHODS and not spec.bands.given


def refuse_per_pair(arch: str, family: type[GgufFamily], spec: PlanSpec) -> None:
    """One QroarError line for a plan with no key form, saying what would work."""
    if has_key_form(spec):
        return
    what = "band factors" if spec.bands.given else f"--method {spec.method}"
    also = (f", or --allow-patched-runtime writes rope_freqs for llama.cpp builds carrying "
            f"patches/{family.needs_patch} (stock runtimes refuse that file)" if family.needs_patch else "")
    raise QroarError(f"{what} sets a factor per rotary pair, which needs rope_freqs.weight, and llama.cpp's {arch} "
                     f"loader does not read it (it refuses a file that carries one): --method yarn, linear or ntk "
                     f"extend a {arch} file through llama.cpp's own rope keys{also}")


def keys_plan(family: type[GgufFamily], file: FileRope, spec: PlanSpec, plan: RopePlan, facts: RopeFacts) -> KeysPlan:
    """The keys that make llama.cpp run ``plan`` on ``file``, and the temperature to fold; one QroarError
    line where no key form is exact."""
    arch, rope = file.arch, gguf.Keys.Rope
    if file.sections:
        raise QroarError(f"this {arch} file rotates with multimodal RoPE (rope.dimension_sections), which "
                         "qroar-gguf does not extend")
    keys: dict[str, tuple[VT, object]] = {}
    temperature = file.attn_factor * plan.attn_scale
    attn_factor = None
    if plan.method == "linear":
        # composes with a file's own linear factor (Gemma 3 4B and larger carry x8): positions divide by both
        keys[rope.SCALING_TYPE.format(arch=arch)] = (VT.STRING, "linear")
        keys[rope.SCALING_FACTOR.format(arch=arch)] = (VT.FLOAT32, float(file.scaling_factor * facts.scale))
    elif plan.method == "ntk":
        # the file's own linear factor, if any, stays: a new base under the same interpolation
        b = facts.theta * facts.scale ** (facts.n_rot / (facts.n_rot - 2)) if facts.n_rot > 2 else facts.theta
        keys[rope.FREQ_BASE.format(arch=arch)] = (VT.FLOAT32, float(b))
    elif plan.method == "yarn":
        if file.scaling_type == "linear" and file.scaling_factor != 1.0:
            raise QroarError(f"this {arch} file already interpolates positions linearly (x{file.scaling_factor:g}) and "
                             "llama.cpp applies one scaling type: YaRN's ramp over it is not what the model was "
                             "tuned on; --method linear multiplies into its factor (or ntk changes its base)")
        if (plan.params.get("beta_fast"), plan.params.get("beta_slow")) != (YARN_BETA_FAST, YARN_BETA_SLOW):
            raise QroarError(f"llama.cpp's {arch} loader reads no YaRN beta keys (it uses beta_fast "
                             f"{YARN_BETA_FAST:g} and beta_slow {YARN_BETA_SLOW:g}): other betas need rope_freqs")
        if file.sliding and family.sliding_yarn is not None:
            raise QroarError(f"{family.sliding_yarn}: no attn_factor key keeps YaRN's temperature exact under a context "
                             "shift on both kinds of layer; --method linear or ntk extend it exactly")
        keys[rope.SCALING_TYPE.format(arch=arch)] = (VT.STRING, "yarn")
        keys[rope.SCALING_FACTOR.format(arch=arch)] = (VT.FLOAT32, float(facts.scale))
        keys[rope.SCALING_ORIG_CTX_LEN.format(arch=arch)] = (VT.UINT32, int(facts.trained_ctx))
        if facts.scale > 1.0 and family.temperature_in != "kq_scale":
            # ggml's rope_yarn multiplies by this (in float32) whenever ext_factor != 0; the key cancels it
            kernel = float(np.float32(1.0 + 0.1 * math.log(np.float32(facts.scale))))
            attn_factor = float(np.float32(1.0 / kernel))
    elif plan.method != "none":
        raise QroarError(f"--method {plan.method} has no form in llama.cpp's rope keys")
    if family.temperature_in == "kq_scale":
        # deepseek2: the graph builds YaRN's temperature from these keys (kq_scale and the kernel), and the
        # file's own attn_factor is one of its inputs: kept as it is, nothing folded (arch/deepseek2.py)
        kept = None if file.attn_factor == 1.0 else float(np.float32(file.attn_factor))
        return KeysPlan(keys, kept, 1.0, kept_attn_factor=True)
    return KeysPlan(keys, attn_factor, float(temperature))
