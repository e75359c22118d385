"""Long chats stay exact: files `patch` writes carry YaRN's temperature in the weights, not in a runtime
factor that a context shift (llama-server --context-shift, Ollama's default) applies again; `--fix-shift`
repairs files made elsewhere (a file written the way llama.cpp's converter writes a Qwen3 YaRN checkpoint
among them); `inspect` says which is which. Real files and the real libllama throughout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
from checkpoints import gguf_tensors, write_gguf
from runs import convert_ok, fail_cleanly, run_cli
from servers import get_json, llama_server, post_json
from test_convert import prompt_logits
from test_patch import fields, patch_ok, small_gguf, tensor_bytes

T_2X = 0.1 * np.log(2.0) + 1.0  # YaRN's attention scale at 2x


@pytest.fixture(scope="module")
def tokens(smollm2_gguf: Path) -> list[int]:
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(smollm2_gguf), vocab_only=True, verbose=False)
    text = Path(__file__).read_text()[:4000]  # any real text
    return vocab.tokenize(text.encode(), add_bos=False)[:300]


@pytest.fixture(scope="module")
def quantized(smollm2_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """SmolLM2 Q4_K_M as trained (its attn_q/attn_k are Q5_0 and Q6_K/Q8_0 blocks), patched for 2x with the
    scale folded into the block scales, and with the scale as the attn_factor key."""
    folder = tmp_path_factory.mktemp("shift")
    files = {name: folder / f"{name}.gguf" for name in ("none", "folded", "keyed", "no_scale")}
    convert_ok(smollm2_dir, "-o", files["none"], "--method", "none", "--qtype", "Q4_K_M")
    patch_ok(files["none"], files["folded"], "--method", "yarn", "--ctx", "16384")
    patch_ok(files["none"], files["keyed"], "--method", "yarn", "--ctx", "16384", "--attn-factor-key")
    patch_ok(files["none"], files["no_scale"], "--method", "yarn", "--ctx", "16384", "--no-attn-scale")
    return files


def test_patch_scales_only_the_rotary_rows_block_scales(quantized: dict[str, Path]):
    before, folded, keyed = (tensor_bytes(quantized[n]) for n in ("none", "folded", "keyed"))
    for files in (before, folded, keyed):
        files.pop("rope_freqs.weight")  # convert writes one even with --method none
    assert keyed == before  # the key form copies every tensor
    changed = {name for name in before if folded[name] != before[name]}
    assert changed == {f"blk.{i}.attn_{p}.weight" for i in range(30) for p in "qk"}
    old, new = gguf_tensors(quantized["none"]), gguf_tensors(quantized["folded"])
    for name in sorted(changed)[:4]:
        assert new[name].tensor_type == old[name].tensor_type
        a = gguf.quants.dequantize(np.asarray(old[name].data), old[name].tensor_type)
        b = gguf.quants.dequantize(np.asarray(new[name].data), new[name].tensor_type)
        np.testing.assert_allclose(b, a * T_2X, rtol=0, atol=2e-3 * np.abs(a).max())
    assert "llama.rope.scaling.attn_factor" not in fields(quantized["folded"])
    assert fields(quantized["keyed"])["llama.rope.scaling.attn_factor"] == pytest.approx(T_2X, rel=1e-6)


def kl_divergence(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean KL(reference || other) over positions, from logits."""
    lp, lq = (x - x.max(axis=1, keepdims=True) for x in (reference.astype(np.float64), other.astype(np.float64)))
    lp, lq = (x - np.log(np.exp(x).sum(axis=1, keepdims=True)) for x in (lp, lq))
    return float((np.exp(lp) * (lp - lq)).sum(axis=1).mean())


