"""Phi-3 / Phi-4 GGUF files: a fused attn_qkv (Q rows, then K, then V), NEOX pairs over the first
rope.dimension_count dims of each head (three quarters in Phi-4-mini), and no rope_freqs in the loader:
llama.cpp's rope keys, with a temperature in the Q/K rotary rows of attn_qkv."""

from __future__ import annotations

from qroar_gguf.arch.base import GgufFamily, register


@register("phi3")
class Phi3Family(GgufFamily):
    qk_tensors = "fused"
