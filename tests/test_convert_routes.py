"""`convert` of architectures qroar-gguf has no converter for: llama.cpp's convert_hf_to_gguf.py (the pinned
sdist's, with its own gguf-py), then patch's plan step, then the quantizer. Tiny random checkpoints built by
transformers (Qwen3-MoE and OLMo 2: keys-only arches), run by the real libllama: the extended file alone must
give the logits llama.cpp's runtime YaRN flags give on the plain converted file. Where both routes exist
(Qwen3: our converter with --allow-patched-runtime, llama.cpp's with keys) the two files are compared."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from checkpoints import convert_with_llama_cpp, gguf_tensors, loads_beyond
from runs import assert_clean_failure, fail_cleanly, processes_naming, run_cli
from test_convert import prompt_logits
from test_keys_route import FAMILIES, N_CTX, TARGET, TRAINED, runtime_options
from test_patch import fields

pytest.importorskip("torch")
pytest.importorskip("transformers")

DELEGATED = ("qwen3moe", "olmo2")


def _build(arch: str, folder: Path, smollm2_dir: Path) -> Path:
    from test_families import build

    config_class, model_class, overrides = FAMILIES[arch]
    return build(folder / "ckpt", smollm2_dir, config_class, model_class, max_position_embeddings=TRAINED,
                 **overrides)


@pytest.fixture(scope="module")
def tokens() -> list[int]:
    """test_keys_route's tokens: a MoE router's near-ties (an expert chosen by a margin below float rounding)
    move a logit by more than the tolerance on some prompts, whichever route wrote the file."""
    return [int(t) for t in np.random.default_rng(3).integers(0, 49152, 64)]


@pytest.fixture(scope="module", params=DELEGATED)
def delegated(request, smollm2_dir: Path, tmp_path_factory) -> tuple[str, Path, Path, Path]:
    """(arch, checkpoint, the plain F32 file llama.cpp's converter writes, `convert --method yarn` as F32)."""
    arch = request.param
    folder = tmp_path_factory.mktemp(arch)
    ckpt = _build(arch, folder, smollm2_dir)
    plain = convert_with_llama_cpp(ckpt, folder / "plain.F32.gguf")
    out = folder / "out" / "yarn.F32.gguf"
    out.parent.mkdir()
    result = run_cli(ckpt, "-o", out, "--method", "yarn", "--ctx", TARGET, "--modelfile", out.parent / "Modelfile")
    assert result.returncode == 0, result.stderr
    assert "convert_hf_to_gguf.py" in result.stdout and f"GGUF arch {arch}" in result.stdout, result.stdout
    return arch, ckpt, plain, out


def test_the_delegated_file_alone_gives_llama_cpp_runtime_yarn(delegated, tokens: list[int]):
    arch, _, plain, out = delegated
    unscaled = prompt_logits(plain, tokens, n_ctx=N_CTX)
    runtime = prompt_logits(plain, tokens, n_ctx=N_CTX, **runtime_options("yarn", plain, arch))
    alone = prompt_logits(out, tokens, n_ctx=N_CTX)
    scale = np.abs(runtime).max()
    assert np.abs(unscaled - runtime).max() > 0.05 * scale  # YaRN shows in these logits
    print(f"{arch}: max |logit difference| / max |logit| = {np.abs(alone - runtime).max() / scale:.2e}")
    np.testing.assert_allclose(alone, runtime, rtol=0, atol=2e-4 * scale)


def test_the_delegated_file_is_patch_of_the_converted_file(delegated, tmp_path: Path):
    """The plan step is patch's own: every tensor and rope key as `patch` writes them on llama.cpp's file."""
    from qroar_gguf.patch import PatchOptions, patch
    from qroar_gguf.rope.spec import PlanSpec

    arch, _, plain, out = delegated
    patched = tmp_path / "patched.gguf"
    patch(plain, patched, PatchOptions(plan=PlanSpec("yarn"), target_ctx=TARGET, progress=False))
    a, b = gguf_tensors(out), gguf_tensors(patched)
    assert a.keys() == b.keys() and all(bytes(a[n].data) == bytes(b[n].data) for n in a)
    ka, kb = fields(out), fields(patched)
    assert {k: v for k, v in ka.items() if ".rope." in k or k.endswith("context_length")} == \
        {k: v for k, v in kb.items() if ".rope." in k or k.endswith("context_length")}


def test_the_delegated_file_carries_the_keys_and_the_raised_context(delegated):
    """llama.cpp's rope keys (no rope_freqs: the loader would refuse it), the kernel's factor cancelled and the
    temperature in the q/k norms; every other tensor as the converter wrote it; loads at the new context;
    the Modelfile names it; nothing else left in the folder."""
    arch, _, plain, out = delegated
    keys = fields(out)
    assert keys[f"{arch}.context_length"] == TARGET
    assert keys[f"{arch}.rope.scaling.type"] == "yarn"
    assert keys[f"{arch}.rope.scaling.original_context_length"] == TRAINED
    m = 1.0 + 0.1 * math.log(TARGET / TRAINED)
    assert keys[f"{arch}.rope.scaling.attn_factor"] == pytest.approx(1 / m, rel=1e-6)
    assert keys["qroar.method"] == "yarn"
    before, after = gguf_tensors(plain), gguf_tensors(out)
    assert "rope_freqs.weight" not in after and before.keys() == after.keys()
    changed = {n.split(".", 2)[2] for n in before if bytes(before[n].data) != bytes(after[n].data)}
    assert changed == {"attn_q_norm.weight", "attn_k_norm.weight"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", out.name]
    assert out.parent.joinpath("Modelfile").read_text().splitlines()[:2] == [
        f"FROM ./{out.name}", f"PARAMETER num_ctx {TARGET}"]
    summary = json.loads(run_cli("inspect", out, "--json").stdout)["context_shift"]
    assert summary["exact"], summary
    loads_beyond(out, TARGET, TRAINED, 32)


def test_a_quantized_delegated_file_keeps_the_intermediate_only_when_asked(delegated, tmp_path: Path):
    arch, ckpt, _, _ = delegated
    if arch != "olmo2":
        pytest.skip("one quantized run is enough")
    out, kept = tmp_path / "x.Q8_0.gguf", tmp_path / "x.F32.gguf"
    result = run_cli(ckpt, "-o", out, "--method", "linear", "--ctx", TARGET, "--keep-f16", kept, "-q")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, kept.name])
    assert fields(out)["general.file_type"] == 7  # MOSTLY_Q8_0
    assert fields(out)[f"{arch}.rope.scaling.factor"] == TARGET / TRAINED
    assert fields(kept)[f"{arch}.context_length"] == TARGET


