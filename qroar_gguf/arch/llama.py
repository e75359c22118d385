"""Llama-family checkpoints (Llama 2/3.x, SmolLM/SmolLM2, TinyLlama, Mistral) as GGUF arch `llama`, and
`llama` GGUF files.

Arch `llama` is chosen because llama.cpp (and Ollama) read `rope_freqs.weight` for it, with adjacent
rotary pairs (rope type NORM) and whole heads rotating ("invalid n_rot" otherwise); the tensor names
come from gguf-py's own mapping table, not from strings typed here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gguf
import numpy as np

from qroar_gguf.arch.base import ModelFamily, TensorSpec, config_architectures, register, to_adjacent, unsupported
from qroar_gguf.errors import QroarError


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


class _Reader:
    """Typed reads of config.json values, each failing with one line that names the key."""

    _MAX_COUNT = 2**31 - 1  # llama.cpp keeps these in int32/uint32

    def __init__(self, config: dict, arch: str):
        self.config, self.arch = config, arch

    def _value(self, key: str, default):
        value = self.config.get(key, default)
        if value is None:
            raise QroarError(f"config.json lacks {key!r}, which a {self.arch} config must have")
        return value

    def count(self, key: str, default: int | None = None) -> int:
        value = self._value(key, default)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= self._MAX_COUNT:
            raise QroarError(f"config.json: {key} must be a positive whole number, got {value!r}")
        return value

    def number(self, key: str, default: float | None = None) -> float:
        value = self._value(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise QroarError(f"config.json: {key} must be a positive number, got {value!r}")
        return float(value)


def _rope_theta(config: dict):
    # transformers >= 5 moved rope_theta into rope_parameters.
    params = config.get("rope_parameters")
    params = params if isinstance(params, dict) else {}
    return config.get("rope_theta", params.get("rope_theta", 10000.0))


@register("llama", hf=("LlamaForCausalLM", "MistralForCausalLM"))
class LlamaFamily(ModelFamily):
    """Llama 2/3.x, SmolLM/SmolLM2, TinyLlama and Mistral as GGUF arch `llama`, whose loader reads
    rope_freqs (and optional Q/K/V biases), rotating adjacent pairs of whole heads."""

    gguf_arch = gguf.MODEL_ARCH.LLAMA
    pair_route = "rope_freqs"
    row_order = "adjacent"
    whole_heads = True

    def __init__(self, config: dict):
        super().__init__(config)
        self._map = gguf.get_tensor_name_map(self.gguf_arch, self.hparams.n_layer)

    def read_hparams(self, config: dict) -> LlamaHparams:
        """Validate that the config describes a model of this family and pull out what the GGUF needs."""
        archs = config_architectures(config)
        arch = next((a for a in archs if a in self.hf_architectures), None)
        if arch is None:
            raise unsupported(config, archs, self.hf_architectures)
        activation = config.get("hidden_act", "silu")
        if activation != "silu":  # llama.cpp's llama arch computes SiLU whatever the file says
            raise QroarError(f"config.json: hidden_act {activation!r} is not silu, which llama.cpp's llama arch computes; "
                             "this checkpoint would run wrongly")
        tied = config.get("tie_word_embeddings", False)
        if not isinstance(tied, bool):
            raise QroarError(f"config.json: tie_word_embeddings must be true or false, got {tied!r}")
        reader = _Reader(config, arch)
        count, number = reader.count, reader.number
        n_embd, n_head = count("hidden_size"), count("num_attention_heads")
        n_kv_head = count("num_key_value_heads", default=n_head)
        if n_head % n_kv_head:
            raise QroarError(f"config.json: num_attention_heads {n_head} is not a multiple of num_key_value_heads "
                             f"{n_kv_head}")
        if config.get("head_dim") is None and n_embd % n_head:
            raise QroarError(f"config.json: hidden_size {n_embd} is not a multiple of num_attention_heads {n_head}; "
                             "give head_dim")
        head_dim = count("head_dim", default=n_embd // n_head)
        partial = number("partial_rotary_factor", default=1.0)
        n_rot = int(head_dim * partial)
        if not 0 < partial <= 1 or n_rot <= 0 or n_rot % 2:
            raise QroarError(f"config.json gives {n_rot} rotary dimensions (head_dim {head_dim} x partial_rotary_factor "
                             f"{partial}); RoPE needs a positive even number at most head_dim")
        rope_theta = _rope_theta(config)
        if not (isinstance(rope_theta, (int, float)) and not isinstance(rope_theta, bool)
                and math.isfinite(rope_theta) and rope_theta > 1):
            raise QroarError(f"config.json: rope_theta must be a number above 1, got {rope_theta!r}")
        return LlamaHparams(
            architecture=arch,
            n_layer=count("num_hidden_layers"),
            n_embd=n_embd,
            n_ff=count("intermediate_size"),
            n_head=n_head,
            n_kv_head=n_kv_head,
            head_dim=head_dim,
            n_rot=n_rot,
            rope_theta=float(rope_theta),
            rms_eps=number("rms_norm_eps", default=1e-5),
            vocab_size=count("vocab_size"),
            context_length=count("max_position_embeddings"),
            tie_embeddings=tied,
        )

    def expected_tensors(self) -> dict[str, TensorSpec]:
        """Every tensor llama.cpp's llama arch loads, by HF name, with the shape the config implies.

        Biases of the attention and MLP projections are optional (llama.cpp loads them when present);
        lm_head is optional when the embeddings are tied.
        """
        hp = self.hparams
        d, q_rows, kv_rows = hp.n_embd, hp.n_head * hp.head_dim, hp.n_kv_head * hp.head_dim
        specs = {
            "model.embed_tokens.weight": TensorSpec((hp.vocab_size, d), True),
            "model.norm.weight": TensorSpec((d,), True),
            "lm_head.weight": TensorSpec((hp.vocab_size, d), not hp.tie_embeddings),
        }
        projections = {"self_attn.q_proj": (q_rows, d), "self_attn.k_proj": (kv_rows, d),
                       "self_attn.v_proj": (kv_rows, d), "self_attn.o_proj": (d, q_rows),
                       "mlp.gate_proj": (hp.n_ff, d), "mlp.up_proj": (hp.n_ff, d), "mlp.down_proj": (d, hp.n_ff)}
        for i in range(hp.n_layer):
            prefix = f"model.layers.{i}."
            for name, shape in projections.items():
                specs[f"{prefix}{name}.weight"] = TensorSpec(shape, True)
                specs[f"{prefix}{name}.bias"] = TensorSpec(shape[:1], False)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                specs[f"{prefix}{norm}.weight"] = TensorSpec((d,), True)
        return specs

    def set_gguf_parameters(self, writer: gguf.GGUFWriter, context_length: int) -> None:
        hp = self.hparams
        writer.add_vocab_size(hp.vocab_size)
        writer.add_context_length(context_length)
        writer.add_embedding_length(hp.n_embd)
        writer.add_block_count(hp.n_layer)
        writer.add_feed_forward_length(hp.n_ff)
        writer.add_head_count(hp.n_head)
        writer.add_head_count_kv(hp.n_kv_head)
        writer.add_rope_freq_base(hp.rope_theta)
        writer.add_layer_norm_rms_eps(hp.rms_eps)
        writer.add_rope_dimension_count(hp.n_rot)
        if "head_dim" in self.config and hp.head_dim != hp.n_embd // hp.n_head:
            writer.add_key_length(hp.head_dim)
            writer.add_value_length(hp.head_dim)

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name through gguf-py's table; None for tensors llama.cpp does not use (rotary buffers)."""
        if hf_name.endswith(".rotary_emb.inv_freq"):
            return None
        return self._map.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def layer_of(self, hf_name: str) -> int | None:
        """The block index of a layer tensor (`model.layers.N.`), None for global tensors."""
        parts = hf_name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part == "layers" and parts[i + 1].isdigit():
                return int(parts[i + 1])
        return None

    def rotary_kind(self, hf_name: str) -> str | None:
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return "q"
        return "k" if hf_name.endswith(("k_proj.weight", "k_proj.bias")) else None

    def modify_tensor(self, hf_name: str, values: np.ndarray) -> np.ndarray:
        """HF rotate_half rows -> llama.cpp's adjacent pairs (weights and biases of Q and K)."""
        kind = self.rotary_kind(hf_name)
        if kind is None:
            return values
        hp = self.hparams
        return to_adjacent(values, hp.n_head if kind == "q" else hp.n_kv_head, hp.head_dim)
