"""Every model family against transformers: small random-weight checkpoints built with transformers
(Qwen2 with its Q/K/V biases, Llama, Mistral, Qwen3 with its q/k norms; grouped-query attention; tied
and untied embeddings), converted to F32 and run by the real libllama (the set-up's build, patches/
applied); the logits must be transformers' logits."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from checkpoints import write_gguf
from runs import convert_ok, run_cli
from test_convert import prompt_logits

from qroar_gguf.assets.smollm2 import unpermute_rope_rows

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SHAPES = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=1024, rms_norm_eps=1e-6)

CASES = {
    "qwen2-gqa-untied": ("Qwen2Config", "Qwen2ForCausalLM",
                         dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1000000.0)),
    "qwen2-mha-tied": ("Qwen2Config", "Qwen2ForCausalLM",
                       dict(num_key_value_heads=4, tie_word_embeddings=True, rope_theta=10000.0)),
    "llama-gqa-untied": ("LlamaConfig", "LlamaForCausalLM",
                         dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0)),
    "mistral-gqa-tied": ("MistralConfig", "MistralForCausalLM",
                         dict(num_key_value_heads=1, tie_word_embeddings=True, rope_theta=10000.0)),
}


def build(directory: Path, tokenizer_dir: Path, config_class: str, model_class: str, **overrides) -> Path:
    """A random checkpoint saved by transformers itself, with SmolLM2's tokenizer beside it. Weights are
    drawn wider than transformers' init and biases are non-zero, so a wrong row or bias shows."""
    torch.manual_seed(0)
    vocab = transformers.AutoConfig.from_pretrained(tokenizer_dir).vocab_size
    config = getattr(transformers, config_class)(vocab_size=vocab, **{**SHAPES, **overrides})
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.08)
    model.save_pretrained(directory, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def transformers_logits(directory: Path, tokens: list[int]) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers(case: str, smollm2_dir: Path, tmp_path: Path):
    config_class, model_class, overrides = CASES[case]
    ckpt = build(tmp_path / "ckpt", smollm2_dir, config_class, model_class, **overrides)
    out = tmp_path / "model.F32.gguf"
    convert_ok(ckpt, "-o", out, "--method", "none", "--qtype", "F32")
    tokens = [int(t) for t in np.random.default_rng(1).integers(0, 49152, 48)]
    ours, theirs = prompt_logits(out, tokens, n_ctx=256), transformers_logits(ckpt, tokens)
    assert theirs.std() > 0.5  # logits that differ enough to show a wrong permutation
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-3 * np.abs(theirs).max())


def test_qwen2_runs_extended_with_rope_freqs(smollm2_dir: Path, tmp_path: Path):
    """The point of writing Qwen2 as llama: stock llama.cpp loads it with rope_freqs at a longer context."""
    config_class, model_class, overrides = CASES["qwen2-gqa-untied"]
    ckpt = build(tmp_path / "ckpt", smollm2_dir, config_class, model_class, **overrides)
    out = tmp_path / "model.Q8_0.gguf"
    convert_ok(ckpt, "-o", out, "--method", "yarn", "--ctx", "4096", "--qtype", "Q8_0")
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(out), n_ctx=0, verbose=False)
    try:
        assert llm.n_ctx() == 4096
        assert llm.metadata["general.architecture"] == "llama"
        llm.eval(list(range(100, 2100)))  # beyond the trained 1024
    finally:
        llm.close()


def test_sliding_window_qwen2_is_refused(smollm2_dir: Path, tmp_path: Path):
    config_class, model_class, overrides = CASES["qwen2-mha-tied"]
    ckpt = build(tmp_path / "ckpt", smollm2_dir, config_class, model_class, use_sliding_window=True,
                 max_window_layers=1, **overrides)  # layer 1 slides
    assert "sliding_attention" in (ckpt / "config.json").read_text()
    result = run_cli(ckpt, "-o", tmp_path / "out.gguf", "-q")
    assert result.returncode == 1 and "use_sliding_window is true" in result.stderr
    assert not (tmp_path / "out.gguf").exists()


# A downloaded qwen2 GGUF -> arch llama, by `patch` ---------------------------------------------------