def test_the_folded_file_is_as_close_as_folding_before_quantization(smollm2_dir: Path, quantized: dict[str, Path],
                                                                     tmp_path: Path, tokens: list[int]):
    """Without a shift, block-scale folding differs from the key form by the f16 rounding of the block
    scales (SmolLM2 amplifies it: the key form's exact scaling by 2 gives identical logits); the baseline is
    convert's fold before quantizing, which gives other bytes. Against the unquantized model the folded
    file is as good as the converted one, and both are far from leaving the scale out."""
    reference_file, converted = tmp_path / "yarn.F32.gguf", tmp_path / "yarn.Q4_K_M.gguf"
    convert_ok(smollm2_dir, "-o", reference_file, "--method", "yarn", "--ctx", "16384", "--qtype", "F32")
    convert_ok(smollm2_dir, "-o", converted, "--method", "yarn", "--ctx", "16384", "--qtype", "Q4_K_M")
    reference = prompt_logits(reference_file, tokens, n_ctx=512)
    keyed = prompt_logits(quantized["keyed"], tokens, n_ctx=512)
    folded = prompt_logits(quantized["folded"], tokens, n_ctx=512)
    baseline = kl_divergence(keyed, prompt_logits(converted, tokens, n_ctx=512))
    assert kl_divergence(keyed, folded) < 1.5 * baseline
    assert kl_divergence(keyed, prompt_logits(quantized["no_scale"], tokens, n_ctx=512)) > 3 * baseline
    assert kl_divergence(reference, folded) < 1.1 * kl_divergence(reference, prompt_logits(converted, tokens,
                                                                                            n_ctx=512))


@pytest.fixture(scope="module")
def f32(smollm2_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """SmolLM2 as an unscaled F32 file, patched for 2x with yarn (the scale folded), in the key form, and
    converted for 2x (the scale folded before writing): with F32 weights only float rounding separates two
    runs that compute the same thing."""
    folder = tmp_path_factory.mktemp("f32")
    files = {name: folder / f"{name}.F32.gguf" for name in ("none", "folded", "keyed", "converted")}
    convert_ok(smollm2_dir, "-o", files["none"], "--method", "none", "--qtype", "F32")
    convert_ok(smollm2_dir, "-o", files["converted"], "--method", "yarn", "--ctx", "16384", "--qtype", "F32")
    patch_ok(files["none"], files["folded"], "--method", "yarn", "--ctx", "16384")
    patch_ok(files["none"], files["keyed"], "--method", "yarn", "--ctx", "16384", "--attn-factor-key")
    return files


def test_an_f32_patched_file_is_exact_under_stock_shifts(f32: dict[str, Path], dev_text: Path):
    """Three shifts of llama-server's kind in stock llama.cpp (patches/0002's switch set to the stock shift),
    the K cache read back: every cached key keeps its norm, and a shifted run's logits equal a run that
    drops the same tokens without re-roping anything (F32 weights: nothing but float rounding differs)."""
    from qroar_gguf.evaluate.kshift import shift_drift

    drift = shift_drift(f32["folded"], dev_text.read_text(encoding="utf-8"), n_shifts=3, stock_shift=True)
    assert max(abs(r - 1.0) for r in drift.norm_ratios) < 1e-3, drift
    assert max(drift.kl_vs_gap) < 1e-4, drift


def test_quantized_files_keep_their_cached_keys_through_stock_shifts(quantized: dict[str, Path], dev_text: Path):
    """The same on Q4_K_M files. Quantized weights amplify the float rounding of the comparison run (it
    decodes at other positions): the unscaled file, exact by construction, sets that floor. patch's file
    keeps every cached key's norm and stays at the floor; the key form, what patch wrote before, multiplies
    every cached key by its attn_factor at every shift and leaves the floor far behind."""
    from qroar_gguf.evaluate.kshift import shift_drift

    text = dev_text.read_text(encoding="utf-8")
    drift = {name: shift_drift(quantized[name], text, n_shifts=3, stock_shift=True)
             for name in ("none", "folded", "keyed")}
    floor = max(drift["none"].kl_vs_gap)
    for name in ("none", "folded"):
        assert max(abs(r - 1.0) for r in drift[name].norm_ratios) < 1e-3, drift[name]
    assert max(drift["folded"].kl_vs_gap) < 2 * floor, (drift["folded"], floor)
    np.testing.assert_allclose(drift["keyed"].norm_ratios, T_2X ** np.arange(1, 4), rtol=1e-3)
    assert drift["keyed"].kl_vs_gap[-1] > 4 * floor, (drift["keyed"], floor)


def test_inspect_says_which_file_a_shift_keeps_exact(quantized: dict[str, Path]):
    for name, word in (("folded", "exact"), ("keyed", "drifts"), ("none", "exact")):
        result = run_cli("inspect", quantized[name])
        assert result.returncode == 0, result.stderr
        line = next(x for x in result.stdout.splitlines() if x.startswith("context shift:"))
        assert word in line, line
        summary = json.loads(run_cli("inspect", quantized[name], "--json").stdout)["context_shift"]
        assert summary["exact"] == (word == "exact")
    drift = json.loads(run_cli("inspect", quantized["keyed"], "--json").stdout)["context_shift"]
    assert drift["factor_per_shift"] == pytest.approx(T_2X, rel=1e-6)


def test_fix_shift_moves_a_key_into_the_weights(quantized: dict[str, Path], tmp_path: Path, tokens: list[int]):
    fixed = tmp_path / "fixed.gguf"
    result = run_cli("patch", quantized["keyed"], "-o", fixed, "--fix-shift")
    assert result.returncode == 0, result.stderr
    assert "1.0693" in result.stdout
    keys = fields(fixed)
    assert "llama.rope.scaling.attn_factor" not in keys
    assert keys["qroar.shift_folded"] == pytest.approx(T_2X, rel=1e-6)
    assert keys["qroar.attention_factor"] == 1.0
    assert tensor_bytes(fixed) == tensor_bytes(quantized["folded"])  # what patch writes in the first place
    again = run_cli("patch", fixed, "-o", tmp_path / "again.gguf", "--fix-shift")
    assert again.returncode == 0 and "already exact" in again.stdout and not (tmp_path / "again.gguf").exists()


def test_fix_shift_takes_no_plan_options(quantized: dict[str, Path], folders):
    _, out_dir = folders
    fail_cleanly(["patch", quantized["keyed"], "-o", out_dir / "x.gguf", "--fix-shift", "--ctx", "32768"], out_dir,
                 "--fix-shift keeps the file's RoPE", status=2)
    fail_cleanly(["patch", quantized["keyed"], "-o", out_dir / "x.gguf", "--fix-shift", "--method", "yarn"], out_dir,
                 "--method", status=2)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0, 0.0])
