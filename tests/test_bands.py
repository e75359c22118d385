"""Band-wise method (issue 5): bands, --band-factors, --band-scales (symmetric or not), --search."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest

from checkpoints import gguf_tensors, make_tiny_llama, write_safetensors
from test_convert import convert_ok, run_cli

TRAINED, TARGET = 256, 512  # tiny model: evaluations at 512 tokens take about a second
HEAD_DIM, N_HEAD, N_KV = 64, 4, 2
P = HEAD_DIM // 2


@pytest.fixture(scope="module")
def tiny(smollm2_dir: Path, tmp_path_factory) -> Path:
    """The tiny GQA Llama (4 Q heads, 2 K heads) with random q/k biases, so biases are checked too."""
    directory, tensors = make_tiny_llama(tmp_path_factory.mktemp("bands") / "ckpt", smollm2_dir,
                                         max_position_embeddings=TRAINED)
    rng = np.random.default_rng(7)
    for i in range(2):
        tensors[f"model.layers.{i}.self_attn.q_proj.bias"] = 0.1 * rng.standard_normal(N_HEAD * HEAD_DIM)
        tensors[f"model.layers.{i}.self_attn.k_proj.bias"] = 0.1 * rng.standard_normal(N_KV * HEAD_DIM)
    write_safetensors(directory / "model.safetensors", tensors)
    return directory


@pytest.fixture(scope="module")
def dev_text(tmp_path_factory) -> Path:
    from qroar_gguf.assets.austen import austen_text

    text = austen_text("Emma").read_text(encoding="utf-8")[20000:26000]  # about 1400 tokens: 2 windows of 512
    path = tmp_path_factory.mktemp("dev") / "dev.txt"
    path.write_text(text, encoding="utf-8")
    return path


def values(t: gguf.ReaderTensor) -> np.ndarray:
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(n) for n in t.shape])))


def provenance(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k[len("qroar."):]: f.contents() for k, f in reader.fields.items() if k.startswith("qroar.")}


# -- the bands ---------------------------------------------------------------------------------------

def test_bands_follow_rotations_in_the_trained_context():
    from qroar_gguf.rope.bands import band_edges, band_starts, pair_bands
    from qroar_gguf.rope.plans import RopeFacts
    from qroar_gguf.rope.sensitivity import frequency_bands

    np.testing.assert_allclose(band_edges(4), [32, math.sqrt(32), 1])
    tiny = RopeFacts(n_rot=64, theta=10000.0, trained_ctx=TRAINED, target_ctx=TARGET)
    rotations = tiny.rotations()
    starts = band_starts(tiny, 4)
    assert starts.tolist() == [0, 1, 7, 13, 32]
    for lo, hi, (r_hi, r_lo) in zip(starts, starts[1:], [(math.inf, 32), (32, 32**0.5), (32**0.5, 1), (1, 0)]):
        assert np.all((rotations[lo:hi] < r_hi) & (rotations[lo:hi] >= r_lo))
    # N = 3 are exactly the frequency bands inspect reports; SmolLM2's 4 bands match the README's table.
    assert [b[1].tolist() for b in frequency_bands(tiny)] == \
        [np.arange(a, b).tolist() for a, b in zip(band_starts(tiny, 3), band_starts(tiny, 3)[1:])]
    smollm2 = RopeFacts(n_rot=64, theta=100000.0, trained_ctx=8192, target_ctx=16384)
    assert band_starts(smollm2, 4).tolist() == [0, 11, 16, 20, 32]
    # Every band non-empty and contiguous for every N <= P, also where some regions hold no pairs.
    for facts in (tiny, smollm2, RopeFacts(n_rot=8, theta=500000.0, trained_ctx=131072, target_ctx=262144)):
        for n in range(1, facts.n_pairs + 1):
            s = band_starts(facts, n)
            assert s[0] == 0 and s[-1] == facts.n_pairs and np.all(np.diff(s) >= 1), (facts, n)
            assert np.array_equal(pair_bands(facts, n), np.repeat(np.arange(n), np.diff(s)))
    from qroar_gguf.errors import QroarError

    with pytest.raises(QroarError, match="more than the 32 rotary pairs"):
        band_starts(tiny, 33)


# -- (a) band scales fold into whole pairs of W_Q / W_K rows -----------------------------------------

@pytest.mark.parametrize("symmetric", [True, False])
def test_band_scales_scale_whole_pairs_of_every_head(tiny: Path, tmp_path: Path, symmetric: bool):
    scales = [1.25, 0.8, 1.1, 0.9]
    plain, scaled = tmp_path / "plain.gguf", tmp_path / "scaled.gguf"
    common = ["--method", "yarn", "--ctx", str(TARGET), "--qtype", "F32"]  # yarn: folded attention scale too
    convert_ok(tiny, "-o", plain, *common)
    convert_ok(tiny, "-o", scaled, *common, "--band-scales", ",".join(map(str, scales)),
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


def test_band_scales_equal_hf_layout_statement(tiny: Path, tmp_path: Path):
    """Same check from the HF side: GGUF row h*d + 2k + t is HF row h*d + t*P + k, scaled by its band."""
    from qroar_gguf.source.checkpoint import open_checkpoint

    out = tmp_path / "scaled.gguf"
    convert_ok(tiny, "-o", out, "--method", "linear", "--ctx", str(TARGET), "--qtype", "F32",
               "--band-scales", "2,0.5,1,1.25")
    scale_of_pair = np.repeat([2, 0.5, 1, 1.25], np.diff([0, 1, 7, 13, 32]))
    ckpt = open_checkpoint(tiny)
    hf = ckpt.load("model.layers.1.self_attn.k_proj.weight").astype(np.float32)
    ours = values(gguf_tensors(out)["blk.1.attn_k.weight"])
    for h in range(N_KV):
        for k in range(P):
            for t in range(2):
                np.testing.assert_allclose(ours[h * HEAD_DIM + 2 * k + t], hf[h * HEAD_DIM + t * P + k] / scale_of_pair[k],
                                           rtol=2e-7)


# -- (b) band factors multiply the plan's rope_freqs --------------------------------------------------

def test_band_factors_multiply_the_base_plan(tiny: Path, tmp_path: Path):
    multipliers = [0.8, 1.1, 0.9, 1.25]
    plain, banded = tmp_path / "plain.gguf", tmp_path / "banded.gguf"
    common = ["--method", "yarn", "--ctx", str(TARGET), "--qtype", "F16"]
    convert_ok(tiny, "-o", plain, *common)
    convert_ok(tiny, "-o", banded, *common, "--band-factors", ",".join(map(str, multipliers)))
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


def test_band_options_fail_in_one_line(tiny: Path, tmp_path: Path):
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
        result = run_cli(tiny, "-o", out, "--ctx", str(TARGET), "--qtype", "F16", *args)
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


def test_symmetric_scales_keep_logits_and_non_symmetric_do_not(tiny: Path, tmp_path: Path):
    import llama_cpp

    common = ["--method", "yarn", "--ctx", str(TARGET), "--qtype", "F32"]
    scales = "1.25,0.8,1.25,0.8"
    files = {name: tmp_path / f"{name}.gguf" for name in ("plain", "symmetric", "non_symmetric")}
    convert_ok(tiny, "-o", files["plain"], *common)
    convert_ok(tiny, "-o", files["symmetric"], *common, "--band-scales", scales)
    convert_ok(tiny, "-o", files["non_symmetric"], *common, "--band-scales", scales, "--no-symmetric")
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


# -- (d) the search ----------------------------------------------------------------------------------

def _options(**kw):
    from qroar_gguf.convert import ConvertOptions

    base = dict(method="yarn", target_ctx=TARGET, qtype="Q4_0", threads=2, progress=False)
    return ConvertOptions(**{**base, **kw})


def _settings(dev_text: Path, cache: Path, **kw):
    from qroar_gguf.search import SearchSettings

    return SearchSettings(**{**dict(dev_text=dev_text, dev_ctx=TARGET, budget=6, seed=1, cache=cache), **kw})


def _trace(result) -> list:
    return [(e.factors, e.scales, e.objective) for e in result.history]


def test_search_is_deterministic_bounded_never_worse_and_resumes(tiny: Path, dev_text: Path, tmp_path: Path):
    from qroar_gguf.search import run_search

    measured: list = []

    class Interrupt(Exception):
        pass

    def stop_after_two(ev):
        measured.append(ev)
        if len(measured) == 2:
            raise Interrupt

    cache_a, cache_b = tmp_path / "cache_a", tmp_path / "cache_b"
    with pytest.raises(Interrupt):  # interrupted after two candidates: both are on disk
        run_search(tiny, _options(), _settings(dev_text, cache_a), on_evaluate=stop_after_two)
    assert len(list(cache_a.glob("*.json"))) == 2

    measured.clear()
    resumed = run_search(tiny, _options(), _settings(dev_text, cache_a), on_evaluate=measured.append)
    assert resumed.evaluations <= 6
    assert resumed.new_evaluations == len(measured) == resumed.evaluations - 2
    assert len(list(cache_a.glob("*.json"))) == resumed.evaluations

    fresh = run_search(tiny, _options(), _settings(dev_text, cache_b))  # deterministic: same path, same numbers
    assert fresh.new_evaluations == fresh.evaluations
    assert _trace(fresh) == _trace(resumed)
    assert fresh.best.factors == resumed.best.factors and fresh.best.scales == resumed.best.scales

    measured.clear()
    again = run_search(tiny, _options(), _settings(dev_text, cache_a), on_evaluate=measured.append)
    assert again.new_evaluations == 0 and measured == []
    assert _trace(again) == _trace(resumed)

    # Starts from the formula plan, never ends worse than it, keys distinct candidates only.
    start = resumed.history[0]
    assert start.factors == (1.0,) * 4 and start.scales == (1.0,) * 4
    assert resumed.best.objective <= start.objective
    assert resumed.best.objective == min(e.objective for e in resumed.history)
    assert len({e.key for e in resumed.history}) == resumed.evaluations
    assert resumed.record["start"] == start.objective and resumed.record["reached"] == resumed.best.objective
    assert resumed.record["evaluations"] == resumed.evaluations and resumed.record["budget"] == 6
    assert resumed.record["dev_text_tokens"] > 2 * TARGET and resumed.record["dev_scored_tokens"] == 2 * 255

    # A budget is a hard limit, and a larger one retraces the same path first.
    small = run_search(tiny, _options(), _settings(dev_text, cache_a, budget=3))
    assert small.evaluations == 3 and small.new_evaluations == 0 and _trace(small) == _trace(resumed)[:3]


def test_search_start_is_the_formula_plan_and_the_output_is_the_best(tiny: Path, dev_text: Path, tmp_path: Path):
    from qroar_gguf.convert import convert
    from qroar_gguf.evaluate.perplexity import perplexity
    from qroar_gguf.evaluate.runtime import Runtime
    from qroar_gguf.search import search_and_convert

    cache = tmp_path / "cache"
    out, formula = tmp_path / "searched.Q4_0.gguf", tmp_path / "yarn.Q4_0.gguf"
    lines: list[str] = []
    measured: list = []
    search_and_convert(tiny, out, _options(), _settings(dev_text, cache, budget=4, seed=0, space="scales"),
                       log=lines.append, on_evaluate=measured.append)
    convert(tiny, formula, _options())

    def dev_nll(path: Path) -> float:
        with Runtime(path, n_ctx=TARGET, threads=2) as rt:
            return perplexity(rt, dev_text.read_text(encoding="utf-8"), quiet=True).mean_nll

    prov = provenance(out)
    search = json.loads(prov["search"])
    assert dev_nll(formula) == pytest.approx(search["start"], abs=1e-9)
    assert dev_nll(out) == pytest.approx(search["reached"], abs=1e-9)
    assert search["reached"] <= search["start"]
    assert search["evaluations"] == len(measured) <= 4 and search["budget"] == 4
    import hashlib

    assert search["dev_text_sha256"] == hashlib.sha256(dev_text.read_bytes()).hexdigest()
    assert search["objective"] == "ppl" and search["space"] == "scales"
    assert prov["band_factors"] == [1.0] * 4  # space "scales": factors stay the formula's
    assert prov["bands"] == [0, 1, 7, 13, 32] and prov["band_symmetric"] is True
    assert any("best" in line for line in lines) and lines[0].startswith("search:")


def test_search_from_the_command_line(tiny: Path, dev_text: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("QROAR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "searched.gguf"
    args = [tiny, "-o", out, "--method", "yarn", "--ctx", str(TARGET), "--qtype", "Q4_0", "--threads", "2",
            "--search", "--dev-text", dev_text, "--dev-ctx", str(TARGET), "--dev-chunks", "1",
            "--search-budget", "2", "--search-space", "factors", "--search-objective", "kld"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "search [1/2] start" in result.stdout and "search: best" in result.stdout
    search = json.loads(provenance(out)["search"])
    assert search["objective"] == "kld" and search["evaluations"] == 2 and search["dev_chunks"] == 1
    assert search["dev_scored_tokens"] == 255 and search["reached"] <= search["start"]
    assert len(list((tmp_path / "cache" / "search").glob("*.json"))) == 2
    rerun = run_cli(*args, "--force", "--search-report", tmp_path / "search.json")  # everything cached
    assert rerun.returncode == 0 and rerun.stdout.count("(cached)") == 2, rerun.stdout
    report = json.loads((tmp_path / "search.json").read_text())
    assert len(report["candidates"]) == 2 and report["reached"] == search["reached"]
    assert report["candidates"][0]["factors"] == [1.0] * 4 == report["start_factors"]
    assert report["base"]["method"] == provenance(out)["method"] and report["base"]["target_ctx"] == TARGET
    assert report["candidates"][-1]["best_so_far"] == min(c["objective"] for c in report["candidates"])
    assert provenance(out)["band_factors"] == pytest.approx(report["best_factors"], rel=1e-6)
    unwritable = run_cli(*args, "--force", "--search-report", tmp_path / "missing" / "search.json")
    assert unwritable.returncode == 1 and unwritable.stderr.count("\n") == 1, unwritable.stderr
    assert "--search-report directory" in unwritable.stderr and "does not exist" in unwritable.stderr
    assert "search [" not in unwritable.stdout  # refused before measuring anything
    unquantized = run_cli(*args[:8], "F16", *args[9:], "--force")
    assert unquantized.returncode == 1 and "needs a quantized --qtype" in unquantized.stderr


def test_search_defaults_to_one_window_of_emma(tiny: Path, tmp_path: Path, monkeypatch):
    """`--search` alone is enough: the dev text defaults to Emma (the packaged Austen text), one window."""
    import hashlib

    from qroar_gguf.assets.austen import austen_text

    emma = austen_text("Emma")
    monkeypatch.setenv("QROAR_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "austen").mkdir(parents=True)
    for text in emma.parent.glob("*.txt"):  # the isolated cache gets the already built texts
        (tmp_path / "cache" / "austen" / text.name).write_bytes(text.read_bytes())
    out = tmp_path / "searched.gguf"
    result = run_cli(tiny, "-o", out, "--ctx", str(TARGET), "--qtype", "Q4_0", "--search", "--search-budget", "1")
    assert result.returncode == 0, result.stderr
    assert "Emma" in result.stdout
    search = json.loads(provenance(out)["search"])
    assert search["dev_text_sha256"] == hashlib.sha256(emma.read_bytes()).hexdigest()
    assert search["dev_chunks"] == 1 and search["dev_scored_tokens"] == TARGET // 2 - 1
    # searched band scales are non-symmetric unless asked (explicit --band-scales default to symmetric)
    assert search["symmetric"] is False and provenance(out)["band_symmetric"] is False
