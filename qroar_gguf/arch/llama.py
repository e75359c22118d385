"""Llama-family checkpoints (Llama 2/3.x, SmolLM/SmolLM2, TinyLlama, Mistral) as GGUF arch `llama`.

Arch `llama` is chosen because llama.cpp (and Ollama) read `rope_freqs.weight` for it; the tensor
names come from gguf-py's own mapping table, not from strings typed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from qroar_gguf.errors import QroarError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
GGUF_ARCH = gguf.MODEL_ARCH.LLAMA
GGUF_ARCH_NAME = gguf.MODEL_ARCH_NAMES[GGUF_ARCH]


@dataclass(frozen=True)
class LlamaHparams:
    architecture: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_kv_head: int
    head_dim: int
    n_rot: int
    rope_theta: float
    rms_eps: float
    vocab_size: int
    context_length: int  # max_position_embeddings as the config states it
    tie_embeddings: bool


def read_hparams(config: dict) -> LlamaHparams:
    """Validate that the config describes a supported model and pull out what the GGUF needs."""
    archs = config.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        named = ", ".join(archs) if archs else f"model_type {config.get('model_type')!r}"
        raise QroarError(f"unsupported architecture {named}: qroar-gguf converts "
                         f"{' and '.join(SUPPORTED_ARCHITECTURES)} (Llama 2/3.x, SmolLM, TinyLlama, Mistral)")
    try:
        n_embd = int(config["hidden_size"])
        n_head = int(config["num_attention_heads"])
        n_layer = int(config["num_hidden_layers"])
        n_ff = int(config["intermediate_size"])
        vocab_size = int(config["vocab_size"])
        context_length = int(config["max_position_embeddings"])
    except KeyError as exc:
        raise QroarError(f"config.json lacks {exc.args[0]!r}, which a {arch} config must have") from None
    head_dim = int(config.get("head_dim") or n_embd // n_head)
    rope_theta = _rope_theta(config)
    partial = float(config.get("partial_rotary_factor", 1.0))
    n_rot = int(head_dim * partial)
    if n_rot <= 0 or n_rot % 2:
        raise QroarError(f"config.json gives {n_rot} rotary dimensions; RoPE needs a positive even number")
    return LlamaHparams(
        architecture=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_ff=n_ff,
        n_head=n_head,
        n_kv_head=int(config.get("num_key_value_heads") or n_head),
        head_dim=head_dim,
        n_rot=n_rot,
        rope_theta=rope_theta,
        rms_eps=float(config.get("rms_norm_eps", 1e-5)),
        vocab_size=vocab_size,
        context_length=context_length,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def _rope_theta(config: dict) -> float:
    # transformers >= 5 moved rope_theta into rope_parameters.
    params = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    return float(theta)


def rope_scaling(config: dict) -> dict | None:
    """The config's rope scaling block (old `rope_scaling` or new `rope_parameters`), None when absent."""
    block = config.get("rope_scaling") or config.get("rope_parameters")
    if not block:
        return None
    kind = block.get("rope_type", block.get("type"))
    if kind in (None, "default"):
        return None
    return dict(block, rope_type=kind)


class TensorNames:
    """HF tensor name -> GGUF tensor name, through gguf-py's table for arch `llama`."""

    def __init__(self, n_layer: int):
        self._map = gguf.get_tensor_name_map(GGUF_ARCH, n_layer)

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name, or None for tensors llama.cpp does not use (e.g. rotary inv_freq buffers)."""
        if hf_name.endswith(".rotary_emb.inv_freq"):
            return None
        return self._map.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def is_query(hf_name: str) -> bool:
    return hf_name.endswith(("q_proj.weight", "q_proj.bias"))


def is_key(hf_name: str) -> bool:
    return hf_name.endswith(("k_proj.weight", "k_proj.bias"))


def permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate_half row order -> llama.cpp's adjacent-pair order, per head (weights and biases).

    HF pairs dims (k, k + d/2) of a head; llama.cpp pairs (2k, 2k + 1). GGUF row h*d + 2k + t takes
    HF row h*d + t*d/2 + k.
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def layer_of(hf_name: str) -> int | None:
    """The block index of a layer tensor (`model.layers.N.`), None for global tensors."""
    parts = hf_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None