def test_an_attention_factor_that_is_not_finite_and_positive_is_refused(folders, value: float):
    inputs, out_dir = folders
    source = small_gguf(inputs / "in.gguf", extra=lambda w: w.add_float32("llama.rope.scaling.attn_factor", value))
    fail_cleanly(["patch", source, "-o", out_dir / "x.gguf", "--fix-shift"], out_dir, "attn_factor", protect=inputs)
    fail_cleanly(["patch", source, "-o", out_dir / "x.gguf", "--ctx", "1024"], out_dir, "attn_factor", protect=inputs)


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path / "in", tmp_path / "out"


def test_yarn_keys_that_contradict_the_context_are_refused(folders):
    def yarn(w):
        w.add_string("llama.rope.scaling.type", "yarn")
        w.add_float32("llama.rope.scaling.factor", 4.0)
        w.add_uint32("llama.rope.scaling.original_context_length", 4096)  # its context is 256
    inputs, out_dir = folders
    source = small_gguf(inputs / "in.gguf", extra=yarn)
    fail_cleanly(["patch", source, "-o", out_dir / "x.gguf", "--fix-shift"], out_dir, "contradict", protect=inputs)


def test_a_small_yarn_file_is_fixed_in_its_quantized_blocks(tmp_path: Path):
    """YaRN keys on a llama file: the factor 1 + 0.1 ln 4 moves into attn_q (F16) and attn_k (Q8_0), and
    attn_factor = 1/(1 + 0.1 ln 4) cancels the kernel's."""
    def yarn(w):
        w.add_string("llama.rope.scaling.type", "yarn")
        w.add_float32("llama.rope.scaling.factor", 4.0)
        w.add_uint32("llama.rope.scaling.original_context_length", 64)
    source = small_gguf(tmp_path / "in.gguf", extra=yarn)
    fixed = tmp_path / "fixed.gguf"
    result = run_cli("patch", source, "-o", fixed, "--fix-shift", "-q")
    assert result.returncode == 0, result.stderr
    m = np.float32(1.0 + 0.1 * np.log(4.0))
    assert fields(fixed)["llama.rope.scaling.attn_factor"] == pytest.approx(1.0 / m, rel=1e-6)
    old, new = gguf_tensors(source), gguf_tensors(fixed)
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):
        a = gguf.quants.dequantize(np.asarray(old[name].data), old[name].tensor_type)
        b = gguf.quants.dequantize(np.asarray(new[name].data), new[name].tensor_type)
        np.testing.assert_allclose(b, a * m, rtol=0, atol=1e-3 * np.abs(a).max())
    assert "drifts" in run_cli("inspect", source).stdout and "exact" in run_cli("inspect", fixed).stdout


