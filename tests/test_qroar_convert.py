"""The plans as the converter applies them: folded attention scale, sensitivity layouts, provenance."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
from checkpoints import gguf_tensors, make_tiny_llama, write_safetensors
from test_convert import convert_ok, run_cli

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def tiny(smollm2_dir: Path, tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    return make_tiny_llama(tmp_path_factory.mktemp("tinyq") / "ckpt", smollm2_dir)


def f16_values(t: gguf.ReaderTensor) -> np.ndarray:
    return np.asarray(t.data).view(np.float16).astype(np.float32)


def test_folded_attention_scale_touches_only_q_and_k(tiny, tmp_path: Path):
    directory, _ = tiny
    plain, scaled = tmp_path / "yarn_noattn.gguf", tmp_path / "yarn.gguf"
    convert_ok(directory, "-o", plain, "--method", "yarn", "--ctx", "8192", "--no-attn-scale", "--qtype", "F16")
    convert_ok(directory, "-o", scaled, "--method", "yarn", "--ctx", "8192", "--qtype", "F16")
    a, b = gguf_tensors(plain), gguf_tensors(scaled)
    t = 0.1 * math.log(4) + 1
    assert set(a) == set(b)
    for name in a:
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            expected = (f16_values(a[name]) * np.float32(t)).astype(np.float16).astype(np.float32)
            np.testing.assert_array_equal(f16_values(b[name]), expected, err_msg=name)
        else:
            assert np.asarray(a[name].data).tobytes() == np.asarray(b[name].data).tobytes(), name
    summary = json.loads(run_cli("inspect", scaled, "--json").stdout)
    assert summary["qroar"]["attention_scale_folded"] == pytest.approx(t)


def test_inflated_key_channel_marks_its_pair_in_both_layouts(smollm2_dir: Path, tmp_path: Path):
    from qroar_gguf.rope.measure import measure_gguf_sensitivity, measure_sensitivity
    from qroar_gguf.source.checkpoint import open_checkpoint

    directory, tensors = make_tiny_llama(tmp_path / "ckpt", smollm2_dir, seed=3)
    head, pair, head_dim = 1, 13, 64
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name][head * head_dim + pair + head_dim // 2] *= 40  # HF rotate_half: pair k = dims k, k + 32
    write_safetensors(directory / "model.safetensors", tensors)

    ckpt = open_checkpoint(directory)
    from_hf = measure_sensitivity(ckpt).sensitivity
    out = tmp_path / "inflated.F16.gguf"
    convert_ok(directory, "-o", out, "--method", "none", "--qtype", "F16")
    from_gguf = measure_gguf_sensitivity(out).sensitivity
    assert int(np.argmax(from_hf)) == pair
    assert int(np.argmax(from_gguf)) == pair
    np.testing.assert_allclose(from_gguf, from_hf, rtol=2e-3)


def test_qroar_file_records_its_options(tiny, tmp_path: Path):
    directory, _ = tiny
    out = tmp_path / "qroar.gguf"
    convert_ok(directory, "-o", out, "--method", "qroar", "--ctx", "8192", "--beta", "3", "--agg", "mean",
               "--base", "llama3", "--qtype", "Q8_0")
    summary = json.loads(run_cli("inspect", out, "--json").stdout)
    params = summary["qroar"]["params"]
    assert (params["beta"], params["agg"], params["base"]) == (3.0, "mean", "llama3")
    assert len(params["sensitivity"]) == 32
    assert summary["rope_freqs"] == pytest.approx(summary["qroar"]["factors"])
    assert [b["band"] for b in summary["bands"]] == ["high", "ramp", "low"]

    from qroar_gguf.rope.plans import RopeFacts, make_plan

    facts = RopeFacts(n_rot=64, theta=10000.0, trained_ctx=2048, target_ctx=8192)
    expected = make_plan("qroar", facts, sensitivity=np.array(params["sensitivity"]), beta=3.0, base="llama3")
    np.testing.assert_array_equal(np.float32(summary["rope_freqs"]), expected.factors)


def test_beta_zero_file_equals_base_plan_file(tiny, tmp_path: Path):
    directory, _ = tiny
    base, zero = tmp_path / "yarn.gguf", tmp_path / "qroar0.gguf"
    convert_ok(directory, "-o", base, "--method", "yarn", "--ctx", "8192", "--qtype", "F16")
    convert_ok(directory, "-o", zero, "--method", "qroar", "--beta", "0", "--ctx", "8192", "--qtype", "F16")
    a, b = gguf_tensors(base), gguf_tensors(zero)
    for name in a:
        assert np.asarray(a[name].data).tobytes() == np.asarray(b[name].data).tobytes(), name


def test_plan_options_need_qroar(tiny, tmp_path: Path):
    directory, _ = tiny
    result = run_cli(directory, "-o", tmp_path / "x.gguf", "--method", "yarn", "--beta", "2")
    assert result.returncode != 0 and "apply to --method qroar only" in result.stderr
    assert not (tmp_path / "x.gguf").exists()


def test_source_llama3_factors_are_kept_and_multiplied(smollm2_dir: Path, tmp_path: Path):
    from qroar_gguf.rope.plans import source_factors

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}
    directory, _ = make_tiny_llama(tmp_path / "l31", smollm2_dir, rope_scaling=scaling, rope_theta=500000.0)
    out = tmp_path / "l31.gguf"
    convert_ok(directory, "-o", out, "--method", "linear", "--ctx", "4096", "--qtype", "F16")
    theirs, _ = source_factors(json.loads((directory / "config.json").read_text()), 64)
    assert theirs is not None and theirs.max() == pytest.approx(8.0) and theirs.min() == pytest.approx(1.0)
    factors = np.asarray(gguf_tensors(out)["rope_freqs.weight"].data)
    np.testing.assert_allclose(factors, 2.0 * theirs, rtol=1e-6)  # 2048 -> 4096 on top of llama3's own
    summary = json.loads(run_cli("inspect", out, "--json").stdout)
    assert summary["qroar"]["source_factors"] == pytest.approx(list(theirs))
    assert summary["qroar"]["trained_context"] == 2048
