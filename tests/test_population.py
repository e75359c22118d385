"""CMA-ES (population.py): deterministic under a seed, inside its box and on its resolution, and a working
optimiser on problems whose answer is known (a coupled quadratic, Rosenbrock)."""

from __future__ import annotations

import numpy as np
import pytest

from qroar_gguf.population import CmaEs, default_population


def _run(objective, es: CmaEs, generations: int) -> tuple[list[np.ndarray], float]:
    asked, best = [], np.inf
    for _ in range(generations):
        points = es.ask()
        asked.append(points)
        values = [objective(p) for p in points]
        best = min(best, min(values))
        es.tell(points, values)
    return asked, best


def _band_es(seed: int = 0, **kw) -> CmaEs:
    return CmaEs(**{**dict(mean=np.ones(4), sigma=0.1, lower=0.8, upper=1.25, population=8, seed=seed,
                           resolution=0.01), **kw})


def test_the_same_seed_asks_the_same_points_and_another_seed_others():
    target = np.array([1.1, 0.9, 1.2, 1.0])

    def objective(p):
        return float(np.sum((p - target) ** 2))

    a, _ = _run(objective, _band_es(seed=5), 6)
    b, _ = _run(objective, _band_es(seed=5), 6)
    c, _ = _run(objective, _band_es(seed=6), 6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_points_stay_in_the_box_on_the_resolution_grid():
    es = _band_es(sigma=5.0)  # steps far larger than the box: every point is repaired
    for _ in range(5):
        points = es.ask()
        assert points.min() >= 0.8 - 1e-12 and points.max() <= 1.25 + 1e-12
        assert np.allclose(points * 100, np.round(points * 100))
        es.tell(points, [float(np.sum(p)) for p in points])
    assert es.mean.min() >= 0.8 - 1e-9  # the mean is a weighted mean of repaired points


def test_it_finds_a_coupled_optimum_inside_the_box():
    """A quadratic with correlated coordinates (what a covariance has to learn) and its optimum off the start."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((4, 4))
    hessian = q @ q.T + 0.1 * np.eye(4)
    target = np.array([1.12, 0.87, 1.21, 0.95])

    def objective(p):
        d = p - target
        return float(d @ hessian @ d)

    _, best = _run(objective, _band_es(resolution=0.0), 60)
    assert best < 1e-6 * objective(np.ones(4))


def test_rosenbrock_in_six_dimensions():
    es = CmaEs(mean=np.zeros(6), sigma=0.5, lower=-5.0, upper=5.0, population=10, seed=3)

    def rosenbrock(x):
        return float(np.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2))

    _, best = _run(rosenbrock, es, 400)
    assert best < 1e-6
    assert np.allclose(es.mean, 1.0, atol=1e-2)


def test_failed_points_rank_last():
    """A generation where the better half failed (inf, or NaN) moves the mean towards the points that ran."""
    es = _band_es(seed=1)
    points = es.ask()
    values = np.array([float(np.sum(p)) for p in points])
    worst_half = np.argsort(values)[4:]
    told = np.full(8, np.inf)
    told[worst_half] = values[worst_half]
    told[np.argsort(values)[0]] = np.nan
    es.tell(points, told)
    assert np.allclose(es.mean, es.weights @ points[worst_half[np.argsort(values[worst_half])]])


def test_default_population_and_bad_settings():
    assert [default_population(n) for n in (1, 4, 8, 16)] == [4, 8, 10, 12]
    with pytest.raises(ValueError, match="population"):
        _band_es(population=1)
    with pytest.raises(ValueError, match="sigma"):
        _band_es(sigma=0.0)
    with pytest.raises(ValueError, match="box"):
        _band_es(mean=np.full(4, 1.5))
    es = _band_es()
    with pytest.raises(ValueError, match="whole generation"):
        es.tell(es.ask()[:3], [0.0, 1.0, 2.0])


def test_only_points_that_ran_move_the_strategy():
    es = _band_es(seed=2)
    points = es.ask()
    values = np.full(8, np.inf)
    values[[5, 2]] = [0.5, 0.25]  # two of eight ran: fewer than the four a generation recombines
    es.tell(points, values)
    w = es.weights[:2] / es.weights[:2].sum()
    assert np.allclose(es.mean, w[0] * points[2] + w[1] * points[5])

    before = (es.mean.copy(), es.sigma, es.cov.copy(), es.generation)
    es.tell(es.ask(), np.full(8, np.inf))  # none ran
    assert np.array_equal(es.mean, before[0]) and es.sigma == before[1] and np.array_equal(es.cov, before[2])
    assert es.generation == before[3]


def test_coordinates_can_start_with_their_own_steps():
    """A steep coordinate (a band scale) starts with a smaller step than the others."""
    es = _band_es(seed=4, population=200, resolution=0.0, scales=[1, 1, 0.2, 0.2])
    points = es.ask()
    spread = points.std(axis=0)
    assert np.all(spread[:2] > 0.07) and np.all(spread[2:] < 0.03)
    with pytest.raises(ValueError, match="scales"):
        _band_es(scales=[1, 1, 0, 1])
