"""Band-wise method: bands, --band-factors, --band-scales (symmetric or not); the search is in test_search.py."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest

from checkpoints import gguf_tensors
from runs import convert_ok, run_cli

TRAINED, TARGET = 256, 512  # the band model: evaluations at 512 tokens take about a second
HEAD_DIM, N_HEAD, N_KV = 64, 4, 2
P = HEAD_DIM // 2


def values(t: gguf.ReaderTensor) -> np.ndarray:
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(n) for n in t.shape])))


def provenance(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k[len("qroar."):]: f.contents() for k, f in reader.fields.items() if k.startswith("qroar.")}


# -- the bands ---------------------------------------------------------------------------------------

def test_bands_follow_rotations_in_the_trained_context():
    from qroar_gguf.rope.bands import band_edges, band_starts, pair_bands
    from qroar_gguf.rope.plans import RopeFacts
    from qroar_gguf.rope.bands import frequency_bands

    np.testing.assert_allclose(band_edges(4), [32, math.sqrt(32), 1])
    small = RopeFacts(n_rot=64, theta=10000.0, trained_ctx=TRAINED, target_ctx=TARGET)
    rotations = small.rotations()
    starts = band_starts(small, 4)
    assert starts.tolist() == [0, 1, 7, 13, 32]
    for lo, hi, (r_hi, r_lo) in zip(starts, starts[1:], [(math.inf, 32), (32, 32**0.5), (32**0.5, 1), (1, 0)]):
        assert np.all((rotations[lo:hi] < r_hi) & (rotations[lo:hi] >= r_lo))
    # N = 3 are exactly the frequency bands inspect reports; SmolLM2's 4 bands match the README's table.
    assert [b[1].tolist() for b in frequency_bands(small)] == \
        [np.arange(a, b).tolist() for a, b in zip(band_starts(small, 3), band_starts(small, 3)[1:])]
    smollm2 = RopeFacts(n_rot=64, theta=100000.0, trained_ctx=8192, target_ctx=16384)
    assert band_starts(smollm2, 4).tolist() == [0, 11, 16, 20, 32]
    # Every band non-empty and contiguous for every N <= P, also where some regions hold no pairs.
    for facts in (small, smollm2, RopeFacts(n_rot=8, theta=500000.0, trained_ctx=131072, target_ctx=262144)):
        for n in range(1, facts.n_pairs + 1):
            s = band_starts(facts, n)
            assert s[0] == 0 and s[-1] == facts.n_pairs and np.all(np.diff(s) >= 1), (facts, n)
            assert np.array_equal(pair_bands(facts, n), np.repeat(np.arange(n), np.diff(s)))
    from qroar_gguf.errors import QroarError

    with pytest.raises(QroarError, match="more than the 32 rotary pairs"):
        band_starts(small, 33)


# -- (a) band scales fold into whole pairs of W_Q / W_K rows -----------------------------------------

@pytest.mark.parametrize("symmetric", [True, False])
def test_band_scales_scale_whole_pairs_of_every_head(band_model: Path, tmp_path: Path, symmetric: bool):
    scales = [1.25, 0.8, 1.1, 0.9]
    plain, scaled = tmp_path / "plain.gguf", tmp_path / "scaled.gguf"
    common = ["--method", "yarn", "--ctx", str(TARGET), "--qtype", "F32"]  # yarn: folded attention scale too
    convert_ok(band_model, "-o", plain, *common)
    convert_ok(band_model, "-o", scaled, *common, "--band-scales", ",".join(map(str, scales)),
               "--symmetric" if symmetric else "--no-symmetric")
    a, b = gguf_tensors(plain), gguf_tensors(scaled)
    assert set(a) == set(b)
    starts = [0, 1, 7, 13, 32]
    band_of_pair = [next(j for j in range(4) if starts[j] <= k < starts[j + 1]) for k in range(P)]
    checked = 0
    for name in a:
        kind = "q" if ".attn_q." in name else "k" if ".attn_k." in name else None
        if kind is None:
            assert np.asarray(a[name].data).tobytes() == np.asarray(b[name].data).tobytes(), name
            continue
        before, after = values(a[name]), values(b[name])
        n_head = N_HEAD if kind == "q" else N_KV
        assert before.shape[0] == n_head * HEAD_DIM
        for h in range(n_head):
            for k in range(P):
                s = scales[band_of_pair[k]]
                factor = 1 / s if (kind == "k" and symmetric) else s
                rows = [h * HEAD_DIM + 2 * k, h * HEAD_DIM + 2 * k + 1]  # llama.cpp pair k: adjacent rows
                np.testing.assert_allclose(after[rows], before[rows] * factor, rtol=2e-7, atol=0,
                                           err_msg=f"{name} head {h} pair {k}")
                checked += 1
    assert checked == 2 * (2 * (N_HEAD + N_KV) * P)  # 2 layers x (weight + bias) x Q/K heads x pairs
    prov = provenance(scaled)
    assert prov["bands"] == starts
    np.testing.assert_allclose(prov["band_scales"], scales, rtol=1e-7)
    assert prov["band_factors"] == [1.0] * 4
    assert prov["band_symmetric"] is symmetric
    assert "bands" not in provenance(plain)


def test_band_scales_equal_hf_layout_statement(band_model: Path, tmp_path: Path):
    """Same check from the HF side: GGUF row h*d + 2k + t is HF row h*d + t*P + k, scaled by its band."""
    from qroar_gguf.source.checkpoint import open_checkpoint

    out = tmp_path / "scaled.gguf"
    convert_ok(band_model, "-o", out, "--method", "linear", "--ctx", str(TARGET), "--qtype", "F32",
               "--band-scales", "2,0.5,1,1.25")
    scale_of_pair = np.repeat([2, 0.5, 1, 1.25], np.diff([0, 1, 7, 13, 32]))
    ckpt = open_checkpoint(band_model)
    hf = ckpt.load("model.layers.1.self_attn.k_proj.weight").astype(np.float32)
    ours = values(gguf_tensors(out)["blk.1.attn_k.weight"])
    for h in range(N_KV):
        for k in range(P):
            for t in range(2):
                np.testing.assert_allclose(ours[h * HEAD_DIM + 2 * k + t], hf[h * HEAD_DIM + t * P + k] / scale_of_pair[k],
                                           rtol=2e-7)


# -- (b) band factors multiply the plan's rope_freqs --------------------------------------------------

def test_band_factors_multiply_the_base_plan(band_model: Path, tmp_path: Path):
    multipliers = [0.8, 1.1, 0.9, 1.25]
    plain, banded = tmp_path / "plain.gguf", tmp_path / "banded.gguf"
    common = ["--method", "yarn", "--ctx", str(TARGET), "--qtype", "F16"]
    convert_ok(band_model, "-o", plain, *common)
    convert_ok(band_model, "-o", banded, *common, "--band-factors", ",".join(map(str, multipliers)))
    a, b = gguf_tensors(plain), gguf_tensors(banded)
    base = np.asarray(a["rope_freqs.weight"].data, dtype=np.float64)
    got = np.asarray(b["rope_freqs.weight"].data)
    assert b["rope_freqs.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    per_pair = np.repeat(multipliers, np.diff([0, 1, 7, 13, 32]))
    expected = np.maximum(base * per_pair, 1.0).astype(np.float32)
    np.testing.assert_array_equal(got, expected)
    assert got[0] == 1.0 and base[0] == 1.0  # yarn leaves pair 0 alone; x0.8 may not push it below 1
    assert np.all(got >= 1.0) and not np.array_equal(got, base.astype(np.float32))
    for name in a:
        if name != "rope_freqs.weight":
            assert np.asarray(a[name].data).tobytes() == np.asarray(b[name].data).tobytes(), name
    prov = provenance(banded)
    np.testing.assert_allclose(prov["factors"], expected)
    np.testing.assert_allclose(prov["band_factors"], multipliers, rtol=1e-7)
    assert prov["band_scales"] == [1.0] * 4


def test_band_options_fail_in_one_line(band_model: Path, tmp_path: Path):
    out = tmp_path / "x.gguf"
    for args, message in [
        (["--band-scales", "1,2"], "--band-scales has 2 values but there are 4 bands"),
        (["--bands", "2", "--band-factors", "1,1,1"], "--band-factors has 3 values but there are 2 bands"),
        (["--band-factors", "1,0,1,1"], "--band-factors must be finite and positive"),
        (["--band-scales", "1,-2,1,1"], "--band-scales must be finite and positive"),
        (["--band-scales", "1,a,1,1"], "comma-separated numbers"),
        (["--bands", "40", "--band-scales", ",".join(["1"] * 40)], "more than the 32 rotary pairs"),
        (["--search", "--band-factors", "1,1,1,1"], "--search chooses the band values itself"),
        (["--dev-ctx", "512"], "apply to --search only"),
    ]:
        result = run_cli(band_model, "-o", out, "--ctx", str(TARGET), "--qtype", "F16", *args)
        usage = args[0] == "--dev-ctx"  # a command-line mistake: exit 2 (README's exit statuses)
        assert result.returncode == (2 if usage else 1), (args, result.stderr)
        assert result.stderr.count("\n") == 1 and message in result.stderr, (args, result.stderr)
        assert not out.exists()


# -- (c) the symmetric variant leaves full-precision logits unchanged --------------------------------

def _logits(path: Path, tokens: list[int]) -> np.ndarray:
    import llama_cpp

    model = llama_cpp.Llama(model_path=str(path), n_ctx=TARGET, n_threads=2, logits_all=True, verbose=False,
                            type_k=0, type_v=0)  # f32 KV cache: the comparison is about the weights only
    try:
        model.eval(tokens)
        return np.array(model.scores[: len(tokens)], dtype=np.float64)
    finally:
        model.close()


def test_symmetric_scales_keep_logits_and_non_symmetric_do_not(band_model: Path, tmp_path: Path):
    import llama_cpp

    common = ["--method", "yarn", "--ctx", str(TARGET), "--qtype", "F32"]
    scales = "1.25,0.8,1.25,0.8"
    files = {name: tmp_path / f"{name}.gguf" for name in ("plain", "symmetric", "non_symmetric")}
    convert_ok(band_model, "-o", files["plain"], *common)
    convert_ok(band_model, "-o", files["symmetric"], *common, "--band-scales", scales)
    convert_ok(band_model, "-o", files["non_symmetric"], *common, "--band-scales", scales, "--no-symmetric")
    vocab = llama_cpp.Llama(model_path=str(files["plain"]), vocab_only=True, verbose=False)
    tokens = vocab.tokenize(b"It is a truth universally acknowledged, that a single man in possession of a "
                            b"good fortune, must be in want of a wife. However little known the feelings "
                            b"or views of such a man may be on his first entering a neighbourhood", add_bos=False)
    vocab.close()
    assert len(tokens) > 30
    plain = _logits(files["plain"], tokens)
    symmetric = _logits(files["symmetric"], tokens)
    non_symmetric = _logits(files["non_symmetric"], tokens)
    spread = plain.std()
    assert np.max(np.abs(symmetric - plain)) < 1e-3 * max(1.0, spread), np.max(np.abs(symmetric - plain))
    assert np.max(np.abs(non_symmetric - plain)) > 1e-2 * spread  # the check would see a wrong fold
