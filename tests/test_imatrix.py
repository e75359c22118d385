"""Quantizing for the long context: importance matrices computed with llama-imatrix on the plan-applied
file (cached), given ones, per-tensor types and the lower-bit types (small windows here; the long-context
measurements are tools/bench_imatrix.py's)."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import pytest
from runs import convert_ok, fail_cleanly

from qroar_gguf.gguf_io.imatrix import compute_imatrix
from qroar_gguf.gguf_io.reader import field_value

TARGET = 16384


@pytest.fixture(scope="module")
def plan_f16(smollm2_dir: Path, tmp_path_factory) -> Path:
    """SmolLM2 with yarn for 2x its context, unquantized: what conversion hands the quantizer."""
    out = tmp_path_factory.mktemp("imatrix") / "yarn.F16.gguf"
    convert_ok(smollm2_dir, "-o", out, "--ctx", TARGET, "--method", "yarn", "--qtype", "F16")
    return out


def _types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def test_a_matrix_is_computed_once_and_cached(plan_f16, dev_text):
    first = compute_imatrix(plan_f16, dev_text, ctx=512, chunks=2, threads=2, progress=False)
    stamp = first.stat().st_mtime_ns
    reader = gguf.GGUFReader(first)
    assert field_value(reader, "imatrix.chunk_count") == 2
    assert field_value(reader, "imatrix.chunk_size") == 512
    names = {t.name for t in reader.tensors}
    assert "blk.0.attn_q.weight.in_sum2" in names and "blk.29.ffn_down.weight.in_sum2" in names
    again = compute_imatrix(plan_f16, dev_text, ctx=512, chunks=2, threads=2, progress=False)
    assert again == first and again.stat().st_mtime_ns == stamp
    other = compute_imatrix(plan_f16, dev_text, ctx=256, chunks=2, threads=2, progress=False)
    assert other != first


def test_convert_computes_the_matrix_on_the_plan_applied_file(smollm2_dir, dev_text, tmp_path, plan_f16):
    plain, weighted = tmp_path / "plain.Q4_0.gguf", tmp_path / "imatrix.Q4_0.gguf"
    convert_ok(smollm2_dir, "-o", plain, "--ctx", TARGET, "--method", "yarn", "--qtype", "Q4_0")
    # the defaults: 512-token windows, 64 of them or as many as the text holds (two here)
    convert_ok(smollm2_dir, "-o", weighted, "--ctx", TARGET, "--method", "yarn", "--qtype", "Q4_0",
               "--imatrix-text", dev_text)
    reader = gguf.GGUFReader(weighted)
    assert field_value(reader, "quantize.imatrix.chunks_count") == 2
    assert Path(field_value(reader, "quantize.imatrix.dataset")).name == dev_text.name  # (a cached matrix keeps its first path)
    assert set(_types(weighted)) == set(_types(plain))  # (llama.cpp may pick other types for a few tensors)
    assert weighted.read_bytes() != plain.read_bytes()
    # the same matrix as computing it directly on the plan's unquantized file: the cache key is the file's digest
    cached = compute_imatrix(plan_f16, dev_text, ctx=512, chunks=64, threads=2, progress=False)
    assert Path(field_value(reader, "quantize.imatrix.file")) == cached


def test_a_given_matrix_per_tensor_types_and_an_i_quant(smollm2_dir, dev_text, tmp_path, plan_f16):
    matrix = compute_imatrix(plan_f16, dev_text, ctx=512, chunks=2, threads=2, progress=False)
    out = tmp_path / "mixed.IQ3_XXS.gguf"
    convert_ok(smollm2_dir, "-o", out, "--ctx", TARGET, "--method", "yarn", "--qtype", "IQ3_XXS", "--imatrix", matrix,
               "--tensor-type", "attn_q=q8_0", "--tensor-type", "attn_k=q8_0", "--token-embedding-type", "q5_0")
    types = _types(out)
    assert {types[f"blk.{i}.attn_q.weight"] for i in range(30)} == {"Q8_0"}
    assert {types[f"blk.{i}.attn_k.weight"] for i in range(30)} == {"Q8_0"}
    assert types["token_embd.weight"] == "Q5_0"
    assert types["rope_freqs.weight"] == "F32"
    assert field_value(gguf.GGUFReader(out), "general.file_type") == gguf.LlamaFileType.MOSTLY_IQ3_XXS


@pytest.mark.parametrize(("extra", "needle"), [
    (["--qtype", "IQ3_XXS"], "needs an importance matrix"),
    (["--qtype", "F16", "--tensor-type", "attn_q=q8_0"], "not quantized"),
    (["--tensor-type", "attn_q"], "PATTERN=TYPE"),
    (["--tensor-type", "attn_q=q9_9"], "not a ggml type"),
    (["--output-tensor-type", "int4"], "not a ggml type"),
    (["--token-embedding-type", "q6_k"], "not a multiple of q6_k's 256-value blocks"),  # SmolLM2's rows: 576
    (["--output-tensor-type", "q4_k"], "token_embd.weight has rows of 576"),  # tied: the output is token_embd
    (["--tensor-type", "attn_(q=q8_0"], "not a regular expression"),
])
def test_bad_quantization_requests_are_one_line(smollm2_dir, tmp_path, extra, needle):
    fail_cleanly([smollm2_dir, "-o", tmp_path / "x.gguf", "--ctx", TARGET, *extra], tmp_path, needle)


def test_a_text_too_short_for_the_window_is_one_line(smollm2_dir, dev_text, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    fail_cleanly([smollm2_dir, "-o", out_dir / "x.gguf", "--ctx", TARGET, "--qtype", "Q4_0", "--imatrix-text", dev_text,
                  "--imatrix-ctx", TARGET], out_dir, "too short for an importance matrix")


def test_imatrix_options_need_the_text(smollm2_dir, tmp_path):
    fail_cleanly([smollm2_dir, "-o", tmp_path / "x.gguf", "--imatrix-ctx", 512], tmp_path, "--imatrix-text", status=2)
    assert not os.listdir(tmp_path)


def test_a_matrix_key_names_the_llama_cpp_that_computes_it(tmp_path, monkeypatch):
    """A matrix from the llama.cpp QROAR_LLAMA_BIN names is not the set-up build's, and a rebuild in the
    same folder is another build (keys are of files' bytes, so two tiny files stand in for model and text)."""
    from qroar_gguf.gguf_io.imatrix import imatrix_key

    model, text = tmp_path / "m.gguf", tmp_path / "t.txt"
    model.write_bytes(b"model")
    text.write_text("text")
    monkeypatch.delenv("QROAR_LLAMA_BIN", raising=False)
    setup = imatrix_key(model, text, 512, 2)
    other = tmp_path / "other-bin"
    other.mkdir()
    tool = other / "llama-imatrix"
    tool.write_bytes(b"one build")
    monkeypatch.setenv("QROAR_LLAMA_BIN", str(other))
    first = imatrix_key(model, text, 512, 2)
    monkeypatch.setenv("QROAR_LLAMA_BIN", str(other) + "/")
    assert imatrix_key(model, text, 512, 2) == first  # the same folder, spelled otherwise
    tool.write_bytes(b"a rebuild of it")
    rebuilt = imatrix_key(model, text, 512, 2)
    assert len({setup, first, rebuilt}) == 3
