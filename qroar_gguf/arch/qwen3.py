"""Qwen3 checkpoints (`Qwen3ForCausalLM`) as GGUF arch `qwen3`, for the llama.cpp qroar-gguf builds; `qwen3`
and `qwen3moe` GGUF files, extended in stock runtimes through llama.cpp's rope keys.

No stock llama.cpp arch that loads `rope_freqs` computes Qwen3's attention as it is (per-head RMSNorm
of q and k before NEOX RoPE), and stock llama.cpp's `qwen3` refuses a file carrying `rope_freqs`
("wrong number of tensors"). patches/0001-qwen3-optional-rope-freqs.patch makes the qwen3 loader
take the tensor; the tools and bindings the set-up builds include it, stock runtimes (llama.cpp
releases, Ollama) do not. So these files are refused unless asked for (`--allow-patched-runtime`)
and say in their metadata which patch they need.

Rows stay in Hugging Face's order: llama.cpp rotates qwen3 in NEOX mode, pairing dims (k, k + d/2)
as transformers does, and `rope_freqs[k]` divides pair k's rotation there as for adjacent pairs. Both
normalise q and k per head after the projections, so an attention temperature goes into the norms' weights.
"""

from __future__ import annotations

import gguf
import numpy as np

from qroar_gguf.arch.base import GgufFamily, TensorSpec, register
from qroar_gguf.arch.llama import LlamaFamily, LlamaHparams
from qroar_gguf.arch.qwen2 import refuse_sliding_window
from qroar_gguf.errors import QroarError

#: The change to llama.cpp a qwen3 file with rope_freqs needs (patches/).
RUNTIME_PATCH = "0001-qwen3-optional-rope-freqs.patch"


@register("qwen3", hf=("Qwen3ForCausalLM",))
class Qwen3Family(LlamaFamily):
    gguf_arch = gguf.MODEL_ARCH.QWEN3
    pair_route = "keys"  # stock llama.cpp; rope_freqs in builds carrying needs_patch
    row_order = "neox"
    whole_heads = False  # asserted at conversion (read_hparams); a GGUF's n_rot is the loader's business
    temperature_in = "qk_norm"
    needs_patch = RUNTIME_PATCH
    folds_band_scales = False  # rows stay in NEOX order, and the q/k norms would undo a W_Q/W_K scale

    def read_hparams(self, config: dict) -> LlamaHparams:
        refuse_sliding_window(config, "qwen3")
        hp = super().read_hparams(config)
        if hp.n_rot != hp.head_dim:  # llama.cpp's qwen3 graph asserts it
            raise QroarError(f"config.json: {hp.n_rot} rotary dimensions of head_dim {hp.head_dim}; llama.cpp's "
                             "qwen3 rotates whole heads (partial_rotary_factor 1)")
        return hp

    def expected_tensors(self) -> dict[str, TensorSpec]:
        specs = {name: spec for name, spec in super().expected_tensors().items()
                 if not name.endswith(("mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias",
                                       "self_attn.o_proj.bias"))}  # the qwen3 loader takes no others
        for i in range(self.hparams.n_layer):
            for norm in ("q_norm", "k_norm"):
                specs[f"model.layers.{i}.self_attn.{norm}.weight"] = TensorSpec((self.hparams.head_dim,), True)
        return specs

    def scale_kind(self, hf_name: str) -> str | None:
        # q and k are RMS-normalised after their projections, which would cancel a scale folded into
        # W_Q/W_K: the norms' weights carry it (the scale then multiplies q and k before RoPE, as wanted).
        return ("q" if hf_name.endswith("self_attn.q_norm.weight")
                else "k" if hf_name.endswith("self_attn.k_norm.weight") else None)

    def modify_tensor(self, hf_name: str, values: np.ndarray) -> np.ndarray:
        return values  # NEOX: Hugging Face's row order is llama.cpp's


@register("qwen3moe")
class Qwen3MoeFamily(GgufFamily):
    """Qwen3-MoE GGUF files: Qwen3's attention (q/k norms, NEOX) over experts; its loader reads no rope_freqs."""

    temperature_in = "qk_norm"
