"""Measure S_k from real weights: W_Q/W_K of an HF checkpoint (rotate_half layout) or of a GGUF
file (llama.cpp's adjacent-pair layout), one tensor at a time."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from qroar_gguf.arch import llama
from qroar_gguf.errors import QroarError
from qroar_gguf.gguf_io.reader import open_gguf
from qroar_gguf.gguf_io.reader import read_hparams as read_gguf_hparams
from qroar_gguf.rope.sensitivity import SensitivityAccumulator, SensitivityResult
from qroar_gguf.source.checkpoint import Checkpoint


def measure_sensitivity(ckpt: Checkpoint, hp: llama.LlamaHparams, agg: str = "max",
                        progress: bool = False) -> SensitivityResult:
    """S_k from the checkpoint's q_proj/k_proj weights (reads only those tensors)."""
    acc = SensitivityAccumulator(hp.n_layer, hp.n_rot // 2, agg=agg)
    wanted = [n for n in ckpt.names if n.endswith(("q_proj.weight", "k_proj.weight"))]
    for name in tqdm(wanted, desc="sensitivity", unit="tensor", disable=not progress, leave=False):
        layer = llama.layer_of(name)
        query = llama.is_query(name)
        w = ckpt.load(name)
        if not np.isfinite(w).all():
            raise QroarError(f"{name} contains NaN or Inf values: the checkpoint is damaged")
        acc.add_weight(layer, "q" if query else "k", w, hp.n_head if query else hp.n_kv_head, hp.n_rot, "hf")
    return acc.result()


def measure_gguf_sensitivity(path: str | Path, agg: str = "max") -> SensitivityResult:
    """S_k from a GGUF's attn_q/attn_k tensors (dequantized one at a time; llama.cpp layout)."""
    reader = open_gguf(path)
    hp = read_gguf_hparams(reader, path)
    acc = SensitivityAccumulator(hp.n_layer, hp.n_rot // 2, agg=agg)
    for t in reader.tensors:
        parts = t.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in ("attn_q", "attn_k") and parts[3] == "weight":
            w = gguf.quants.dequantize(t.data, t.tensor_type)
            query = parts[2] == "attn_q"
            acc.add_weight(int(parts[1]), "q" if query else "k", w, hp.n_head if query else hp.n_kv_head, hp.n_rot,
                           "gguf")
    return acc.result()
