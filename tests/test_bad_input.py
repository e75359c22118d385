"""Inputs that must be refused in one line before anything is written (besides test_convert's basics).

Each test damages a private copy of the tiny checkpoint (or gives a bad option) and runs the real
command line: exit status 1 (2 for command-line usage), one line on stderr naming the problem,
no traceback, no file left in the output folder, the input untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from checkpoints import gguf_tensors, shard_checkpoint, write_gguf, write_safetensors
from runs import convert_ok, fail_cleanly, run_cli


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _write_raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


# 4. Tensors that do not match config.json -----------------------------------------------------------

@pytest.mark.parametrize("changes, needle", [
    ({"head_dim": 32}, "model.layers.0.self_attn.q_proj.weight' has shape [256, 256] but config.json implies [128, 256]"),
    ({"num_hidden_layers": 3}, "tensor 'model.layers.2.self_attn.q_proj.weight' is missing"),
    ({"num_hidden_layers": 1}, "has no place in a LlamaForCausalLM with 1 layers"),
    ({"intermediate_size": 384}, "mlp.gate_proj.weight' has shape [512, 256] but config.json implies [384, 256]"),
    ({"num_key_value_heads": 4}, "k_proj.weight' has shape [128, 256] but config.json implies [256, 256]"),
    ({"tie_word_embeddings": False}, "tensor 'lm_head.weight' is missing"),
])
def test_config_that_does_not_fit_the_tensors(scratch: Path, tmp_path: Path, changes: dict, needle: str):
    _edit_config(scratch, **changes)
    fail_cleanly([scratch, "-o", tmp_path / "out.gguf"], tmp_path, needle, protect=scratch)


def test_tensor_with_the_wrong_shape(scratch: Path, tiny, tmp_path: Path):
    _, tensors = tiny
    damaged = dict(tensors)
    damaged["model.layers.1.mlp.down_proj.weight"] = tensors["model.layers.1.mlp.down_proj.weight"][:, :500]
    write_safetensors(scratch / "model.safetensors", damaged)
    fail_cleanly([scratch, "-o", tmp_path / "out.gguf"], tmp_path,
                 "'model.layers.1.mlp.down_proj.weight' has shape [256, 500]", protect=scratch)


def test_missing_tensor(scratch: Path, tiny, tmp_path: Path):
    _, tensors = tiny
    write_safetensors(scratch / "model.safetensors",
                      {n: v for n, v in tensors.items() if n != "model.layers.0.post_attention_layernorm.weight"})
    fail_cleanly([scratch, "-o", tmp_path / "out.gguf"], tmp_path,
                 "'model.layers.0.post_attention_layernorm.weight' is missing", protect=scratch)


def test_one_shard_alone_is_refused_and_the_whole_converts(tiny, tmp_path: Path):
    directory, tensors = tiny
    index = shard_checkpoint(directory, tmp_path / "sharded", tensors, n_shards=2)
    out = tmp_path / "out"
    out.mkdir()
    fail_cleanly([index.parent / "model-00001-of-00002.safetensors", "-o", out / "x.gguf"], out,
                 "give its directory or model.safetensors.index.json, not one shard")
    convert_ok(index.parent, "-o", out / "x.gguf", "--qtype", "F16")


# 5. Inputs that would silently become garbage ------------------------------------------------------

def test_integer_tensor_is_refused(scratch: Path, tiny, tmp_path: Path):
    _, tensors = tiny
    header, blobs, offset = {}, [], 0
    for name, values in tensors.items():
        stored = values.astype("<i4") if name == "model.norm.weight" else values.astype("<f2")
        dtype = "I32" if name == "model.norm.weight" else "F16"
        header[name] = {"dtype": dtype, "shape": list(values.shape), "data_offsets": [offset, offset + stored.nbytes]}
        blobs.append(stored.tobytes())
        offset += stored.nbytes
    _write_raw_safetensors(scratch / "model.safetensors", header, b"".join(blobs))
    fail_cleanly([scratch, "-o", tmp_path / "out.gguf"], tmp_path,
                 "'model.norm.weight' is stored as I32; weights must be floating point", protect=scratch)


def test_overlapping_tensor_data_is_refused(scratch: Path, tmp_path: Path):
    a, b = np.ones((4, 4), np.float16), np.zeros((4, 4), np.float16)
    header = {"a": {"dtype": "F16", "shape": [4, 4], "data_offsets": [0, 32]},
              "b": {"dtype": "F16", "shape": [4, 4], "data_offsets": [16, 48]}}
    _write_raw_safetensors(scratch / "model.safetensors", header, a.tobytes() + b.tobytes())
    fail_cleanly([scratch, "-o", tmp_path / "out.gguf"], tmp_path, "tensors 'a' and 'b' overlap", protect=scratch)


def test_band_scale_that_overflows_float16_is_refused(tiny, tmp_path: Path):
    directory, _ = tiny
    fail_cleanly([directory, "-o", tmp_path / "out.gguf", "--band-scales", "1e7,1,1,1", "--qtype", "F16"],
                 tmp_path, "blk.0.attn_q.weight would hold NaN or Inf as F16")
    convert_ok(directory, "-o", tmp_path / "out.gguf", "--band-scales", "2,1,1,1", "--qtype", "F16")


# 6. Values that used to end in a traceback -----------------------------------------------------------

@pytest.mark.parametrize("config_text, needle", [
    ("null", "is not a JSON object"),
    ("[1, 2]", "is not a JSON object"),
])
def test_config_that_is_not_an_object(scratch: Path, tmp_path: Path, config_text: str, needle: str):
    (scratch / "config.json").write_text(config_text)
    fail_cleanly([scratch, "-o", tmp_path / "out.gguf"], tmp_path, needle, protect=scratch)


@pytest.mark.parametrize("changes, needle", [
    ({"hidden_size": "256"}, "hidden_size must be a positive whole number, got '256'"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive whole number, got 0"),
    ({"max_position_embeddings": -5}, "max_position_embeddings must be a positive whole number"),
    ({"vocab_size": [49152]}, "vocab_size must be a positive whole number"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps must be a positive number"),
    ({"rope_theta": None}, "rope_theta must be a number above 1"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
    ({"rope_scaling": "linear"}, "rope_scaling must be a mapping"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2, "original_max_position_embeddings": "x"}},
     "original_max_position_embeddings must be a positive whole number"),
])
def test_config_value_of_the_wrong_type(scratch: Path, tmp_path: Path, changes: dict, needle: str):
    _edit_config(scratch, **changes)
    fail_cleanly([scratch, "-o", tmp_path / "out.gguf"], tmp_path, needle, protect=scratch)


def test_architectures_as_a_string(scratch: Path, tmp_path: Path):
    _edit_config(scratch, architectures="NoSuchModelForCausalLM")
    line = fail_cleanly([scratch, "-o", tmp_path / "out.gguf"], tmp_path, "architecture NoSuchModelForCausalLM: neither")
    assert "N, o, S, u, c, h" not in line
    _edit_config(scratch, architectures="LlamaForCausalLM")
    convert_ok(scratch, "-o", tmp_path / "out.gguf", "--qtype", "F16")


@pytest.mark.parametrize("content, needle", [
    ("{not json", "tokenizer_config.json is not valid JSON"),
    ("[]", "tokenizer_config.json is not a JSON object"),
    ('{"chat_template": [1]}', "chat_template must be a string or a list"),
])
def test_broken_tokenizer_config(scratch: Path, tmp_path: Path, content: str, needle: str):
    (scratch / "tokenizer_config.json").write_text(content)
    fail_cleanly([scratch, "-o", tmp_path / "out.gguf", "--qtype", "F16"], tmp_path, needle, protect=scratch)


@pytest.mark.parametrize("offsets", [["0", "32"], [0.5, 32], [32, 0], [0], True])
def test_safetensors_offsets_that_are_not_integers(scratch: Path, tmp_path: Path, offsets):
    header = {"a": {"dtype": "F16", "shape": [4, 4], "data_offsets": offsets}}
    _write_raw_safetensors(scratch / "model.safetensors", header, bytes(32))
    fail_cleanly([scratch, "-o", tmp_path / "out.gguf"], tmp_path, "malformed entry", protect=scratch)


@pytest.mark.parametrize("args, needle", [
    (["--scale", "inf"], "--scale must be a finite positive number"),
    (["--scale", "nan"], "--scale"),
    (["--ctx", str(10**30)], "out of range"),
])
def test_impossible_target_context(tiny, tmp_path: Path, args: list[str], needle: str):
    directory, _ = tiny
    result = run_cli(directory, "-o", tmp_path / "out.gguf", *args)
    assert result.returncode in (1, 2), result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_output_name_too_long(tiny, tmp_path: Path):
    directory, _ = tiny
    fail_cleanly([directory, "-o", tmp_path / ("x" * 300 + ".gguf")], tmp_path, "name too long")
    # a name that fits but leaves no room for the temporary's suffix is written (the temporary's name is
    # shortened), and nothing else is left beside it
    convert_ok(directory, "-o", tmp_path / ("y" * 250 + ".gguf"), "--qtype", "F16")
    assert [p.name for p in tmp_path.iterdir()] == ["y" * 250 + ".gguf"]


def test_json_into_a_missing_folder(tiny, tmp_path: Path, smollm2_dir: Path):
    directory, _ = tiny
    png = tmp_path / "factors.png"
    fail_cleanly(["plot", directory, "-o", png, "--json", tmp_path / "missing" / "data.json"], tmp_path,
                 "does not exist: create it first")
    assert not png.exists()
    text = tmp_path / "text.txt"
    text.write_text("Emma Woodhouse, handsome, clever, and rich. " * 50)
    fail_cleanly(["eval", tmp_path / "x.gguf", "--text", text, "--ctx", "64"], tmp_path, "does not exist",
                 status=2)
    convert_ok(directory, "-o", tmp_path / "x.gguf", "--qtype", "F16")
    fail_cleanly(["eval", tmp_path / "x.gguf", "--text", text, "--ctx", "64", "--json",
                  tmp_path / "missing" / "r.json"], tmp_path, "does not exist: create it first")


# -o naming something that is not a regular file ------------------------------------------------------

def test_output_that_is_a_device_or_pipe_is_never_replaced(tiny, tmp_path: Path):
    directory, _ = tiny
    fail_cleanly([directory, "-o", "/dev/null", "--force"], tmp_path, "is not a regular file")
    assert Path("/dev/null").is_char_device()
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    fail_cleanly([directory, "-o", fifo, "--force"], tmp_path, "is not a regular file")
    assert fifo.is_fifo()


# 7. Messages that say what happened --------------------------------------------------------------------

@pytest.fixture()
def small_disk(tmp_path: Path):
    """A real 40 MiB file system (tmpfs), where the tiny model's F16 file fits but not with its Q8_0 copy."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_full_disk_says_so(tiny, small_disk: Path):
    directory, _ = tiny
    fill = small_disk / "filler"
    fill.write_bytes(bytes(24 * 2**20))  # the F16 intermediate (~30 MiB) no longer fits
    fail_cleanly([directory, "-o", small_disk / "out.gguf", "--qtype", "Q8_0"], small_disk,
                 "the unquantized file needs")
    fill.write_bytes(bytes(6 * 2**20))  # the intermediate fits, its Q8_0 copy does not
    line = fail_cleanly([directory, "-o", small_disk / "out.gguf", "--qtype", "Q8_0"], small_disk, "disk is full")
    assert "status 1" not in line


