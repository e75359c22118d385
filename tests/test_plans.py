"""RoPE plans against transformers' own RoPE code and their closed forms."""

from __future__ import annotations

import inspect
import json
import math

import numpy as np
import pytest

from qroar_gguf.errors import QroarError
from qroar_gguf.rope.plans import (
    PLANS,
    RopeFacts,
    RopePlan,
    combine_with_source,
    extends,
    make_plan,
    plan_options,
    source_factors,
)

# (theta, trained context): the three rope bases of the brief with a typical trained length each.
BASES = [(1e4, 2048), (5e5, 8192), (1e5, 4096)]
HEAD_DIMS = [64, 128]
SCALES = [2, 4, 8, 16]
CONFIGS = [(t, L, d, r) for (t, L) in BASES for d in HEAD_DIMS for r in SCALES]
CONFIG_IDS = [f"theta{t:g}-L{L}-d{d}-x{r}" for (t, L, d, r) in CONFIGS]


# --------------------------------------------------------------------------------------------------
# transformers as the reference
# --------------------------------------------------------------------------------------------------


def _hf_config(theta: float, head_dim: int, max_pos: int, scaling: dict | None):
    """A LlamaConfig for either transformers API (v5 ``rope_parameters``, v4 ``rope_scaling``)."""
    transformers = pytest.importorskip("transformers")
    n_heads = 4
    common = dict(
        hidden_size=head_dim * n_heads, num_attention_heads=n_heads, head_dim=head_dim,
        max_position_embeddings=max_pos, num_hidden_layers=1, intermediate_size=64, vocab_size=16,
    )
    if "rope_parameters" in inspect.signature(transformers.LlamaConfig.__init__).parameters:
        params = {"rope_type": "default", **(scaling or {}), "rope_theta": theta}
        return transformers.LlamaConfig(**common, rope_parameters=params)
    return transformers.LlamaConfig(**common, rope_theta=theta, rope_scaling=scaling)


def _hf_unscaled_inv_freq(theta: float, dim: int) -> np.ndarray:
    torch = pytest.importorskip("torch")
    # transformers' default RoPE, computed as its init functions do (float32).
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    return inv.double().numpy()


def _hf_factors(rope_type: str, theta: float, head_dim: int, max_pos: int, scaling: dict, **kwargs):
    """(factor = unscaled inv_freq / scaled inv_freq, attention factor) as transformers computes them."""
    pytest.importorskip("torch")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = _hf_config(theta, head_dim, max_pos, {"rope_type": rope_type, **scaling})
    inv, attention = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", **kwargs)
    return _hf_unscaled_inv_freq(theta, head_dim) / inv.double().numpy(), float(attention)


@pytest.mark.parametrize(("theta", "L", "d", "r"), CONFIGS, ids=CONFIG_IDS)
def test_linear_matches_transformers(theta, L, d, r):
    expected, attention = _hf_factors("linear", theta, d, L, {"factor": float(r)})
    plan = make_plan("linear", RopeFacts(n_rot=d, theta=theta, trained_ctx=L, target_ctx=L * r))
    np.testing.assert_allclose(plan.factors, expected, rtol=1e-6)
    assert plan.attn_scale == attention == 1.0


@pytest.mark.parametrize(("theta", "L", "d", "r"), CONFIGS, ids=CONFIG_IDS)
def test_yarn_matches_transformers(theta, L, d, r):
    expected, attention = _hf_factors(
        "yarn", theta, d, L * r, {"factor": float(r), "original_max_position_embeddings": L}
    )
    plan = make_plan("yarn", RopeFacts(n_rot=d, theta=theta, trained_ctx=L, target_ctx=L * r))
    np.testing.assert_allclose(plan.factors, expected, rtol=1e-6)
    assert plan.attn_scale == pytest.approx(attention, rel=1e-12)
    assert plan.attn_scale == pytest.approx(0.1 * math.log(r) + 1.0, rel=1e-12)
    # The ramp really is exercised: some pairs untouched, some fully interpolated, some in between.
    assert plan.factors[0] == 1.0 and plan.factors[-1] == pytest.approx(r)
    assert np.any((plan.factors > 1.0) & (plan.factors < r * (1 - 1e-6)))


