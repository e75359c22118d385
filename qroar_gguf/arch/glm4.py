"""GLM-4 GGUF files: NEOX pairs over half of each head (rope.dimension_count), split q/k projections with
biases, no rope_freqs in the loader: llama.cpp's rope keys; a temperature goes into the rotary rows only."""

from __future__ import annotations

from qroar_gguf.arch.base import GgufFamily, register


@register("glm4")
class Glm4Family(GgufFamily):
    pass