def test_quantizer_failure_gives_llama_cpp_reason(tmp_path: Path):
    from qroar_gguf.errors import QroarError
    from qroar_gguf.gguf_io.quantize import quantize_gguf

    source = tmp_path / "not-a-model.gguf"
    source.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(QroarError) as caught:
        quantize_gguf(source, tmp_path / "out.gguf", "Q4_0", threads=1, progress=False)
    message = str(caught.value)
    assert "\n" not in message and "status 1" not in message
    assert "failed to load model" in message or "gguf" in message.lower(), message


def test_usage_errors_are_one_line_with_status_2(tiny, tmp_path: Path):
    directory, _ = tiny
    fail_cleanly([directory, "-o", tmp_path / "out.gguf", "--no-such-option"], tmp_path,
                 "No such option '--no-such-option'", status=2)
    fail_cleanly([directory, "-o", tmp_path / "out.gguf", "--qtype", "Q9_9"], tmp_path, "--help", status=2)


def test_the_tiny_checkpoint_still_converts(tiny, tmp_path: Path):
    directory, tensors = tiny
    convert_ok(directory, "-o", tmp_path / "ok.gguf", "--qtype", "F16")
    assert len(gguf_tensors(tmp_path / "ok.gguf")) == 1 + len(tensors)


# Found by an adversarial review: inputs that must never be overwritten, and options that clash ----------

