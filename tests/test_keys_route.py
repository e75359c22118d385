"""`patch` on arches whose llama.cpp loader reads no rope_freqs (Qwen3, Qwen3-MoE, Gemma 3, Phi-3, OLMo 2,
GLM-4): llama.cpp's own rope keys, with YaRN's temperature folded into the q/k rows so a context shift
only rotates. Tiny random checkpoints built by transformers, converted to F32 by the pinned sdist's
convert_hf_to_gguf.py (one conversion per family), run by the real libllama: the patched file alone
must give the logits llama.cpp's runtime flags give on the unpatched one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
from checkpoints import gguf_tensors, loads_beyond
from runs import fail_cleanly, run_cli
from test_convert import prompt_logits
from test_patch import fields, tensor_bytes

pytest.importorskip("torch")
pytest.importorskip("transformers")

TRAINED, TARGET = 256, 1024  # r = 4
N_TOKENS = 64
N_CTX = 128

#: family -> (config class, model class, overrides, n_rot / head_dim as the file should hold them)
FAMILIES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=64, rope_theta=1000000.0)),
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                 dict(num_key_value_heads=2, head_dim=64, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=64, rope_theta=1000000.0)),
    # 6 layers: five sliding-window layers (their own base, never scaled), then a global one
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(num_hidden_layers=6, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
                    sliding_window=16)),
    # Phi-4-mini's shape: a fused attn_qkv, and three quarters of each head rotate
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             dict(num_key_value_heads=2, original_max_position_embeddings=TRAINED,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75})),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(num_key_value_heads=2, rope_theta=10000.0)),
    # half of each head rotates; pad/eos inside SmolLM2's vocabulary
    "glm4": ("Glm4Config", "Glm4ForCausalLM",
             dict(num_key_value_heads=2, head_dim=32, rope_theta=10000.0, pad_token_id=0, eos_token_id=0)),
}
RUNTIME = {"linear": 1, "yarn": 2}  # llama_rope_scaling_type


def _glm4_tokens(directory: Path) -> None:
    """llama.cpp's GLM-4 converter looks up <|user|> (its end-of-turn) among the added tokens: SmolLM2's
    <empty_output> is renamed to it, keeping every id."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        path.write_text(path.read_text(encoding="utf-8").replace("<empty_output>", "<|user|>"), encoding="utf-8")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, smollm2_dir: Path, tmp_path_factory) -> tuple[str, Path]:
    """(arch, the F32 file llama.cpp's converter writes for a tiny random checkpoint of it)."""
    from checkpoints import convert_with_llama_cpp
    from test_families import build

    arch = request.param
    config_class, model_class, overrides = FAMILIES[arch]
    folder = tmp_path_factory.mktemp(arch)
    # the folder's name becomes general.name, which llama.cpp's vocabulary matches against "phi3"
    ckpt = build(folder / "ckpt", smollm2_dir, config_class, model_class, max_position_embeddings=TRAINED,
                 **overrides)
    if arch == "glm4":
        _glm4_tokens(ckpt)
    out = convert_with_llama_cpp(ckpt, folder / "model.F32.gguf")
    assert fields(out)["general.architecture"] == arch
    return arch, out


@pytest.fixture(scope="module")
def tokens() -> list[int]:
    return [int(t) for t in np.random.default_rng(3).integers(0, 49152, N_TOKENS)]


@pytest.fixture(scope="module")
def extended(family) -> dict[str, Path]:
    """method -> the family's file patched for it (in this process: the command line is run by the refusals)."""
    from qroar_gguf.patch import PatchOptions, patch
    from qroar_gguf.rope.spec import PlanSpec

    arch, source = family
    files = {}
    for method in ("yarn", "linear", "ntk") if arch != "gemma3" else ("linear", "ntk"):
        files[method] = source.with_name(f"{method}.gguf")
        patch(source, files[method], PatchOptions(plan=PlanSpec(method), target_ctx=TARGET, progress=False))
    return files


@pytest.fixture(scope="module")
def unscaled(family, tokens: list[int]) -> np.ndarray:
    return prompt_logits(family[1], tokens, n_ctx=N_CTX)


