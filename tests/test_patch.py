"""`qroar-gguf patch`: an existing GGUF extended with every tensor copied byte for byte; real files, real
libllama (the published SmolLM2 Q4_1 GGUF, files convert makes), and a fuzzed reading path."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkpoints import gguf_tensors, write_gguf
from runs import convert_ok, digest, fail_cleanly, run_cli
from test_convert import prompt_logits

from qroar_gguf.errors import QroarError
from qroar_gguf.gguf_io.layout import read_layout
from qroar_gguf.gguf_io.provenance import read_provenance
from qroar_gguf.gguf_io.reader import field_value
from qroar_gguf.patch import PatchOptions, patch
from qroar_gguf.rope.spec import PlanSpec

CTX_KEY = "llama.context_length"


def patch_ok(source: Path, out: Path, *args) -> None:
    result = run_cli("patch", source, "-o", out, "-q", *args)
    assert result.returncode == 0, result.stderr


def fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: field_value(reader, name) for name in reader.fields if not name.startswith("GGUF.")}


def stored_keys(path: Path) -> dict:
    """Every key as stored: its types and its raw bytes (strings undecoded)."""
    reader = gguf.GGUFReader(path)
    return {name: (f.types, [bytes(np.asarray(f.parts[i])) for i in f.data]) for name, f in reader.fields.items()
            if not name.startswith("GGUF.")}


def tensor_bytes(path: Path) -> dict[str, str]:
    return {t.name: hashlib.sha256(np.asarray(t.data).tobytes()).hexdigest() for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def tokens(smollm2_gguf: Path) -> list[int]:
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(smollm2_gguf), vocab_only=True, verbose=False)
    text = Path(__file__).with_name("test_patch.py").read_text()[:6000]  # any real text
    return vocab.tokenize(text.encode(), add_bos=False)[:600]


# 1. The published SmolLM2 Q4_1 GGUF ------------------------------------------------------------------

@pytest.fixture(scope="module")
def linear_patch(smollm2_gguf: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("patch") / "linear.Q4_1.gguf"
    patch_ok(smollm2_gguf, out, "--method", "linear", "--ctx", "16384", "--modelfile", out.with_name("Modelfile"))
    return out


def test_every_tensor_is_copied_byte_for_byte(smollm2_gguf: Path, linear_patch: Path):
    before, after = tensor_bytes(smollm2_gguf), tensor_bytes(linear_patch)
    assert "rope_freqs.weight" not in before
    assert {k: v for k, v in after.items() if k != "rope_freqs.weight"} == before
    rope = gguf_tensors(linear_patch)["rope_freqs.weight"]
    assert rope.tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(np.asarray(rope.data), np.full(32, 2.0, dtype=np.float32))


def test_every_other_key_is_kept(smollm2_gguf: Path, linear_patch: Path):
    old, new = fields(smollm2_gguf), fields(linear_patch)
    assert new.pop(CTX_KEY) == 16384 and old.pop(CTX_KEY) == 8192
    made = {k: new.pop(k) for k in list(new) if k.startswith("qroar.")}
    assert new == old
    assert made["qroar.method"] == "linear" and made["qroar.trained_context"] == 8192
    assert made["qroar.source"] == smollm2_gguf.name and made["qroar.attention_factor"] == 1.0
    assert "llama.rope.scaling.attn_factor" not in new  # linear has no attention scale: nothing written
    old, new = stored_keys(smollm2_gguf), stored_keys(linear_patch)
    assert {k: v for k, v in new.items() if k != CTX_KEY and not k.startswith("qroar.")} == \
        {k: v for k, v in old.items() if k != CTX_KEY}  # same types, same bytes


def test_linear_patch_equals_runtime_linear_scaling(smollm2_gguf: Path, linear_patch: Path, tokens: list[int]):
    patched = prompt_logits(linear_patch, tokens, n_ctx=1024)
    runtime = prompt_logits(smollm2_gguf, tokens, n_ctx=1024, rope_freq_scale=0.5)
    unscaled = prompt_logits(smollm2_gguf, tokens, n_ctx=1024)
    np.testing.assert_allclose(patched, runtime, rtol=0, atol=1e-3)
    assert np.abs(patched - unscaled).max() > 0.1  # the factors really act


def test_the_patched_file_runs_at_its_new_context(linear_patch: Path):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(linear_patch), n_ctx=0, verbose=False)  # 0: the file's context
    try:
        assert llm.n_ctx() == 16384
        out = llm("Once upon a time", max_tokens=8, temperature=0.0)
        assert out["choices"][0]["text"].strip()
    finally:
        llm.close()


def test_the_modelfile_names_the_file_its_context_and_template(linear_patch: Path):
    text = linear_patch.with_name("Modelfile").read_text()
    lines = text.splitlines()
    assert lines[0] == f"FROM ./{linear_patch.name}" and lines[1] == "PARAMETER num_ctx 16384"
    assert "<|im_start|>{{ .Role }}" in text and 'PARAMETER stop "<|im_end|>"' in text


# 2. Against convert on the same source ---------------------------------------------------------------

@pytest.fixture(scope="module")
def unscaled_f32(smollm2_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unscaled") / "none.F32.gguf"
    convert_ok(smollm2_dir, "-o", out, "--method", "none", "--qtype", "F32")
    return out


def test_qroar_patch_equals_qroar_convert(smollm2_dir: Path, tmp_path: Path):
    """Sensitivity measured from the file's own attn_q/attn_k (F16 here) gives the checkpoint's factors."""
    unscaled, patched, converted = tmp_path / "none.F16.gguf", tmp_path / "patched.gguf", tmp_path / "converted.gguf"
    convert_ok(smollm2_dir, "-o", unscaled, "--method", "none", "--qtype", "F16")
    patch_ok(unscaled, patched, "--method", "qroar", "--ctx", "16384", "--beta", "4")
    convert_ok(smollm2_dir, "-o", converted, "--method", "qroar", "--ctx", "16384", "--beta", "4", "--qtype", "F32")
    ours, theirs = (np.asarray(gguf_tensors(p)["rope_freqs.weight"].data) for p in (patched, converted))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    assert not np.allclose(ours, ours[0])  # qroar's factors, not a constant


def test_patch_folds_the_attention_scale_as_convert_does(smollm2_dir: Path, unscaled_f32: Path, tmp_path: Path,
                                                         tokens: list[int]):
    """yarn's attention scale: convert folds it into W_Q/W_K before quantizing, patch into the stored rows of
    W_Q/W_K (F32 here, so exactly); --attn-factor-key writes <arch>.rope.scaling.attn_factor instead, which
    llama.cpp multiplies into the rotation. All three give the same logits; without the scale they do not."""
    converted, patched, keyed, unscaled = (tmp_path / f"{n}.gguf" for n in ("c", "p", "k", "n"))
    convert_ok(smollm2_dir, "-o", converted, "--method", "yarn", "--ctx", "16384", "--qtype", "F32")
    patch_ok(unscaled_f32, patched, "--method", "yarn", "--ctx", "16384")
    patch_ok(unscaled_f32, keyed, "--method", "yarn", "--ctx", "16384", "--attn-factor-key")
    patch_ok(unscaled_f32, unscaled, "--method", "yarn", "--ctx", "16384", "--no-attn-scale")
    t = 0.1 * np.log(2.0) + 1.0
    assert "llama.rope.scaling.attn_factor" not in fields(patched)
    assert fields(patched)["qroar.attention_scale_folded"] == pytest.approx(t, rel=1e-6)
    assert fields(keyed)["llama.rope.scaling.attn_factor"] == pytest.approx(t, rel=1e-6)
    before, after = tensor_bytes(unscaled_f32), tensor_bytes(patched)
    changed = {name for name in before if before[name] != after[name]} - {"rope_freqs.weight"}  # multiplied into
    assert changed == {f"blk.{i}.attn_{p}.weight" for i in range(30) for p in "qk"}
    ours, theirs = gguf_tensors(patched), gguf_tensors(converted)
    np.testing.assert_allclose(np.asarray(ours["blk.3.attn_k.weight"].data),
                               np.asarray(theirs["blk.3.attn_k.weight"].data), rtol=1e-6)
    reference = prompt_logits(converted, tokens, n_ctx=1024)
    for made in (patched, keyed):
        same = np.abs(prompt_logits(made, tokens, n_ctx=1024) - reference)
        assert same.mean() < 0.01 and same.max() < 0.2
    other = np.abs(prompt_logits(unscaled, tokens, n_ctx=1024) - reference)
    assert other.mean() > 0.05


# 3. Bad input: one line, non-zero exit, nothing left behind, input untouched ----------------------------

def small_gguf(path: Path, arch: str = "llama", *, attn_q: bool = True, extra=None,
               endianess: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE) -> Path:
    """A one-layer model GGUF of a few KiB: enough for patch's reading path (not for llama.cpp), with
    arrays of numbers and of strings (one not valid UTF-8, as a byte-level token may be)."""
    w = gguf.GGUFWriter(path, arch, endianess=endianess)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(32)
    w.add_rope_freq_base(10000.0)
    w.add_key_value("tokenizer.ggml.tokens", [b"a", b"\xff\xfe", "é".encode()], gguf.GGUFValueType.ARRAY,
                    sub_type=gguf.GGUFValueType.STRING)
    w.add_array("tokenizer.ggml.token_type", [1, 1, 3])
    w.add_uint64("general.parameter_count", 2**40)
    if extra is not None:
        extra(w)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((16, 64)).astype(np.float32))
    if attn_q:
        w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((64, 64)).astype(np.float16))
    k = gguf.quants.quantize(rng.standard_normal((64, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_k.weight", k, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    write_gguf(w)
    return path


def test_a_small_file_patches(inputs: Path, tmp_path: Path):
    """The fuzz test's seed is valid, so what it finds are the mutations."""
    source = small_gguf(inputs / "small.gguf")
    out = tmp_path / "out.gguf"
    patch_ok(source, out, "--method", "qroar", "--ctx", "1024")
    copied, before = tensor_bytes(out), tensor_bytes(source)
    assert copied.pop("rope_freqs.weight")
    # qroar on a yarn base: YaRN's attention scale went into attn_q (F16) and attn_k (Q8_0's block scales)
    assert {k for k in before if copied[k] != before[k]} == {"blk.0.attn_q.weight", "blk.0.attn_k.weight"}
    assert fields(out)[CTX_KEY] == 1024
    old, new = stored_keys(source), stored_keys(out)
    assert {k: v for k, v in new.items() if k != CTX_KEY and not k.startswith("qroar.")} == \
        {k: v for k, v in old.items() if k != CTX_KEY}


