"""`patch` on deepseek2 (DeepSeek-V2/V3, multi-head latent attention: RoPE on part of each head, one rotary
key part shared by the heads). Its loader reads no rope_freqs and its graph builds YaRN's temperature from
the rope keys themselves (kq_scale and the kernel), so the keys alone are written and every tensor is
copied: the patched file must give exactly the logits llama.cpp's runtime flags give on the unpatched one.
A tiny random DeepseekV3ForCausalLM built by transformers (2 layers, hidden 128, 4 experts, q_lora 64,
kv_lora 32, 16 rotary of 48 query dims per head), converted to F32 by the pinned sdist's converter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from checkpoints import loads_beyond
from runs import fail_cleanly, run_cli
from test_convert import prompt_logits
from test_keys_route import N_CTX, RUNTIME, TARGET, TRAINED, ntk_base
from test_patch import fields, tensor_bytes

pytest.importorskip("torch")
pytest.importorskip("transformers")

ARCH = "deepseek2"
SHAPE = dict(num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32,
             v_head_dim=32, head_dim=16, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
             first_k_dense_replace=1, moe_intermediate_size=64, n_group=1, topk_group=1, rope_theta=10000.0)


@pytest.fixture(scope="module")
def source(smollm2_dir: Path, tmp_path_factory) -> Path:
    """The F32 file llama.cpp's converter writes for a tiny random DeepseekV3ForCausalLM."""
    from checkpoints import convert_with_llama_cpp
    from test_families import build

    folder = tmp_path_factory.mktemp("deepseek2")
    ckpt = build(folder / "ckpt", smollm2_dir, "DeepseekV3Config", "DeepseekV3ForCausalLM",
                 max_position_embeddings=TRAINED, **SHAPE)
    out = convert_with_llama_cpp(ckpt, folder / "model.F32.gguf")
    keys = fields(out)
    assert keys["general.architecture"] == ARCH
    assert keys[f"{ARCH}.rope.dimension_count"] == 16 and keys[f"{ARCH}.attention.key_length_mla"] == 48
    assert f"{ARCH}.rope.scaling.yarn_log_multiplier" not in keys  # no rope_scaling in the config
    return out


@pytest.fixture(scope="module")
def extended(source: Path) -> dict[str, Path]:
    from qroar_gguf.patch import PatchOptions, patch
    from qroar_gguf.rope.spec import PlanSpec

    files = {}
    for method in ("yarn", "linear", "ntk"):
        files[method] = source.with_name(f"{method}.gguf")
        result = patch(source, files[method], PatchOptions(plan=PlanSpec(method), target_ctx=TARGET, progress=False))
        assert result.scaled_tensors == [] and result.attn_folded == 1.0 and result.attn_factor is None
    return files


@pytest.fixture(scope="module")
def tokens() -> list[int]:
    return [int(t) for t in np.random.default_rng(3).integers(0, 49152, 64)]


@pytest.mark.parametrize("method", ["yarn", "linear", "ntk"])
def test_the_patched_file_alone_gives_llama_cpp_runtime_scaling(source: Path, extended: dict[str, Path],
                                                                method: str, tokens: list[int]):
    """The same code computes both (the keys fill the same cparams the flags do): identical logits."""
    if method == "ntk":
        runtime_flags = dict(rope_freq_base=ntk_base(source, ARCH))
    else:
        runtime_flags = dict(rope_scaling_type=RUNTIME[method], rope_freq_scale=TRAINED / TARGET)
        runtime_flags |= dict(yarn_orig_ctx=TRAINED) if method == "yarn" else {}
    unscaled = prompt_logits(source, tokens, n_ctx=N_CTX)
    runtime = prompt_logits(source, tokens, n_ctx=N_CTX, **runtime_flags)
    alone = prompt_logits(extended[method], tokens, n_ctx=N_CTX)
    scale = np.abs(runtime).max()
    assert np.abs(unscaled - runtime).max() > 0.05 * scale  # the scaling shows in these logits
    np.testing.assert_array_equal(alone, runtime)