def test_plot_json_never_overwrites_the_checkpoint(scratch: Path, tmp_path: Path):
    weights = scratch / "model.safetensors"
    before = weights.read_bytes()
    fail_cleanly(["plot", scratch, "-o", tmp_path / "f.png", "--json", weights], tmp_path, "is one of the input files")
    assert weights.read_bytes() == before
    fail_cleanly(["plot", scratch, "-o", tmp_path / "f.png", "--json", tmp_path / "f.png"], tmp_path,
                 "name the same file", status=2)


def test_eval_json_never_overwrites_the_reference(tiny, tmp_path: Path):
    directory, _ = tiny
    model, reference = tmp_path / "q.gguf", tmp_path / "ref.gguf"
    convert_ok(directory, "-o", model, "--qtype", "Q8_0")
    convert_ok(directory, "-o", reference, "--qtype", "F16")
    text = tmp_path / "text.txt"
    text.write_text("Emma Woodhouse, handsome, clever, and rich. " * 50)
    before = reference.read_bytes()
    fail_cleanly(["eval", model, "--text", text, "--ctx", "64", "--reference", reference, "--json", reference],
                 tmp_path, "is one of the input files")
    assert reference.read_bytes() == before


@pytest.mark.parametrize("extra, needle", [
    (["--search", "--search-report", "DEV"], "--search-report and --dev-text name the same file"),
    (["--search", "--search-report", "OUT"], "-o and --search-report name the same file"),
    (["--keep-f16", "OUT"], "-o and --keep-f16 name the same file"),
    (["--ctx", "4096", "--scale", "2"], "either --ctx or --scale"),
    (["--dev-ctx", "64"], "apply to --search only"),
    (["--search-report", "r.json"], "apply to --search only"),
    (["--symmetric"], "applies to --band-scales or --search only"),
    (["--threads", "100000"], "--threads"),
])
def test_options_that_clash_are_usage_errors(tiny, tmp_path: Path, extra: list[str], needle: str):
    directory, _ = tiny
    dev = tmp_path / "dev.txt"
    dev.write_text("a short dev text. " * 20)
    out = tmp_path / "out.gguf"
    args = [str(out) if a == "OUT" else str(dev) if a == "DEV" else a for a in extra]
    if "--search" in extra and "DEV" not in extra:
        args += ["--dev-text", str(dev)]
    elif "DEV" in extra:
        args = ["--dev-text", str(dev), *args]
    fail_cleanly([directory, "-o", out, *args], tmp_path, needle, status=2)
    assert dev.read_text() == "a short dev text. " * 20


