"""Outlier sensitivity of rotary pairs from W_Q / W_K row norms, frequency bands, interpolation pressure.

Pure math, no I/O. Weights arrive one tensor at a time (``SensitivityAccumulator`` never holds the
model). Everything is computed in float64.

Layouts of the ``[out, in]`` projection rows of head ``h`` (head_dim ``d``, ``P = n_rot/2`` pairs):

* ``"hf"``   (transformers' rotate_half): pair k = rows ``h*d + k`` and ``h*d + k + P``;
* ``"gguf"`` (llama.cpp NORM rope, after the converter's permute): pair k = rows ``h*d + 2k``, ``h*d + 2k + 1``.

With partial rotary (``n_rot < d``) only the first ``n_rot`` dims of each head rotate; the rest are
ignored here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qroar_gguf.choices import AGGREGATIONS, DEFAULT_AGG
from qroar_gguf.errors import QroarError
from qroar_gguf.rope.layout import LAYOUTS, pair_rows
from qroar_gguf.rope.plans import RopeFacts

KINDS = ("q", "k")

_CHUNK_ELEMENTS = 1 << 22  # float64 working set per chunk: 32 MiB


def _row_norms(w: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Euclidean norms of ``w[rows]`` in float64, chunk-wise, without overflow or underflow.

    Each row is divided by its largest magnitude before squaring, so any finite row of a float16,
    bfloat16 (converted), float32 or float64 tensor gives a finite norm unless the norm itself
    exceeds the float64 range.
    """
    out = np.empty(rows.size, dtype=np.float64)
    step = max(1, _CHUNK_ELEMENTS // max(1, w.shape[1]))
    for start in range(0, rows.size, step):
        x = np.asarray(w[rows[start:start + step]], dtype=np.float64)
        peak = np.max(np.abs(x), axis=1) if x.shape[1] else np.zeros(x.shape[0])
        safe = np.where(peak > 0, peak, 1.0)
        out[start:start + step] = peak * np.sqrt(np.sum(np.square(x / safe[:, None]), axis=1))
    return out


def pair_channel_norms(w: np.ndarray, n_head: int, n_rot: int, layout: str) -> np.ndarray:
    """Outlier strength of every rotary pair of every head: ``[n_head, P]`` float64.

    ``w`` is a projection weight ``[out, in]`` with ``out = n_head * head_dim`` (a float array: callers
    convert bfloat16). Pair k of head h owns two rows (see the module docstring for ``layout``); its
    strength is ``sqrt(||row_a||^2 + ||row_b||^2)``.
    """
    if not isinstance(w, np.ndarray):
        w = np.asarray(w)
    if w.ndim != 2:
        raise QroarError(f"expected a 2-D [out, in] weight, got shape {w.shape}")
    if w.dtype.kind != "f":
        raise QroarError(f"expected a floating-point weight, got dtype {w.dtype} (convert bfloat16 first)")
    if layout not in LAYOUTS:
        raise QroarError(f"unknown weight layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if n_head <= 0 or w.shape[0] % n_head:
        raise QroarError(f"{w.shape[0]} weight rows do not split into {n_head} heads")
    head_dim = w.shape[0] // n_head
    if n_rot <= 0 or n_rot % 2 or n_rot > head_dim:
        raise QroarError(f"rotary dims {n_rot} must be even, positive and at most the head size {head_dim}")
    a, b = pair_rows(n_head, head_dim, n_rot, layout)
    norms = _row_norms(w, np.concatenate([a.ravel(), b.ravel()]))
    na, nb = norms[: a.size].reshape(a.shape), norms[a.size:].reshape(b.shape)
    return np.hypot(na, nb)


@dataclass(frozen=True, eq=False)
class SensitivityResult:
    """``sensitivity``: ``S_k`` ``[P]``; ``per_layer``: ``[n_layer, P]`` (max over the layer's Q and K
    heads); ``per_head``: ``{(layer, "q"|"k"): [n_heads, P]}`` as received, for diagnostics."""

    sensitivity: np.ndarray
    per_layer: np.ndarray
    agg: str
    per_head: dict


class SensitivityAccumulator:
    """Streams per-layer Q and K pair norms into ``S_k``.

    Feed it with :meth:`add` (pair norms ``[n_heads, P]``, e.g. from :func:`pair_channel_norms`; K may
    have fewer heads than Q under GQA) or :meth:`add_weight` (a weight tensor, converted on the fly),
    in any order, one tensor at a time. Per layer the pair's value is the max over all heads of Q and
    K together; over layers it is ``agg``: "max" or "mean". Both aggregations are invariant to any
    permutation of heads.
    """

    def __init__(self, n_layer: int, n_pairs: int, agg: str = DEFAULT_AGG) -> None:
        if n_layer <= 0 or n_pairs <= 0:
            raise QroarError(f"need at least one layer and one pair, got {n_layer} layers and {n_pairs} pairs")
        if agg not in AGGREGATIONS:
            raise QroarError(f"unknown sensitivity aggregation {agg!r}; choose one of {', '.join(AGGREGATIONS)}")
        self.n_layer = n_layer
        self.n_pairs = n_pairs
        self.agg = agg
        self._layer_max = np.full((n_layer, n_pairs), -np.inf)
        self._seen: dict[tuple[int, str], np.ndarray] = {}

    def add(self, layer: int, kind: str, norms: np.ndarray) -> None:
        """Record the pair norms ``[n_heads, P]`` of one layer's Q (``kind="q"``) or K (``"k"``)."""
        if kind not in KINDS:
            raise QroarError(f"kind must be 'q' or 'k', got {kind!r}")
        if not 0 <= layer < self.n_layer:
            raise QroarError(f"layer {layer} is outside 0..{self.n_layer - 1}")
        if (layer, kind) in self._seen:
            raise QroarError(f"layer {layer} {kind.upper()} was already added")
        norms = np.array(norms, dtype=np.float64)
        if norms.ndim != 2 or norms.shape[1] != self.n_pairs or norms.shape[0] == 0:
            raise QroarError(f"expected pair norms of shape [n_heads, {self.n_pairs}], got {norms.shape}")
        if not np.all(np.isfinite(norms)) or np.any(norms < 0):
            raise QroarError(f"layer {layer} {kind.upper()} pair norms must be finite and non-negative")
        self._seen[(layer, kind)] = norms
        self._layer_max[layer] = np.maximum(self._layer_max[layer], norms.max(axis=0))

    def add_weight(self, layer: int, kind: str, w: np.ndarray, n_head: int, n_rot: int, layout: str) -> None:
        """:func:`pair_channel_norms` then :meth:`add`."""
        self.add(layer, kind, pair_channel_norms(w, n_head, n_rot, layout))

    def missing(self) -> list[str]:
        """What has not been added yet, e.g. ``["layer 3 K"]``."""
        return [
            f"layer {layer} {kind.upper()}"
            for layer in range(self.n_layer)
            for kind in KINDS
            if (layer, kind) not in self._seen
        ]

    def result(self) -> SensitivityResult:
        """``S`` and the per-layer detail; every layer's Q and K must have been added."""
        missing = self.missing()
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise QroarError(f"sensitivity is incomplete: missing {', '.join(missing[:3])}{more}")
        per_layer = self._layer_max.copy()
        s = per_layer.max(axis=0) if self.agg == "max" else per_layer.mean(axis=0)
        return SensitivityResult(sensitivity=s, per_layer=per_layer, agg=self.agg, per_head=dict(self._seen))

    def sensitivity(self) -> np.ndarray:
        """``S_k``, ``[P]`` float64."""
        return self.result().sensitivity


def interpolation_pressure(facts: RopeFacts, factors: np.ndarray) -> np.ndarray:
    """Interpolation pressure per pair, ``[P]`` float64 — OUR definition (the paper gives no formula).

    ``pressure_k = (1 - 1/f_k) * min(1, L / lam_k)``

    * ``1 - 1/f_k`` is the fraction of the pair's per-token phase step that the plan removes (its
      angle per token goes from ``w_k`` to ``w_k/f_k``): 0 for an untouched pair, ``1 - 1/r`` under
      linear interpolation; negative only for a factor below 1 (a stretched step).
    * ``min(1, L / lam_k)`` is the fraction of a full turn the pair completed within the trained
      context: a pair that turned at least once had its whole phase circle resolved in training, so
      compressing its steps costs in full; a slower pair saw only part of a turn and its compression
      maps unseen angles into seen ones, so it counts in proportion.

    Dimensionless, in ``[0, 1)`` for factors >= 1. A band's pressure is the mean over its pairs (see
    :func:`qroar_gguf.rope.bands.frequency_bands`).
    """
    f = np.asarray(factors, dtype=np.float64)
    if f.shape != (facts.n_pairs,):
        raise QroarError(f"expected {facts.n_pairs} factors, got shape {f.shape}")
    if not np.all(np.isfinite(f)) or np.any(f <= 0):
        raise QroarError("factors must be finite and positive")
    return (1.0 - 1.0 / f) * np.minimum(1.0, facts.rotations())
