"""GGUF arches llama.cpp runs that `patch` refuses, each with its reason: no RoPE to extend, or multimodal
RoPE."""

from __future__ import annotations

from qroar_gguf.arch.base import GgufFamily, register


@register("qwen2vl", "qwen3vl", "qwen3vlmoe", "hunyuan_vl")
class MultimodalRopeFamily(GgufFamily):
    pair_route = None
    row_order = None
    refusal = ("rotates with multimodal RoPE (position sections for text, height and width), which qroar-gguf "
               "does not extend")


@register("bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "modern-bert", "neo-bert",
          "eurobert", "bloom", "mpt", "gpt2", "starcoder", "jais", "refact", "mamba", "mamba2", "rwkv6",
          "rwkv6qwen2", "rwkv7", "arwkv7", "t5", "t5encoder", "wavtokenizer-dec", "clip")
class NoRopeFamily(GgufFamily):
    """Positions come from ALiBi, learned embeddings or a recurrent state: there is no RoPE to extend."""

    pair_route = None
    row_order = None
    refusal = "has no RoPE (ALiBi, learned positions or a recurrent state): there is no context to extend"