def as_qwen2_gguf(llama_file: Path, out: Path, n_head: int, n_kv_head: int) -> Path:
    """The file llama.cpp's converter makes for a Qwen2 checkpoint: arch qwen2, Q/K rows in HF order,
    no rope_freqs (qwen2 refuses it), from the llama-form file of the same checkpoint."""
    reader = gguf.GGUFReader(llama_file)
    writer = gguf.GGUFWriter(out, "qwen2")
    for field in reader.fields.values():
        if field.name.startswith(("GGUF.", "qroar.")) or field.name == "general.architecture":
            continue
        kind = field.types[0]
        name = "qwen2." + field.name[len("llama."):] if field.name.startswith("llama.") else field.name
        writer.add_key_value(name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        data = np.array(t.data)
        if t.name.split(".")[2:3] in (["attn_q"], ["attn_k"]):
            data = unpermute_rope_rows(data, n_head if ".attn_q." in t.name else n_kv_head)
        writer.add_tensor(t.name, data)
    write_gguf(writer)
    return out


def test_a_qwen2_gguf_is_patched_as_llama(smollm2_dir: Path, tmp_path: Path):
    """What people download for Qwen2.5 is a qwen2 GGUF, often quantized: patch rewrites it as llama
    (keys renamed, Q/K rows reordered as whole rows of bytes) with rope_freqs, and llama.cpp runs it as
    the qwen2 file runs with runtime linear scaling."""
    from qroar_gguf.gguf_io.quantize import quantize_gguf

    config_class, model_class, overrides = CASES["qwen2-gqa-untied"]
    ckpt = build(tmp_path / "ckpt", smollm2_dir, config_class, model_class, **overrides)
    convert_ok(ckpt, "-o", tmp_path / "llama.F32.gguf", "--method", "none", "--qtype", "F32")
    qwen2_f32 = as_qwen2_gguf(tmp_path / "llama.F32.gguf", tmp_path / "qwen2.F32.gguf", 4, 2)
    tokens = [int(t) for t in np.random.default_rng(2).integers(0, 49152, 48)]
    theirs = transformers_logits(ckpt, tokens)
    np.testing.assert_allclose(prompt_logits(qwen2_f32, tokens, n_ctx=256), theirs, rtol=0,
                               atol=2e-3 * np.abs(theirs).max())  # a faithful qwen2 file, run by qwen2's code
    qwen2_q8 = tmp_path / "qwen2.Q8_0.gguf"
    quantize_gguf(qwen2_f32, qwen2_q8, "Q8_0", 2, progress=False)
    patched = tmp_path / "patched.Q8_0.gguf"
    result = run_cli("patch", qwen2_q8, "-o", patched, "--method", "linear", "--ctx", "2048", "-q")
    assert result.returncode == 0, result.stderr

    reader = gguf.GGUFReader(patched)
    assert reader.get_field("general.architecture").contents() == "llama"
    assert reader.get_field("llama.context_length").contents() == 2048
    assert not [name for name in reader.fields if name.startswith("qwen2.")]
    before = {t.name: np.array(t.data) for t in gguf.GGUFReader(qwen2_q8).tensors}
    after = {t.name: np.array(t.data) for t in reader.tensors}
    assert after.pop("rope_freqs.weight").tolist() == [2.0] * 16
    for name, data in before.items():
        if ".attn_q." in name or ".attn_k." in name:
            n_head = 4 if ".attn_q." in name else 2
            assert np.array_equal(unpermute_rope_rows(after[name], n_head), data), name  # the same rows, moved
        else:
            assert np.array_equal(after[name], data), name
    ours = prompt_logits(patched, tokens, n_ctx=256)
    runtime = prompt_logits(qwen2_q8, tokens, n_ctx=256, rope_freq_scale=0.5)
    # Quantized, the two runs agree closely but not bit for bit (F32 below is exact): the same rows in
    # another order meet llama.cpp's quantized kernels differently
    scale = np.abs(runtime).max()
    assert np.abs(ours - runtime).mean() < 1e-3 * scale and np.abs(ours - runtime).max() < 3e-2 * scale
    assert (ours.argmax(axis=1) == runtime.argmax(axis=1)).mean() >= 0.95
    assert np.abs(ours - prompt_logits(qwen2_q8, tokens, n_ctx=256)).max() > 0.1  # the factors act

    patched_f32 = tmp_path / "patched.F32.gguf"
    assert run_cli("patch", qwen2_f32, "-o", patched_f32, "--method", "linear", "--ctx", "2048", "-q").returncode == 0
    runtime = prompt_logits(qwen2_f32, tokens, n_ctx=256, rope_freq_scale=0.5)
    np.testing.assert_allclose(prompt_logits(patched_f32, tokens, n_ctx=256), runtime, rtol=0,
                               atol=1e-4 * np.abs(runtime).max())


def test_qwen2_with_every_layer_full_attention_converts(smollm2_dir: Path, tmp_path: Path):
    """use_sliding_window with max_window_layers >= num_hidden_layers slides no layer (transformers)."""
    config_class, model_class, overrides = CASES["qwen2-mha-tied"]
    ckpt = build(tmp_path / "ckpt", smollm2_dir, config_class, model_class, use_sliding_window=True,
                 max_window_layers=2, **overrides)
    convert_ok(ckpt, "-o", tmp_path / "out.gguf", "--ctx", "2048", "--qtype", "F16")


QWEN3 = ("Qwen3Config", "Qwen3ForCausalLM",
         dict(num_key_value_heads=2, head_dim=64, tie_word_embeddings=False, rope_theta=1000000.0))


def test_qwen3_is_refused_unless_a_patched_runtime_is_allowed(smollm2_dir: Path, tmp_path: Path):
    """Our converter's Qwen3 (rope_freqs) only with --allow-patched-runtime; without it `convert` takes
    llama.cpp's converter and keys (test_convert_routes.py), and --converter native is refused."""
    from runs import fail_cleanly

    ckpt = build(tmp_path / "ckpt", smollm2_dir, *QWEN3[:2], **QWEN3[2])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    line = fail_cleanly([ckpt, "-o", out_dir / "x.gguf", "--ctx", "2048", "--converter", "native"], out_dir,
                        "--allow-patched-runtime", protect=ckpt)
    assert "0001-qwen3-optional-rope-freqs.patch" in line and "Ollama" in line
    fail_cleanly([ckpt, "-o", out_dir / "x.gguf", "--ctx", "2048", "--allow-patched-runtime", "--bands", "2",
                  "--band-scales", "1,1.1"], out_dir, "band scales cannot be folded")


def test_qwen3_with_rope_freqs_equals_transformers_in_the_patched_llama_cpp(smollm2_dir: Path, tmp_path: Path):
    """Qwen3 as GGUF arch qwen3 (per-head q/k norms, NEOX rows) in the libllama the set-up built with
    patches/0001: with no plan its logits are transformers'; with rope_freqs = 2 everywhere they are
    llama.cpp's own linear scaling x2 (the patch feeds the factors to qwen3's RoPE); YaRN's attention
    scale goes into the q/k norms' weights, since a scale on W_Q/W_K would be normalised away."""
    ckpt = build(tmp_path / "ckpt", smollm2_dir, *QWEN3[:2], **QWEN3[2])
    files = {m: tmp_path / f"{m}.F32.gguf" for m in ("none", "linear", "yarn")}
    for method, out in files.items():
        convert_ok(ckpt, "-o", out, "--method", method, "--scale", "2", "--qtype", "F32", "--allow-patched-runtime")
    reader = gguf.GGUFReader(files["linear"])
    from qroar_gguf.gguf_io.reader import field_value

    assert field_value(reader, "general.architecture") == "qwen3"
    assert field_value(reader, "qroar.needs_patch") == "0001-qwen3-optional-rope-freqs.patch"
    assert field_value(reader, "qwen3.attention.key_length") == 64

    tokens = [int(t) for t in np.random.default_rng(1).integers(0, 49152, 48)]
    theirs = transformers_logits(ckpt, tokens)
    none = prompt_logits(files["none"], tokens, n_ctx=256)
    np.testing.assert_allclose(none, theirs, rtol=0, atol=2e-3 * np.abs(theirs).max())
    linear = prompt_logits(files["linear"], tokens, n_ctx=256)
    runtime_linear = prompt_logits(files["none"], tokens, n_ctx=256, rope_freq_scale=0.5)
    np.testing.assert_allclose(linear, runtime_linear, rtol=0, atol=1e-4 * np.abs(theirs).max())
    assert np.abs(linear - none).max() > 0.05 * np.abs(theirs).max()  # the factors changed the logits

    tensors = {f: {t.name: np.array(t.data) for t in gguf.GGUFReader(files[f]).tensors} for f in ("none", "yarn")}
    scale = field_value(gguf.GGUFReader(files["yarn"]), "qroar.attention_scale_folded")
    assert scale > 1.0
    np.testing.assert_array_equal(tensors["yarn"]["blk.0.attn_q.weight"], tensors["none"]["blk.0.attn_q.weight"])
    np.testing.assert_allclose(tensors["yarn"]["blk.1.attn_k_norm.weight"],
                               tensors["none"]["blk.1.attn_k_norm.weight"] * np.float32(scale), rtol=1e-6)
