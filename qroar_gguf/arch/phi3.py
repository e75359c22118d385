"""Phi-3 / Phi-4 GGUF files: a fused attn_qkv (Q rows, then K, then V), NEOX pairs over the first
rope.dimension_count dims of each head (three quarters in Phi-4-mini), and no rope_freqs in the loader.

It reads per-pair factors of its own instead (src/models/phi3.cpp): optional ``rope_factors_long.weight``
and ``rope_factors_short.weight``, F32, ``n_rot/2`` values each, one tensor for every layer.
``llama_model::get_rope_factors`` takes the long set when the context per sequence exceeds
``rope.scaling.original_context_length`` (the trained context when absent), else the short one, and
``ggml_rope_ext`` divides pair k's rotation by factor k, as for rope_freqs. `patch` writes a per-pair plan
into both (so it acts at every context, as the folded temperature does), and the temperature into the Q/K
rotary rows of attn_qkv. Plans with a key form (yarn, linear, ntk) keep llama.cpp's rope keys.
"""

from __future__ import annotations

from qroar_gguf.arch.base import GgufFamily, register


@register("phi3")
class Phi3Family(GgufFamily):
    pair_route = "rope_factors"
    key_plans_as_keys = True
    qk_tensors = "fused"
