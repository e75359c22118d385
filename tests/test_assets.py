"""The embedded default model (SmolLM2 rebuilt from its published GGUF) and the Austen texts."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest

from qroar_gguf.arch.base import to_adjacent
from qroar_gguf.arch.pretokenizer import detect_pre_tokenizer, extract_from_converter, load_table
from qroar_gguf.assets.austen import austen_text, list_titles
from qroar_gguf.assets.smollm2 import CHECKPOINT_FILES, hf_tensor_name, unpermute_rope_rows
from qroar_gguf.errors import QroarError


def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    return to_adjacent(w, n_head, w.shape[0] // n_head)


# Digits, punctuation, accents, CJK, emoji (with ZWJ), whitespace runs, tabs, newlines, special tokens.
TOKENIZER_PROBES = [
    "<|im_start|>user\nHello, Wörld! Ça va? 12345 3.14159  naïve café —   tabs\t\there\n\n\n"
    "日本語のテキスト 我想在apple工作 🦙🚀😶\u200d🌫️ don't I'VE <|im_end|>\n<|im_start|>assistant\n"
    "  leading spaces and trailing   \n",
    "<|endoftext|><repo_name>x/y<file_sep>def f(x):\n\treturn x**2  # 0.5e-3 == 5e-4?\r\n",
]


@pytest.fixture(scope="module")
def llama_vocab(smollm2_gguf: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(smollm2_gguf), vocab_only=True, verbose=False)


def _prose_ids(tokenize, n: int = 1024) -> list[int]:
    """~n tokens of plain English prose: the opening of Sense & Sensibility."""
    try:
        text = austen_text("Sense & Sensibility").read_text(encoding="utf-8")
    except QroarError as e:
        pytest.skip(f"no Austen text: {e}")
    text = text[text.index("The family of Dashwood") :][:20000]
    return tokenize(text)[:n]


# --- checkpoint layout -------------------------------------------------------------------------


def test_checkpoint_files_and_config(smollm2_dir: Path) -> None:
    assert all((smollm2_dir / f).is_file() for f in CHECKPOINT_FILES)
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
        "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
        "num_hidden_layers": 30, "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "max_position_embeddings": 8192, "vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 2, "tie_word_embeddings": True, "torch_dtype": "float16", "rope_scaling": None,
    }  # fmt: skip
    assert {k: cfg[k] for k in expected} == expected
    tok_cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok_cfg["add_bos_token"] is False and "<|im_start|>" in tok_cfg["chat_template"]


def test_tensor_names() -> None:
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("blk.7.attn_k.weight") == "model.layers.7.self_attn.k_proj.weight"
    assert hf_tensor_name("blk.29.ffn_norm.weight") == "model.layers.29.post_attention_layernorm.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    for unknown in ("rope_freqs.weight", "blk.0.attn_q.bias", "blk.0.ssm_a.weight"):
        with pytest.raises(KeyError):
            hf_tensor_name(unknown)


def test_rope_permutation_roundtrip() -> None:
    w = np.arange(3 * 64 * 5, dtype=np.float32).reshape(3 * 64, 5)
    assert np.array_equal(unpermute_rope_rows(permute_rope_rows(w, 3), 3), w)
    # HF rotate_half pairs rows (k, k+32) of a head; llama.cpp puts them at (2k, 2k+1).
    p = permute_rope_rows(w, 3)
    assert np.array_equal(p[64 + 2 * 5], w[64 + 5]) and np.array_equal(p[64 + 2 * 5 + 1], w[64 + 32 + 5])


# --- tokenizer ---------------------------------------------------------------------------------


def test_pre_tokenizer_table_matches_llama_cpp_converter() -> None:
    """Our pre-tokenizer table against the converter of the llama.cpp we build (the set-up keeps its sdist)."""
    from qroar_gguf.llama_tools import fetch_sdist

    with tarfile.open(fetch_sdist(lambda message: None)) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("vendor/llama.cpp/conversion/base.py"))
        source = tar.extractfile(member).read().decode("utf-8")
    extracted = extract_from_converter(source)
    table = load_table()
    assert extracted["chktxt"] == table["chktxt"] and extracted["hashes"] == table["hashes"]


def test_rebuilt_tokenizer_is_smollm(smollm2_dir: Path) -> None:
    assert detect_pre_tokenizer(smollm2_dir / "tokenizer.json") == "smollm"


@pytest.mark.parametrize("text", TOKENIZER_PROBES + [load_table()["chktxt"]])
def test_tokenizer_matches_llama_cpp(smollm2_dir: Path, llama_vocab, text: str) -> None:
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json")).encode(text).ids
    theirs = llama_vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    assert ours == theirs


# --- weights -----------------------------------------------------------------------------------


def test_requantize_reproduces_published_bytes(smollm2_dir: Path, smollm2_gguf: Path) -> None:
    """Dequantize -> fp16 -> re-permute -> quantize gives the published bytes: names, layout and
    Q/K permutation are all right, and fp16 loses nothing of the Q4_1/Q8_0 grid values."""
    import gguf
    from safetensors.numpy import load_file

    reader = gguf.GGUFReader(smollm2_gguf)
    weights = load_file(str(smollm2_dir / "model.safetensors"))
    picked = {"token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.11.attn_v.weight",
              "blk.17.ffn_down.weight", "blk.29.attn_q.weight", "blk.29.attn_output.weight"}  # fmt: skip
    tensors = [t for t in reader.tensors if t.name in picked]
    assert len(tensors) == len(picked)
    assert {t.tensor_type.name for t in tensors} == {"Q4_1", "Q8_0"}
    for t in tensors:
        w = weights[hf_tensor_name(t.name)].astype(np.float32)
        if ".attn_q." in t.name:
            w = permute_rope_rows(w, 9)
        elif ".attn_k." in t.name:
            w = permute_rope_rows(w, 3)
        assert np.array_equal(gguf.quants.quantize(w, t.tensor_type), t.data), t.name


def test_transformers_perplexity(smollm2_dir: Path, smollm2_gguf: Path) -> None:
    """The checkpoint runs in transformers with a sane perplexity that matches llama.cpp's on the
    published GGUF (same weights; llama.cpp quantizes activations to 8 bits, hence not identical)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    llama_cpp = pytest.importorskip("llama_cpp")

    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    ids = _prose_ids(lambda s: tok(s)["input_ids"])
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        hf_ppl = math.exp(model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item())
    assert 10 < hf_ppl < 60, hf_ppl  # measured 21.6

    llm = llama_cpp.Llama(model_path=str(smollm2_gguf), n_ctx=len(ids), logits_all=True, verbose=False)
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
    top = logits.max(axis=1)
    lse = np.log(np.exp(logits - top[:, None]).sum(axis=1)) + top
    cpp_ppl = math.exp(float(np.mean(lse - logits[np.arange(len(ids) - 1), ids[1:]])))
    assert abs(hf_ppl / cpp_ppl - 1) < 0.02, (hf_ppl, cpp_ppl)


# --- texts -------------------------------------------------------------------------------------


def test_austen_texts() -> None:
    try:
        paths = {t: austen_text(t) for t in list_titles()}
    except QroarError as e:
        pytest.skip(f"no Austen text: {e}")
    assert len(list_titles()) == 6 and len(set(paths.values())) == 6
    assert all(" " not in p.name and "&" not in p.name for p in paths.values())
    pride = paths["Pride & Prejudice"].read_text(encoding="utf-8")
    assert "It is a truth universally acknowledged, that a single man in possession\nof a good fortune" in pride
    assert austen_text("emma") == paths["Emma"] and len(paths["Emma"].read_text(encoding="utf-8")) > 800_000
    with pytest.raises(QroarError):
        austen_text("Ulysses")