@pytest.fixture()
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    return folder


def _offsets(path: Path) -> dict[str, int]:
    """A byte offset inside each section of the file."""
    reader = gguf.GGUFReader(path)
    first_key = min(int(f.offset) for name, f in reader.fields.items() if not name.startswith("GGUF."))
    return {"header": 10, "key/value section": first_key + 12, "tensor info": int(reader.tensors[0].field.offset) + 10,
            "tensor data": int(reader.tensors[-1].data_offset) + 10}


@pytest.mark.parametrize("section", ["header", "key/value section", "tensor info", "tensor data"])
def test_a_truncated_file_is_refused(inputs: Path, tmp_path: Path, section: str):
    whole = small_gguf(inputs / "whole.gguf")
    cut = inputs / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[: _offsets(whole)[section]])
    fail_cleanly(["patch", cut, "-o", tmp_path / "out.gguf"], tmp_path, "truncated", protect=inputs)


ARCH_CASES = ("mamba", "qwen2vl", "starcoder2", "no-such-arch")  # refused by their arch


@pytest.mark.parametrize("case, needle", [
    ("not_gguf", "not a readable GGUF file"),
    ("mamba", "has no RoPE"),
    ("qwen2vl", "multimodal RoPE"),
    ("starcoder2", "does not patch it yet"),
    ("no-such-arch", "unknown to the pinned llama.cpp"),
    ("missing_attn_q", "has no blk.0.attn_q.weight"),
    ("same_file", "same file"),
    ("patched_twice", "already made or patched by qroar-gguf"),
    ("band_scales", "--band-scales rescales W_Q/W_K"),
    ("big_endian", "big-endian"),
    ("split", "one of 2 parts of a split GGUF"),
    ("yarn_scaled", "already scales RoPE its own way (rope.scaling.type 'yarn'"),
    ("longrope", "rope_factors_long"),
])
def test_bad_input_is_refused(inputs: Path, tmp_path: Path, case: str, needle: str):
    extra = {
        "split": lambda w: w.add_uint16("split.count", 2),
        "yarn_scaled": lambda w: w.add_string("llama.rope.scaling.type", "yarn"),
        "longrope": lambda w: w.add_tensor("rope_factors_long.weight", np.ones(16, dtype=np.float32)),
    }.get(case)
    source = small_gguf(inputs / "model.gguf", case if case in ARCH_CASES else "llama",
                        attn_q=case != "missing_attn_q", extra=extra,
                        endianess=gguf.GGUFEndian.BIG if case == "big_endian" else gguf.GGUFEndian.LITTLE)
    out, extra = tmp_path / "out.gguf", []
    if case == "not_gguf":
        source.write_bytes(b"PK\x03\x04 this is a zip file, not a model" * 10)
    elif case == "same_file":
        out = source
    elif case == "patched_twice":
        patch_ok(source, inputs / "once.gguf", "--ctx", "1024")
        source.unlink()
        source = inputs / "once.gguf"
    elif case == "band_scales":
        extra = ["--band-scales", "1,1,1.1,1"]
    status = 2 if case == "same_file" else 1
    fail_cleanly(["patch", source, "-o", out, *extra], tmp_path, needle, protect=inputs, status=status)


