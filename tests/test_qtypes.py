"""Every --qtype llama-quantize takes: quantized by llama.cpp and loaded by libllama, refused where
llama.cpp would refuse late or write something else; the output's name and its type agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from checkpoints import write_safetensors
from qroar_gguf.choices import EXPERTS_ONLY, FILE_TYPES, NEEDS_IMATRIX, TERNARY, UNQUANTIZED
from qroar_gguf.errors import QroarError
from qroar_gguf.file_types import canonical_qtype, qtype_named_by
from qroar_gguf.gguf_io.quantize import TypeOverrides, quantize_gguf
from runs import convert_ok, fail_cleanly, run_cli

OWN_NAMES = sorted({canonical_qtype(name) for name in FILE_TYPES})
# MXFP4_MOE is refused on every model converted here (none has experts); the ternary types are written
# from a ternary model (test_ternary_types_only_for_ternary_models).
QUANTIZED = [q for q in OWN_NAMES if q not in UNQUANTIZED and q not in EXPERTS_ONLY and q not in TERNARY]


def loaded(path: Path) -> int:
    """libllama loads the file and computes finite logits for a few tokens; the file type it reads (gguf-py
    0.19 does not know every tensor type the pinned llama.cpp writes)."""
    import llama_cpp

    from qroar_gguf.evaluate.runtime import GgufModel, Runtime

    with GgufModel(path, n_gpu_layers=0) as model:
        with Runtime(model, n_ctx=64, n_batch=64, threads=2, n_gpu_layers=0) as runtime:
            runtime.decode([1, 100, 200, 300], 0, outputs=slice(None))
            assert runtime.logits().shape[0] == 4 and np.isfinite(runtime.logits()).all()
        return int(llama_cpp.llama_model_ftype(model.handle))


@pytest.fixture(scope="module")
def tiny_f16(tiny, tmp_path_factory) -> Path:
    directory, _ = tiny
    out = tmp_path_factory.mktemp("qtypes") / "tiny.F16.gguf"
    convert_ok(directory, "-o", out, "--method", "none")
    return out


@pytest.fixture(scope="module")
def tiny_imatrix(tiny_f16: Path, dev_text: Path) -> Path:
    from qroar_gguf.gguf_io.imatrix import compute_imatrix

    return compute_imatrix(tiny_f16, dev_text, ctx=256, chunks=2, threads=2, progress=False)


# Every type the tiny model's shapes allow (rows of 256 and 512: every block size divides them) ------

@pytest.mark.parametrize("qtype", QUANTIZED)
def test_each_type_quantizes_and_loads(qtype: str, tiny_f16: Path, tiny_imatrix: Path, tmp_path: Path):
    # Without a matrix wherever we allow that: a type llama.cpp refuses without one, and we do not, fails here.
    overrides = TypeOverrides(imatrix=tiny_imatrix if qtype in NEEDS_IMATRIX else None)
    out = tmp_path / f"tiny.{qtype}.gguf"
    quantize_gguf(tiny_f16, out, qtype, 2, progress=False, overrides=overrides)
    assert loaded(out) == FILE_TYPES[qtype]


def test_imatrix_types_are_refused_without_one(tiny, tmp_path: Path):
    directory, _ = tiny
    for qtype in ("IQ1_S", "iq2_xxs", "IQ2_M", "Q2_K_S"):
        line = fail_cleanly([directory, "-o", tmp_path / "x.gguf", "--qtype", qtype], tmp_path, "importance matrix")
        assert "--imatrix-text" in line and "--imatrix " in line


def test_mxfp4_moe_is_refused_on_a_dense_model(tiny, tiny_f16: Path, tmp_path: Path):
    directory, _ = tiny
    fail_cleanly([directory, "-o", tmp_path / "x.gguf", "--qtype", "MXFP4_MOE"], tmp_path, "mixture-of-experts")
    with pytest.raises(QroarError, match="mixture-of-experts"):  # bench quantizes an unquantized GGUF
        quantize_gguf(tiny_f16, tmp_path / "y.gguf", "MXFP4_MOE", 2, progress=False)
    assert not (tmp_path / "y.gguf").exists()


@pytest.mark.parametrize("qtype", TERNARY)
def test_ternary_types_only_for_ternary_models(qtype: str, tiny, tiny_f16: Path, tmp_path: Path):
    directory, tensors = tiny
    fail_cleanly([directory, "-o", tmp_path / "x.gguf", "--qtype", qtype], tmp_path, "ternary")
    with pytest.raises(QroarError, match="ternary"):  # bench quantizes an unquantized GGUF
        quantize_gguf(tiny_f16, tmp_path / "y.gguf", qtype, 2, progress=False)

    ternary = tmp_path / "ternary"
    ternary.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (directory / name).exists():
            (ternary / name).write_bytes((directory / name).read_bytes())
    rng = np.random.default_rng(1)
    trained = {name: (0.02 * rng.integers(-1, 2, values.shape)).astype(np.float32)
               if name.startswith("model.layers.") and values.ndim == 2 else values
               for name, values in tensors.items()}
    write_safetensors(ternary / "model.safetensors", trained)
    out = tmp_path / f"ternary.{qtype}.gguf"
    convert_ok(ternary, "-o", out, "--method", "none")
    assert loaded(out) == FILE_TYPES[qtype]


# The output's name and its type --------------------------------------------------------------------

@pytest.mark.parametrize(("name", "claimed"), [
    ("model.Q8_0.gguf", "Q8_0"), ("x-q5_k_m.gguf", "Q5_K_M"), ("SmolLM2-135M-Instruct-32k-Q4_K_M.gguf", "Q4_K_M"),
    ("model_iq2_xxs.gguf", "IQ2_XXS"), ("model.Q4_K.gguf", "Q4_K_M"), ("m-bf16.gguf", "BF16"), ("m.f16.gguf", "F16"),
    ("model.gguf", None), ("q4_k_m-model-32k.gguf", "Q4_K_M"), ("xq8_0.gguf", None),
])
def test_type_a_name_claims(name: str, claimed: str | None):
    assert qtype_named_by(Path(name)) == claimed


def test_output_name_chooses_the_type(tiny, tmp_path: Path):
    directory, _ = tiny
    out = tmp_path / "model.Q8_0.gguf"
    result = run_cli(directory, "-o", out, "--method", "none")
    assert result.returncode == 0, result.stderr
    assert loaded(out) == FILE_TYPES["Q8_0"]
    assert "(Q8_0 as the output's name says," in result.stdout

    alias = tmp_path / "model.q4_k.gguf"  # an alias and the type's own name agree
    convert_ok(directory, "-o", alias, "--method", "none", "--qtype", "Q4_K_M")
    assert loaded(alias) == FILE_TYPES["Q4_K_M"]


def test_contradicting_qtype_needs_force(tiny, tmp_path: Path):
    directory, _ = tiny
    out = tmp_path / "model.Q8_0.gguf"
    line = fail_cleanly([directory, "-o", out, "--qtype", "Q4_0"], tmp_path, "names Q8_0 but --qtype is Q4_0",
                        status=2)
    assert "--force" in line
    result = run_cli(directory, "-o", out, "--method", "none", "--qtype", "q4_0", "--force")
    assert result.returncode == 0, result.stderr
    assert loaded(out) == FILE_TYPES["Q4_0"]
    assert "(Q4_0 as --qtype asked," in result.stdout


def test_default_type_is_said(tiny, tmp_path: Path):
    directory, _ = tiny
    result = run_cli(directory, "-o", tmp_path / "model.gguf", "--method", "none")
    assert result.returncode == 0, result.stderr
    assert "(Q4_K_M by default," in result.stdout


def test_patch_keeps_the_type_and_warns_of_a_name(tiny, tmp_path: Path):
    directory, _ = tiny
    source = tmp_path / "in.Q8_0.gguf"
    convert_ok(directory, "-o", source, "--method", "none")
    out = tmp_path / "out.Q4_K_M.gguf"
    result = run_cli("patch", source, "-o", out, "--ctx", "4096", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().startswith("warning: out.Q4_K_M.gguf names Q4_K_M")
    assert "Q8_0" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert loaded(out) == FILE_TYPES["Q8_0"]

    agreeing = run_cli("patch", source, "-o", tmp_path / "out.32k.Q8_0.gguf", "--ctx", "4096", "-q")
    assert agreeing.returncode == 0 and agreeing.stderr == "", agreeing.stderr


def test_help_lists_types_by_family():
    result = run_cli("convert", "--help")
    assert result.returncode == 0, result.stderr
    for family in ("k-quants:", "i-quants:", "legacy:", "ternary:", "float:"):
        assert family in result.stdout
    listed = set(result.stdout.split())
    assert set(OWN_NAMES) <= listed


def test_readme_lists_types_by_family():
    from qroar_gguf.choices import QTYPE_FAMILIES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for family, (_, types) in QTYPE_FAMILIES.items():
        row = next(line for line in readme.splitlines() if line.strip().startswith(f"| {family} |"))
        assert set(row.split("|")[2].replace("`", " ").split()) == {canonical_qtype(name) for name in types}
