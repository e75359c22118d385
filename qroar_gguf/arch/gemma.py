"""Gemma 2 and Gemma 3 GGUF files: NEOX pairs, no rope_freqs in their loaders, so llama.cpp's rope keys.

Both interleave sliding-window layers with global ones. llama.cpp's ``get_rope_freq_scale`` returns the
sliding layers' own scale (1) for Gemma 3, so YaRN's kernel factor never reaches them while
``rope.scaling.attn_factor`` does: no key keeps YaRN's temperature exact under a context shift there.
Gemma 2's sliding layers take the context's scale like the others. Gemma 3 4B and larger already carry
linear x8 on their global layers: a linear plan multiplies into it (rope/scaling_keys.py).
"""

from __future__ import annotations

from qroar_gguf.arch.base import GgufFamily, register


@register("gemma2")
class Gemma2Family(GgufFamily):
    """Gemma 2: split q/k projections, no q/k norms; its sliding layers scale like the global ones."""


@register("gemma3")
class Gemma3Family(GgufFamily):
    """Gemma 3: q/k norms after the projections carry a temperature; sliding layers never scaled."""

    temperature_in = "qk_norm"
    sliding_yarn = ("gemma3's sliding-window layers rotate with freq_scale 1, so YaRN's kernel factor never "
                    "reaches them, yet they receive rope.scaling.attn_factor")