@pytest.mark.parametrize(("theta", "L", "d", "r"), CONFIGS, ids=CONFIG_IDS)
def test_llama3_matches_transformers(theta, L, d, r):
    scaling = {
        "factor": float(r), "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": L,
    }
    expected, attention = _hf_factors("llama3", theta, d, L * r, scaling)
    plan = make_plan("llama3", RopeFacts(n_rot=d, theta=theta, trained_ctx=L, target_ctx=L * r))
    np.testing.assert_allclose(plan.factors, expected, rtol=1e-6)
    assert plan.attn_scale == attention == 1.0


@pytest.mark.parametrize(("theta", "L", "d", "r"), CONFIGS, ids=CONFIG_IDS)
def test_ntk_closed_form_and_transformers_dynamic(theta, L, d, r):
    plan = make_plan("ntk", RopeFacts(n_rot=d, theta=theta, trained_ctx=L, target_ctx=L * r))
    new_base = theta * r ** (d / (d - 2))
    k = np.arange(d // 2)
    np.testing.assert_allclose(plan.factors, (new_base / theta) ** (2 * k / d), rtol=1e-6)
    assert plan.factors[0] == 1.0 and plan.factors[-1] == pytest.approx(r, rel=1e-6)
    assert plan.attn_scale == 1.0
    # transformers' dynamic NTK with factor 1 at seq_len L' is exactly this base change.
    expected, _ = _hf_factors("dynamic", theta, d, L, {"factor": 1.0}, seq_len=L * r)
    np.testing.assert_allclose(plan.factors, expected, rtol=2e-6)


def test_yarn_attention_scale_can_be_turned_off():
    facts = RopeFacts(n_rot=64, theta=1e4, trained_ctx=2048, target_ctx=8192)
    on, off = make_plan("yarn", facts), make_plan("yarn", facts, attn_scale=False)
    np.testing.assert_array_equal(on.factors, off.factors)
    assert on.attn_scale == pytest.approx(1 + 0.1 * math.log(4)) and off.attn_scale == 1.0


# --------------------------------------------------------------------------------------------------
# Registry, validation, identity
# --------------------------------------------------------------------------------------------------


def test_registry_has_the_six_methods():
    assert list(PLANS) == ["none", "linear", "ntk", "yarn", "llama3", "qroar"]
    assert plan_options("linear") == {}
    assert set(plan_options("qroar")) == {"sensitivity", "beta", "base", "attn_scale", "protection"}
    assert plan_options("qroar")["sensitivity"] is inspect.Parameter.empty


def test_the_trained_context_itself_is_no_extension():
    """One target-context rule (plans.extends) for make_plan, every plan function and the demo: at L' = L
    every plan's factors would be 1, a file naming a plan that changes nothing, so only "none" takes it."""
    assert not extends(2048, 2048) and not extends(2048, 1024) and extends(2048, 2049)
    facts = RopeFacts(n_rot=64, theta=1e4, trained_ctx=2048, target_ctx=2048)
    for method, fn in PLANS.items():
        options = {"sensitivity": np.linspace(1, 2, 32)} if method == "qroar" else {}
        if method == "none":
            plan = fn(facts)
            np.testing.assert_array_equal(plan.factors, np.ones(32, dtype=np.float32))
            assert plan.attn_scale == 1.0 and plan.factors.dtype == np.float32
            continue
        with pytest.raises(QroarError, match="target context 2048 must be larger than the trained context 2048"):
            fn(facts, **options)


def test_just_beyond_the_trained_context_every_plan_is_nearly_the_identity():
    facts = RopeFacts(n_rot=64, theta=1e4, trained_ctx=2048, target_ctx=2049)
    for method, fn in PLANS.items():
        options = {"sensitivity": np.linspace(1, 2, 32)} if method == "qroar" else {}
        plan = fn(facts, **options)
        np.testing.assert_allclose(plan.factors, np.ones(32), atol=1e-3)
        assert abs(plan.attn_scale - 1.0) < 1e-3


def test_none_keeps_any_target():
    plan = make_plan("none", RopeFacts(n_rot=64, theta=1e4, trained_ctx=2048, target_ctx=512))
    np.testing.assert_array_equal(plan.factors, np.ones(32))
    assert plan.method == "none" and plan.attn_scale == 1.0


@pytest.mark.parametrize("method", ["linear", "ntk", "yarn", "llama3", "qroar"])
@pytest.mark.parametrize("target", [1024, 2048])
def test_target_must_exceed_trained(method, target):
    facts = RopeFacts(n_rot=64, theta=1e4, trained_ctx=2048, target_ctx=target)
    options = {"sensitivity": np.ones(32)} if method == "qroar" else {}
    with pytest.raises(QroarError, match=r"target context \d+ must be larger than the trained context 2048 \(use --method none to keep it\)"):
        make_plan(method, facts, **options)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(n_rot=63, theta=1e4, trained_ctx=2048, target_ctx=4096), "even"),
        (dict(n_rot=0, theta=1e4, trained_ctx=2048, target_ctx=4096), "even and positive"),
        (dict(n_rot=64, theta=1.0, trained_ctx=2048, target_ctx=4096), "larger than 1"),
        (dict(n_rot=64, theta=float("nan"), trained_ctx=2048, target_ctx=4096), "finite"),
        (dict(n_rot=64, theta=1e4, trained_ctx=0, target_ctx=4096), "trained context"),
        (dict(n_rot=64.0, theta=1e4, trained_ctx=2048, target_ctx=4096), "integer"),
    ],
)
def test_facts_validation(kwargs, message):
    with pytest.raises(QroarError, match=message):
        RopeFacts(**kwargs)


