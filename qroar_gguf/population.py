"""A population search over a box: CMA-ES (Hansen's "The CMA Evolution Strategy: A Tutorial", 2016),
ask/tell, pure numpy, deterministic under a seed.

Why CMA-ES: the band search's objective is a black box, deterministic on a CPU but expensive (one llama.cpp
evaluation per candidate) over a few to a few dozen continuous coordinates, with coupled bands (raising one
band's factor changes what is best for its neighbours). CMA-ES learns that coupling in its covariance, and
its generations are independent candidates, which is what a GPU can evaluate side by side.

Conventions here:

* Coordinates live in ``[lower, upper]``; samples are clipped into the box before they are rounded and
  evaluated ("repair"), and the strategy is told the repaired points, so it learns from what was measured.
* ``resolution`` rounds every evaluated point (0: none), so candidates are readable and a point close to one
  already measured is the same candidate (the caller's cache then answers it).
* Ranking uses the objective values only; a failed candidate is told ``inf`` (or NaN) and ranks last. Only
  candidates that ran move the strategy: when fewer than half of a generation ran, the recombination weights
  are those of the ones that did, renormalised, and a generation where none ran changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def default_population(n: int) -> int:
    """CMA-ES's default population size for ``n`` coordinates: 4 + floor(3 ln n)."""
    return 4 + int(math.floor(3 * math.log(max(n, 1))))


@dataclass
class CmaEs:
    """CMA-ES with rank-one and rank-mu covariance updates and cumulative step-size adaptation."""

    mean: np.ndarray
    sigma: float
    lower: np.ndarray
    upper: np.ndarray
    population: int
    seed: int = 0
    resolution: float = 0.0
    #: Each coordinate's first step relative to ``sigma`` (the starting covariance's square root, diagonal):
    #: for coordinates whose objective is far steeper than the others'. None: all alike.
    scales: np.ndarray | None = None
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self):
        self.mean = np.asarray(self.mean, dtype=np.float64).copy()
        self.lower = np.broadcast_to(np.asarray(self.lower, dtype=np.float64), self.mean.shape).copy()
        self.upper = np.broadcast_to(np.asarray(self.upper, dtype=np.float64), self.mean.shape).copy()
        n = self.mean.size
        if n < 1:
            raise ValueError("CMA-ES needs at least one coordinate")
        if not (self.sigma > 0 and math.isfinite(self.sigma)):
            raise ValueError(f"sigma must be a positive number, got {self.sigma!r}")
        if self.population < 2:
            raise ValueError(f"the population must be at least 2, got {self.population}")
        if np.any(self.lower > self.upper) or np.any(self.mean < self.lower) or np.any(self.mean > self.upper):
            raise ValueError("the start must lie in the box")
        self.rng = np.random.default_rng(self.seed)
        lam = self.population
        mu = lam // 2
        w = math.log((lam + 1) / 2) - np.log(np.arange(1, mu + 1))
        self.weights = w / w.sum()
        self.mu_eff = 1.0 / float(np.sum(self.weights ** 2))
        self.c_sigma = (self.mu_eff + 2) / (n + self.mu_eff + 5)
        self.d_sigma = 1 + 2 * max(0.0, math.sqrt((self.mu_eff - 1) / (n + 1)) - 1) + self.c_sigma
        self.c_c = (4 + self.mu_eff / n) / (n + 4 + 2 * self.mu_eff / n)
        self.c_1 = 2 / ((n + 1.3) ** 2 + self.mu_eff)
        self.c_mu = min(1 - self.c_1, 2 * (self.mu_eff - 2 + 1 / self.mu_eff) / ((n + 2) ** 2 + self.mu_eff))
        self.chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))
        self.p_sigma = np.zeros(n)
        self.p_c = np.zeros(n)
        scales = np.ones(n) if self.scales is None else np.broadcast_to(np.asarray(self.scales, float), (n,))
        if not np.all(np.isfinite(scales) & (scales > 0)):
            raise ValueError("the coordinates' scales must be positive numbers")
        self.cov = np.diag(scales ** 2)
        self.generation = 0

    def _repair(self, x: np.ndarray) -> np.ndarray:
        x = np.clip(x, self.lower, self.upper)
        if self.resolution > 0:
            x = np.round(x / self.resolution) * self.resolution
            x = np.clip(x, self.lower, self.upper)
        return x

    def ask(self) -> np.ndarray:
        """The next generation: ``population`` points (rows), clipped into the box and rounded."""
        eigenvalues, basis = np.linalg.eigh(self.cov)
        scale = basis * np.sqrt(np.maximum(eigenvalues, 1e-20))
        z = self.rng.standard_normal((self.population, self.mean.size))
        return np.array([self._repair(self.mean + self.sigma * (scale @ zi)) for zi in z])

    def tell(self, points: np.ndarray, objectives) -> None:
        """Update from a generation's points (as asked) and their objectives (lower is better)."""
        points = np.asarray(points, dtype=np.float64)
        f = np.asarray(objectives, dtype=np.float64)
        if points.shape != (self.population, self.mean.size) or f.shape != (self.population,):
            raise ValueError("tell() takes the whole generation that ask() gave")
        f = np.where(np.isnan(f), np.inf, f)
        order = np.argsort(f, kind="stable")[: self.weights.size]
        order = order[np.isfinite(f[order])]
        if order.size == 0:  # nothing ran: nothing to learn from
            return
        weights = self.weights[: order.size] / self.weights[: order.size].sum()
        n = self.mean.size
        old = self.mean
        steps = (points[order] - old) / self.sigma
        self.mean = old + self.sigma * (weights @ steps)
        eigenvalues, basis = np.linalg.eigh(self.cov)
        inv_sqrt = basis @ np.diag(1 / np.sqrt(np.maximum(eigenvalues, 1e-20))) @ basis.T
        y = (self.mean - old) / self.sigma
        self.p_sigma = (1 - self.c_sigma) * self.p_sigma + math.sqrt(
            self.c_sigma * (2 - self.c_sigma) * self.mu_eff) * (inv_sqrt @ y)
        self.generation += 1
        norm = float(np.linalg.norm(self.p_sigma))
        # h_sigma: the evolution path is not too long, so the rank-one path may grow (the tutorial's eq. 45)
        h_sigma = norm / math.sqrt(1 - (1 - self.c_sigma) ** (2 * self.generation)) < (1.4 + 2 / (n + 1)) * self.chi_n
        growth = math.sqrt(self.c_c * (2 - self.c_c) * self.mu_eff) * y if h_sigma else 0.0
        self.p_c = (1 - self.c_c) * self.p_c + growth
        rank_mu = (steps.T * weights) @ steps
        correction = 0.0 if h_sigma else self.c_1 * self.c_c * (2 - self.c_c)
        self.cov = ((1 - self.c_1 - self.c_mu + correction) * self.cov + self.c_1 * np.outer(self.p_c, self.p_c)
                    + self.c_mu * rank_mu)
        self.cov = (self.cov + self.cov.T) / 2
        self.sigma *= math.exp((self.c_sigma / self.d_sigma) * (norm / self.chi_n - 1))
        self.sigma = float(min(self.sigma, 1e3 * float(np.max(self.upper - self.lower)) + 1e-12))
