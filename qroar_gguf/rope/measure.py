"""Measure S_k from real weights: W_Q/W_K of an HF checkpoint (rotate_half layout; which tensors they
are, the model family says) or of a GGUF file (llama.cpp's adjacent-pair layout), one tensor at a time."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from qroar_gguf.arch.base import ModelFamily
from qroar_gguf.arch.families import family_for
from qroar_gguf.errors import QroarError
from qroar_gguf.gguf_io.reader import open_gguf
from qroar_gguf.gguf_io.reader import read_hparams as read_gguf_hparams
from qroar_gguf.rope.sensitivity import SensitivityAccumulator, SensitivityResult
from qroar_gguf.source.checkpoint import Checkpoint


def measure_sensitivity(ckpt: Checkpoint, family: ModelFamily | None = None, agg: str = "max",
                        progress: bool = False) -> SensitivityResult:
    """S_k from the checkpoint's rotary projection weights, as the family names them (reads only
    those tensors); ``family`` None: the one config.json names."""
    family = family or family_for(ckpt.config)
    hp = family.hparams
    acc = SensitivityAccumulator(hp.n_layer, hp.n_rot // 2, agg=agg)
    wanted = [(n, kind) for n in ckpt.names if n.endswith(".weight") and (kind := family.rotary_kind(n))]
    for name, kind in tqdm(wanted, desc="sensitivity", unit="tensor", disable=not progress, leave=False):
        w = ckpt.load(name)
        if not np.isfinite(w).all():
            raise QroarError(f"{name} contains NaN or Inf values: the checkpoint is damaged")
        n_head = hp.n_head if kind == "q" else hp.n_kv_head
        acc.add_weight(family.layer_of(name), kind, w, n_head, hp.n_rot, "hf")
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