# A Qwen3 YaRN checkpoint as llama.cpp's own converter writes it ------------------------------------------

@pytest.fixture(scope="module")
def qwen3_yarn(smollm2_dir: Path, tmp_path_factory) -> Path:
    """A random Qwen3 (q/k norms, GQA, head 64) with `rope_scaling: yarn` x4 over 256 trained tokens, built
    by transformers and converted to F32 by the pinned sdist's convert_hf_to_gguf.py with its own gguf-py:
    the keys-only form (qwen3.rope.scaling.type yarn, factor, original context) downloaded files carry."""
    pytest.importorskip("transformers")
    from checkpoints import convert_with_llama_cpp
    from test_families import QWEN3, build

    folder = tmp_path_factory.mktemp("qwen3")
    ckpt = build(folder / "ckpt", smollm2_dir, *QWEN3[:2], **QWEN3[2],
                 rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256})
    return convert_with_llama_cpp(ckpt, folder / "qwen3-yarn.F32.gguf")


def test_a_converter_made_qwen3_yarn_file_is_fixed(qwen3_yarn: Path, tmp_path: Path):
    keys = fields(qwen3_yarn)
    assert keys["qwen3.rope.scaling.type"] == "yarn" and keys["qwen3.rope.scaling.factor"] == 4.0
    assert "drifts" in run_cli("inspect", qwen3_yarn).stdout
    fixed = tmp_path / "fixed.gguf"
    result = run_cli("patch", qwen3_yarn, "-o", fixed, "--fix-shift", "-q")
    assert result.returncode == 0, result.stderr
    m = float(np.float32(1.0 + 0.1 * np.log(4.0)))
    new = fields(fixed)
    assert new["qwen3.rope.scaling.attn_factor"] == pytest.approx(1.0 / m, rel=1e-6)
    assert new["qwen3.rope.scaling.type"] == "yarn"  # llama.cpp's YaRN keeps computing the factors
    old_t, new_t = gguf_tensors(qwen3_yarn), gguf_tensors(fixed)
    changed = {n for n in old_t if not np.array_equal(np.asarray(old_t[n].data), np.asarray(new_t[n].data))}
    assert changed == {f"blk.{i}.attn_{p}_norm.weight" for i in range(2) for p in "qk"}
    np.testing.assert_allclose(np.asarray(new_t["blk.1.attn_q_norm.weight"].data),
                               np.asarray(old_t["blk.1.attn_q_norm.weight"].data) * m, rtol=1e-6)
    assert "exact" in run_cli("inspect", fixed).stdout

    tokens = [int(t) for t in np.random.default_rng(3).integers(0, 49152, 200)]
    before = prompt_logits(qwen3_yarn, tokens, n_ctx=1024)
    after = prompt_logits(fixed, tokens, n_ctx=1024)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-4 * np.abs(before).max())


# Through llama-server, started as Ollama starts it ---------------------------------------------------

NUM_CTX, NUM_PARALLEL, DISCARD = 256, 2, 16  # Ollama: -c num_ctx*num_parallel -np num_parallel --context-shift