def ntk_base(source: Path, arch: str) -> float:
    keys = fields(source)
    head = keys.get(f"{arch}.attention.key_length",
                    keys[f"{arch}.embedding_length"] // keys[f"{arch}.attention.head_count"])
    n_rot, base = keys.get(f"{arch}.rope.dimension_count", head), keys[f"{arch}.rope.freq_base"]
    return base * (TARGET / TRAINED) ** (n_rot / (n_rot - 2))


def runtime_options(method: str, source: Path, arch: str) -> dict:
    """llama.cpp's own flags for ``method`` on the unpatched file."""
    if method == "ntk":
        return dict(rope_freq_base=ntk_base(source, arch))
    options = dict(rope_scaling_type=RUNTIME[method], rope_freq_scale=TRAINED / TARGET)
    return options | (dict(yarn_orig_ctx=TRAINED) if method == "yarn" else {})


@pytest.mark.parametrize("method", ["yarn", "linear", "ntk"])
def test_the_patched_file_alone_gives_llama_cpp_runtime_scaling(family, extended: dict[str, Path], method: str,
                                                                tokens: list[int], unscaled: np.ndarray):
    arch, source = family
    if method not in extended:
        pytest.skip(f"{arch}'s YaRN is refused (test_yarn_on_sliding_window_layers_is_refused)")
    runtime = prompt_logits(source, tokens, n_ctx=N_CTX, **runtime_options(method, source, arch))
    alone = prompt_logits(extended[method], tokens, n_ctx=N_CTX)
    scale = np.abs(runtime).max()
    assert np.abs(unscaled - runtime).max() > 0.05 * scale  # the scaling shows in these logits
    # float32 rounding only: the fold multiplies q/k by m where the runtime multiplies in the kernel, and
    # the key's 1/m meets the kernel's m (linear and ntk touch no weight: identical logits)
    print(f"{arch} {method}: max |logit difference| / max |logit| = {np.abs(alone - runtime).max() / scale:.2e}")
    np.testing.assert_allclose(alone, runtime, rtol=0, atol=(2e-4 if method == "yarn" else 0.0) * scale)


def test_yarn_keys_are_written_with_the_temperature_in_the_rows(family, extended: dict[str, Path]):
    """The keys llama.cpp reads, no rope_freqs, the kernel's factor cancelled by attn_factor, and only the q/k
    rows (norm weights where the arch has them, else the projections' rotary rows) changed; `inspect`
    says a shift keeps the file exact; the context is raised and the file loads at it."""
    arch, source = family
    if arch == "gemma3":
        pytest.skip("gemma3's YaRN is refused")
    out = extended["yarn"]
    keys = fields(out)
    assert keys[f"{arch}.context_length"] == TARGET
    assert keys[f"{arch}.rope.scaling.type"] == "yarn"
    assert keys[f"{arch}.rope.scaling.factor"] == TARGET / TRAINED
    assert keys[f"{arch}.rope.scaling.original_context_length"] == TRAINED
    m = 1.0 + 0.1 * math.log(TARGET / TRAINED)
    assert keys[f"{arch}.rope.scaling.attn_factor"] == pytest.approx(1.0 / m, rel=1e-6)
    before, after = tensor_bytes(source), tensor_bytes(out)
    assert "rope_freqs.weight" not in after and before.keys() == after.keys()
    changed = {name.split(".", 2)[2] for name in before if before[name] != after[name]}
    expected = {"phi3": {"attn_qkv.weight"},  # fused: its Q and K rows
                "glm4": {n for n in ("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")
                         if f"blk.0.{n}" in before}}.get(arch, {"attn_q_norm.weight", "attn_k_norm.weight"})
    assert changed == expected
    summary = json.loads(run_cli("inspect", out, "--json").stdout)["context_shift"]
    assert summary["exact"], summary
    loads_beyond(out, TARGET, TRAINED, 64)


def test_only_rotary_rows_carry_the_temperature(family, extended: dict[str, Path]):
    """GLM-4 rotates half of each head, Phi-4-mini three quarters: the other rows keep their values."""
    arch, source = family
    if arch not in ("glm4", "phi3"):
        pytest.skip("whole heads rotate")
    out = extended["yarn"]
    keys = fields(source)
    n_rot, n_embd, n_head = (keys[f"{arch}.{k}"] for k in ("rope.dimension_count", "embedding_length",
                                                          "attention.head_count"))
    head = keys.get(f"{arch}.attention.key_length", n_embd // n_head)
    assert n_rot < head
    name = "blk.0.attn_q.weight" if arch == "glm4" else "blk.0.attn_qkv.weight"
    old, new = (np.asarray(gguf_tensors(p)[name].data) for p in (source, out))
    rows = np.arange(n_head * head)
    rotary = rows % head < n_rot
    m = 1.0 + 0.1 * math.log(TARGET / TRAINED)
    np.testing.assert_array_equal(new[rows[~rotary]], old[rows[~rotary]])
    np.testing.assert_allclose(new[rows[rotary]], old[rows[rotary]] * m, rtol=1e-6)


def test_per_pair_plans_are_refused(family, tmp_path: Path):
    arch, source = family
    if arch == "phi3":
        pytest.skip("phi3 takes per-pair plans through rope_factors_long/short (test_phi3_per_pair_route)")
    (tmp_path / "out").mkdir()
    plans = [["--method", "qroar"]] + ([["--method", "llama3"], ["--method", "linear", "--band-factors", "1,1,2,2"]]
                                       if arch == "qwen3" else [])
    for args in plans:
        line = fail_cleanly(["patch", source, "-o", tmp_path / "out" / "x.gguf", "--ctx", TARGET, *args],
                            tmp_path / "out", "rope_freqs")
        assert "--method yarn" in line and f"{arch} loader does not read it" in line
        assert ("--allow-patched-runtime" in line) == (arch == "qwen3")


def test_yarn_on_sliding_window_layers_is_refused(family, tmp_path: Path):
    """Gemma 3's sliding layers get the context's attention factor but freq_scale 1, so no attn_factor key
    cancels YaRN's kernel factor on every layer: refused, with what works."""
    arch, source = family
    if arch != "gemma3":
        pytest.skip("gemma3 only")
    assert f"{arch}.attention.sliding_window" in fields(source)
    (tmp_path / "out").mkdir()
    line = fail_cleanly(["patch", source, "-o", tmp_path / "out" / "x.gguf", "--method", "yarn", "--ctx", TARGET],
                        tmp_path / "out", "sliding-window layers")
    assert "--method linear" in line


def test_qwen3_takes_rope_freqs_where_a_patched_runtime_is_allowed(family, tokens: list[int], tmp_path: Path):
    """With --allow-patched-runtime a qwen3 file gets rope_freqs (per-pair plans too), for the llama.cpp we
    build (patches/0001): x4 everywhere is runtime linear x4; the file says which patch it needs."""
    arch, source = family
    if arch != "qwen3":
        pytest.skip("qwen3 only")
    out = tmp_path / "linear.gguf"
    result = run_cli("patch", source, "-o", out, "--method", "linear", "--ctx", TARGET, "--allow-patched-runtime", "-q")
    assert result.returncode == 0, result.stderr
    keys = fields(out)
    assert keys["qroar.needs_patch"] == "0001-qwen3-optional-rope-freqs.patch"
    assert f"{arch}.rope.scaling.type" not in keys
    np.testing.assert_array_equal(np.asarray(gguf_tensors(out)["rope_freqs.weight"].data), 4.0)
    runtime = prompt_logits(source, tokens, n_ctx=N_CTX, **runtime_options("linear", source, arch))
    np.testing.assert_allclose(prompt_logits(out, tokens, n_ctx=N_CTX), runtime, rtol=0,
                               atol=1e-5 * np.abs(runtime).max())
    qroar = tmp_path / "qroar.gguf"
    result = run_cli("patch", source, "-o", qroar, "--method", "qroar", "--ctx", TARGET, "--allow-patched-runtime", "-q")
    assert result.returncode == 0, result.stderr
    prompt_logits(qroar, tokens[:8], n_ctx=N_CTX)  # loads in our build


def test_a_file_that_already_scales_linearly_composes(family, extended: dict[str, Path], tokens: list[int],
                                                      tmp_path: Path):
    """Gemma 3 4B and larger carry linear x8 on their global layers: a linear plan multiplies into that
    factor (here x4 on x2 over the file's context: x8 in all), and YaRN over it is refused with the reason."""
    arch, source = family
    if arch != "gemma3":
        pytest.skip("gemma3 only")
    out = tmp_path / "again.gguf"
    result = run_cli("patch", extended["linear"], "-o", out, "--method", "linear", "--ctx", 2 * TARGET, "--force", "-q")
    assert result.returncode == 0, result.stderr
    assert fields(out)[f"{arch}.rope.scaling.factor"] == 8.0
    runtime = prompt_logits(source, tokens, n_ctx=N_CTX, rope_scaling_type=RUNTIME["linear"], rope_freq_scale=1 / 8)
    np.testing.assert_array_equal(prompt_logits(out, tokens, n_ctx=N_CTX), runtime)
    (tmp_path / "out").mkdir()
    fail_cleanly(["patch", extended["linear"], "-o", tmp_path / "out" / "x.gguf", "--method", "yarn", "--force",
                  "--ctx", 2 * TARGET], tmp_path / "out", "already interpolates positions linearly")


# The per-arch exceptions, on the pure function (no file needed) ---------------------------------------

def _keys(arch: str, method: str = "yarn", sliding: bool = False, sections: bool = False, **options):
    from qroar_gguf.arch.families import gguf_family
    from qroar_gguf.rope.scaling_keys import FileRope, keys_plan
    from qroar_gguf.rope.spec import PlanSpec, rope_facts_for

    spec = PlanSpec(method, options)
    facts = rope_facts_for(64, 10000.0, TRAINED, method, TARGET, None)
    return keys_plan(gguf_family(arch), FileRope(arch, "none", 1.0, 1.0, sliding, sections), spec,
                     spec.plan(facts, None), facts)


def test_sliding_window_layers_decide_whether_yarn_is_exact():
    """Gemma 2 scales its sliding layers like the others (exact); OLMo 3's (olmo2 with a window) take no YaRN
    factor in the forward pass but the attention factor in a shift: refused."""
    keys = _keys("gemma2", sliding=True)
    assert keys.fold == pytest.approx(1.0 + 0.1 * math.log(4.0)) and keys.attn_factor == pytest.approx(1 / keys.fold)
    from qroar_gguf.errors import QroarError

    with pytest.raises(QroarError, match="olmo2's sliding-window layers"):
        _keys("olmo2", sliding=True)
    assert _keys("olmo2", method="linear", sliding=True).fold == 1.0
    with pytest.raises(QroarError, match="multimodal RoPE"):
        _keys("glm4", sections=True)
    with pytest.raises(QroarError, match="beta"):
        _keys("qwen3", beta_fast=16.0)


# phi3's own per-pair route: rope_factors_long / rope_factors_short ---------------------------------------

def _longrope_logits(ckpt: Path, factors: np.ndarray, attention: float, tokens: list[int]) -> np.ndarray:
    """transformers' Phi-3 with LongRoPE: ``factors`` for both sets (so the context picks none) and the
    attention factor on cos and sin, i.e. on the rotary part of q and k."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(ckpt)
    params = dict(config.rope_parameters)
    params.update(rope_type="longrope", short_factor=[float(f) for f in factors],
                  long_factor=[float(f) for f in factors], attention_factor=float(attention),
                  original_max_position_embeddings=TRAINED)
    config.rope_parameters = params
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, config=config, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def test_phi3_per_pair_route(family, tokens: list[int], unscaled: np.ndarray, tmp_path: Path):
    """phi3's loader reads rope_factors_long/short (one F32 factor per rotary pair; the long set beyond
    rope.scaling.original_context_length): per-pair plans go there, both sets alike so they act at every
    context, with YaRN's temperature in attn_qkv's rotary Q/K rows. A factor of 4 on every pair is
    llama.cpp's runtime linear x4 bit for bit; qroar's factors and folded temperature give transformers'
    Phi-3 LongRoPE with the same factors and attention factor, as closely as the unpatched file gives
    transformers' plain Phi-3; the file loads at its new context in llama-cpp-python."""
    arch, source = family
    if arch != "phi3":
        pytest.skip("phi3 only")
    from test_families import transformers_logits

    n_pairs = fields(source)[f"{arch}.rope.dimension_count"] // 2
    flat = tmp_path / "flat.gguf"
    result = run_cli("patch", source, "-o", flat, "--method", "linear", "--band-factors", "1,1,1,1", "--ctx", TARGET,
                     "-q")
    assert result.returncode == 0, result.stderr
    written = gguf_tensors(flat)
    for name in ("rope_factors_long.weight", "rope_factors_short.weight"):
        assert written[name].tensor_type == gguf.GGMLQuantizationType.F32
        assert np.asarray(written[name].data).tolist() == [4.0] * n_pairs
    keys = fields(flat)
    assert "rope_freqs.weight" not in written and f"{arch}.rope.scaling.type" not in keys
    assert keys[f"{arch}.context_length"] == TARGET
    runtime = prompt_logits(source, tokens, n_ctx=N_CTX, **runtime_options("linear", source, arch))
    np.testing.assert_array_equal(prompt_logits(flat, tokens, n_ctx=N_CTX), runtime)

    out = tmp_path / "qroar.gguf"
    result = run_cli("patch", source, "-o", out, "--method", "qroar", "--ctx", TARGET, "-q")
    assert result.returncode == 0, result.stderr
    written, keys = gguf_tensors(out), fields(out)
    factors = np.asarray(written["rope_factors_long.weight"].data)
    np.testing.assert_array_equal(np.asarray(written["rope_factors_short.weight"].data), factors)
    assert factors.size == n_pairs and factors.min() == pytest.approx(1.0) and factors.max() == pytest.approx(4.0)
    temperature = keys["qroar.attention_scale_folded"]
    assert temperature == pytest.approx(1.0 + 0.1 * math.log(TARGET / TRAINED), rel=1e-6)
    assert f"{arch}.rope.scaling.attn_factor" not in keys and f"{arch}.rope.scaling.type" not in keys
    before, after = tensor_bytes(source), tensor_bytes(out)
    assert set(after) - set(before) == {"rope_factors_long.weight", "rope_factors_short.weight"}
    assert {name.split(".", 2)[2] for name in before if before[name] != after[name]} == {"attn_qkv.weight"}
    summary = json.loads(run_cli("inspect", out, "--json").stdout)
    assert summary["context_shift"]["exact"] and summary["rope_freqs_tensor"] == "rope_factors_long.weight"
    np.testing.assert_allclose(summary["rope_freqs"], factors)

    ours = prompt_logits(out, tokens, n_ctx=N_CTX)  # within the original context: the short set
    ckpt = source.parent / "ckpt"
    theirs = _longrope_logits(ckpt, factors, temperature, tokens)
    baseline = np.abs(unscaled - transformers_logits(ckpt, tokens)).max()  # llama.cpp against transformers
    scale = np.abs(theirs).max()
    error = np.abs(ours - theirs).max()
    print(f"phi3 qroar: max |logit difference| / max |logit| = {error / scale:.2e} (unpatched: {baseline / scale:.2e})")
    assert np.abs(unscaled - theirs).max() > 0.05 * scale  # the factors and the temperature show
    assert error <= 2 * baseline + 1e-5 * scale
    np.testing.assert_allclose(prompt_logits(out, tokens, n_ctx=TARGET), ours, rtol=0, atol=1e-5 * scale)  # long set
    loads_beyond(out, TARGET, TRAINED, 64)


def test_every_registered_family_answers_the_gguf_side():
    """Each GGUF arch has one owner, known to the pinned gguf-py, with a route, a row order where it is
    patched, a refusal where it is not; row orders as llama.cpp's rope types say (NORM: adjacent pairs)."""
    import gguf

    from qroar_gguf.arch.base import PAIR_ROUTES, ROW_ORDERS, registered_gguf
    from qroar_gguf.arch.families import gguf_family

    known = set(gguf.MODEL_ARCH_NAMES.values())
    for arch, family in registered_gguf().items():
        assert arch in known, arch
        if family.pair_route is None:
            assert family.refusal, arch
        else:
            assert family.pair_route in PAIR_ROUTES and family.row_order in ROW_ORDERS and not family.refusal, arch
        assert family.qk_tensors in ("split", "fused", "mla")
        assert family.temperature_in in ("projections", "qk_norm", "kq_scale")
    adjacent = {a for a, f in registered_gguf().items() if f.pair_route and f.row_order == "adjacent"}
    assert adjacent == {"llama", "mistral3", "granite", "granitemoe", "arcee", "minicpm", "deepseek2"}
    assert gguf_family("qwen2").rewrite_as == "llama" and gguf_family("qwen3").needs_patch
    assert gguf_family("phi3").route() == "rope_factors" and gguf_family("phi3").route(per_pair=False) == "keys"
    assert gguf_family("qwen3").route() == "keys" and gguf_family("qwen3").route(True) == "rope_freqs"
    assert not gguf_family("deepseek2").context_shift and gguf_family("no-such-arch") is None
