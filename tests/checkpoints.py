"""Small real checkpoints written by the tests: random Llama weights, safetensors (F16/BF16/F32), shards."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "F16") -> None:
    """Write float tensors as `dtype` (F16, BF16 or F32) in the safetensors layout."""
    header: dict = {"__metadata__": {"format": "pt"}}
    blobs: list[bytes] = []
    offset = 0
    for name, values in tensors.items():
        values = np.asarray(values, dtype=np.float32)
        if dtype == "F16":
            blob = values.astype("<f2").tobytes()
        elif dtype == "F32":
            blob = values.astype("<f4").tobytes()
        elif dtype == "BF16":
            blob = gguf.quants.quantize(np.ascontiguousarray(values), gguf.GGMLQuantizationType.BF16).tobytes()
        else:
            raise ValueError(dtype)
        header[name] = {"dtype": dtype, "shape": list(values.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def tiny_llama_tensors(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights with Llama's names and shapes, scaled so activations stay sane."""
    rng = np.random.default_rng(seed)
    d, ff, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = d // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim

    def w(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(vocab, d) * 4}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = w(d, d)
        tensors[p + "self_attn.k_proj.weight"] = w(kv, d)
        tensors[p + "self_attn.v_proj.weight"] = w(kv, d)
        tensors[p + "self_attn.o_proj.weight"] = w(d, d)
        tensors[p + "mlp.gate_proj.weight"] = w(ff, d)
        tensors[p + "mlp.up_proj.weight"] = w(ff, d)
        tensors[p + "mlp.down_proj.weight"] = w(d, ff)
        tensors[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
        tensors[p + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    tensors["model.norm.weight"] = np.ones(d, dtype=np.float32)
    return tensors


def tiny_llama_config(vocab_size: int, **overrides) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "vocab_size": vocab_size,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": True,
        "torch_dtype": "float16",
    }
    config.update(overrides)
    return config


def make_tiny_llama(directory: Path, tokenizer_dir: Path, dtype: str = "F16", seed: int = 0,
                    **config_overrides) -> tuple[Path, dict[str, np.ndarray]]:
    """A random Llama checkpoint with a real tokenizer (copied from `tokenizer_dir`)."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab_size = config_overrides.pop("vocab_size", None) or \
        json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    config = tiny_llama_config(vocab_size, **config_overrides)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, directory / name)
    tensors = tiny_llama_tensors(config, seed)
    write_safetensors(directory / "model.safetensors", tensors, dtype)
    return directory, tensors


def shard_checkpoint(source: Path, target: Path, tensors: dict[str, np.ndarray], n_shards: int = 2,
                     dtype: str = "F16") -> Path:
    """Write the same tensors as `n_shards` files plus model.safetensors.index.json."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", *TOKENIZER_FILES):
        if (source / name).exists():
            shutil.copy(source / name, target / name)
    names = list(tensors)
    weight_map = {}
    for i in range(n_shards):
        part = names[i::n_shards]
        file_name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        write_safetensors(target / file_name, {n: tensors[n] for n in part}, dtype)
        weight_map.update({n: file_name for n in part})
    index = target / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return index


def write_gguf(writer: gguf.GGUFWriter) -> None:
    """Write everything added to a GGUFWriter made with a path: header, keys, tensors."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def convert_with_llama_cpp(checkpoint: Path, out: Path, outtype: str = "f32") -> Path:
    """``checkpoint`` converted by llama.cpp's own convert_hf_to_gguf.py from the pinned sdist, run with its
    own gguf-py: the files people download are written this way."""
    import os
    import subprocess
    import sys

    from qroar_gguf.llama_tools import reference_converter

    script = reference_converter()
    env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")}
    done = subprocess.run([sys.executable, str(script), str(checkpoint), "--outtype", outtype, "--outfile", str(out)],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def loads_beyond(path, target: int, trained: int, past: int) -> None:
    """The file loads in llama-cpp-python at its own context (n_ctx 0 reads context_length), which is
    ``target``, and evaluates ``past`` tokens beyond the trained context."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=0, verbose=False)
    try:
        assert llm.n_ctx() == target
        llm.eval(list(range(100, 100 + trained + past)))
    finally:
        llm.close()