def chat_with_shifts(model: Path, prompt: str, folder: Path, n_predict: int = 280) -> tuple[list[int], list[dict], int, Path, int]:
    """A greedy answer from stock llama-server with Ollama's launch arguments, long enough for several
    context shifts (`n_discard` per shift is a request option): the prompt's tokens, each answered token
    with its log-probability, the slot's context, and the slot's cache saved after the answer with the slot's number."""
    args = ["-c", str(NUM_CTX * NUM_PARALLEL), "-np", str(NUM_PARALLEL), "--context-shift", "-t", "2",
            "-ctk", "f32", "-ctv", "f32",  # an F32 cache: a shift's re-rope is not rounded to f16 again
            "--slot-save-path", f"{folder}/"]
    with llama_server(model, args, folder / "server.log", env={"QROAR_STOCK_KSHIFT": "1"}) as base:  # stock: Ollama's
        n_ctx = get_json(f"{base}/props")["default_generation_settings"]["n_ctx"]
        prompt_ids = post_json(f"{base}/tokenize", {"content": prompt}, timeout=60)["tokens"]
        answer = post_json(f"{base}/completion", {"prompt": prompt_ids, "n_predict": n_predict, "temperature": 0,
                                                   "top_k": 1, "n_probs": 1, "cache_prompt": False,
                                                   "ignore_eos": True, "n_discard": DISCARD}, timeout=600)
        post_json(f"{base}/slots/{answer['id_slot']}?action=save", {"filename": "slot.bin"}, timeout=60)
    return prompt_ids, answer["completion_probabilities"], n_ctx, folder / "slot.bin", answer["id_slot"]


@pytest.mark.parametrize("name,exact", [("folded", True), ("converted", True), ("none", True), ("keyed", False)])
def test_llama_server_stays_exact_through_context_shifts(f32: dict[str, Path], tmp_path: Path, name: str,
                                                         exact: bool):
    """Every answered token's log-probability from llama-server, and every key its cache holds at the end
    (the slot saved to a file, read back), against the same generation replayed in the bindings with a
    gap at each shift instead of a move (same cache contents, same distances, nothing re-roped). patch's
    file, convert's and the unscaled one match it (F32 weights and cache: rounding apart) through every shift; the
    key form, what patch wrote before, does not: each shift multiplies every cached key by its
    attn_factor again."""
    from qroar_gguf.assets.austen import austen_text
    from qroar_gguf.evaluate.kshift import key_norms, replay_without_shifts, saved_slot_cache

    prompt = austen_text("Emma").read_text(encoding="utf-8")[5000:5160]
    prompt_ids, answered, n_ctx, slot_file, slot = chat_with_shifts(f32[name], prompt, tmp_path)
    logged = re.findall(r"slot context shift, n_keep = (\d+), n_left = \d+, n_discard = (\d+)",
                        (tmp_path / "server.log").read_text())
    replay = replay_without_shifts(f32[name], prompt_ids, [t["id"] for t in answered], n_ctx=n_ctx, n_discard=DISCARD)
    assert replay.n_shifts >= 3 and logged == [("0", str(DISCARD))] * replay.n_shifts  # n_keep 0: no BOS
    errors = np.abs(np.array([t["logprob"] for t in answered]) - replay.logprobs)
    cache = saved_slot_cache(slot_file, slot)
    assert len(cache.positions) == len(replay.cache.positions)
    # the keys written before the first shift and cached through every one: the same computation in both
    # runs until then, so any difference is the shifts' (later keys also carry the float rounding of
    # attending to re-roped ones)
    oldest = np.sort(replay.cache.positions) < replay.first_shift_at
    assert oldest.sum() >= 64
    ratios = (key_norms(cache) / key_norms(replay.cache))[:, oldest]
    if exact:
        assert errors.max() < 0.01, errors.max()
        assert np.abs(ratios - 1).max() < 1e-3, np.abs(ratios - 1).max()
    else:  # the oldest cached keys went through every shift
        assert errors.max() > 0.1, errors.max()
        assert ratios.max() == pytest.approx(T_2X ** replay.n_shifts, rel=1e-3)
