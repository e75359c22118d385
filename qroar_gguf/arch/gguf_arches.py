"""Which GGUF arches a file can be patched for, and by which route: the one table of what llama.cpp's
loaders do with RoPE.

From llama.cpp's source (the copy llama-cpp-python vendors): the per-arch loaders in
``src/models/*.cpp`` that create ``LLM_TENSOR_ROPE_FREQS``, and ``llama_model_rope_type``, which must be
``LLAMA_ROPE_TYPE_NORM`` (adjacent pairs, the layout ``rope/measure.py`` reads from a GGUF). An arch
whose loader does not take the tensor makes llama.cpp refuse the file ("wrong number of tensors"); every
arch reads the generic keys (``<arch>.rope.scaling.type``/``.factor``/``.original_context_length``/
``.attn_factor``, ``<arch>.rope.freq_base``) in ``load_hparams``, so those arches are extended through
the keys (``KEYS_ONLY``: linear, yarn, and ntk as a new base), with their per-arch exceptions here.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

#: Loader reads rope_freqs; rotary pairs are adjacent rows.
PATCHABLE = ("llama", "mistral3", "granite", "granitemoe", "arcee", "minicpm")
#: Loader does not read rope_freqs, but its files become a PATCHABLE arch by renaming their keys and reordering the Q/K rows
#: (whole rows, so quantized tensors move as bytes): qwen2 is llama with Q/K/V biases and NEOX pairs.
REWRITTEN_AS = {"qwen2": "llama"}


@dataclass(frozen=True)
class KeysArch:
    """An arch whose loader reads no per-pair factors: extended through llama.cpp's generic rope keys."""

    #: What its sliding-window layers (where the file declares a window) do with YaRN, when that keeps
    #: the temperature from being exact under a context shift on every layer; None: they scale like the others.
    sliding_yarn: str | None = None
    #: The patches/ file that makes its loader read rope_freqs (per-pair plans in our own build only).
    patched_runtime: str | None = None


#: Loader reads only the generic keys. Q/K norms, split or fused (phi3's attn_qkv) projections and partial
#: rotation (GLM-4 half, Phi-4-mini three quarters of each head) are found from the file's tensors and n_rot.
KEYS_ONLY = {
    "qwen3": KeysArch(patched_runtime="0001-qwen3-optional-rope-freqs.patch"),
    "qwen3moe": KeysArch(),
    "gemma2": KeysArch(),  # its sliding layers take the context's freq_scale too
    "gemma3": KeysArch(sliding_yarn="gemma3's sliding-window layers rotate with freq_scale 1, so YaRN's kernel "
                                    "factor never reaches them, yet they receive rope.scaling.attn_factor"),
    "phi3": KeysArch(),
    "olmo2": KeysArch(sliding_yarn="olmo2's sliding-window layers (OLMo 3) rotate without YaRN's factors, yet a "
                                   "context shift applies rope.scaling.attn_factor to their cached keys"),
    "glm4": KeysArch(),
}

#: Known to llama.cpp, and refused with the reason.
REFUSED = {
    "deepseek2": "deepseek2 (MLA) builds its attention scale kq_scale from YaRN's mscale with yarn_log_mul, and "
                 "ropes a separate shared key part: the temperature cannot be moved into the weights exactly",
    **{arch: f"{arch} rotates with multimodal RoPE (position sections for text, height and width), which "
             "qroar-gguf does not extend" for arch in ("qwen2vl", "qwen3vl", "qwen3vlmoe", "hunyuan_vl")},
}
#: Positions come from ALiBi, learned embeddings or a recurrent state: there is no RoPE to extend.
NO_ROPE = ("bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "modern-bert", "neo-bert",
           "eurobert", "bloom", "mpt", "gpt2", "starcoder", "jais", "refact", "mamba", "mamba2", "rwkv6",
           "rwkv6qwen2", "rwkv7", "arwkv7", "t5", "t5encoder", "wavtokenizer-dec", "clip")


def refusal(arch: str) -> str:
    """The one line that says why a file of ``arch`` cannot be patched."""
    if arch in REFUSED:
        return REFUSED[arch]
    if arch in NO_ROPE:
        return f"{arch} has no RoPE (ALiBi, learned positions or a recurrent state): there is no context to extend"
    if arch not in gguf.MODEL_ARCH_NAMES.values():
        return f"GGUF arch {arch} is unknown to the pinned llama.cpp, which would not load the file"
    return (f"qroar-gguf patches GGUF arch {', '.join(PATCHABLE)} (rope_freqs.weight), "
            f"{', '.join(KEYS_ONLY)} (llama.cpp's rope keys) and rewrites {', '.join(REWRITTEN_AS)} as "
            f"{', '.join(REWRITTEN_AS.values())}; llama.cpp runs {arch} with RoPE, but qroar-gguf does not patch it yet")