def test_per_pair_plans_are_refused_before_converting(delegated, tmp_path: Path):
    arch, ckpt, _, _ = delegated
    line = fail_cleanly([ckpt, "-o", tmp_path / "x.gguf", "--method", "qroar", "--ctx", TARGET], tmp_path,
                        "rope_freqs", protect=ckpt)
    assert f"{arch} loader does not read it" in line and "--method yarn" in line
    fail_cleanly([ckpt, "-o", tmp_path / "x.gguf", "--method", "linear", "--band-scales", "1,1,1,2"], tmp_path,
                 "llama.cpp's converter")


def test_native_refuses_what_it_does_not_convert(delegated, tmp_path: Path):
    _, ckpt, _, _ = delegated
    fail_cleanly([ckpt, "-o", tmp_path / "x.gguf", "--converter", "native"], tmp_path, "unsupported architecture")


# Qwen3: both routes --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen3(smollm2_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("qwen3")
    ckpt = _build("qwen3", folder, smollm2_dir)
    return ckpt, convert_with_llama_cpp(ckpt, folder / "plain.F32.gguf")


def test_qwen3_takes_llama_cpp_keys_unless_a_patched_runtime_is_allowed(qwen3, tokens: list[int], tmp_path: Path):
    """Stock runtimes: llama.cpp's converter and keys (by default). --allow-patched-runtime: our converter and
    rope_freqs (our build). Both are runtime YaRN: same logits up to float rounding; what differs is where the
    plan lives (keys and attn_factor 1/m, or rope_freqs and qroar.needs_patch), and which runtimes load it."""
    ckpt, plain = qwen3
    keys_file, freqs_file = tmp_path / "keys.F32.gguf", tmp_path / "freqs.F32.gguf"
    for out, extra in ((keys_file, []), (freqs_file, ["--allow-patched-runtime"])):
        result = run_cli(ckpt, "-o", out, "--method", "yarn", "--ctx", TARGET, *extra)
        assert result.returncode == 0, result.stderr
        assert ("convert_hf_to_gguf.py" in result.stdout) == (not extra), result.stdout
    k, f = fields(keys_file), fields(freqs_file)
    assert k["qwen3.rope.scaling.type"] == "yarn" and "rope_freqs.weight" not in gguf_tensors(keys_file)
    assert "qwen3.rope.scaling.type" not in f and "rope_freqs.weight" in gguf_tensors(freqs_file)
    assert f["qroar.needs_patch"] == "0001-qwen3-optional-rope-freqs.patch" and "qroar.needs_patch" not in k
    runtime = prompt_logits(plain, tokens, n_ctx=N_CTX, **runtime_options("yarn", plain, "qwen3"))
    scale = np.abs(runtime).max()
    via_keys, via_freqs = prompt_logits(keys_file, tokens, n_ctx=N_CTX), prompt_logits(freqs_file, tokens, n_ctx=N_CTX)
    print(f"qwen3 keys vs runtime {np.abs(via_keys - runtime).max() / scale:.2e}, rope_freqs vs runtime "
          f"{np.abs(via_freqs - runtime).max() / scale:.2e}, keys vs rope_freqs "
          f"{np.abs(via_keys - via_freqs).max() / scale:.2e} (of the largest logit)")
    np.testing.assert_allclose(via_keys, runtime, rtol=0, atol=2e-4 * scale)
    np.testing.assert_allclose(via_freqs, runtime, rtol=0, atol=2e-4 * scale)
    result = run_cli(ckpt, "-o", tmp_path / "forced.F32.gguf", "--method", "yarn", "--ctx", TARGET,
                     "--converter", "native")
    assert result.returncode != 0 and "--allow-patched-runtime" in result.stderr  # native insists: refused


