"""llama.cpp's own programs, built by the set-up from the pinned source (CMakeLists.txt), on files we make:
the bindings load the same libllama, llama-perplexity agrees with `eval`, llama-server and
llama-completion run a file beyond its trained context with its factors, llama-quantize writes the
bytes the bindings' quantizer writes."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from runs import convert_ok, fail_cleanly, run_cli
from servers import get_json, llama_server, post_json

from qroar_gguf.evaluate.passkey import build_prompt
from qroar_gguf.evaluate.perplexity_tool import final_estimate, run_perplexity
from qroar_gguf.gguf_io.quantize import quantize_gguf
from qroar_gguf.llama_tools import TOOLS, current_build, describe_tools, find_tool

TRAINED = 8192
TARGET = 16384


@pytest.fixture(scope="module")
def long_files(smollm2_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """SmolLM2 converted for 2x its trained context, Q4_0 (its F16 intermediate kept), with yarn and
    with no plan (the control: the same weights, positions not rescaled)."""
    out = tmp_path_factory.mktemp("long")
    files = {"yarn": out / "yarn.Q4_0.gguf", "f16": out / "yarn.F16.gguf", "none": out / "none.Q4_0.gguf"}
    convert_ok(smollm2_dir, "-o", files["yarn"], "--ctx", TARGET, "--method", "yarn", "--qtype", "Q4_0",
               "--keep-f16", files["f16"])
    convert_ok(smollm2_dir, "-o", files["none"], "--ctx", TARGET, "--method", "none", "--qtype", "Q4_0")
    return files


def test_every_tool_is_built_and_the_bindings_load_its_libllama():
    described = describe_tools()
    assert described["build"] is not None, "the set-up did not build llama.cpp's tools"
    for name in TOOLS:
        tool = described["tools"][name]
        assert tool["path"] is not None, name
        if name == "llama-quantize":  # has no --version; it prints its usage
            assert tool["version"].startswith("no --version"), tool
            continue
        assert tool["version"] == described["build"]["llama_cpp_version"], (name, tool["version"])
    assert re.match(r"\d+\.\d+", described["build"]["llama_cpp_version"]), described["build"]
    assert described["bindings"]["same_as_build"] is True, described["bindings"]

    import llama_cpp

    loaded = Path(llama_cpp.llama_cpp._lib._name).resolve()
    assert loaded.read_bytes() == (current_build().bin / "libllama.so").read_bytes()


def test_tools_command_lists_them():
    result = run_cli("tools")
    assert result.returncode == 0, result.stderr
    for name in TOOLS:
        assert str(find_tool(name)) in result.stdout
    assert "the build's own" in result.stdout


def test_llama_perplexity_agrees_with_eval(long_files, dev_text, tmp_path):
    """The same file, text and window (512, two windows): within 0.1% of PPL."""
    theirs, _ = final_estimate(run_perplexity("-m", long_files["yarn"], "-f", dev_text, "-c", 512, "--chunks", 2,
                                              "-t", 2))

    report = tmp_path / "eval.json"
    ours = run_cli("eval", long_files["yarn"], "--text", dev_text, "--ctx", 512, "--chunks", 2, "--json", report, "-q")
    assert ours.returncode == 0, ours.stderr
    mine = json.loads(report.read_text())["perplexity"]["ppl"]
    assert abs(mine - theirs) / theirs < 1e-3, (mine, theirs)


def _last_logprobs(path: Path, text: str) -> tuple[int, np.ndarray]:
    """Through the bindings: the prompt's token count and the log-probabilities after its last token."""
    from qroar_gguf.evaluate.runtime import Runtime

    with Runtime(path, n_ctx=TARGET, threads=2) as rt:
        tokens = rt.tokenize(text)
        rt.clear()
        rt.prefill(tokens, reuse=False)
        logits = rt.logits_ith(-1).astype(np.float64)
    return len(tokens), logits - logits.max() - math.log(np.exp(logits - logits.max()).sum())


def test_llama_server_answers_beyond_the_trained_context_with_the_files_factors(long_files, tmp_path):
    """llama-server (what Ollama runs for a GGUF) with `-c 16384`: a passkey prompt of more than 8192
    tokens gets an answer. The factors are used: the server loaded every tensor of the file, rope_freqs
    included (llama.cpp refuses a file with a tensor its arch does not use), and the first answered
    token's log-probability is the bindings' on the same file. (That the unscaled control answers
    differently is measured by tools/bench_llama_tools.py: a second 9k-token run is minutes here.)"""
    from qroar_gguf.gguf_io.reader import open_gguf

    prompt = build_prompt("68351", 0.1, 360).text  # the key early, then filler past the trained context
    log_path = tmp_path / "server.log"
    with llama_server(long_files["yarn"], ["-c", str(TARGET), "-t", "2", "-np", "1", "-fa", "on",
                                           "-lv", "4"],  # 4: the model loader's lines too
                      log_path) as base:
        models = get_json(f"{base}/v1/models")
        assert models["data"][0]["meta"]["n_ctx_train"] == TARGET
        assert get_json(f"{base}/props")["default_generation_settings"]["n_ctx"] == TARGET
        answer = post_json(f"{base}/completion",
                           {"prompt": prompt, "n_predict": 8, "temperature": 0, "top_k": 1, "n_probs": 1,
                            "cache_prompt": False}, timeout=600)

    reader = open_gguf(long_files["yarn"])
    names = [t.name for t in reader.tensors]
    assert "rope_freqs.weight" in names
    assert re.search(rf"loaded meta data with \d+ key-value pairs and {len(names)} tensors", log_path.read_text())

    n_prompt, with_factors = _last_logprobs(long_files["yarn"], prompt)
    assert TRAINED < n_prompt < TARGET
    assert answer["tokens_evaluated"] == n_prompt
    assert answer["content"].strip(), answer
    first = answer["completion_probabilities"][0]
    assert first["id"] == int(np.argmax(with_factors))
    assert abs(first["logprob"] - with_factors[first["id"]]) < 0.02, (first["logprob"], with_factors[first["id"]])


