"""A downloaded GGUF is untrusted input: the files here, crafted byte by byte, each once made `patch`
or `inspect` allocate by a claim, print a traceback, accept an impossible shape or obey the file's
text on the terminal. Each now fails in one line (exit 1, 2 for usage) with nothing left behind, or,
where the file is merely odd, works.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf_craft import QT, VT, Gguf, Tensor, Value, craft, f32, nested, small_model, text, u32, with_key, with_tensor
from runs import fail_cleanly, run_cli

from qroar_gguf.display import printable
from qroar_gguf.errors import QroarError
from qroar_gguf.gguf_io.layout import MAX_NESTING, read_layout

CTX = "llama.context_length"


def _write(folder: Path, g, name: str = "model.gguf") -> Path:
    path = folder / name
    path.write_bytes(craft(g))
    return path


@pytest.fixture()
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    return folder


def _inspect_json(path: Path) -> dict:
    result = run_cli("inspect", path, "--json")
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr

    def refuse(constant):  # NaN and Infinity are not JSON
        raise AssertionError(f"inspect --json printed {constant}")

    return json.loads(result.stdout, parse_constant=refuse)


def _refused_by_both(source: Path, tmp_path: Path, inputs: Path, needle: str, *patch_args: str) -> None:
    """patch and inspect agree: the same file is refused by each in one line."""
    fail_cleanly(["patch", source, "-o", tmp_path / "out.gguf", *patch_args], tmp_path, needle, protect=inputs)
    fail_cleanly(["inspect", source], tmp_path, needle, protect=inputs)


# 1. The reader: claims bounded by the file, before anything is allocated ---------------------------

@pytest.mark.parametrize("claim", [2**22, 2**40, 2**64 - 1])
@pytest.mark.parametrize("item", [VT.UINT8, VT.STRING, VT.ARRAY])
def test_an_array_claiming_more_items_than_the_file_holds(inputs: Path, claim: int, item):
    value = Value(VT.ARRAY, [], item, claimed=claim)
    path = _write(inputs, with_key(small_model(), "x.claims", value))
    with pytest.raises(QroarError, match="more than the .* bytes left can hold"):
        read_layout(path)


@pytest.mark.parametrize("depth", [MAX_NESTING + 1, 1000, 100_000])
def test_arrays_nested_deeper_than_the_limit(inputs: Path, tmp_path: Path, depth: int):
    path = _write(inputs, with_key(small_model(), "x.deep", nested(depth)))
    _refused_by_both(path, tmp_path, inputs, f"nest more than {MAX_NESTING} deep")


def test_odd_but_valid_files_still_inspect_and_patch(inputs: Path, tmp_path: Path):
    """Zero-length arrays, an array of arrays (within the limit), non-UTF-8 tokens, version 2 and
    tensors stored out of order are all valid GGUF."""
    g = small_model()
    g = with_key(g, "x.empty", Value(VT.ARRAY, [], VT.UINT32))
    g = with_key(g, "x.nested", nested(MAX_NESTING))
    stored = list(reversed(range(len(g.tensors))))  # the data in reverse order of the infos
    offsets, data = {}, b""
    for i in stored:
        offsets[i] = len(data)
        data += g.tensors[i].data + b"\0" * (-len(g.tensors[i].data) % 32)
    tensors = [Tensor(t.name, t.dims, t.type, b"", offsets[i]) for i, t in enumerate(g.tensors)]
    for version in (2, 3):
        path = inputs / f"v{version}.gguf"
        path.write_bytes(craft(Gguf(g.keys, tensors, version=version)) + data)
        summary = _inspect_json(path)
        assert summary["n_tensors"] == 3 and summary["bands"] is not None
        out = tmp_path / f"v{version}.out.gguf"
        result = run_cli("patch", path, "-o", out, "--ctx", "1024", "-q")
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("value", [Value(VT.UINT64, 32), Value(VT.BOOL, True), Value(VT.UINT32, 48)])
def test_an_alignment_llama_cpp_would_refuse_is_refused_by_patch_and_inspect_alike(inputs: Path, tmp_path: Path,
                                                                                     value: Value):
    path = _write(inputs, with_key(small_model(), "general.alignment", value))
    _refused_by_both(path, tmp_path, inputs, "general.alignment is")


def test_a_tensor_past_the_end_is_damage_for_inspect_too(inputs: Path, tmp_path: Path):
    g = small_model()
    path = _write(inputs, with_tensor(g, "blk.0.attn_q.weight", offset=1 << 40))
    _refused_by_both(path, tmp_path, inputs, "past the file's end")


# 2. The keys against each other and the tensors, before anything is written -----------------------

@pytest.mark.parametrize("changes, needle", [
    ({"llama.rope.dimension_count": u32(2**24)}, "no larger than the head"),
    ({"llama.rope.dimension_count": u32(31)}, "no larger than the head"),
    ({"llama.block_count": Value(VT.UINT64, 2**40)}, "llama.cpp reads at most 512"),
    ({"llama.attention.head_count_kv": u32(4)}, "key/value heads"),
    ({"llama.attention.head_count": u32(128), "llama.embedding_length": u32(64)}, "fewer dimensions than heads"),
    ({"llama.attention.head_count": u32(4), "llama.rope.dimension_count": u32(16)},
     "blk.0.attn_k.weight has shape [64, 64] but the keys imply [64, 32]"),
    ({"llama.attention.head_count": Value(VT.ARRAY, [2, 2], VT.UINT32)}, "has 2 values for 1 layers"),
    ({"llama.attention.key_length": u32(48)}, "but the keys imply [64, 96]"),
    ({"llama.embedding_length": Value(VT.UINT64, 2**40)}, "but the keys imply"),
    ({"llama.context_length": Value(VT.ARRAY, [1] * 10, VT.UINT32)}, "<array of 10 UINT32>"),
])
def test_keys_that_contradict_each_other_or_the_tensors(inputs: Path, tmp_path: Path, changes: dict, needle: str):
    g = small_model()
    for name, value in changes.items():
        g = with_key(g, name, value)
    path = _write(inputs, g)
    fail_cleanly(["patch", path, "-o", tmp_path / "out.gguf", "--ctx", "1024"], tmp_path, needle.split(" [")[0],
                 protect=inputs)
    assert _inspect_json(path)["bands"] is None  # inspect shows the rest, without bands from such keys


def test_a_llama_file_with_partly_rotary_heads_is_refused_as_llama_cpp_refuses_it(inputs: Path, tmp_path: Path):
    path = _write(inputs, with_key(small_model(), "llama.rope.dimension_count", u32(16)))
    fail_cleanly(["patch", path, "-o", tmp_path / "out.gguf"], tmp_path, "invalid n_rot", protect=inputs)
    assert _inspect_json(path)["bands"] is not None  # consistent RoPE keys: inspect describes them


def test_head_counts_per_layer_and_a_key_length_are_read_as_llama_cpp_reads_them(inputs: Path, tmp_path: Path):
    """Per-layer head counts (arrays) and a head size from key_length that is not embedding / heads
    (as Qwen3-0.6B's and Gemma 3's are)."""
    g = small_model(n_embd=64, n_head=4, n_kv_head=2, n_rot=32)  # 4 heads of 32: 128 rows from 64 columns
    g = with_key(g, "llama.attention.key_length", u32(32))
    g = with_key(g, "llama.attention.head_count", Value(VT.ARRAY, [4], VT.INT32))
    path = _write(inputs, g)
    result = run_cli("patch", path, "-o", tmp_path / "out.gguf", "--method", "qroar", "--ctx", "1024", "-q")
    assert result.returncode == 0, result.stderr
    assert len(_inspect_json(path)["bands"]) > 0


def test_qwen2_heads_that_do_not_fit_its_rows_are_refused_before_writing(inputs: Path, tmp_path: Path):
    g = small_model("qwen2", n_head=2, n_kv_head=2)  # 64 rows of Q and of K: 2 heads of 32
    for name, value in (("head_count", 3), ("head_count_kv", 3), ("key_length", 32)):
        g = with_key(g, f"qwen2.attention.{name}", u32(value))
    fail_cleanly(["patch", _write(inputs, g), "-o", tmp_path / "out.gguf"], tmp_path, "but the keys imply",
                 protect=inputs)


def test_a_target_beyond_the_stored_context_type(inputs: Path, tmp_path: Path):
    path = _write(inputs, with_key(small_model(), CTX, Value(VT.INT32, 256)))
    fail_cleanly(["patch", path, "-o", tmp_path / "out.gguf", "--ctx", str(2**31)], tmp_path,
                 "stores llama.context_length as INT32, which holds at most 2147483647", protect=inputs)


@pytest.mark.parametrize("args, needle", [
    (["--ctx", "9" * 300], "target context of 997 bits is out of range"),
    (["--scale", "1e308"], "--scale 1e+308 makes a context of inf tokens"),
    (["--scale", "inf"], "--scale must be a finite positive number"),
])
def test_absurd_targets_are_one_line(inputs: Path, tmp_path: Path, args: list[str], needle: str):
    fail_cleanly(["patch", _write(inputs, small_model()), "-o", tmp_path / "out.gguf", *args], tmp_path, needle,
                 protect=inputs)


def _undequantizable() -> list[gguf.GGMLQuantizationType]:
    """Quantization types of whole 32-value blocks that this gguf-py cannot turn into numbers."""
    found = []
    for kind, (block, size) in gguf.GGML_QUANT_SIZES.items():
        if 256 % block == 0 and block > 1:
            try:
                gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), kind)
            except NotImplementedError:
                found.append(kind)
    return found


@pytest.mark.skipif(not _undequantizable(), reason="this gguf-py dequantizes every type tried")
def test_qroar_on_weights_gguf_py_cannot_dequantize(inputs: Path, tmp_path: Path):
    kind = _undequantizable()[0]
    block, size = gguf.GGML_QUANT_SIZES[kind]
    g = with_key(small_model(n_embd=256, n_rot=64), "llama.attention.key_length", u32(64))
    g = with_tensor(g, "blk.0.attn_q.weight", type=kind, dims=(256, 128), data=b"\0" * (128 * 256 // block * size))
    g = with_tensor(g, "token_embd.weight", dims=(256, 1), data=b"\0" * 1024)
    g = with_tensor(g, "blk.0.attn_k.weight", type=QT.F32, dims=(256, 128), data=b"\0" * (128 * 256 * 4))
    path = _write(inputs, g)
    fail_cleanly(["patch", path, "-o", tmp_path / "out.gguf", "--method", "qroar"], tmp_path,
                 f"is {kind.name}, which gguf-py cannot dequantize", protect=inputs)
    result = run_cli("patch", path, "-o", tmp_path / "out.gguf", "--method", "yarn", "-q")
    assert result.returncode == 0, result.stderr


# 3. Provenance and odd values: inspect shows them, never trusts them ---------------------------------

@pytest.mark.parametrize("key, value", [
    ("qroar.params", text("[" * 100_000)),
    ("qroar.params", text("[" * 50 + "]" * 50)),
    ("qroar.params", text('{"a":' * 20 + "1" + "}" * 20)),
    ("qroar.attention_scale_folded", text("big")),
    ("qroar.factors", text("1,2")),
    ("qroar.target_context", Value(VT.FLOAT32, float("nan"))),
    ("qroar.search", text('{"objective": "ppl"}')),
    ("qroar.bands", Value(VT.ARRAY, [1.5], VT.FLOAT32)),
])
def test_malformed_provenance_is_shown_as_such(inputs: Path, tmp_path: Path, key: str, value: Value):
    g = with_key(with_key(small_model(), "qroar.method", text("qroar")), key, value)
    path = _write(inputs, g)
    summary = _inspect_json(path)
    result = run_cli("inspect", path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    if key == "qroar.search":  # well-formed JSON missing fields: shown with what it has
        assert "searched:" in result.stdout
    else:
        assert summary["qroar_malformed"] == [key] and key.removeprefix("qroar.") not in summary["qroar"]
        assert f"malformed: {key}" in result.stdout


@pytest.mark.parametrize("value", [Value(VT.FLOAT32, float("inf")), Value(VT.ARRAY, [1, 2], VT.UINT32),
                                   Value(VT.FLOAT64, float("nan")), text("Q4_K_M")])
def test_an_odd_file_type_is_shown_as_it_is(inputs: Path, value: Value):
    g = with_key(with_key(small_model(), "general.file_type", value), "llama.rope.freq_base", f32(float("nan")))
    summary = _inspect_json(_write(inputs, g))
    assert summary["file_type"] is not None and summary["rope_freq_base"] == "nan"


# 4. The terminal: what a file says is shown, never obeyed --------------------------------------------

HOSTILE = "evil\x1b]0;owned\x07\x1b[2J\nforged: line\u202e"


def test_names_from_the_file_are_escaped(inputs: Path, tmp_path: Path):
    g = with_key(small_model(), "general.name", text(HOSTILE))
    g = with_key(g, "x" + HOSTILE, u32(1))
    path = _write(inputs, g)
    shown = run_cli("inspect", path)
    assert shown.returncode == 0 and printable(HOSTILE) in shown.stdout
    assert "\x1b" not in shown.stdout and "\nforged" not in shown.stdout
    # an arch name and a tensor name reach error lines
    bad_arch = _write(inputs, with_key(small_model(), "general.architecture", text(HOSTILE)), "arch.gguf")
    line = fail_cleanly(["patch", bad_arch, "-o", tmp_path / "out.gguf"], tmp_path, "is unknown to the pinned llama.cpp",
                        protect=inputs)
    assert "\x1b" not in line and "evil\\x1b]0;owned\\x07\\x1b[2J" in line
    bad_tensor = _write(inputs, with_tensor(small_model(), "token_embd.weight", name=HOSTILE, claimed_dims=9),
                        "tensor.gguf")
    line = fail_cleanly(["inspect", bad_tensor], tmp_path, "has 9 dimensions", protect=inputs)
    assert "\x1b" not in line and "\\x1b]0;owned" in line


def test_inspect_into_a_closed_pipe_stays_quiet(inputs: Path):
    """`inspect | head`: more output than a pipe holds (a long rope_freqs), the reader gone early."""
    n = 40_000
    g = small_model()
    g = Gguf(g.keys, [*g.tensors, Tensor("rope_freqs.weight", (n,), QT.F32, struct.pack(f"<{n}f", *[1.5] * n))])
    path = _write(inputs, g)
    command = f"{sys.executable} -m qroar_gguf inspect {path} | head -c 10"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True,
                            env={**os.environ})
    assert result.stderr == "" and len(result.stdout) == 10, result.stderr
    assert result.returncode == 128 + 13  # as a process SIGPIPE stops


# 5. The output: checked before writing ----------------------------------------------------------------

def test_a_symlink_into_another_file_system_is_refused_before_writing(inputs: Path, tmp_path: Path):
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a file system of its own")
    target = other / f"qroar-test-{os.getpid()}.gguf"
    try:
        (tmp_path / "link.gguf").symlink_to(target)
        fail_cleanly(["patch", _write(inputs, small_model()), "-o", tmp_path / "link.gguf"], tmp_path,
                     "on another file system", protect=inputs)
        assert not target.exists() and not list(other.glob(f".{target.name}*"))
    finally:
        target.unlink(missing_ok=True)


@pytest.mark.parametrize("length", [230, 245, 255])
def test_a_long_output_name_is_written(inputs: Path, tmp_path: Path, length: int):
    out = tmp_path / ("m" * (length - 5) + ".gguf")
    result = run_cli("patch", _write(inputs, small_model()), "-o", out, "--ctx", "1024", "-q")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in", out.name])
