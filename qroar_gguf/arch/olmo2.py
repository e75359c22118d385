"""OLMo 2 (and OLMo 3, which declares a sliding window) GGUF files: NEOX pairs, q/k norms over all heads
after the projections, no rope_freqs in the loader: llama.cpp's rope keys."""

from __future__ import annotations

from qroar_gguf.arch.base import GgufFamily, register


@register("olmo2")
class Olmo2Family(GgufFamily):
    temperature_in = "qk_norm"
    sliding_yarn = ("olmo2's sliding-window layers (OLMo 3) rotate without YaRN's factors, yet a context shift "
                    "applies rope.scaling.attn_factor to their cached keys")