def test_facts_derived_values():
    facts = RopeFacts(n_rot=8, theta=100.0, trained_ctx=1000, target_ctx=4000)
    assert facts.scale == 4.0 and facts.n_pairs == 4
    np.testing.assert_allclose(facts.wavelengths(), 2 * np.pi * 100.0 ** (np.arange(4) / 4))
    assert facts.wavelengths().dtype == np.float64


def test_unknown_method_and_options():
    facts = RopeFacts(n_rot=64, theta=1e4, trained_ctx=2048, target_ctx=8192)
    with pytest.raises(QroarError, match="unknown RoPE method 'dynamic'"):
        make_plan("dynamic", facts)
    with pytest.raises(QroarError, match=r"method linear does not take option\(s\) beta \(accepted: none\)"):
        make_plan("linear", facts, beta=2.0)
    with pytest.raises(QroarError, match=r"does not take option\(s\) betta"):
        make_plan("qroar", facts, sensitivity=np.ones(32), betta=2.0)
    with pytest.raises(QroarError, match=r"needs option\(s\) sensitivity"):
        make_plan("qroar", facts)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(sensitivity=np.ones(31)), "one value per rotary pair"),
        (dict(sensitivity=np.r_[np.ones(31), np.nan]), "finite"),
        (dict(sensitivity=np.r_[np.ones(31), -1.0]), "non-negative"),
        (dict(sensitivity=np.ones(32), beta=-1.0), "beta"),
        (dict(sensitivity=np.ones(32), beta=float("inf")), "beta"),
        (dict(sensitivity=np.ones(32), base="ntk"), "base"),
        (dict(sensitivity=np.ones(32), protection="other"), "protection"),
        (dict(sensitivity=np.ones(32), base="llama3", attn_scale=True), "yarn base only"),
        (dict(sensitivity=np.ones(32), attn_scale="yes"), "true or false"),
    ],
)
def test_qroar_option_validation(options, message):
    facts = RopeFacts(n_rot=64, theta=1e4, trained_ctx=2048, target_ctx=8192)
    with pytest.raises(QroarError, match=message):
        make_plan("qroar", facts, **options)


