"""GGUF arches whose loaders read rope_freqs.weight with adjacent pairs (rope type NORM) as llama's does:
Mistral 3, Granite, Granite-MoE, Arcee and MiniCPM files are patched like llama files, keeping their arch."""

from __future__ import annotations

from qroar_gguf.arch.base import GgufFamily, register


@register("mistral3", "granite", "granitemoe", "arcee", "minicpm")
class LlamaLikeFamily(GgufFamily):
    pair_route = "rope_freqs"
    row_order = "adjacent"