# Bad input ------------------------------------------------------------------------------------------------

def test_missing_torch_is_one_line(qwen3, tmp_path: Path):
    """A Python where `import torch` fails (a stand-in package that raises as a missing one does): one line
    with the install hint, nothing written."""
    ckpt, _ = qwen3
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")])}
    result = run_cli(ckpt, "-o", out_dir / "x.gguf", "--ctx", TARGET, env=env)
    assert_clean_failure(result, out_dir, set(), "needs torch")
    assert "pip install" in result.stderr


def test_missing_torch_is_found_before_converting(monkeypatch):
    from qroar_gguf import llama_converter
    from qroar_gguf.errors import QroarError

    real = llama_converter.importlib.util.find_spec
    monkeypatch.setattr(llama_converter.importlib.util, "find_spec", lambda n, *a: None if n == "torch" else real(n, *a))
    with pytest.raises(QroarError, match=r"needs torch, which this Python lacks: pip install"):
        llama_converter.check_converter_runs()


@pytest.mark.parametrize(("architecture", "needle"), [
    ("NoSuchModelForCausalLM", "neither qroar-gguf nor llama.cpp's converter"),
    ("BertModel", "bert has no RoPE"),
    ("Qwen2VLForConditionalGeneration", "multimodal RoPE"),
])
def test_architectures_llama_cpp_does_not_take_or_we_cannot_extend(tiny, tmp_path: Path, architecture: str,
                                                                   needle: str):
    import shutil

    source, _ = tiny
    ckpt = tmp_path / "ckpt"
    shutil.copytree(source, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "architectures": [architecture]}))
    (tmp_path / "out").mkdir()
    fail_cleanly([ckpt, "-o", tmp_path / "out" / "x.gguf"], tmp_path / "out", needle, protect=ckpt)


def test_the_gguf_arch_is_read_from_the_converters_source():
    from qroar_gguf.llama_converter import converter_gguf_arch

    expected = {"Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3moe", "Gemma3ForCausalLM": "gemma3",
                "Gemma2ForCausalLM": "gemma2", "Phi3ForCausalLM": "phi3", "Olmo2ForCausalLM": "olmo2",
                "Glm4ForCausalLM": "glm4", "LlamaForCausalLM": "llama", "DeepseekV3ForCausalLM": "deepseek2",
                "GraniteForCausalLM": "granite", "NoSuchModelForCausalLM": None}
    assert {hf: converter_gguf_arch(hf) for hf in expected} == expected