def test_yarn_and_llama3_option_validation():
    facts = RopeFacts(n_rot=64, theta=1e4, trained_ctx=2048, target_ctx=8192)
    with pytest.raises(QroarError, match="beta_fast"):
        make_plan("yarn", facts, beta_fast=1.0, beta_slow=2.0)
    with pytest.raises(QroarError, match="high_freq_factor"):
        make_plan("llama3", facts, low_freq_factor=4.0, high_freq_factor=1.0)


# --------------------------------------------------------------------------------------------------
# Q-ROAR
# --------------------------------------------------------------------------------------------------


def _rising_sensitivity(n: int) -> np.ndarray:
    return np.linspace(0.8, 1.2, n)  # the prototype's profile: rises steadily, max/min about 1.5


@pytest.mark.parametrize("base", ["linear", "yarn", "llama3"])
def test_qroar_beta_zero_is_base_and_params_are_json(base):
    facts = RopeFacts(n_rot=64, theta=1e4, trained_ctx=2048, target_ctx=8192)
    plan = make_plan("qroar", facts, sensitivity=_rising_sensitivity(32), beta=0.0, base=base)
    base_plan = make_plan(base, facts)
    np.testing.assert_array_equal(plan.factors, base_plan.factors)
    assert plan.attn_scale == base_plan.attn_scale
    params = json.loads(json.dumps(plan.params))
    assert params["base"] == base and params["beta"] == 0.0 and len(params["sensitivity"]) == 32
    assert params["base_params"] == json.loads(json.dumps(base_plan.params))


def test_qroar_protects_above_average_pairs_only():
    facts = RopeFacts(n_rot=64, theta=1e4, trained_ctx=2048, target_ctx=8192)
    s = np.ones(32)
    s[10] = 1.5  # a clear outlier inside yarn's ramp
    yarn = make_plan("yarn", facts).factors
    plan = make_plan("qroar", facts, sensitivity=s, beta=8.0)
    changed = np.flatnonzero(plan.factors != yarn)
    assert changed.tolist() == [10]
    z = 1.5 / s.mean()
    expected = np.float64(yarn[10]) ** np.exp(-8.0 * (z - 1.0))
    assert plan.factors[10] == pytest.approx(expected, rel=1e-6)
    assert 1.0 <= plan.factors[10] < yarn[10]


def test_qroar_flat_sensitivity_is_the_base_plan():
    facts = RopeFacts(n_rot=64, theta=1e4, trained_ctx=2048, target_ctx=8192)
    for s in (np.full(32, 3.0), np.zeros(32)):
        plan = make_plan("qroar", facts, sensitivity=s, beta=50.0)
        np.testing.assert_array_equal(plan.factors, make_plan("yarn", facts).factors)


def test_qroar_softmax_protection_is_the_seed_formula():
    facts = RopeFacts(n_rot=64, theta=1e4, trained_ctx=2048, target_ctx=8192)
    s = _rising_sensitivity(32)
    plan = make_plan("qroar", facts, sensitivity=s, beta=8.0, protection="softmax")
    z = s / s.mean()
    p = np.exp(8.0 * z) / np.exp(8.0 * z).sum()
    p = p / p.max()
    base = make_plan("yarn", facts).factors.astype(np.float64)
    expected = np.exp(np.log(base) * (1 - p))
    expected[facts.wavelengths() >= facts.trained_ctx] = base[facts.wavelengths() >= facts.trained_ctx]
    np.testing.assert_allclose(plan.factors, expected, rtol=1e-6)


