"""Paired comparison of two runs scored on the same tokens (two plans, two quantizations...).

Because both arrays hold the NLL of the *same* tokens, the difference ``d = nll_a - nll_b`` has far
less variance than either array: the standard error of ``mean(d)`` resolves PPL differences that
the two PPLs' own error bars hide. ``PPL_a / PPL_b = exp(mean(d))``.

Per-token differences inside one chunk are correlated; pass ``block`` (the tokens scored per chunk,
``n_ctx - 1 - n_ctx//2``) to take the standard error over per-chunk mean differences instead, which
does not assume independence within a chunk (needs at least 2 chunks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qroar_gguf.errors import QroarError

Z95 = 1.959963984540054


@dataclass(frozen=True)
class PairedComparison:
    n: int
    mean_diff: float  # mean(nll_a - nll_b), nats per token; < 0: a is better
    se: float  # standard error of mean_diff
    ppl_a: float
    ppl_b: float

    @property
    def ppl_ratio(self) -> float:
        """PPL_a / PPL_b."""
        return math.exp(self.mean_diff)

    @property
    def ratio_ci95(self) -> tuple[float, float]:
        return math.exp(self.mean_diff - Z95 * self.se), math.exp(self.mean_diff + Z95 * self.se)

    @property
    def z(self) -> float:
        """mean_diff in standard errors (|z| > 2: a real difference at about 95%)."""
        return self.mean_diff / self.se if self.se > 0 else (0.0 if self.mean_diff == 0 else math.copysign(math.inf, self.mean_diff))

    def to_dict(self) -> dict:
        lo, hi = self.ratio_ci95
        return {
            "n": self.n,
            "mean_diff": self.mean_diff,
            "se": self.se,
            "ppl_a": self.ppl_a,
            "ppl_b": self.ppl_b,
            "ppl_ratio": self.ppl_ratio,
            "ppl_ratio_ci95": [lo, hi],
            "z": self.z,
        }


def paired_compare(nll_a, nll_b, *, block: int | None = None) -> PairedComparison:
    """Compare per-token NLL arrays of two runs on the same tokens (``a`` against ``b``)."""
    a = np.asarray(nll_a, dtype=np.float64).ravel()
    b = np.asarray(nll_b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise QroarError(
            f"the two runs scored different tokens ({a.size} vs {b.size}): run both with the same --ctx and text"
        )
    if a.size < 2:
        raise QroarError("a paired comparison needs at least 2 scored tokens")
    d = a - b
    mean = float(d.mean())
    if block is None:
        se = float(d.std(ddof=1) / math.sqrt(d.size))
    else:
        if block < 1 or d.size % block:
            raise QroarError(f"block {block} does not divide the {d.size} scored tokens")
        m = d.reshape(-1, block).mean(axis=1)
        if m.size < 2:
            raise QroarError("a per-chunk standard error needs at least 2 chunks")
        se = float(m.std(ddof=1) / math.sqrt(m.size))
    return PairedComparison(
        n=int(d.size),
        mean_diff=mean,
        se=se,
        ppl_a=math.exp(float(a.mean())),
        ppl_b=math.exp(float(b.mean())),
    )
