"""Which two rows of a W_Q/W_K projection form rotary pair k, in either layout.

``"hf"``: Hugging Face's rotate_half pairs dims ``(k, k + n_rot/2)`` of each head; ``"gguf"``:
llama.cpp pairs adjacent dims ``(2k, 2k + 1)`` (the converter permutes the rows; arch/llama.py).
"""

from __future__ import annotations

import numpy as np

from qroar_gguf.errors import QroarError

LAYOUTS = ("hf", "gguf")


def pair_rows(n_head: int, head_dim: int, n_rot: int, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(a, b)``, each ``[n_head, P]``, of the two rows that make up every pair."""
    n_pairs = n_rot // 2
    k = np.arange(n_pairs)
    if layout == "hf":
        a, b = k, k + n_pairs
    elif layout == "gguf":
        a, b = 2 * k, 2 * k + 1
    else:
        raise QroarError(f"unknown weight layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    offsets = (np.arange(n_head) * head_dim)[:, None]
    return offsets + a[None, :], offsets + b[None, :]
