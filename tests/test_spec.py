"""The typed plan spec: one value parsed once, from a plan string or the command line's options."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qroar_gguf.errors import QroarError
from qroar_gguf.rope.plans import RopeFacts, make_plan
from qroar_gguf.rope.spec import BandSpec, PlanSpec

FACTS = RopeFacts(n_rot=64, theta=100000.0, trained_ctx=8192, target_ctx=16384)


def test_a_plan_string_parses_to_the_spec_the_command_line_builds():
    parsed = PlanSpec.parse("qroar:beta=4,agg=mean,base=llama3,band_factors=1/1/0.9/0.9,symmetric=false")
    built = PlanSpec("qroar", {"beta": 4, "base": "llama3"}, "mean",
                     BandSpec(factors=(1.0, 1.0, 0.9, 0.9), symmetric=False))
    assert parsed == built
    assert parsed.label == "qroar:beta=4,agg=mean,base=llama3,band_factors=1/1/0.9/0.9,symmetric=false"
    assert built.label == "qroar:beta=4,base=llama3,agg=mean"
    assert json.loads(json.dumps(parsed.record())) == {
        "beta": 4, "base": "llama3", "agg": "mean", "bands": 4, "band_factors": [1.0, 1.0, 0.9, 0.9],
        "band_scales": None, "symmetric": False}


def test_values_take_their_types():
    spec = PlanSpec.parse("yarn:attn_scale=false,beta_fast=16,beta_slow=1.5")
    assert dict(spec.options) == {"attn_scale": False, "beta_fast": 16, "beta_slow": 1.5}
    assert PlanSpec.parse("qroar:bands=3,band_scales=1/1.1/0.9").bands == BandSpec(3, None, (1.0, 1.1, 0.9))


def test_the_plan_is_make_plans_and_records_the_aggregation():
    s = np.linspace(0.0, 2.0, FACTS.n_pairs)
    spec = PlanSpec("qroar", {"beta": 4}, "mean")
    assert spec.needs_sensitivity and not PlanSpec("yarn").needs_sensitivity
    plan = spec.plan(FACTS, s)
    assert np.array_equal(plan.factors, make_plan("qroar", FACTS, sensitivity=s, beta=4).factors)
    assert plan.params["agg"] == "mean" and PlanSpec("qroar").plan(FACTS, s).params["agg"] == "max"
    with pytest.raises(QroarError, match="sensitivity"):
        spec.plan(FACTS)


def test_the_spec_is_immutable():
    spec = PlanSpec("yarn", {"attn_scale": False})
    with pytest.raises(TypeError):
        spec.options["attn_scale"] = True  # type: ignore[index]


@pytest.mark.parametrize("text, message", [
    ("magic", "unknown plan 'magic'"),
    ("yarn:beta=4", "method yarn takes no option beta"),
    ("yarn:agg=max", "agg .* applies to qroar only"),
    ("qroar:agg=median", "agg must be one of max, mean"),
    ("qroar:beta", "options are key=value"),
    ("qroar:band_factors=1/2", "band_factors has 2 values but there are 4 bands"),
    ("qroar:bands=x", "bands must be a whole number"),
    ("qroar:bands=0", "--bands must be a positive integer"),
    ("qroar:band_scales=1/1/0/1", "must be finite and positive"),
    ("qroar:band_scales=1/1/a/1", "slash-separated numbers"),
    ("qroar:band_scales=1/1/1/1,symmetric=maybe", "symmetric must be true or false"),
])
def test_bad_specs_are_one_line_errors(text: str, message: str):
    with pytest.raises(QroarError, match=message) as caught:
        PlanSpec.parse(text)
    assert "\n" not in str(caught.value)


def test_the_command_lines_rules_are_the_specs():
    """--ctx xor --scale and the qroar-only options are checked here once; the command line maps the
    UsageProblem to its usage error (exit status 2)."""
    from qroar_gguf.errors import UsageProblem
    from qroar_gguf.rope.spec import rope_facts_for

    for options, agg in (({"beta": 4.0}, None), ({"base": "linear"}, None), ({}, "mean")):
        with pytest.raises(UsageProblem, match=r"--beta, --agg and --base apply to --method qroar only \(got --method"):
            PlanSpec("yarn", options, agg)
    with pytest.raises(UsageProblem, match="give either --ctx or --scale, not both"):
        rope_facts_for(64, 1e4, 2048, "yarn", target_ctx=4096, scale=2.0)
    assert PlanSpec("qroar", {"beta": 4.0}, "mean").aggregation == "mean" and PlanSpec("qroar").aggregation == "max"


def test_symmetric_is_left_to_the_use_unless_asked():
    assert BandSpec().symmetric is None and BandSpec().is_symmetric  # given scales fold symmetrically
    assert BandSpec(symmetric=False).is_symmetric is False
    assert PlanSpec.parse("qroar:band_scales=1/1/0.9/1").bands.is_symmetric  # a plan string's default
