"""Qwen2 / Qwen2.5 checkpoints (`Qwen2ForCausalLM`) and `qwen2` GGUF files, both written as GGUF arch `llama`.

llama.cpp's own `qwen2` arch never loads `rope_freqs` (it refuses a file that carries one), but its
`llama` arch computes the same model: RMSNorm, SwiGLU, grouped-query attention with the Q/K/V biases
it adds when a file has them, and the same RoPE once Q/K rows (and their biases) are permuted into
llama's adjacent pairs, exactly as for a Llama (transformers rotates halves in both). So a Qwen2
checkpoint is written as a Llama with biases; what llama does not compute is refused. A `qwen2` GGUF
(NEOX rows, as llama.cpp's converter writes it) is patched the same way: its keys renamed, its Q/K rows
(whole rows, so quantized ones move as bytes) reordered into llama's pairs, rope_freqs added.
"""

from __future__ import annotations

from qroar_gguf.arch.base import TensorSpec, register
from qroar_gguf.arch.llama import LlamaFamily, LlamaHparams
from qroar_gguf.errors import QroarError


def _slides(config: dict) -> bool:
    """Whether some layer attends through a sliding window (transformers: with use_sliding_window, the
    layers from max_window_layers on, or those layer_types names so)."""
    if not config.get("use_sliding_window"):
        return False
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list):
        return "sliding_attention" in layer_types
    layers, window_from = config.get("num_hidden_layers"), config.get("max_window_layers")
    return not (isinstance(layers, int) and isinstance(window_from, int) and window_from >= layers)


def refuse_sliding_window(config: dict, gguf_arch: str) -> None:
    if _slides(config):
        raise QroarError(f"config.json: use_sliding_window is true, but llama.cpp's {gguf_arch} arch (the one "
                         "written) attends to the whole context: this checkpoint would run wrongly")


@register("qwen2", hf=("Qwen2ForCausalLM",))
class Qwen2Family(LlamaFamily):
    # its own GGUF files rotate NEOX pairs and are read through the rope_freqs of the llama they become
    row_order = "neox"
    rewrite_as = "llama"

    def read_hparams(self, config: dict) -> LlamaHparams:
        refuse_sliding_window(config, "llama")
        return super().read_hparams(config)

    def expected_tensors(self) -> dict[str, TensorSpec]:
        specs = super().expected_tensors()
        for name, spec in specs.items():  # Qwen2's attention has Q/K/V biases: a checkpoint without them is damaged
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                specs[name] = TensorSpec(spec.shape, True)
        return specs
