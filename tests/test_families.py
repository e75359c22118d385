"""Every model family against transformers: small random-weight checkpoints built with transformers
(Qwen2 with its Q/K/V biases, Llama, Mistral; grouped-query attention; tied and untied embeddings),
converted to F32 and run by the real libllama; the logits must be transformers' logits."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from runs import convert_ok, run_cli
from test_convert import prompt_logits

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
    config = getattr(transformers, config_class)(vocab_size=vocab, **SHAPES, **overrides)
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
    ckpt = build(tmp_path / "ckpt", smollm2_dir, config_class, model_class, **overrides)
    config = (ckpt / "config.json").read_text().replace('"use_sliding_window": false', '"use_sliding_window": true')
    assert '"use_sliding_window": true' in config
    (ckpt / "config.json").write_text(config)
    result = run_cli(ckpt, "-o", tmp_path / "out.gguf", "-q")
    assert result.returncode == 1 and "use_sliding_window is true" in result.stderr
    assert not (tmp_path / "out.gguf").exists()
