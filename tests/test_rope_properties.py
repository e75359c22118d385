"""Properties of the RoPE plans and of the sensitivity pipeline (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qroar_gguf.errors import QroarError
from qroar_gguf.rope.bands import frequency_bands
from qroar_gguf.rope.plans import PLANS, QROAR_BASES, RopeFacts, make_plan
from qroar_gguf.rope.sensitivity import (
    SensitivityAccumulator,
    interpolation_pressure,
    pair_channel_norms,
)

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def facts_strategy(draw, min_scale: int = 1) -> RopeFacts:
    n_rot = 2 * draw(st.integers(1, 128))
    theta = draw(st.floats(1.5, 1e7, allow_nan=False, allow_infinity=False))
    trained = draw(st.integers(16, 1 << 20))
    target = draw(st.integers(max(trained * min_scale, trained + 1), trained * 64))  # a plan extends: L' > L
    return RopeFacts(n_rot=n_rot, theta=theta, trained_ctx=trained, target_ctx=target)


def sensitivity_strategy(n_pairs: int):
    return hnp.arrays(np.float64, n_pairs, elements=st.floats(0.0, 1e6, allow_nan=False, allow_infinity=False))


def _all_plans(facts: RopeFacts, s: np.ndarray, beta: float) -> dict[str, np.ndarray]:
    out = {}
    for method, fn in PLANS.items():
        if method == "qroar":
            for base in QROAR_BASES:
                out[f"qroar-{base}"] = fn(facts, sensitivity=s, beta=beta, base=base).factors
        else:
            out[method] = fn(facts).factors
    return out


# --------------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------------


@PROPERTY
@given(data=st.data(), facts=facts_strategy(), beta=st.floats(0.0, 100.0))
def test_every_factor_is_at_least_one_and_at_most_r(data, facts, beta):
    s = data.draw(sensitivity_strategy(facts.n_pairs))
    r = np.float32(facts.scale)
    for name, factors in _all_plans(facts, s, beta).items():
        assert factors.dtype == np.float32 and factors.shape == (facts.n_pairs,), name
        assert np.all(np.isfinite(factors)), name
        assert np.all(factors >= 1.0), name
        assert np.all(factors <= r * np.float32(1 + 1e-6)), name


@PROPERTY
@given(facts=facts_strategy())
def test_base_plans_are_non_decreasing_in_pair_index(facts):
    for method in ("linear", "ntk", "yarn", "llama3"):
        f = PLANS[method](facts).factors
        assert np.all(np.diff(f) >= 0), method


@PROPERTY
@given(data=st.data(), facts=facts_strategy(min_scale=1), base=st.sampled_from(QROAR_BASES))
def test_beta_zero_is_the_base_plan_exactly(data, facts, base):
    assume(facts.target_ctx > facts.trained_ctx)
    s = data.draw(sensitivity_strategy(facts.n_pairs))
    plan = make_plan("qroar", facts, sensitivity=s, beta=0.0, base=base)
    base_plan = make_plan(base, facts)
    np.testing.assert_array_equal(plan.factors, base_plan.factors)
    assert plan.attn_scale == base_plan.attn_scale


@PROPERTY
@given(
    data=st.data(),
    facts=facts_strategy(),
    base=st.sampled_from(QROAR_BASES),
    betas=st.lists(st.floats(0.0, 200.0), min_size=2, max_size=5),
)
def test_larger_beta_never_interpolates_a_pair_more(data, facts, base, betas):
    s = data.draw(sensitivity_strategy(facts.n_pairs))
    previous = None
    for beta in sorted(betas):
        f = PLANS["qroar"](facts, sensitivity=s, beta=beta, base=base).factors
        if previous is not None:
            assert np.all(f <= previous)
        previous = f


@PROPERTY
@given(data=st.data(), facts=facts_strategy(), base=st.sampled_from(QROAR_BASES), beta=st.floats(0.0, 1e3))
def test_pairs_beyond_the_trained_context_keep_the_base_factor(data, facts, base, beta):
    s = data.draw(sensitivity_strategy(facts.n_pairs))
    beyond = facts.wavelengths() >= facts.trained_ctx
    for protection in ("excess", "softmax"):
        f = PLANS["qroar"](facts, sensitivity=s, beta=beta, base=base, protection=protection).factors
        np.testing.assert_array_equal(f[beyond], PLANS[base](facts).factors[beyond])


@PROPERTY
@given(facts=facts_strategy(min_scale=2))
def test_qroar_with_an_outlier_pair_moves_only_that_pair(facts):
    base = PLANS["yarn"](facts).factors
    candidates = np.flatnonzero((base > 1.0) & (facts.wavelengths() < facts.trained_ctx))
    assume(candidates.size and facts.n_pairs >= 2)  # one pair alone is always exactly average
    k = int(candidates[len(candidates) // 2])
    s = np.ones(facts.n_pairs)
    s[k] = 2.0
    f = PLANS["qroar"](facts, sensitivity=s, beta=8.0).factors
    others = np.arange(facts.n_pairs) != k
    np.testing.assert_array_equal(f[others], base[others])
    assert 1.0 <= f[k] < base[k]


@SMALL
@given(facts=facts_strategy())
def test_frequency_bands_partition_the_pairs(facts):
    bands = frequency_bands(facts)
    assert [name for name, _ in bands] == ["high", "ramp", "low"]
    joined = np.concatenate([idx for _, idx in bands])
    np.testing.assert_array_equal(joined, np.arange(facts.n_pairs))  # ordered: high, ramp, low
    rotations = facts.rotations()
    high, ramp, low = (idx for _, idx in bands)
    assert np.all(rotations[high] >= 32) and np.all(rotations[low] < 1)
    assert np.all((rotations[ramp] >= 1) & (rotations[ramp] < 32))


@SMALL
@given(facts=facts_strategy())
def test_interpolation_pressure_range(facts):
    assert np.all(interpolation_pressure(facts, PLANS["none"](facts).factors) == 0)
    for method in ("linear", "ntk", "yarn", "llama3"):
        p = interpolation_pressure(facts, PLANS[method](facts).factors)
        assert np.all(p >= 0) and np.all(p < 1)
        assert np.all(p <= 1 - 1 / facts.scale + 1e-6)
    # linear PI on a pair that turned at least once: exactly the step fraction removed
    turned = facts.rotations() >= 1
    p_lin = interpolation_pressure(facts, PLANS["linear"](facts).factors)
    np.testing.assert_allclose(p_lin[turned], 1 - 1 / np.float64(np.float32(facts.scale)), rtol=1e-12)


def test_interpolation_pressure_validates():
    facts = RopeFacts(n_rot=8, theta=1e4, trained_ctx=100, target_ctx=200)
    with pytest.raises(QroarError):
        interpolation_pressure(facts, np.ones(3))
    with pytest.raises(QroarError):
        interpolation_pressure(facts, np.array([1.0, 1.0, 0.0, 1.0]))


# --------------------------------------------------------------------------------------------------
# Sensitivity
# --------------------------------------------------------------------------------------------------


def _to_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


@st.composite
def model_weights(draw, dtype=np.float32, elements=None):
    """Per-layer Q [n_head*d, n_embd] and K [n_kv*d, n_embd] (GQA: n_kv divides n_head)."""
    n_kv = draw(st.integers(1, 3))
    n_head = n_kv * draw(st.integers(1, 3))
    head_dim = 2 * draw(st.integers(1, 6))
    n_embd = draw(st.integers(1, 8))
    n_layer = draw(st.integers(1, 3))
    if elements is None:
        elements = st.floats(-10.0, 10.0, width=32)
    layers = []
    for _ in range(n_layer):
        q = draw(hnp.arrays(dtype, (n_head * head_dim, n_embd), elements=elements))
        k = draw(hnp.arrays(dtype, (n_kv * head_dim, n_embd), elements=elements))
        layers.append((q, k))
    return n_head, n_kv, head_dim, layers


def _sensitivity(n_head, n_kv, head_dim, layers, layout="hf", agg="max", n_rot=None):
    n_rot = head_dim if n_rot is None else n_rot
    acc = SensitivityAccumulator(len(layers), n_rot // 2, agg=agg)
    for i, (q, k) in reversed(list(enumerate(layers))):  # any order
        acc.add_weight(i, "k", k, n_kv, n_rot, layout)
        acc.add_weight(i, "q", q, n_head, n_rot, layout)
    return acc.result()


@PROPERTY
@given(
    data=st.data(),
    dtype=st.sampled_from([np.float16, np.float32]),
    agg=st.sampled_from(["max", "mean"]),
    beta=st.floats(0.0, 100.0),
)
def test_factors_are_finite_for_any_finite_weights(data, dtype, agg, beta):
    elements = st.floats(allow_nan=False, allow_infinity=False, width=np.dtype(dtype).itemsize * 8)
    n_head, n_kv, head_dim, layers = data.draw(model_weights(dtype=dtype, elements=elements))
    result = _sensitivity(n_head, n_kv, head_dim, layers, agg=agg)
    assert np.all(np.isfinite(result.sensitivity)) and np.all(result.sensitivity >= 0)
    facts = RopeFacts(n_rot=head_dim, theta=1e4, trained_ctx=64, target_ctx=data.draw(st.integers(65, 4096)))
    for base in QROAR_BASES:
        plan = make_plan("qroar", facts, sensitivity=result.sensitivity, beta=beta, base=base)
        assert np.all(np.isfinite(plan.factors)) and np.all(plan.factors >= 1)


@PROPERTY
@given(data=st.data(), agg=st.sampled_from(["max", "mean"]), layout=st.sampled_from(["hf", "gguf"]))
def test_permuting_heads_leaves_sensitivity_unchanged(data, agg, layout):
    n_head, n_kv, head_dim, layers = data.draw(model_weights())
    reference = _sensitivity(n_head, n_kv, head_dim, layers, layout=layout, agg=agg)
    permuted = []
    for q, k in layers:
        pq = data.draw(st.permutations(range(n_head)))
        pk = data.draw(st.permutations(range(n_kv)))
        q = q.reshape(n_head, head_dim, -1)[list(pq)].reshape(q.shape)
        k = k.reshape(n_kv, head_dim, -1)[list(pk)].reshape(k.shape)
        permuted.append((q, k))
    result = _sensitivity(n_head, n_kv, head_dim, permuted, layout=layout, agg=agg)
    np.testing.assert_array_equal(result.sensitivity, reference.sensitivity)
    np.testing.assert_array_equal(result.per_layer, reference.per_layer)


@PROPERTY
@given(data=st.data())
def test_layouts_agree_after_the_converter_permute(data):
    n_head, n_kv, head_dim, layers = data.draw(model_weights())
    hf = _sensitivity(n_head, n_kv, head_dim, layers, layout="hf")
    gguf_layers = [(_to_gguf(q, n_head), _to_gguf(k, n_kv)) for q, k in layers]
    gg = _sensitivity(n_head, n_kv, head_dim, gguf_layers, layout="gguf")
    np.testing.assert_allclose(gg.sensitivity, hf.sensitivity, rtol=1e-12)
    np.testing.assert_allclose(gg.per_layer, hf.per_layer, rtol=1e-12)


@PROPERTY
@given(
    n_kv=st.integers(1, 4),
    half=st.integers(1, 16),
    n_embd=st.integers(1, 24),
    data=st.data(),
)
def test_an_inflated_hf_channel_marks_its_pair_in_both_layouts(n_kv, half, n_embd, data):
    head_dim = 2 * half
    head = data.draw(st.integers(0, n_kv - 1))
    channel = data.draw(st.integers(0, head_dim - 1))
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    w = rng.uniform(-1.0, 1.0, size=(n_kv * head_dim, n_embd)).astype(np.float32)
    w[head * head_dim + channel] *= 1000.0  # HF row of (head, channel)
    expected_pair = channel % half  # rotate_half: channels k and k + P form pair k

    hf = pair_channel_norms(w, n_kv, head_dim, "hf")
    assert hf.shape == (n_kv, half)
    assert np.unravel_index(np.argmax(hf), hf.shape) == (head, expected_pair)

    gguf = pair_channel_norms(_to_gguf(w, n_kv), n_kv, head_dim, "gguf")
    assert np.unravel_index(np.argmax(gguf), gguf.shape) == (head, expected_pair)
    np.testing.assert_allclose(gguf, hf, rtol=1e-12)

    acc = SensitivityAccumulator(1, half)
    acc.add_weight(0, "k", w, n_kv, head_dim, "hf")
    acc.add_weight(0, "q", np.zeros((head_dim, n_embd), np.float32), 1, head_dim, "hf")
    assert int(np.argmax(acc.sensitivity())) == expected_pair


def test_pair_norms_by_hand_and_partial_rotary():
    # one head, d = 8, rows are multiples of basis vectors so every row norm is obvious
    w = np.diag(np.arange(1.0, 9.0))  # row j has norm j+1
    np.testing.assert_allclose(pair_channel_norms(w, 1, 8, "hf")[0], np.hypot([1, 2, 3, 4], [5, 6, 7, 8]))
    np.testing.assert_allclose(pair_channel_norms(w, 1, 8, "gguf")[0], np.hypot([1, 3, 5, 7], [2, 4, 6, 8]))
    # partial rotary: only the first n_rot = 4 dims rotate; HF pairs (k, k + 2)
    np.testing.assert_allclose(pair_channel_norms(w, 1, 4, "hf")[0], np.hypot([1, 2], [3, 4]))
    np.testing.assert_allclose(pair_channel_norms(w, 1, 4, "gguf")[0], np.hypot([1, 3], [2, 4]))
    # two heads
    w2 = np.vstack([w, 10 * w])
    assert pair_channel_norms(w2, 2, 8, "hf").shape == (2, 4)
    np.testing.assert_allclose(pair_channel_norms(w2, 2, 8, "hf")[1], 10 * np.hypot([1, 2, 3, 4], [5, 6, 7, 8]))


def test_pair_norms_survive_extreme_values():
    big = np.full((4, 3), np.finfo(np.float32).max, dtype=np.float32)
    tiny = np.full((4, 3), np.finfo(np.float32).smallest_subnormal, dtype=np.float32)
    assert np.all(np.isfinite(pair_channel_norms(big, 1, 4, "hf")))
    assert np.all(pair_channel_norms(tiny, 1, 4, "hf") > 0)
    huge64 = np.full((4, 3), 1e300)
    np.testing.assert_allclose(pair_channel_norms(huge64, 1, 4, "hf"), 1e300 * np.sqrt(6.0))


def test_accumulator_aggregation_and_validation():
    acc = SensitivityAccumulator(2, 2, agg="mean")
    acc.add(0, "q", [[1.0, 2.0], [3.0, 0.0]])
    acc.add(0, "k", [[0.0, 5.0]])
    with pytest.raises(QroarError, match="incomplete: missing layer 1 Q, layer 1 K"):
        acc.result()
    with pytest.raises(QroarError, match="already added"):
        acc.add(0, "q", [[1.0, 1.0]])
    acc.add(1, "q", [[1.0, 1.0]])
    acc.add(1, "k", [[1.0, 1.0]])
    result = acc.result()
    np.testing.assert_array_equal(result.per_layer, [[3.0, 5.0], [1.0, 1.0]])
    np.testing.assert_array_equal(result.sensitivity, [2.0, 3.0])
    assert set(result.per_head) == {(0, "q"), (0, "k"), (1, "q"), (1, "k")}
    with pytest.raises(QroarError, match="shape"):
        SensitivityAccumulator(1, 2).add(0, "q", [[1.0, 2.0, 3.0]])
    with pytest.raises(QroarError, match="outside"):
        SensitivityAccumulator(1, 2).add(1, "q", [[1.0, 2.0]])
    with pytest.raises(QroarError, match="aggregation"):
        SensitivityAccumulator(1, 2, agg="median")
    with pytest.raises(QroarError, match="layout"):
        pair_channel_norms(np.ones((4, 2)), 1, 4, "interleaved")
    with pytest.raises(QroarError, match="floating-point"):
        pair_channel_norms(np.ones((4, 2), dtype=np.uint16), 1, 4, "hf")
    with pytest.raises(QroarError, match="heads"):
        pair_channel_norms(np.ones((6, 2)), 4, 2, "hf")
    with pytest.raises(QroarError, match="rotary dims"):
        pair_channel_norms(np.ones((8, 2)), 1, 10, "hf")
