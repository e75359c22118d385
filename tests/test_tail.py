"""Tail Inflation Ratio (tools/tail_inflation.py) on a tiny random Llama with a real tokenizer."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from checkpoints import make_tiny_llama  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # the tool lives beside its bench

from tail_inflation import _load_model, patched_rope, tail_inflation  # noqa: E402

from qroar_gguf.errors import QroarError  # noqa: E402
from qroar_gguf.rope.plans import RopeFacts, make_plan  # noqa: E402

TRAINED, SHORT, LONG = 256, 128, 512


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    directory, _ = make_tiny_llama(tmp_path_factory.mktemp("tail") / "tiny", smollm2_dir,
                                   max_position_embeddings=TRAINED)
    return directory


@pytest.fixture(scope="module")
def text() -> str:
    rng = np.random.default_rng(7)
    words = ("the house was quiet and Emma sat by the window reading letters from her friend while "
             "rain fell on the garden and nobody came to call that long grey afternoon").split()
    return " ".join(rng.choice(words, size=1500))


@pytest.fixture(scope="module")
def model(tiny):
    torch.set_num_threads(2)
    return _load_model(tiny)


def _logits(model, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    # An explicit all-ones mask: without it transformers reads non-consecutive position_ids as packed sequences.
    with torch.inference_mode():
        return model(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids)).logits[0]


def test_linear_factor_equals_positions_divided(model):
    """llama.cpp's rope_freqs: angle m*w_k/f_k. Linear f = r at positions r*j == unpatched at positions j."""
    r, n = 2, 96
    ids = torch.randint(3, 1000, (1, n), generator=torch.Generator().manual_seed(0))
    plain = _logits(model, ids, torch.arange(n)[None])
    plan = make_plan("linear", RopeFacts(n_rot=64, theta=10000.0, trained_ctx=TRAINED, target_ctx=TRAINED * r))
    assert np.all(plan.factors == r)
    with patched_rope(model, plan.factors, plan.attn_scale):
        stretched = _logits(model, ids, r * torch.arange(n)[None])
    assert torch.allclose(stretched, plain, atol=1e-4, rtol=0)
    # and the patch is undone on exit: stretched positions without it give other logits
    unpatched = _logits(model, ids, r * torch.arange(n)[None])
    assert (unpatched - plain).abs().max() > 1e-2


def test_patch_matches_rope_freqs_formula(model):
    """cos/sin of pair k (dims k and k+P) are cos(m*w_k/f_k)*t and sin(m*w_k/f_k)*t."""
    facts = RopeFacts(n_rot=64, theta=10000.0, trained_ctx=TRAINED, target_ctx=LONG)
    plan = make_plan("yarn", facts)
    assert plan.attn_scale > 1.0 and len(set(plan.factors.tolist())) > 2
    positions = torch.arange(0, LONG, 7)[None]
    x = torch.zeros(1, positions.shape[1], 64)
    with patched_rope(model, plan.factors, plan.attn_scale):
        cos, sin = model.model.rotary_emb(x, positions)
    k = np.arange(32)
    angle = positions[0].numpy()[:, None].astype(np.float64) * facts.theta ** (-2.0 * k / 64) / plan.factors
    for half in (0, 1):
        np.testing.assert_allclose(cos[0, :, half * 32:(half + 1) * 32].numpy(), np.cos(angle) * plan.attn_scale,
                                   atol=2e-4)
        np.testing.assert_allclose(sin[0, :, half * 32:(half + 1) * 32].numpy(), np.sin(angle) * plan.attn_scale,
                                   atol=2e-4)


