"""`eval` and `bench` from the command line, on a small real model (fast) and real text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from checkpoints import make_tiny_llama
from runs import fail_cleanly
from test_convert import convert_ok, run_cli


@pytest.fixture(scope="module")
def tiny256(smollm2_dir: Path, tmp_path_factory) -> Path:
    directory, _ = make_tiny_llama(tmp_path_factory.mktemp("tinyb") / "ckpt", smollm2_dir,
                                   max_position_embeddings=256)
    return directory


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    from qroar_gguf.assets.austen import austen_text

    return austen_text("Persuasion")


def test_bench_builds_evaluates_and_caches(tiny256: Path, text: Path, tmp_path: Path):
    out = tmp_path / "bench"
    args = ["bench", tiny256, "--ctx", "256", "512", "--qtype", "Q4_0", "Q8_0", "--plans", "none", "linear",
            "yarn", "qroar:beta=4", "--text", text, "--chunks", "2", "--out", out, "-q"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert len(rows) == 2 * 2 * 4
    assert {(r["plan"], r["ctx"], r["qtype"]) for r in rows} == {
        (p, c, q) for p in ("none", "linear", "yarn", "qroar:beta=4") for c in (256, 512) for q in ("Q4_0", "Q8_0")}
    for r in rows:
        assert r["n_chunks"] == 2 and r["ppl"] > 1 and r["kld_mean"] >= 0
        # at the trained context the extended plans run the file built for 512
        assert r["built_for_ctx"] == (r["ctx"] if r["plan"] == "none" else 512)
    by = {(r["plan"], r["ctx"], r["qtype"]): r for r in rows}
    assert "ratio_to_linear" not in by[("linear", 512, "Q4_0")]
    assert by[("yarn", 512, "Q4_0")]["ratio_to_linear"] == pytest.approx(
        by[("yarn", 512, "Q4_0")]["ppl"] / by[("linear", 512, "Q4_0")]["ppl"], rel=1e-9)
    # Q8_0 stays closer to its F16 reference than Q4_0 does
    assert by[("yarn", 512, "Q8_0")]["kld_mean"] < by[("yarn", 512, "Q4_0")]["kld_mean"]
    assert (out / "results.md").read_text().count("\n| ") == len(rows) + 1
    assert (out / "ppl_vs_ctx.png").read_bytes()[:4] == b"\x89PNG"

    runs = sorted(p.name for p in (out / "runs").iterdir())
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    assert sorted(p.name for p in (out / "runs").iterdir()) == runs  # nothing re-measured
    assert json.loads((out / "results.json").read_text())["rows"] == rows


def test_bench_band_plans_and_key_cache_axis(tiny256: Path, text: Path, tmp_path: Path):
    """A searched variant is a plan spec (band values separated by `/`) and builds exactly what convert's
    band flags build; --type-k is an axis whose rows are paired only within the same key cache."""
    import numpy as np

    from checkpoints import gguf_tensors

    out = tmp_path / "bench"
    banded = "qroar:band_factors=1/1/1.25/1,band_scales=1/1/1/1.1,symmetric=false"
    result = run_cli("bench", tiny256, "--ctx", "512", "--qtype", "Q8_0", "--plans", "yarn", banded,
                     "--type-k", "f16", "q4_0", "--passkey-trials", "1", "--passkey-depths", "0.2", "0.8",
                     "--text", text, "--out", out, "-q")
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["type_ks"] == ["f16", "q4_0"]
    by = {(r["plan"], r["type_k"]): r for r in results["rows"]}
    assert set(by) == {(p, k) for p in ("yarn", banded) for k in ("f16", "q4_0")}
    for k in ("f16", "q4_0"):
        assert by[(banded, k)]["ratio_to_yarn"] == pytest.approx(by[(banded, k)]["ppl"] / by[("yarn", k)]["ppl"],
                                                                 rel=1e-9)
    # a 4-bit key cache changes the measurement
    assert by[("yarn", "q4_0")]["ppl"] != by[("yarn", "f16")]["ppl"]
    for r in results["rows"]:
        assert set(r["passkey_by_depth"]) == {"0.2", "0.8"} and 0 <= r["passkey"] <= 1
    assert len(list((out / "runs").glob("*.passkey.*.json"))) == 4
    assert " q4_0 " in (out / "results.md").read_text()

    built = [p for p in (out / "models").glob("*.F16.*.gguf") if p.name.startswith("qroar")]
    assert len(built) == 1
    direct = tmp_path / "direct.gguf"
    convert_ok("convert", tiny256, "-o", direct, "--ctx", "512", "--qtype", "F16", "--method", "qroar",
               "--band-factors", "1,1,1.25,1", "--band-scales", "1,1,1,1.1", "--no-symmetric")
    ours, theirs = gguf_tensors(built[0]), gguf_tensors(direct)
    assert set(ours) == set(theirs)
    for name in ours:
        assert np.array_equal(ours[name].data, theirs[name].data), name


def test_bench_dirs_share_finished_measurements(tiny256: Path, text: Path, tmp_path: Path, monkeypatch):
    """A second bench directory reads what the first measured on identical files (and measures nothing)."""
    monkeypatch.setenv("QROAR_CACHE", str(tmp_path / "cache"))
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--ctx", "512", "--qtype", "Q8_0", "--text", text, "-q"]
    assert run_cli("bench", tiny256, "--plans", "linear", "yarn", "--out", first, *common).returncode == 0
    shared = list((tmp_path / "cache" / "bench-runs").glob("yarn.512.Q8_0.*.json"))
    assert len(shared) == 1
    record = json.loads(shared[0].read_text())
    shared[0].write_text(json.dumps({**record, "ppl": 12345.0}))  # mark it: only the cache can say this
    result = run_cli("bench", tiny256, "--plans", "yarn", "--out", second, *common)
    assert result.returncode == 0, result.stderr
    assert json.loads((second / "results.json").read_text())["rows"][0]["ppl"] == 12345.0
    assert (second / "runs" / shared[0].name).is_file()


def test_bench_rejects_bad_band_values(tiny256: Path, text: Path, tmp_path: Path):
    result = run_cli("bench", tiny256, "--ctx", "512", "--qtype", "Q8_0", "--plans", "qroar:band_factors=1/2",
                     "--text", text, "--out", tmp_path / "b", "-q")
    assert result.returncode != 0
    assert "plan 'qroar:band_factors=1/2': band_factors has 2 values" in result.stderr
    assert "Traceback" not in result.stderr


def test_eval_reports_ppl_kld_and_passkey(tiny256: Path, text: Path, tmp_path: Path):
    ref, quant = tmp_path / "ref.gguf", tmp_path / "q.gguf"
    convert_ok(tiny256, "-o", ref, "--method", "yarn", "--ctx", "512", "--qtype", "F16")
    convert_ok(tiny256, "-o", quant, "--method", "yarn", "--ctx", "512", "--qtype", "Q4_0")
    report = tmp_path / "eval.json"
    result = run_cli("eval", quant, "--text", text, "--ctx", "512", "--chunks", "2", "--reference", ref,
                     "--passkey", "--type-k", "q8_0", "--json", report, "-q")
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["kld"]["n_chunks"] == 2 and data["kld"]["kld_mean"] > 0
    assert 0 <= data["passkey"]["accuracy"] <= 1
    assert "KLD mean" in result.stdout and "passkey accuracy" in result.stdout

    # what it ran on: every layer on the GPU where this libllama has a GPU back-end, none otherwise
    from qroar_gguf.evaluate.runtime import gpu_offload_supported

    gpu = gpu_offload_supported()
    assert data["device"]["gpu_offload"] is gpu and data["device"]["device"] == ("gpu" if gpu else "cpu")
    assert data["device"]["gpu_layers"] == (-1 if gpu else 0) and "CPU" in data["device"]["system_info"]
    if not gpu:  # asking this build for GPU layers is one line, before any evaluation
        for command in (["eval", quant, "--text", text, "--ctx", "512"],
                        ["bench", tiny256, "--ctx", "512", "--qtype", "Q8_0", "--plans", "yarn", "--text", text,
                         "--out", tmp_path / "bench", "-q"]):
            refused = run_cli(*command, "--gpu-layers", "4")
            assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
            assert "--gpu-layers 4: this llama.cpp build has no GPU back-end" in refused.stderr
            assert not (tmp_path / "bench").exists()


@pytest.mark.parametrize("case", ["missing", "not_gguf", "too_short"])
def test_eval_errors_are_one_line(case: str, tiny256: Path, text: Path, tmp_path: Path):
    model = tmp_path / "m.gguf"
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    if case == "missing":
        args = ["eval", tmp_path / "nope.gguf", "--text", text, "--ctx", "256"]
    elif case == "not_gguf":
        model.write_text("not a model")
        args = ["eval", model, "--text", text, "--ctx", "256"]
    else:
        convert_ok(tiny256, "-o", model, "--method", "none", "--qtype", "Q8_0")
        args = ["eval", model, "--text", short, "--ctx", "256"]
    result = run_cli(*args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and len(lines) <= 3, result.stderr  # click usage errors add a usage line
    assert {"missing": "does not exist", "not_gguf": "not a GGUF", "too_short": "tokens"}[case] in result.stderr


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    """About 1400 tokens of Emma (two 512-token windows): never the evaluation text, Persuasion."""
    from qroar_gguf.assets.austen import austen_text

    path = tmp_path_factory.mktemp("calibration") / "emma.txt"
    path.write_text(austen_text("Emma").read_text(encoding="utf-8")[20000:26000], encoding="utf-8")
    return path


def test_bench_imatrix_axis_pairs_each_matrix_with_no_matrix(tiny256: Path, text: Path, calibration: Path,
                                                             tmp_path: Path, monkeypatch):
    """--imatrix none short: the short row's file is quantized with a matrix computed on the plan's F16
    file, its PPL is paired with the row without one, F16 gets no matrix, and a rerun computes nothing."""
    import math

    import gguf

    from qroar_gguf.digests import sha256_file
    from qroar_gguf.gguf_io.reader import field_value
    from qroar_gguf.llama_tools import find_tool

    # A cache of its own, so that the matrix is computed here (the tools stay the set-up's build).
    monkeypatch.setenv("QROAR_LLAMA_BIN", str(find_tool("llama-imatrix").parent))
    monkeypatch.setenv("QROAR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench"
    common = ["bench", tiny256, "--ctx", "512", "--plans", "yarn", "--text", text, "--chunks", "2", "--out", out, "-q"]
    args = [*common, "--qtype", "Q4_0", "F16", "--imatrix", "none", "short", "--imatrix-text", calibration,
            "--imatrix-tokens", "1024"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["imatrixes"] == ["none", "short"] and results["imatrix_tokens"] == 1024
    by = {(r["qtype"], r["imatrix"]): r for r in results["rows"]}
    assert set(by) == {("Q4_0", "none"), ("Q4_0", "short"), ("F16", "none")}  # an unquantized file takes none
    none, short = by[("Q4_0", "none")], by[("Q4_0", "short")]
    assert (short["imatrix_ctx"], short["imatrix_chunks"]) == (512, 2)  # 1024 tokens in 512-token windows
    assert "imatrix_ctx" not in none
    models = out / "models"
    assert sha256_file(models / short["file"]) != sha256_file(models / none["file"])
    quantized = gguf.GGUFReader(models / short["file"])
    assert field_value(quantized, "quantize.imatrix.chunks_count") == 2
    assert field_value(gguf.GGUFReader(models / none["file"]), "quantize.imatrix.file") is None
    for r in (none, short):  # both against the same F16 reference, on the same tokens
        assert r["ref_ppl"] == by[("F16", "none")]["ppl"] and r["kld_mean"] > 0

    ratio, (lo, hi) = short["ratio_to_no_imatrix"], short["ratio_to_no_imatrix_ci95"]
    assert all(math.isfinite(v) for v in (ratio, lo, hi)) and lo <= ratio <= hi
    assert ratio == pytest.approx(short["ppl"] / none["ppl"], rel=1e-9)
    assert "ratio_to_no_imatrix" not in none and "ratio_to_short_imatrix" not in short
    table = (out / "results.md").read_text()
    assert "| plan | qtype | imatrix | K cache |" in table and "| yarn | Q4_0 | short 512x2 | f16 |" in table
    assert table.count("\n| ") == len(results["rows"]) + 1
    assert (out / "ppl_vs_ctx.png").read_bytes()[:4] == b"\x89PNG"

    # A rerun reuses the cached matrix (llama-imatrix does not run again), the built files and the rows.
    matrix = Path(field_value(quantized, "quantize.imatrix.file"))
    assert list((tmp_path / "cache" / "imatrix").glob("*.imatrix.gguf")) == [matrix]
    stamp, built, runs = matrix.stat().st_mtime_ns, sorted(models.iterdir()), sorted((out / "runs").iterdir())
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    assert matrix.stat().st_mtime_ns == stamp
    assert sorted(models.iterdir()) == built and sorted((out / "runs").iterdir()) == runs
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]

    # Without --imatrix the row is the one measured without a matrix, under the key it always had.
    plain = run_cli(*common, "--qtype", "Q4_0")
    assert plain.returncode == 0, plain.stderr
    assert json.loads((out / "results.json").read_text())["rows"][0]["run"] == none["run"]
    assert "imatrix" not in (out / "results.md").read_text()


@pytest.mark.parametrize(("case", "needle"), [
    ("same_text", "has the same content as --text"),
    ("no_text", "--imatrix short needs --imatrix-text FILE"),
    ("text_without_matrix", "apply to importance matrices only"),
    ("i_quant_without_matrix", "cannot be built without an importance matrix"),
])
def test_bench_imatrix_requests_are_refused_before_building(case: str, needle: str, tiny256: Path, text: Path,
                                                            calibration: Path, tmp_path: Path):
    copy = tmp_path / "same.txt"  # another name, the same content: calibration must differ in content
    copy.write_bytes(text.read_bytes())
    extra = {"same_text": ["--imatrix", "short", "--imatrix-text", copy],
             "no_text": ["--imatrix", "none", "short"],
             "text_without_matrix": ["--imatrix-text", calibration],
             "i_quant_without_matrix": ["--qtype", "IQ3_XXS", "--imatrix", "none", "short", "--imatrix-text",
                                        calibration]}[case]
    fail_cleanly(["bench", tiny256, "--ctx", "512", "--plans", "yarn", "--text", text, "--out", tmp_path / "bench",
                  *extra], tmp_path, needle)


def test_bench_attn_type_axis_with_workers(tiny256: Path, text: Path, tmp_path: Path):
    """--attn-type default q8_0: attn_q/attn_k of the q8_0 row's file are Q8_0 (the rest the --qtype's), and
    its PPL is paired with the same file at its default; two workers build the shared F16 reference once."""
    import gguf

    from checkpoints import gguf_tensors

    out = tmp_path / "bench"
    result = run_cli("bench", tiny256, "--ctx", "512", "--qtype", "Q4_0", "F16", "--plans", "yarn", "--attn-type",
                     "default", "q8_0", "--workers", "2", "--text", text, "--out", out, "-q")
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["attn_types"] == ["default", "q8_0"]
    by = {(r["qtype"], r.get("attn_type")): r for r in results["rows"]}
    assert set(by) == {("Q4_0", None), ("Q4_0", "q8_0"), ("F16", None)}  # an unquantized file takes none
    default, higher = by[("Q4_0", None)], by[("Q4_0", "q8_0")]
    assert higher["ratio_to_default_attn"] == pytest.approx(higher["ppl"] / default["ppl"], rel=1e-9)
    assert "ratio_to_default_attn" not in default and higher["ref_ppl"] == default["ref_ppl"]
    assert higher["kld_mean"] < default["kld_mean"]  # 8-bit queries and keys stay closer to the F16 file
    for row, want in ((default, gguf.GGMLQuantizationType.Q4_0), (higher, gguf.GGMLQuantizationType.Q8_0)):
        tensors = gguf_tensors(out / "models" / row["file"])
        assert tensors["blk.0.attn_q.weight"].tensor_type == want and tensors["blk.0.attn_k.weight"].tensor_type == want
        assert tensors["blk.0.attn_v.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert len(list((out / "models").glob("yarn.512.F16.*.gguf"))) == 1
    table = (out / "results.md").read_text()
    assert "| attn_q/k |" in table and "/ default attn" in table and "| yarn | Q4_0 | q8_0 |" in table


def test_bench_llama_perplexity_evaluator_agrees_with_bindings(tiny256: Path, text: Path, tmp_path: Path):
    """--evaluator llama-perplexity measures the same windows as the bindings, PPL and KLD as llama.cpp
    prints them; the two are cached apart. (This random tiny model puts many targets more than 16 nats
    below its top token, where the saved log-probabilities floor: its NLLs are not compared.)"""
    common = ["bench", tiny256, "--ctx", "256", "--qtype", "Q4_0", "--plans", "yarn", "--chunks", "2", "--text", text]
    measured = {}
    for evaluator in ("bindings", "llama-perplexity"):
        out = tmp_path / evaluator
        result = run_cli(*common, "--evaluator", evaluator, "--out", out, "-q")
        assert result.returncode == 0, result.stderr
        measured[evaluator] = json.loads((out / "results.json").read_text())
    assert "evaluator" not in measured["bindings"] and measured["llama-perplexity"]["evaluator"] == "llama-perplexity"
    ours, tool = measured["bindings"]["rows"][0], measured["llama-perplexity"]["rows"][0]
    assert tool["evaluator"] == "llama-perplexity" and tool["run"] != ours["run"]
    assert (tool["n_chunks"], tool["n_scored"]) == (ours["n_chunks"], ours["n_scored"]) == (2, 254)
    assert tool["ppl"] == pytest.approx(ours["ppl"], rel=2e-3)
    assert tool["ref_ppl"] == pytest.approx(ours["ref_ppl"], rel=2e-3)
    assert tool["kld_mean"] == pytest.approx(ours["kld_mean"], rel=0.05, abs=2e-3)
    assert tool["same_top_pct"] == pytest.approx(ours["same_top_pct"], abs=2.0)
    assert tool["kld_se"] > 0 and ours["kld_se"] > 0
    assert tool["ppl_se"] == pytest.approx(ours["ppl_se"], rel=0.02)


def test_bench_deadline_lists_rows_not_started(tiny256: Path, text: Path, tmp_path: Path):
    """--deadline 0: no row starts, nothing is built, and results.json lists every row under skipped."""
    out = tmp_path / "bench"
    result = run_cli("bench", tiny256, "--ctx", "512", "--qtype", "Q4_0", "--plans", "yarn", "linear",
                     "--deadline", "0", "--text", text, "--out", out, "-q")
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["rows"] == [] and results["deadline"] == 0
    assert sorted(s["plan"] for s in results["skipped"]) == ["linear", "yarn"]
    assert results["skipped"][0] | {"plan": "-"} == {"plan": "-", "ctx": 512, "qtype": "Q4_0", "type_k": "f16",
                                                     "imatrix": "none", "attn_type": "default"}
    assert not list((out / "models").iterdir())
    assert "Not started by the deadline" in (out / "results.md").read_text()


@pytest.mark.parametrize(("extra", "needle"), [
    (["--attn-type", "q9_9"], "--attn-type q9_9: not a ggml type; use default or one of"),
    (["--qtype", "F16", "--attn-type", "q8_0"], "--attn-type q8_0 applies to quantized types only"),
])
def test_bench_attn_type_requests_are_refused_before_building(extra: list, needle: str, tiny256: Path, text: Path,
                                                              tmp_path: Path):
    fail_cleanly(["bench", tiny256, "--ctx", "512", "--plans", "yarn", "--text", text, "--out", tmp_path / "bench",
                  *extra], tmp_path, needle)


def test_llama_perplexity_log_and_saved_log_probabilities_are_read(tmp_path: Path):
    """The final estimate and the --kl-divergence lines as llama-perplexity prints them, and the NLL of every
    scored token of every window from a --kl-divergence-base file (a file written here in its format)."""
    import numpy as np

    from qroar_gguf.errors import QroarError
    from qroar_gguf.evaluate.perplexity_tool import final_estimate, saved_nll, statistic

    log = ("[1]12.3456,\nFinal estimate: PPL = 12.3456 +/- 0.12345\n"
           "Mean    KLD:   0.012345 ±   0.000321\n99.0%   KLD:   0.150000\nMedian  KLD:   0.004000\n"
           "Same top p: 91.234 ± 0.456 %\n")
    assert final_estimate(log) == (12.3456, 0.12345)
    assert statistic(log, "Mean    KLD") == (0.012345, 0.000321)
    assert statistic(log, "99.0%   KLD") == (0.15, None)
    assert statistic(log, "Same top p") == (91.234, 0.456)
    with pytest.raises(QroarError, match="printed no 'Final estimate: PPL'"):
        final_estimate("nothing")

    n_ctx, n_vocab, n_chunk = 8, 3, 2
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, n_vocab, size=(n_chunk, n_ctx)).astype(np.int32)
    first, width = n_ctx // 2, 2 * ((n_vocab + 1) // 2) + 4
    want, rows = [], []
    for c in range(n_chunk):
        for i in range(first, n_ctx - 1):
            logp = np.log(rng.dirichlet(np.ones(n_vocab)))
            scale, low = np.float32((logp.max() - logp.min()) / 65535), np.float32(logp.min())
            steps = np.round((logp - low) / scale).astype(np.uint16)
            row = np.zeros(width, dtype=np.uint16)
            row[:4] = np.array([scale, low], dtype=np.float32).view(np.uint16)
            row[4:4 + n_vocab] = steps
            rows.append(row)
            want.append(-(float(scale) * float(steps[tokens[c, i + 1]]) + float(low)))
    path = tmp_path / "base.logits"
    path.write_bytes(b"_logits_" + np.array([n_ctx, n_vocab, n_chunk], dtype=np.int32).tobytes() + tokens.tobytes()
                     + np.stack(rows).tobytes())
    np.testing.assert_allclose(saved_nll(path), want, rtol=1e-6)
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(QroarError, match="is incomplete"):
        saved_nll(path)
