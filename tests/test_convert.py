"""End-to-end conversion: real checkpoints in, real GGUF files out, run by the real libllama."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from checkpoints import gguf_tensors, make_tiny_llama, shard_checkpoint, write_safetensors
from runs import convert_ok, fail_cleanly, run_cli

TRICKY_TEXT = ("Hello, world! 1234567 dollars... naïve café — 東京 🚀\n\n\tTabs   and    spaces  "
               "<|im_start|>user\nWhat's 3.14*2?<|im_end|>\n  trailing   ")


def load_llama(path: Path, n_ctx: int = 512, **kwargs):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, logits_all=True, verbose=False,
                           flash_attn=True, yarn_beta_fast=-1, yarn_beta_slow=-1, **kwargs)


def prompt_logits(path: Path, tokens: list[int], **kwargs) -> np.ndarray:
    model = load_llama(path, **kwargs)
    try:
        model.eval(tokens)
        return np.array(model.scores[: len(tokens)], dtype=np.float32)
    finally:
        model.close()


@pytest.fixture(scope="module")
def smollm2_f16(smollm2_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "none.F16.gguf"
    convert_ok(smollm2_dir, "-o", out, "--method", "none", "--qtype", "F16")
    return out


@pytest.fixture(scope="module")
def prose_tokens(smollm2_gguf: Path) -> list[int]:
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(smollm2_gguf), vocab_only=True, verbose=False)
    text = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
            "must be in want of a wife. However little known the feelings or views of such a man may be "
            "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
            "surrounding families, that he is considered the rightful property of some one or other of "
            "their daughters.")
    return vocab.tokenize(text.encode(), add_bos=False)


# 1. The SmolLM2 oracle ------------------------------------------------------------------------------

def test_f16_tensors_are_the_published_values(smollm2_f16: Path, smollm2_gguf: Path):
    ours, published = gguf_tensors(smollm2_f16), gguf_tensors(smollm2_gguf)
    assert set(ours) == set(published) | {"rope_freqs.weight"}
    for name, ref in published.items():
        mine = ours[name]
        reference = gguf.quants.dequantize(ref.data, ref.tensor_type)
        values = gguf.quants.dequantize(mine.data, mine.tensor_type).reshape(reference.shape)
        if mine.tensor_type == gguf.GGMLQuantizationType.F16:
            reference = reference.astype(np.float16).astype(np.float32)  # f16 rounding of the source
        np.testing.assert_array_equal(values, reference, err_msg=name)
        if ref.tensor_type in (gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0):
            # Re-quantizing our values reproduces the published blocks byte for byte.
            requantized = gguf.quants.quantize(values, ref.tensor_type)
            assert requantized.tobytes() == np.asarray(ref.data).tobytes(), name


def test_llama_cpp_quantizer_reproduces_published_file(smollm2_dir: Path, smollm2_gguf: Path, tmp_path: Path):
    out = tmp_path / "none.Q4_1.gguf"
    convert_ok(smollm2_dir, "-o", out, "--method", "none", "--qtype", "Q4_1")
    ours, published = gguf_tensors(out), gguf_tensors(smollm2_gguf)
    for name, ref in published.items():
        assert ours[name].tensor_type == ref.tensor_type, name
        assert np.asarray(ours[name].data).tobytes() == np.asarray(ref.data).tobytes(), name


def test_tokenizer_metadata_matches_published(smollm2_f16: Path, smollm2_gguf: Path):
    ours, published = gguf.GGUFReader(smollm2_f16), gguf.GGUFReader(smollm2_gguf)
    for key, field in published.fields.items():
        if key.startswith("tokenizer."):
            assert key in ours.fields, key
            assert ours.fields[key].contents() == field.contents(), key
    assert ours.fields["tokenizer.ggml.pre"].contents() == "smollm"


def test_llama_cpp_tokenizes_identically(smollm2_f16: Path, smollm2_gguf: Path):
    import llama_cpp

    ids = []
    for path in (smollm2_f16, smollm2_gguf):
        vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        ids.append(vocab.tokenize(TRICKY_TEXT.encode(), add_bos=False, special=True))
        vocab.close()
    assert ids[0] == ids[1]
    assert len(ids[0]) > 30


def test_logits_agree_with_published(smollm2_f16: Path, smollm2_gguf: Path, prose_tokens: list[int]):
    ours = prompt_logits(smollm2_f16, prose_tokens)
    published = prompt_logits(smollm2_gguf, prose_tokens)
    # Same weights; only llama.cpp's activation quantization in the Q4_1 matmuls differs.
    corr = np.corrcoef(ours.ravel(), published.ravel())[0, 1]
    assert corr > 0.995, corr
    agree = np.mean(ours.argmax(-1) == published.argmax(-1))
    assert agree > 0.9, agree


# 2. rope_freqs semantics ----------------------------------------------------------------------------

def test_linear_factors_equal_runtime_linear_scaling(smollm2_dir: Path, smollm2_f16: Path, tmp_path: Path,
                                                     prose_tokens: list[int]):
    linear = tmp_path / "linear.F16.gguf"
    convert_ok(smollm2_dir, "-o", linear, "--method", "linear", "--ctx", "16384", "--qtype", "F16")
    factors = gguf_tensors(linear)["rope_freqs.weight"]
    assert factors.tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(np.asarray(factors.data), np.full(32, 2.0, dtype=np.float32))

    from_file = prompt_logits(linear, prose_tokens)
    runtime = prompt_logits(smollm2_f16, prose_tokens, rope_freq_scale=0.5)
    unscaled = prompt_logits(smollm2_f16, prose_tokens)
    np.testing.assert_allclose(from_file, runtime, rtol=0, atol=1e-3)
    assert np.abs(from_file - unscaled).max() > 0.1  # the factors really act


# 3. A random Llama with K-quant-friendly widths ------------------------------------------------------

def test_q4_k_m_really_uses_k_quants(tiny, tmp_path: Path):
    directory, _ = tiny
    out = tmp_path / "tiny.Q4_K_M.gguf"
    convert_ok(directory, "-o", out, "--method", "linear", "--ctx", "8192", "--qtype", "Q4_K_M")
    types = {name: t.tensor_type.name for name, t in gguf_tensors(out).items()}
    for name, kind in types.items():
        if name.endswith(("attn_q.weight", "attn_k.weight", "attn_output.weight", "ffn_gate.weight", "ffn_up.weight")):
            assert kind == "Q4_K", (name, kind)
        elif name.endswith(("ffn_down.weight", "attn_v.weight")):
            assert kind in ("Q4_K", "Q6_K"), (name, kind)
    assert "Q6_K" in {types[n] for n in types if n.endswith(("ffn_down.weight", "attn_v.weight"))}
    assert types["rope_freqs.weight"] == "F32"

    logits = prompt_logits(out, [1, 100, 200, 300, 400])
    assert np.isfinite(logits).all()

    result = run_cli("inspect", out, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["context_length"] == 8192
    assert summary["file_type"] == "Q4_K_M"
    assert summary["qroar"]["method"] == "linear"
    assert summary["qroar"]["trained_context"] == 2048 and summary["qroar"]["target_context"] == 8192
    assert summary["qroar"]["factors"] == pytest.approx([4.0] * 32)
    assert summary["rope_freqs"] == pytest.approx([4.0] * 32)


# 4. Sharded and bf16 sources ------------------------------------------------------------------------

def test_sharded_checkpoint_converts_to_the_same_tensors(tiny, tmp_path: Path):
    directory, tensors = tiny
    index = shard_checkpoint(directory, tmp_path / "sharded", tensors, n_shards=3)
    whole, sharded = tmp_path / "whole.gguf", tmp_path / "sharded.gguf"
    convert_ok(directory / "model.safetensors", "-o", whole, "--qtype", "F16", "--ctx", "4096")
    convert_ok(index, "-o", sharded, "--qtype", "F16", "--ctx", "4096")
    convert_ok(index.parent, "-o", tmp_path / "by_dir.gguf", "--qtype", "F16", "--ctx", "4096")
    a, b, c = gguf_tensors(whole), gguf_tensors(sharded), gguf_tensors(tmp_path / "by_dir.gguf")
    assert set(a) == set(b) == set(c)
    for name in a:
        assert np.asarray(a[name].data).tobytes() == np.asarray(b[name].data).tobytes() == \
               np.asarray(c[name].data).tobytes(), name


def test_bf16_source_converts_exactly(smollm2_dir: Path, tmp_path: Path):
    directory, tensors = make_tiny_llama(tmp_path / "bf16", smollm2_dir, dtype="BF16")
    out32, out16 = tmp_path / "bf16.F32.gguf", tmp_path / "bf16.BF16.gguf"
    convert_ok(directory, "-o", out32, "--qtype", "F32", "--method", "none")
    convert_ok(directory, "-o", out16, "--qtype", "BF16", "--method", "none")
    f32, bf16 = gguf_tensors(out32), gguf_tensors(out16)
    bf16_values = {n: gguf.quants.dequantize(gguf.quants.quantize(v, gguf.GGMLQuantizationType.BF16),
                                             gguf.GGMLQuantizationType.BF16) for n, v in tensors.items()}
    q = bf16_values["model.layers.1.self_attn.k_proj.weight"]
    expected_k = q.reshape(2, 2, 32, 256).swapaxes(1, 2).reshape(128, 256)  # llama.cpp pair order
    np.testing.assert_array_equal(np.asarray(f32["blk.1.attn_k.weight"].data).reshape(128, 256), expected_k)
    np.testing.assert_array_equal(np.asarray(f32["blk.0.ffn_down.weight"].data).reshape(256, 512),
                                  bf16_values["model.layers.0.mlp.down_proj.weight"])
    assert bf16["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    np.testing.assert_array_equal(
        gguf.quants.dequantize(bf16["blk.0.ffn_down.weight"].data, gguf.GGMLQuantizationType.BF16).reshape(256, 512),
        bf16_values["model.layers.0.mlp.down_proj.weight"])
    assert np.isfinite(prompt_logits(out16, [1, 2, 3])).all()


# 5. Bad input ---------------------------------------------------------------------------------------

def test_truncated_safetensors(scratch: Path, tmp_path: Path):
    model = scratch / "model.safetensors"
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    fail_cleanly([scratch, "-o", tmp_path / "out.gguf"], tmp_path, "truncated", protect=scratch)


def test_corrupt_safetensors_header(scratch: Path, tmp_path: Path):
    model = scratch / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[8:20] = b"not json at!"
    model.write_bytes(bytes(data))
    fail_cleanly([scratch, "-o", tmp_path / "out.gguf"], tmp_path, "not a valid safetensors", protect=scratch)


def test_missing_config(scratch: Path, tmp_path: Path):
    (scratch / "config.json").unlink()
    fail_cleanly([scratch, "-o", tmp_path / "out.gguf"], tmp_path, "config.json")


def test_missing_tokenizer(scratch: Path, tmp_path: Path):
    (scratch / "tokenizer.json").unlink()
    fail_cleanly([scratch, "-o", tmp_path / "out.gguf"], tmp_path, "tokenizer")


def test_unsupported_architecture(scratch: Path, tmp_path: Path):
    """--converter native names the architectures qroar-gguf converts itself; an architecture llama.cpp's
    converter does not take either is refused by both routes."""
    config = json.loads((scratch / "config.json").read_text())
    config["architectures"] = ["Gemma3ForCausalLM"]
    (scratch / "config.json").write_text(json.dumps(config))
    fail_cleanly([scratch, "-o", tmp_path / "out.gguf", "--converter", "native"], tmp_path,
                 "unsupported architecture Gemma3ForCausalLM: qroar-gguf converts LlamaForCausalLM, "
                 "MistralForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM")
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (scratch / "config.json").write_text(json.dumps(config))
    fail_cleanly([scratch, "-o", tmp_path / "out.gguf"], tmp_path,
                 "architecture NoSuchModelForCausalLM: neither qroar-gguf nor llama.cpp's converter")


def test_target_context_must_grow(scratch: Path, tmp_path: Path):
    fail_cleanly([scratch, "-o", tmp_path / "out.gguf", "--ctx", "2048"], tmp_path, "larger than the trained")
    fail_cleanly([scratch, "-o", tmp_path / "out.gguf", "--ctx", "1024", "--method", "linear"], tmp_path,
          "larger than the trained")
    convert_ok(scratch, "-o", tmp_path / "none.gguf", "--ctx", "2048", "--method", "none", "--qtype", "F16")


def test_nan_in_key_weights(scratch: Path, tiny, tmp_path: Path):
    _, tensors = tiny
    damaged = dict(tensors)
    damaged["model.layers.1.self_attn.k_proj.weight"] = tensors["model.layers.1.self_attn.k_proj.weight"].copy()
    damaged["model.layers.1.self_attn.k_proj.weight"][3, 7] = np.inf
    write_safetensors(scratch / "model.safetensors", damaged)
    fail_cleanly([scratch, "-o", tmp_path / "out.gguf"], tmp_path, "NaN or Inf", protect=scratch)


def test_output_equal_to_input(scratch: Path):
    fail_cleanly([scratch / "model.safetensors", "-o", scratch / "model.safetensors", "--force"], scratch,
          "is one of the input files", protect=scratch)


def test_existing_output_needs_force(scratch: Path, tmp_path: Path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"keep me")
    fail_cleanly([scratch, "-o", out], tmp_path, "--force")
    assert out.read_bytes() == b"keep me"
    convert_ok(scratch, "-o", out, "--force", "--qtype", "Q8_0")
    assert out.read_bytes()[:4] == b"GGUF"


def test_unwritable_output_directory(scratch: Path, tmp_path: Path):
    locked = Path("/sys") if Path("/sys").is_dir() else tmp_path / "locked"
    result = run_cli(scratch, "-o", locked / "out.gguf")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "not writable" in result.stderr
    assert not (locked / "out.gguf").exists()


def test_keep_f16_keeps_the_intermediate(tiny, tmp_path: Path):
    directory, _ = tiny
    out, kept = tmp_path / "q.gguf", tmp_path / "kept.F16.gguf"
    convert_ok(directory, "-o", out, "--qtype", "Q4_0", "--keep-f16", kept)
    assert gguf_tensors(kept)["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert gguf_tensors(out)["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.F16.gguf", "q.gguf"]


def test_help_names_defaults():
    result = run_cli("convert", "--help")
    assert result.returncode == 0
    flat = " ".join(result.stdout.split())  # click wraps lines
    for text in ("--ctx", "--method", "--qtype", "Q4_K_M", "--keep-f16", "--force", "4x the trained"):
        assert text in flat


# SentencePiece tokenizers (Llama 2, TinyLlama, Mistral) ----------------------------------------------

def test_sentencepiece_checkpoint_tokenizes_like_sentencepiece(tmp_path: Path, smollm2_dir: Path):
    import llama_cpp
    import sentencepiece as spm

    from qroar_gguf.assets.austen import austen_text

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(austen_text("Persuasion").read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=512,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,  # as Llama
                                   minloglevel=2)
    directory, _ = make_tiny_llama(tmp_path / "spm", smollm2_dir, vocab_size=512)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (directory / name).unlink(missing_ok=True)
    (tmp_path / "tokenizer.model").rename(directory / "tokenizer.model")
    (directory / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": False}))

    out = tmp_path / "spm.gguf"
    convert_ok(directory, "-o", out, "--qtype", "Q8_0", "--ctx", "4096")
    reader = gguf.GGUFReader(out)
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    text = "Anne Elliot walked 12 miles, naïvely — to Kellynch!  Twice."
    model = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    assert model.tokenize(text.encode(), add_bos=True) == [1] + sp.encode(text)
    model.close()