def test_qroar_yarn_base_attention_scale_follows_option():
    facts = RopeFacts(n_rot=64, theta=1e4, trained_ctx=2048, target_ctx=8192)
    s = _rising_sensitivity(32)
    assert make_plan("qroar", facts, sensitivity=s).attn_scale == make_plan("yarn", facts).attn_scale
    assert make_plan("qroar", facts, sensitivity=s, attn_scale=False).attn_scale == 1.0
    assert make_plan("qroar", facts, sensitivity=s, base="linear").attn_scale == 1.0


def test_plan_is_read_only_and_validated():
    plan = make_plan("linear", RopeFacts(n_rot=8, theta=1e4, trained_ctx=100, target_ctx=200))
    with pytest.raises(ValueError):
        plan.factors[0] = 3.0
    with pytest.raises(QroarError):
        RopePlan(method="x", factors=np.array([1.0, np.inf]), attn_scale=1.0, params={})
    with pytest.raises(QroarError):
        RopePlan(method="x", factors=np.array([1.0, 0.0]), attn_scale=1.0, params={})


# --------------------------------------------------------------------------------------------------
# Source factors
# --------------------------------------------------------------------------------------------------

LLAMA31 = {
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3",
    },
}


def test_source_factors_llama31_matches_transformers():
    factors, trained = source_factors(LLAMA31, 128)
    assert trained == 8192 and factors.dtype == np.float32 and factors.shape == (64,)
    expected, _ = _hf_factors("llama3", 5e5, 128, 131072, dict(LLAMA31["rope_scaling"], rope_type="llama3"))
    np.testing.assert_allclose(factors, expected, rtol=1e-6)


def test_source_factors_v5_rope_parameters_and_old_type_key():
    v5 = {
        "max_position_embeddings": 131072,
        "rope_parameters": dict(LLAMA31["rope_scaling"], rope_theta=500000.0),
    }
    old = dict(LLAMA31, rope_scaling={k if k != "rope_type" else "type": v for k, v in LLAMA31["rope_scaling"].items()})
    reference, _ = source_factors(LLAMA31, 128)
    for config in (v5, old):
        factors, trained = source_factors(config, 128)
        np.testing.assert_array_equal(factors, reference)
        assert trained == 8192


def test_source_factors_none_linear_and_unsupported():
    plain = {"max_position_embeddings": 2048, "rope_theta": 1e4}
    assert source_factors(plain, 64) == (None, 2048)
    assert source_factors(dict(plain, rope_scaling=None), 64) == (None, 2048)
    v5_default = dict(plain, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    assert source_factors(v5_default, 64) == (None, 2048)
    factors, trained = source_factors(dict(plain, rope_scaling={"type": "linear", "factor": 4.0}), 64)
    np.testing.assert_array_equal(factors, np.full(32, 4.0, dtype=np.float32))
    assert trained == 2048
    for kind in ("dynamic", "yarn", "longrope"):
        with pytest.raises(QroarError, match=f"rope scaling type '{kind}' is not supported"):
            source_factors(dict(plain, rope_scaling={"type": kind, "factor": 2.0}), 64)
    with pytest.raises(QroarError, match="low_freq_factor"):
        source_factors(dict(plain, rope_scaling={"rope_type": "llama3", "factor": 8.0}), 64)


def test_combine_with_source_multiplies():
    ours = np.array([1.0, 2.0, 4.0], dtype=np.float32)
    theirs = np.array([1.0, 3.0, 8.0], dtype=np.float32)
    np.testing.assert_array_equal(combine_with_source(ours, theirs), np.array([1.0, 6.0, 32.0], dtype=np.float32))
    out = combine_with_source(ours, None)
    np.testing.assert_array_equal(out, ours)
    assert out.dtype == np.float32
    with pytest.raises(QroarError, match="cannot combine"):
        combine_with_source(ours, theirs[:2])
    with pytest.raises(QroarError, match="source factors"):
        combine_with_source(ours, np.array([1.0, 0.0, 1.0]))
