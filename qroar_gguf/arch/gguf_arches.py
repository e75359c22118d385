"""Which GGUF arches a file can be patched for: llama.cpp's loader must read ``rope_freqs.weight``.

From llama.cpp's source (the copy llama-cpp-python vendors): the per-arch loaders in
``src/models/*.cpp`` that create ``LLM_TENSOR_ROPE_FREQS``, and ``llama_model_rope_type``, which must be
``LLAMA_ROPE_TYPE_NORM`` (adjacent pairs, the layout ``rope/measure.py`` reads from a GGUF). An arch
whose loader does not take the tensor makes llama.cpp refuse the file ("wrong number of tensors").
"""

from __future__ import annotations

#: Loader reads rope_freqs; rotary pairs are adjacent rows.
PATCHABLE = ("llama", "mistral3", "granite", "granitemoe", "arcee", "minicpm")
#: Arches whose files become another, patchable arch by renaming their keys and reordering the Q/K rows
#: (whole rows, so quantized tensors move as bytes): qwen2 is llama with Q/K/V biases and NEOX pairs.
REWRITTEN_AS = {"qwen2": "llama"}
#: Loader never reads rope_freqs: llama.cpp refuses a file that carries one.
NO_ROPE_FREQS = ("qwen2", "qwen2moe", "qwen3", "qwen3moe", "gemma", "gemma2", "gemma3", "phi2", "phi3",
                 "starcoder2", "olmo", "olmo2", "stablelm", "internlm2", "cohere", "command-r")


def refusal(arch: str) -> str:
    """The one line that says why a file of ``arch`` cannot be patched."""
    if arch in NO_ROPE_FREQS and arch not in REWRITTEN_AS:
        return (f"llama.cpp's {arch} loader does not read rope_freqs.weight and refuses a file that carries it "
                f"(\"wrong number of tensors\"), so a {arch} file cannot be extended this way")
    return (f"qroar-gguf patches GGUF arch {', '.join(PATCHABLE)} (llama.cpp reads rope_freqs.weight for "
            f"those) and rewrites {', '.join(REWRITTEN_AS)} as {', '.join(REWRITTEN_AS.values())}; this file's arch "
            f"is {arch}")