def test_force_patches_a_patched_file_again(inputs: Path, tmp_path: Path):
    source = small_gguf(inputs / "model.gguf")
    once, twice = tmp_path / "once.gguf", tmp_path / "twice.gguf"
    patch_ok(source, once, "--method", "linear", "--ctx", "512")
    patch_ok(once, twice, "--method", "linear", "--ctx", "1024", "--force")
    rope = np.asarray(gguf_tensors(twice)["rope_freqs.weight"].data)
    np.testing.assert_array_equal(rope, np.full(16, 4.0, dtype=np.float32))  # 2 x 2: compounded, as said
    made = read_provenance(read_layout(twice))
    assert made["trained_context"] == 512 and made["target_context"] == 1024
    assert made["source_factors"] == [2.0] * 16


# 4. Fuzz: mutated small files fail cleanly or patch -------------------------------------------------

FUZZ = settings(max_examples=int(os.environ.get("QROAR_FUZZ_EXAMPLES", "300")), deadline=timedelta(seconds=20),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def mutations(draw, size: int):
    kind = draw(st.sampled_from(["flip", "truncate", "overwrite", "insert"]))
    at = draw(st.integers(0, size - 1))
    if kind == "truncate":
        return kind, at, b""
    return kind, at, draw(st.binary(min_size=1, max_size=8))


def test_mutated_files_fail_only_cleanly(tmp_path_factory):
    seed = small_gguf(tmp_path_factory.mktemp("seed") / "seed.gguf").read_bytes()

    @FUZZ
    @given(changes=st.lists(mutations(len(seed)), min_size=1, max_size=3))
    def check(changes):
        blob = bytearray(seed)
        for kind, at, data in changes:
            at = min(at, max(len(blob) - 1, 0))
            if kind == "flip" and blob:
                blob[at] ^= data[0] or 1
            elif kind == "truncate":
                del blob[at:]
            elif kind == "overwrite":
                blob[at:at + len(data)] = data
            else:
                blob[at:at] = data
        with tempfile.TemporaryDirectory() as tmp:
            source, out = Path(tmp) / "in.gguf", Path(tmp) / "out.gguf"
            source.write_bytes(bytes(blob))
            try:
                patch(source, out, PatchOptions(plan=PlanSpec("qroar"), target_ctx=1024, progress=False))
            except QroarError as exc:
                assert str(exc) and "\n" not in str(exc)
                assert not out.exists()
            else:  # a mutation patch accepts (a changed value, say) still gives an exact copy, but for the
                copied, before = tensor_bytes(out), tensor_bytes(source)  # rows carrying yarn's attention scale
                carriers = {"blk.0.attn_q.weight", "blk.0.attn_k.weight"}
                assert copied.pop("rope_freqs.weight")
                assert {k: v for k, v in copied.items() if k not in carriers} == \
                    {k: v for k, v in before.items() if k not in carriers}
            assert source.read_bytes() == bytes(blob)
            assert sorted(p.name for p in Path(tmp).iterdir()) in (["in.gguf"], ["in.gguf", "out.gguf"])

    check()


def test_the_input_is_never_written(smollm2_gguf: Path, tmp_path: Path):
    (tmp_path / "in").mkdir()
    shutil.copyfile(smollm2_gguf, tmp_path / "in" / "copy.gguf")
    before = digest(tmp_path / "in")
    patch_ok(tmp_path / "in" / "copy.gguf", tmp_path / "out.gguf", "--ctx", "16384")
    assert digest(tmp_path / "in") == before


# 5. Copy-on-write file systems: the copied tensors' blocks shared, the same bytes -----------------------

def _spread_gguf(path: Path) -> Path:
    """A small llama GGUF whose copied tensors span many blocks, with odd-sized tensors between them and
    their padding filled with non-zero bytes (which a patched file must not carry over)."""
    rng = np.random.default_rng(1)

    def extra(w: gguf.GGUFWriter) -> None:
        w.add_tensor("output.weight", rng.standard_normal((4000, 64)).astype(np.float32))
        w.add_tensor("blk.0.ffn_norm.weight", np.ones(65, dtype=np.float32))  # 260 bytes: 28 of padding
        w.add_tensor("blk.0.ffn_down.weight", rng.standard_normal((3000, 64)).astype(np.float32))

    small_gguf(path, extra=extra)
    layout = read_layout(path)
    ends = sorted((t.data_offset + t.n_bytes, t.data_offset) for t in layout.tensors)
    starts = sorted(t.data_offset for t in layout.tensors)
    with open(path, "r+b") as f:
        for (end, _), start in zip(ends, starts[1:]):
            f.seek(end)
            f.write(b"\xab" * (start - end))
    return path


def _clone_by_copying(calls: list):
    """FICLONERANGE done as a copy of the range: the bytes a file system that shares blocks leaves."""
    from qroar_gguf.gguf_io import rewrite

    def ioctl(fd: int, request: int, arg: bytes) -> int:
        assert request == rewrite._FICLONERANGE
        src, start, length, dest = struct.unpack("<qQQQ", arg)
        assert start % rewrite.CLONE_BLOCK == 0 and dest % rewrite.CLONE_BLOCK == 0
        os.pwrite(fd, os.pread(src, length, start), dest)
        calls.append((start, length, dest))
        return 0
    return ioctl


@pytest.mark.parametrize("method", ["yarn", "linear"])
def test_a_cloned_patch_has_the_bytes_of_a_copied_one(inputs: Path, tmp_path: Path, monkeypatch, method: str):
    """The output's bytes never depend on whether its blocks could be shared: the copied tensors cloned as one
    range, then the header, rope_freqs, the rescaled W_Q/W_K and the padding written over it."""
    from qroar_gguf.gguf_io import rewrite

    source = _spread_gguf(inputs / "spread.gguf")
    copied, cloned = tmp_path / "copied.gguf", tmp_path / "cloned.gguf"
    options = PatchOptions(plan=PlanSpec(method=method), target_ctx=1024, progress=False)

    def unsupported(*_):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(rewrite, "fcntl", SimpleNamespace(ioctl=unsupported))
    patch(source, copied, options)
    calls: list = []
    monkeypatch.setattr(rewrite, "fcntl", SimpleNamespace(ioctl=_clone_by_copying(calls)))
    patch(source, cloned, options)
    assert len(calls) == 1 and calls[0][1] >= 1 << 20
    assert cloned.read_bytes() == copied.read_bytes()
    assert tensor_bytes(cloned)["output.weight"] == tensor_bytes(source)["output.weight"]


def test_copied_tensors_lie_where_they_lay_modulo_a_block(inputs: Path, tmp_path: Path):
    """qroar.padding puts every copied tensor at its input offset modulo 4096 (so a file system can share
    its blocks), and is neither provenance nor carried into a second patch as it was."""
    from qroar_gguf.gguf_io.rewrite import CLONE_BLOCK

    source = _spread_gguf(inputs / "spread.gguf")
    out, again = tmp_path / "out.gguf", tmp_path / "again.gguf"
    patch_ok(source, out, "--method", "linear", "--ctx", "1024")
    patch_ok(out, again, "--method", "linear", "--ctx", "2048", "--force")
    before = {t.name: t.data_offset for t in read_layout(source).tensors}
    for path in (out, again):
        layout = read_layout(path)
        assert {name: t.data_offset % CLONE_BLOCK for name, t in ((t.name, t) for t in layout.tensors)
                if name in before and name != "blk.0.attn_q.weight"} == \
            {name: offset % CLONE_BLOCK for name, offset in before.items() if name != "blk.0.attn_q.weight"}
        assert list(layout.fields)[-1] == "qroar.padding" and "padding" not in read_provenance(layout)
        assert sum(name == "qroar.padding" for name in layout.fields) == 1


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def test_blocks_are_shared_on_a_copy_on_write_file_system(smollm2_gguf: Path, tmp_path: Path):
    """With $QROAR_COW_DIR on btrfs or XFS (reflink=1): the patched file shares all but a few of its
    blocks with the input (filefrag's `shared`), and has the bytes of the same patch made on this one."""
    cow = os.environ.get("QROAR_COW_DIR")
    if not cow or shutil.which("filefrag") is None:
        pytest.skip("set QROAR_COW_DIR to a folder on btrfs or XFS (reflink) to check sharing")
    folder = Path(tempfile.mkdtemp(dir=cow))
    try:
        source = folder / smollm2_gguf.name
        shutil.copyfile(smollm2_gguf, source)
        here = tmp_path / "in"
        here.mkdir()
        shutil.copyfile(smollm2_gguf, here / smollm2_gguf.name)
        patch_ok(source, folder / "out.gguf", "--method", "yarn", "--ctx", "16384")
        patch_ok(here / smollm2_gguf.name, tmp_path / "out.gguf", "--method", "yarn", "--ctx", "16384")
        assert _sha256(folder / "out.gguf") == _sha256(tmp_path / "out.gguf")
        extents = subprocess.run(["filefrag", "-v", folder / "out.gguf"], capture_output=True, text=True).stdout
        shared = sum(int(line.split(":")[3]) for line in extents.splitlines()
                     if line.strip()[:1].isdigit() and "shared" in line)
        assert shared * 4096 > 0.5 * (folder / "out.gguf").stat().st_size
    finally:
        shutil.rmtree(folder)
