"""Measure S_k from real weights: W_Q/W_K of an HF checkpoint (rotate_half layout; which tensors they
are, the model family says) or of a GGUF file (which tensors and rows, and in which row order its pairs
lie, the family of the file's arch says: adjacent for llama, NEOX for qwen2/qwen3/phi3...), one tensor
at a time."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from qroar_gguf.arch.base import ModelFamily
from qroar_gguf.arch.families import family_for, gguf_family
from qroar_gguf.choices import DEFAULT_AGG
from qroar_gguf.errors import QroarError
from qroar_gguf.gguf_io.layout import GgufLayout, read_layout
from qroar_gguf.gguf_io.reader import check_attention_shapes
from qroar_gguf.gguf_io.reader import read_hparams as read_gguf_hparams
from qroar_gguf.rope.sensitivity import SensitivityAccumulator, SensitivityResult
from qroar_gguf.source.checkpoint import Checkpoint


def measure_sensitivity(ckpt: Checkpoint, family: ModelFamily | None = None, agg: str = DEFAULT_AGG,
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


def measure_gguf_sensitivity(path: str | Path, agg: str = DEFAULT_AGG,
                             layout: GgufLayout | None = None) -> SensitivityResult:
    """S_k from a GGUF's query and key projections (dequantized one tensor at a time), in the row order of
    the file's arch (its family's). ``layout``: the file's, when the caller has read it already."""
    layout = layout or read_layout(path)
    hp = read_gguf_hparams(layout, path)
    family = gguf_family(hp.architecture)
    if family is None:
        raise QroarError(f"{path}: qroar-gguf does not know which rows of a {hp.architecture} file form rotary pairs")
    pairs = family.pair_layout()
    if family.qk_tensors == "split":
        check_attention_shapes(hp, layout.tensors, path)  # the sizes below are then the tensors', not claims
    names = {t.name: t for t in layout.tensors}
    acc = SensitivityAccumulator(hp.n_layer, hp.n_rot // 2, agg=agg)
    with open(path, "rb") as f:  # plain reads, one tensor at a time: a map's pages would stay resident
        for layer in range(hp.n_layer):
            n_q, n_k = (hp.heads(layer, kind) * hp.head_size for kind in ("q", "k"))
            loaded: dict[str, np.ndarray] = {}
            for kind, (name, first, n_rows) in family.qk_rows(layer, n_q, n_k).items():
                t = names.get(name)
                if t is None:
                    raise QroarError(f"{path} has no {name}: a {hp.architecture} file with {hp.n_layer} layers "
                                     "needs one per layer")
                if name not in loaded:
                    loaded = {name: _read_tensor(f, t, path)}
                w = loaded[name]
                if w.ndim != 2 or w.shape[0] < first + n_rows or (family.qk_tensors == "fused"
                                                                   and w.shape[1] != hp.n_embd):
                    raise QroarError(f"{path}: {name} has shape {list(t.dims)}, too few rows for {n_q} query and "
                                     f"{n_k} key rows (heads of {hp.head_size}) of an embedding of {hp.n_embd}")
                acc.add_weight(layer, kind, w[first:first + n_rows], hp.heads(layer, kind), hp.n_rot, pairs)
    return acc.result()


def _read_tensor(f, t, path) -> np.ndarray:
    """One tensor's values, read from the open file and dequantized; damaged or truncated data refused."""
    f.seek(t.data_offset)
    raw = np.frombuffer(f.read(t.n_bytes), dtype=np.uint8)
    if raw.size != t.n_bytes:
        raise QroarError(f"{path} ends inside {t.name}: it is truncated")
    w = _dequantized(raw, t, path)
    if not np.isfinite(w).all():
        raise QroarError(f"{t.name} in {path} holds NaN or Inf values: the file is damaged")
    return w


def _dequantized(raw: np.ndarray, t, path) -> np.ndarray:
    """One tensor's values; a type gguf-py cannot dequantize is one line naming it."""
    try:
        with np.errstate(all="ignore"):  # damaged blocks decode to Inf/NaN: the caller refuses them
            return gguf.quants.dequantize(raw.reshape(t.byte_shape), t.tensor_type)
    except NotImplementedError:
        raise QroarError(f"{path}: {t.name} is {t.tensor_type.name}, which gguf-py cannot dequantize to measure "
                         "the weights; a plan that needs no weights (--method yarn, linear, ntk) works") from None