def test_dev_text_that_is_not_utf8(tiny, tmp_path: Path):
    directory, _ = tiny
    dev = tmp_path / "dev.bin"
    dev.write_bytes(bytes(range(256)) * 8)
    fail_cleanly([directory, "-o", tmp_path / "out.gguf", "--search", "--dev-text", dev], tmp_path, "is not UTF-8 text")


def test_output_under_a_file_is_not_a_missing_folder(tiny, tmp_path: Path):
    directory, _ = tiny
    (tmp_path / "afile").write_text("x")
    fail_cleanly([directory, "-o", tmp_path / "afile" / "x.gguf"], tmp_path, "is a file, not a folder")


@pytest.mark.parametrize("changes, needle", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not silu"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    ({"architectures": []}, "config.json names no architectures (model_type 'llama')"),
    ({"architectures": [[]]}, "architectures must be a list of class names"),  # found by the config fuzzer
])
def test_config_the_llama_arch_cannot_honour(scratch: Path, tmp_path: Path, changes: dict, needle: str):
    _edit_config(scratch, **changes)
    fail_cleanly([scratch, "-o", tmp_path / "out.gguf"], tmp_path, needle, protect=scratch)


def test_bench_refuses_before_building_anything(tiny, tmp_path: Path):
    directory, _ = tiny
    text = tmp_path / "text.txt"
    text.write_text("Emma Woodhouse, handsome, clever, and rich. " * 50)
    out = tmp_path / "bench"
    fail_cleanly(["bench", directory, "--ctx", "4096", "--qtype", "Q9", "--plans", "yarn", "--text", text,
                  "--out", out], tmp_path, "Q9", status=2)
    fail_cleanly(["bench", directory, "--ctx", "4096", "--qtype", "Q8_0", "--plans", "yarn:beta=4", "--text", text,
                  "--out", out], tmp_path, "takes no option beta")
    fail_cleanly(["bench", directory, "--ctx", "4096", "--qtype", "Q8_0", "--plans", "yarn", "--text", "/dev/null",
                  "--out", out], tmp_path, "is not a regular file")
    assert not out.exists()


