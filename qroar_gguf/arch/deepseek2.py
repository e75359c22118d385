"""DeepSeek-V2/V3 GGUF files (arch `deepseek2`, multi-head latent attention), extended in stock runtimes
through llama.cpp's rope keys.

What the pinned loader and graph do (``src/models/deepseek2.cpp``, ``llama-context.cpp``):

* Only part of each head rotates: ``n_rot`` = qk_rope_head_dim (rope.dimension_count). Queries come from
  ``attn_q`` (lite) or ``attn_q_b``, each head's rows ``[nope | rope]``; the one rotary key part shared by
  all heads is the last ``n_rot`` rows of ``attn_kv_a_mqa``. There is no ``attn_k`` and the loader reads no
  ``rope_freqs``: yarn, linear and ntk go in as llama.cpp's own keys, per-pair plans are refused.
* Rotary pairs are adjacent (``LLAMA_ROPE_TYPE_NORM``); the file keeps Hugging Face's rows.
* The attention temperature is the graph's own, built from the scaling keys: with freq_scale ``1/s``,
  ``kq_scale = (a*(1 + 0.1 ln s))^2 * (1 + 0.1 L ln s)^2 / sqrt(head_k)``, ``a`` being the context's
  attention factor (``rope.scaling.attn_factor`` times YaRN's adjustment) and ``L`` the file's
  ``rope.scaling.yarn_log_multiplier`` / 0.1; the rotated parts take ``a`` and, under YaRN, the kernel's
  ``1 + 0.1 ln s`` on top. That is not one factor on the rotary rows, so nothing is folded: the keys
  alone make llama.cpp compute what its runtime flags (``--rope-scaling yarn --rope-scale s
  --yarn-orig-ctx L``) compute on the unextended file, by the same code, and every tensor is copied.
  A context shift re-ropes the cached rotary key part with ``a`` and the kernel's factor again (a file
  without a log multiplier, YaRN at ``s``: ``1 + 0.1 ln s`` per shift); the kq_scale part it never
  re-applies. Ollama starts llama-server without ``--context-shift`` for deepseek2 (``server/sched.go``).
"""

from __future__ import annotations

from qroar_gguf.arch.base import GgufFamily, register
from qroar_gguf.errors import QroarError


@register("deepseek2")
class Deepseek2Family(GgufFamily):
    pair_route = "keys"
    row_order = "adjacent"
    qk_tensors = "mla"
    temperature_in = "kq_scale"
    context_shift = False  # Ollama starts llama-server without --context-shift for it
    mscale_from_log_multiplier = True

    @classmethod
    def qk_rows(cls, layer: int, n_q: int, n_k: int) -> dict[str, tuple[str, int, int]]:
        raise QroarError("deepseek2's rotary rows are a part of each query head (attn_q or attn_q_b) and one key "
                         "part shared by the heads (attn_kv_a_mqa): qroar-gguf does not measure them")