def test_llama_completion_runs_the_file_non_interactively(long_files):
    """llama.cpp's one-shot command line loads the file at its full context and continues a prompt."""
    run = subprocess.run([str(find_tool("llama-completion")), "-m", str(long_files["yarn"]), "-c", str(TARGET),
                          "-p", "The capital of France is", "-n", "8", "--temp", "0", "-no-cnv", "-t", "2",
                          "--no-warmup"],
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("The capital of France is"), run.stdout
    assert len(run.stdout) > len("The capital of France is"), run.stdout


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K_M"])
def test_llama_quantize_writes_the_bindings_bytes(long_files, tmp_path, qtype):
    by_bindings, by_tool = tmp_path / "bindings.gguf", tmp_path / "tool.gguf"
    quantize_gguf(long_files["f16"], by_bindings, qtype, 2, progress=False)
    quantize_gguf(long_files["f16"], by_tool, qtype, 2, progress=False, quantizer="llama-quantize")
    assert by_tool.stat().st_size == by_bindings.stat().st_size
    assert by_tool.read_bytes() == by_bindings.read_bytes()


def test_convert_with_llama_quantize(long_files, smollm2_dir, tmp_path):
    """The command line's --quantizer llama-quantize gives convert's usual file."""
    out = tmp_path / "tool.Q4_0.gguf"
    convert_ok(smollm2_dir, "-o", out, "--ctx", TARGET, "--method", "yarn", "--qtype", "Q4_0",
               "--quantizer", "llama-quantize")
    assert out.read_bytes() == long_files["yarn"].read_bytes()


def test_missing_tools_are_one_line_before_anything_is_written(smollm2_dir, tmp_path, monkeypatch):
    """With the programs gone (here: $QROAR_LLAMA_BIN naming an empty folder), --quantizer llama-quantize
    fails at once, in one line, leaving nothing; `tools` says what is missing."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("QROAR_LLAMA_BIN", str(empty))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    line = fail_cleanly([smollm2_dir, "-o", out_dir / "x.gguf", "--quantizer", "llama-quantize"], out_dir,
                        "llama-quantize")
    assert "QROAR_LLAMA_BIN" in line
    listed = run_cli("tools")
    assert listed.returncode == 0, listed.stderr
    assert sum(line.strip().endswith("missing") for line in listed.stdout.splitlines()) == len(TOOLS)


def test_the_build_key_follows_what_is_compiled(tmp_path):
    """The sdist, CMakeLists.txt, each patch's diff and the CMake options decide the build; a patch's
    prose header does not (editing it must not cost a rebuild)."""
    from qroar_gguf.llama_tools import build_key

    (tmp_path / "patches").mkdir()
    (tmp_path / "CMakeLists.txt").write_text("project(x)\n")
    patch = tmp_path / "patches" / "0001-x.patch"
    patch.write_text("What: a change\n\n--- a/src/x.cpp\n+++ b/src/x.cpp\n@@ -1 +1 @@\n-a\n+b\n")
    key = build_key(root=tmp_path)
    patch.write_text("What: the same change, described better\n\n--- a/src/x.cpp\n+++ b/src/x.cpp\n@@ -1 +1 @@\n-a\n+b\n")
    assert build_key(root=tmp_path) == key
    patch.write_text("What: a change\n\n--- a/src/x.cpp\n+++ b/src/x.cpp\n@@ -1 +1 @@\n-a\n+c\n")
    changed = build_key(root=tmp_path)
    assert changed != key
    assert build_key(["-DGGML_CUDA=ON"], root=tmp_path) != changed
    (tmp_path / "CMakeLists.txt").write_text("project(y)\n")
    assert build_key(root=tmp_path) != changed
    (tmp_path / "patches" / "0002-y.patch").write_text("--- a/y\n+++ b/y\n")
    assert len({build_key(root=tmp_path), changed, key}) == 3


def test_the_sdists_llama_cpp_commit_is_read_from_its_submodule(tmp_path):
    """llama.cpp's build cannot see the vendored commit (no git repository once extracted): we read it."""
    import io
    import tarfile

    from qroar_gguf.llama_tools import LLAMA_CPP_PYTHON_VERSION, sdist_llama_cpp_commit

    sdist = tmp_path / "x.tar.gz"
    head = b"0c1e57098bba43ac29e6e3b677cdceebdd22334f\n"
    with tarfile.open(sdist, "w:gz") as tar:
        member = tarfile.TarInfo(f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/.git/modules/vendor/llama.cpp/HEAD")
        member.size = len(head)
        tar.addfile(member, io.BytesIO(head))
    assert sdist_llama_cpp_commit(sdist) == head.decode().strip()
    assert sdist_llama_cpp_commit(tmp_path / "missing.tar.gz") is None


def test_run_program_kills_a_child_that_runs_past_its_time_and_keeps_its_lines():
    import time
    from collections import deque

    from qroar_gguf.llama_tools import run_program

    log: deque = deque()
    assert run_program(["sh", "-c", "echo out; echo err >&2; exit 3"], log) == 3
    assert list(log) == ["out", "err"]
    started = time.monotonic()
    assert run_program(["sleep", "30"], deque(), timeout=0.5) is None
    assert time.monotonic() - started < 10