def test_demo_refuses_a_context_it_cannot_show_before_converting(smollm2_dir: Path, tmp_path: Path):
    result = run_cli("demo", "--ctx", "100", env={**os.environ, "QROAR_CACHE": str(smollm2_dir.parent)})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and "must be larger than the model's trained context" in lines[0]
    assert "2/4 convert" not in result.stdout


def test_eval_says_why_a_damaged_file_is_refused(smollm2_gguf: Path, tmp_path: Path):
    damaged = tmp_path / "half.gguf"
    damaged.write_bytes(smollm2_gguf.read_bytes()[: smollm2_gguf.stat().st_size // 2])
    text = tmp_path / "text.txt"
    text.write_text("Emma Woodhouse, handsome, clever, and rich. " * 50)
    fail_cleanly(["eval", damaged, "--text", text, "--ctx", "64"], tmp_path, "past the file's end")


def test_inspect_reads_odd_files_without_a_traceback(tmp_path: Path):
    import gguf

    odd = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(odd), "llama")
    writer.add_string("llama.context_length", "long")  # a string where a number belongs
    writer.add_string("qroar.params", "{not json")
    writer.add_string("qroar.method", "yarn")
    writer.add_tensor("rope_freqs.weight", np.ones((2, 4), dtype=np.float32))
    write_gguf(writer)
    result = run_cli("inspect", odd, "--json")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    summary = json.loads(result.stdout)
    # a qroar.* key that does not hold what qroar-gguf writes there is named, never believed
    assert summary["qroar_malformed"] == ["qroar.params"] and summary["qroar"] == {"method": "yarn"}
    assert summary["bands"] is None
    assert len(summary["rope_freqs"]) == 8
    fail_cleanly(["inspect", "/dev/null"], tmp_path, "is not a regular file")
