"""Frequency bands of rotary pairs, per-band rope_freqs multipliers and per-band W_Q/W_K scales.

Pure functions, no I/O (the Q-ROAR paper's band-wise method; the converter folds what is computed here).

Band definition (ours; the paper does not publish one)
------------------------------------------------------
Pair ``k`` completes ``R_k = L / lam_k`` rotations within the trained context ``L``. Since
``lam_k = 2*pi*b**(2k/n_rot)`` grows geometrically with k, ``log R_k`` falls linearly with k, so
bands that are contiguous in log-rotations are contiguous in pair index (high frequencies first).

``N`` bands need ``N - 1`` edges, placed at equal steps of ``log R`` over YaRN's two boundaries,
``R = 32`` (``beta_fast``: YaRN leaves faster pairs alone) down to ``R = 1`` (``beta_slow``: slower
pairs never finished a turn in training), both included::

    N = 1: no edge (one band of all pairs)
    N = 2: R = sqrt(32) ~ 5.66
    N >= 3: R = 32 ** (1 - j/(N-2)), j = 0..N-2     (N = 3: 32 and 1, i.e. :func:`frequency_bands`;
                                                     N = 4: 32, 5.66 and 1)

Band ``j`` holds the pairs with ``edge_j > R_k >= edge_{j+1}`` (``edge_0 = inf``, ``edge_N = 0``).
So with the default ``N = 4``: (0) ``R >= 32`` (untouched by YaRN), (1) ``5.66 <= R < 32`` and
(2) ``1 <= R < 5.66`` (the two halves of YaRN's ramp in log-rotations), (3) ``R < 1``.

Every band of the band-wise method is non-empty whenever ``N <= P``, since each holds a value to
apply: a band that would be empty (a model whose pairs do not
reach some region) takes the nearest pair(s) of its neighbours; the band starts are repaired by a
forward pass ``start_j >= start_{j-1} + 1`` and a backward pass ``start_j <= start_{j+1} - 1``. The
result depends only on ``(n_rot, theta, L, N)``: deterministic. The three named bands of the
diagnostics (:func:`frequency_bands`) are the same ``N = 3`` bands without the repair: there an empty
band is what the model is, and is reported as such.

Multipliers and scales
----------------------
* rope_freqs: ``f_k = max(1, f_k(base) * m_{band(k)})`` (a band factor never makes a pair faster than
  trained).
* W_Q / W_K: every row of pair ``k`` (both rows, every head, Q heads and the fewer K heads under GQA)
  is multiplied by ``a_{band(k)}`` for Q, and by ``1/a`` (``symmetric``: every q.k product, hence the
  full-precision logits, unchanged) or ``a`` (non-symmetric: the band's logit scale becomes ``a**2``)
  for K. Non-rotary dims (partial rotary) keep scale 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qroar_gguf.errors import QroarError
from qroar_gguf.rope.layout import pair_rows
from qroar_gguf.rope.plans import YARN_BETA_FAST, YARN_BETA_SLOW, RopeFacts

DEFAULT_BANDS = 4


def band_edges(n_bands: int) -> np.ndarray:
    """The ``N - 1`` band edges in rotations within the trained context, decreasing (see module doc)."""
    n_bands = check_band_count(n_bands)
    if n_bands == 1:
        return np.empty(0)
    hi, lo = math.log(YARN_BETA_FAST), math.log(YARN_BETA_SLOW)
    if n_bands == 2:
        return np.array([math.exp((hi + lo) / 2)])
    return np.exp(np.linspace(hi, lo, n_bands - 1))


def _unrepaired_starts(facts: RopeFacts, n_bands: int) -> list[int]:
    """First pair of every band plus ``P``, straight from the edges: a band may be empty."""
    rotations = facts.rotations()  # decreasing in k
    # Band j+1 starts at the first pair with R < edge_j, i.e. after the pairs with R >= edge_j.
    return [0, *(int(np.count_nonzero(rotations >= edge)) for edge in band_edges(n_bands)), facts.n_pairs]


#: The diagnostics' names of the three bands of ``N = 3``.
FREQUENCY_BAND_NAMES = ("high", "ramp", "low")


def frequency_bands(facts: RopeFacts) -> list[tuple[str, np.ndarray]]:
    """The ``N = 3`` bands by name, unrepaired (a band may be empty), each ``(name, pair indices)``:

    * ``"high"``: ``R_k >= 32`` (many turns; YaRN leaves them alone),
    * ``"ramp"``: ``1 <= R_k < 32`` (some turns; YaRN's ramp),
    * ``"low"``:  ``R_k < 1`` (less than one turn; YaRN interpolates them fully).
    """
    starts, k = _unrepaired_starts(facts, 3), np.arange(facts.n_pairs)
    return [(name, k[starts[j]:starts[j + 1]]) for j, name in enumerate(FREQUENCY_BAND_NAMES)]


def band_starts(facts: RopeFacts, n_bands: int) -> np.ndarray:
    """First pair index of every band plus ``P`` at the end: int ``[N + 1]``, strictly increasing."""
    n_bands = check_band_count(n_bands)
    if n_bands > facts.n_pairs:
        raise QroarError(f"--bands {n_bands} is more than the {facts.n_pairs} rotary pairs")
    starts = _unrepaired_starts(facts, n_bands)
    for j in range(1, n_bands):  # repair empty bands: forward, then backward
        starts[j] = max(starts[j], starts[j - 1] + 1)
    for j in range(n_bands - 1, 0, -1):
        starts[j] = min(starts[j], starts[j + 1] - 1)
    return np.array(starts, dtype=np.int64)


def pair_bands(facts: RopeFacts, n_bands: int) -> np.ndarray:
    """The band of every pair: int ``[P]`` with values ``0..N-1``, non-decreasing."""
    starts = band_starts(facts, n_bands)
    return np.repeat(np.arange(n_bands), np.diff(starts))


def check_band_values(values, n_bands: int, what: str) -> tuple[float, ...]:
    """``values`` as a tuple of N finite positive floats, or a one-line QroarError."""
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise QroarError(f"{what} must be numbers, got {values!r}") from None
    if len(out) != n_bands:
        raise QroarError(f"{what} has {len(out)} value{'s' * (len(out) != 1)} but there {'is' if n_bands == 1 else 'are'} "
                         f"{n_bands} band{'s' * (n_bands != 1)} (--bands {n_bands}): give one per band")
    bad = [v for v in out if not (math.isfinite(v) and v > 0)]
    if bad:
        raise QroarError(f"{what} must be finite and positive, got {bad[0]:g}")
    return out


def apply_band_factors(factors: np.ndarray, facts: RopeFacts, n_bands: int, multipliers) -> np.ndarray:
    """``max(1, f_k * m_{band(k)})`` in float64 from the plan's factors; returned as float32 ``[P]``."""
    f = np.asarray(factors, dtype=np.float64)
    if f.shape != (facts.n_pairs,):
        raise QroarError(f"expected {facts.n_pairs} factors, got shape {f.shape}")
    m = np.asarray(check_band_values(multipliers, n_bands, "--band-factors"), dtype=np.float64)
    return np.maximum(f * m[pair_bands(facts, n_bands)], 1.0).astype(np.float32)


def row_scales(n_head: int, head_dim: int, n_rot: int, pair_scale: np.ndarray, layout: str = "gguf") -> np.ndarray:
    """A float64 multiplier per output row ``[n_head * head_dim]`` that scales both rows of pair k by
    ``pair_scale[k]`` in every head; non-rotary rows get 1.

    ``layout="gguf"``: pair k = rows ``h*d + 2k, h*d + 2k + 1`` (after the converter's permute);
    ``"hf"``: rows ``h*d + k, h*d + k + n_rot/2`` (rotate_half).
    """
    pair_scale = np.asarray(pair_scale, dtype=np.float64)
    n_pairs = n_rot // 2
    if pair_scale.shape != (n_pairs,):
        raise QroarError(f"expected {n_pairs} pair scales, got shape {pair_scale.shape}")
    if n_rot > head_dim or n_rot % 2:
        raise QroarError(f"rotary dims {n_rot} must be even and at most the head size {head_dim}")
    a, b = pair_rows(n_head, head_dim, n_rot, layout)
    scales = np.ones(n_head * head_dim, dtype=np.float64)
    scales[a] = pair_scale
    scales[b] = pair_scale
    return scales


def qk_row_scales(facts: RopeFacts, n_bands: int, scales, symmetric: bool, *, n_head: int, n_kv_head: int,
                  head_dim: int, layout: str = "gguf") -> tuple[np.ndarray, np.ndarray]:
    """Per-row multipliers ``(for W_Q, for W_K)`` of the band scales ``a`` (see module doc)."""
    a = np.asarray(check_band_values(scales, n_bands, "--band-scales"), dtype=np.float64)
    per_pair = a[pair_bands(facts, n_bands)]
    q = row_scales(n_head, head_dim, facts.n_rot, per_pair, layout)
    k = row_scales(n_kv_head, head_dim, facts.n_rot, 1.0 / per_pair if symmetric else per_pair, layout)
    return q, k


def check_band_count(n_bands) -> int:
    """``n_bands`` as a positive int, or a one-line QroarError."""
    if isinstance(n_bands, bool) or not isinstance(n_bands, (int, np.integer)) or n_bands < 1:
        raise QroarError(f"--bands must be a positive integer, got {n_bands!r}")
    return int(n_bands)


@dataclass(frozen=True, eq=False)
class BandFold:
    """What the converter applies for ``--bands/--band-factors/--band-scales/--symmetric``.

    ``factors``/``scales`` are None when not given (multipliers 1 / scales 1). ``q_rows``/``k_rows`` are
    float32 per-row multipliers in llama.cpp's (post-permute) layout, None without scales.
    """

    n_bands: int
    starts: np.ndarray
    factors: tuple[float, ...] | None
    scales: tuple[float, ...] | None
    symmetric: bool
    q_rows: np.ndarray | None
    k_rows: np.ndarray | None

    def apply_factors(self, facts: RopeFacts, factors: np.ndarray) -> np.ndarray:
        if self.factors is None:
            return np.asarray(factors, dtype=np.float32)
        return apply_band_factors(factors, facts, self.n_bands, self.factors)

    def provenance(self) -> dict:
        return {"bands": [int(s) for s in self.starts], "band_factors": list(self.factors or [1.0] * self.n_bands),
                "band_scales": list(self.scales or [1.0] * self.n_bands), "band_symmetric": bool(self.symmetric)}


def band_fold(facts: RopeFacts, n_bands: int, factors=None, scales=None, symmetric: bool = True, *,
              n_head: int, n_kv_head: int, head_dim: int) -> BandFold | None:
    """Validate band options; None when neither factors nor scales are given (nothing to fold)."""
    n_bands = check_band_count(n_bands)
    if factors is None and scales is None:
        return None
    starts = band_starts(facts, n_bands)
    if not isinstance(symmetric, (bool, np.bool_)):
        raise QroarError(f"symmetric must be true or false, got {symmetric!r}")
    factors = None if factors is None else check_band_values(factors, n_bands, "--band-factors")
    scales = None if scales is None else check_band_values(scales, n_bands, "--band-scales")
    q_rows = k_rows = None
    if scales is not None:
        q, k = qk_row_scales(facts, n_bands, scales, bool(symmetric), n_head=n_head, n_kv_head=n_kv_head,
                             head_dim=head_dim)
        q_rows, k_rows = q.astype(np.float32), k.astype(np.float32)
    return BandFold(n_bands=n_bands, starts=starts, factors=factors, scales=scales, symmetric=bool(symmetric),
                    q_rows=q_rows, k_rows=k_rows)