def test_a_checkpoint_that_already_scales_rope_is_refused_before_converting(qwen3, tmp_path: Path):
    """Qwen3's published YaRN config (rope_scaling yarn x4 over 32768): llama.cpp's converter would write it as
    the file's own YaRN, which a plan cannot extend exactly; refused before the conversion."""
    import shutil

    source, _ = qwen3
    ckpt = tmp_path / "ckpt"
    shutil.copytree(source, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": TRAINED}
    (ckpt / "config.json").write_text(json.dumps(config))
    (tmp_path / "out").mkdir()
    fail_cleanly([ckpt, "-o", tmp_path / "out" / "x.gguf", "--ctx", TARGET], tmp_path / "out",
                 "already scales RoPE its own way (rope_scaling 'yarn')", protect=ckpt)


def test_sigterm_to_the_main_process_alone_kills_llama_cpps_converter(qwen3, tmp_path: Path):
    """`kill PID` while llama.cpp's converter runs: the converter goes too, nothing is left in the folder."""
    import signal
    import subprocess
    import sys
    import time

    ckpt, _ = qwen3
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "qroar_gguf", str(ckpt), "-o", str(out / "x.gguf"), "--ctx",
                             str(TARGET), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not processes_naming("convert_hf_to_gguf.py", out):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the converter never started"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 143
    time.sleep(0.2)
    assert processes_naming("convert_hf_to_gguf.py", out) == [] and list(out.iterdir()) == []


@pytest.mark.parametrize(("dtype", "qtype", "method", "expected"), [
    ("F32", "Q4_K_M", "yarn", "f32"), ("F16", "Q4_K_M", "yarn", "f16"), ("F16", "F32", "yarn", "f32"),
    # BF16 rows cannot carry YaRN's temperature exactly: the intermediate is F32 (exact) when a plan folds one
    ("BF16", "Q4_K_M", "yarn", "f32"), ("BF16", "Q4_K_M", "linear", "bf16"), ("BF16", "BF16", "linear", "bf16"),
])
def test_the_intermediate_type_follows_the_source(smollm2_dir: Path, tmp_path: Path, dtype: str, qtype: str,
                                                  method: str, expected: str):
    from checkpoints import make_tiny_llama

    from qroar_gguf.convert import ConvertOptions
    from qroar_gguf.llama_converter import Delegated, outtype_for
    from qroar_gguf.rope.spec import PlanSpec
    from qroar_gguf.source.checkpoint import open_checkpoint

    ckpt, _ = make_tiny_llama(tmp_path / "ckpt", smollm2_dir, dtype=dtype)
    src = Delegated(open_checkpoint(ckpt), "LlamaForCausalLM", "llama")
    assert outtype_for(src, ConvertOptions(plan=PlanSpec(method), qtype=qtype)) == expected


def test_native_convert_writes_the_modelfile_too(tiny, tmp_path: Path):
    source, _ = tiny
    out = tmp_path / "x.F16.gguf"
    result = run_cli(source, "-o", out, "--qtype", "F16", "--ctx", "4096", "--modelfile", tmp_path / "Modelfile")
    assert result.returncode == 0, result.stderr
    assert "convert_hf_to_gguf.py" not in result.stdout and "wrote " + str(tmp_path / "Modelfile") in result.stdout
    text = (tmp_path / "Modelfile").read_text()
    assert text.startswith(f"FROM ./{out.name}\nPARAMETER num_ctx 4096\n") and "<|im_start|>{{ .Role }}" in text


def test_search_needs_our_own_converter(tiny, tmp_path: Path):
    import shutil

    source, _ = tiny
    ckpt = tmp_path / "ckpt"
    shutil.copytree(source, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "architectures": ["Olmo2ForCausalLM"]}))
    (tmp_path / "out").mkdir()
    fail_cleanly([ckpt, "-o", tmp_path / "out" / "x.gguf", "--search"], tmp_path / "out",
                 "Olmo2ForCausalLM goes through llama.cpp's", protect=ckpt)