def test_the_keys_alone_are_written(source: Path, extended: dict[str, Path]):
    """YaRN's keys, no attn_factor (the graph builds the temperature from the factor), no rope_freqs, every
    tensor byte-identical; the context is raised and the file loads at it in llama-cpp-python; `inspect`
    says Ollama does not shift it and what a shift would do."""
    out = extended["yarn"]
    keys = fields(out)
    assert keys[f"{ARCH}.context_length"] == TARGET
    assert keys[f"{ARCH}.rope.scaling.type"] == "yarn"
    assert keys[f"{ARCH}.rope.scaling.factor"] == TARGET / TRAINED
    assert keys[f"{ARCH}.rope.scaling.original_context_length"] == TRAINED
    assert f"{ARCH}.rope.scaling.attn_factor" not in keys
    assert tensor_bytes(out) == tensor_bytes(source)
    assert fields(extended["linear"])[f"{ARCH}.rope.scaling.type"] == "linear"
    summary = json.loads(run_cli("inspect", out, "--json").stdout)["context_shift"]
    m = 1.0 + 0.1 * math.log(TARGET / TRAINED)
    assert summary["summary"].startswith("not shifted: Ollama runs deepseek2 without --context-shift")
    assert summary["factor_per_shift"] == pytest.approx(m, rel=1e-6)  # the kernel's factor on the cached k_pe
    loads_beyond(out, TARGET, TRAINED, 64)


def test_convert_of_the_checkpoint_equals_patch_of_the_converted_file(source: Path, extended: dict[str, Path],
                                                                     tokens: list[int], tmp_path: Path):
    """`convert` takes DeepseekV3ForCausalLM through llama.cpp's converter, then patch's keys step."""
    out = tmp_path / "converted.F32.gguf"
    result = run_cli(source.parent / "ckpt", "-o", out, "--method", "yarn", "--ctx", TARGET, "--qtype", "F32", "-q")
    assert result.returncode == 0, result.stderr
    assert tensor_bytes(out) == tensor_bytes(extended["yarn"])
    rope = {k: v for k, v in fields(out).items() if k.startswith(f"{ARCH}.rope") or k == f"{ARCH}.context_length"}
    assert rope == {k: v for k, v in fields(extended["yarn"]).items() if k in rope}
    np.testing.assert_array_equal(prompt_logits(out, tokens, n_ctx=N_CTX),
                                  prompt_logits(extended["yarn"], tokens, n_ctx=N_CTX))


def test_per_pair_plans_and_the_attn_factor_key_are_refused(source: Path, tmp_path: Path):
    (tmp_path / "out").mkdir()
    for args in (["--method", "qroar"], ["--method", "llama3"], ["--method", "linear", "--band-factors", "1,1,2,2"]):
        line = fail_cleanly(["patch", source, "-o", tmp_path / "out" / "x.gguf", "--ctx", TARGET, *args],
                            tmp_path / "out", "rope_freqs", protect=source.parent)
        assert "\n" not in line and "--method yarn" in line and f"{ARCH} loader does not read it" in line
    fail_cleanly(["patch", source, "-o", tmp_path / "out" / "x.gguf", "--ctx", TARGET, "--attn-factor-key"],
                 tmp_path / "out", "kq_scale")
    fail_cleanly(["patch", "--fix-shift", source, "-o", tmp_path / "out" / "x.gguf"], tmp_path / "out",
                 "without --context-shift")


def test_the_files_own_attn_factor_is_kept_and_nothing_is_folded():
    """The pure function: an attn_factor the file carries is an input of llama.cpp's kq_scale, kept as it is."""
    from qroar_gguf.arch.families import gguf_family
    from qroar_gguf.rope.scaling_keys import FileRope, keys_plan
    from qroar_gguf.rope.spec import PlanSpec, rope_facts_for

    family = gguf_family(ARCH)
    assert family.pair_route == "keys" and family.row_order == "adjacent" and not family.context_shift
    for method in ("yarn", "linear", "ntk"):
        spec = PlanSpec(method)
        facts = rope_facts_for(16, 10000.0, TRAINED, method, TARGET, None)
        for own in (1.0, 1.25):
            file = FileRope(ARCH, "none", 1.0, own, False, False)
            keys = keys_plan(family, file, spec, spec.plan(facts, None), facts)
            assert keys.fold == 1.0 and keys.attn_factor == (None if own == 1.0 else own)
            assert "cancels" not in keys.describe()