def test_attention_scale_equals_folding_into_wq_wk(tiny, model):
    """Scaling cos/sin by t is what the converter's W_Q *= t, W_K *= t does."""
    plan = make_plan("yarn", RopeFacts(n_rot=64, theta=10000.0, trained_ctx=TRAINED, target_ctx=LONG))
    ids = torch.randint(3, 1000, (1, 80), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(80)[None]
    with patched_rope(model, plan.factors, plan.attn_scale):
        scaled = _logits(model, ids, pos)
    folded_model = _load_model(tiny)
    with torch.no_grad():
        for layer in folded_model.model.layers:
            layer.self_attn.q_proj.weight.mul_(plan.attn_scale)
            layer.self_attn.k_proj.weight.mul_(plan.attn_scale)
    with patched_rope(folded_model, plan.factors, 1.0):
        folded = _logits(folded_model, ids, pos)
    assert torch.allclose(scaled, folded, atol=1e-4, rtol=0)
    assert (scaled - _logits(model, ids, pos)).abs().max() > 1e-3  # the scale does something


def test_none_at_the_short_context_is_exactly_one(tiny, text):
    result = tail_inflation(tiny, text, ["none"], SHORT, SHORT)
    entry = result["plans"]["none"]
    assert entry["reused_reference_forward"]
    for band in entry["bands"].values():
        if band["tir"] is None:
            continue
        assert band["tir"] == 1.0 and band["bulk_ratio"] == 1.0
        assert band["per_layer"] == [1.0] * result["n_layer"] and band["per_layer_max"] == 1.0


def test_plans_finite_deterministic_and_bands_cover_all_pairs(tiny, text):
    plans = ["none", "linear", "ntk", "yarn", "llama3", "qroar:beta=4"]
    first = tail_inflation(tiny, text, plans, SHORT, LONG)
    second = tail_inflation(tiny, text, plans, SHORT, LONG)
    n_pairs = first["n_pairs"]
    bands = first["bands"]
    assert [*bands] == ["high", "ramp", "low", "all"]
    split = sorted(p for name in ("high", "ramp", "low") for p in bands[name])
    assert split == list(range(n_pairs)) and bands["all"] == list(range(n_pairs))
    assert first["measured_positions_long"] == [LONG - SHORT + 1, LONG] and first["measured_beyond_trained"]
    assert first["samples_per_layer"] == (SHORT - 1) * 2 * n_pairs
    assert [*first["plans"]] == plans
    for label, entry in first["plans"].items():
        again = second["plans"][label]
        assert len(entry["factors"]) == n_pairs
        for name, band in entry["bands"].items():
            assert band["pairs"] == bands[name]
            if not band["pairs"]:
                assert band["tir"] is None
                continue
            values = [band["tir"], band["bulk_ratio"], band["per_layer_max"], *band["per_layer"]]
            assert all(math.isfinite(v) and v > 0 for v in values), (label, name)
            assert band["per_layer_max"] == max(band["per_layer"])
            # layer 0's keys depend on the token only, and both runs measure the same tokens
            assert band["per_layer"][0] == 1.0
            for key in ("tir", "bulk_ratio", "per_layer", "long_quantile", "short_quantile"):
                assert band[key] == again["bands"][name][key], (label, name, key)
    # plans that change RoPE change the keys of later layers
    assert first["plans"]["linear"]["bands"]["all"]["tir"] != first["plans"]["none"]["bands"]["all"]["tir"]


def test_control_run(tiny, text):
    """The control (no scaling, same measured tokens) is exactly 1 at the short context, finite at L."""
    same = tail_inflation(tiny, text, ["none"], SHORT, LONG, control_ctx=SHORT)["control"]
    assert same["measured_positions"] == [1, SHORT]
    assert all(b["tir"] == 1.0 for b in same["bands"].values() if b["tir"] is not None)
    control = tail_inflation(tiny, text, ["none"], SHORT, LONG, control_ctx=TRAINED)["control"]
    assert control["ctx"] == TRAINED and control["measured_positions"] == [TRAINED - SHORT + 1, TRAINED]
    band = control["bands"]["all"]
    assert math.isfinite(band["tir"]) and band["per_layer"][0] == 1.0 and band["tir"] != 1.0


def test_errors(tiny, text):
    with pytest.raises(QroarError, match="control context"):
        tail_inflation(tiny, text, ["none"], SHORT, LONG, control_ctx=LONG)
    with pytest.raises(QroarError, match="tokens"):
        tail_inflation(tiny, "just a few words", ["none"], SHORT, LONG)
    with pytest.raises(QroarError, match="trained context"):
        tail_inflation(tiny, text, ["none"], 2 * TRAINED, 4 * TRAINED)
    with pytest.raises(QroarError, match="unknown plan"):
        tail_inflation(tiny, text, ["bogus"], SHORT, LONG)
    with pytest.raises(QroarError, match="quantile"):
        tail_inflation(tiny, text, ["none"], SHORT, LONG, quantile=1.0)
