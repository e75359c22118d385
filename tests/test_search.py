"""The band search (search.py): deterministic, bounded, never worse than its start, resumable, and the
command line around it; on the tiny band model (conftest's band_model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runs import run_cli
from test_bands import TARGET, provenance


def _options(**kw):
    from qroar_gguf.convert import ConvertOptions
    from qroar_gguf.rope.spec import PlanSpec

    base = dict(plan=PlanSpec("yarn"), target_ctx=TARGET, qtype="Q4_0", threads=2, progress=False)
    return ConvertOptions(**{**base, **kw})


def _settings(dev_text: Path, cache: Path, **kw):
    from qroar_gguf.search import SearchSettings

    # every whole window of the dev text (dev_chunks None), not the one window a search takes by default
    return SearchSettings(**{**dict(dev_text=dev_text, dev_ctx=TARGET, dev_chunks=None, budget=6, seed=1, cache=cache),
                             **kw})


def _trace(result) -> list:
    return [(e.factors, e.scales, e.objective) for e in result.history]


def test_search_is_deterministic_bounded_never_worse_and_resumes(band_model: Path, dev_text: Path, tmp_path: Path):
    from qroar_gguf.search import run_search

    measured: list = []

    class Interrupt(Exception):
        pass

    def stop_after_two(ev):
        measured.append(ev)
        if len(measured) == 2:
            raise Interrupt

    cache_a, cache_b = tmp_path / "cache_a", tmp_path / "cache_b"
    with pytest.raises(Interrupt):  # interrupted after two candidates: both are on disk
        run_search(band_model, _options(), _settings(dev_text, cache_a), on_evaluate=stop_after_two)
    assert len(list(cache_a.glob("*.json"))) == 2

    measured.clear()
    resumed = run_search(band_model, _options(), _settings(dev_text, cache_a), on_evaluate=measured.append)
    assert resumed.evaluations <= 6
    assert resumed.new_evaluations == len(measured) == resumed.evaluations - 2
    assert len(list(cache_a.glob("*.json"))) == resumed.evaluations

    fresh = run_search(band_model, _options(), _settings(dev_text, cache_b))  # deterministic: same path, same numbers
    assert fresh.new_evaluations == fresh.evaluations
    assert _trace(fresh) == _trace(resumed)
    assert fresh.best.factors == resumed.best.factors and fresh.best.scales == resumed.best.scales

    measured.clear()
    again = run_search(band_model, _options(), _settings(dev_text, cache_a), on_evaluate=measured.append)
    assert again.new_evaluations == 0 and measured == []
    assert _trace(again) == _trace(resumed)

    # Starts from the formula plan, never ends worse than it, keys distinct candidates only.
    start = resumed.history[0]
    assert start.factors == (1.0,) * 4 and start.scales == (1.0,) * 4
    assert resumed.best.objective <= start.objective
    assert resumed.best.objective == min(e.objective for e in resumed.history)
    assert len({e.key for e in resumed.history}) == resumed.evaluations
    assert resumed.record["start"] == start.objective and resumed.record["reached"] == resumed.best.objective
    assert resumed.record["evaluations"] == resumed.evaluations and resumed.record["budget"] == 6
    assert resumed.record["dev_text_tokens"] > 2 * TARGET and resumed.record["dev_scored_tokens"] == 2 * 255

    # A budget is a hard limit, and a larger one retraces the same path first.
    small = run_search(band_model, _options(), _settings(dev_text, cache_a, budget=3))
    assert small.evaluations == 3 and small.new_evaluations == 0 and _trace(small) == _trace(resumed)[:3]


def test_search_start_is_the_formula_plan_and_the_output_is_the_best(band_model: Path, dev_text: Path, tmp_path: Path):
    from qroar_gguf.convert import convert
    from qroar_gguf.evaluate.perplexity import perplexity
    from qroar_gguf.evaluate.runtime import Runtime
    from qroar_gguf.search import search_and_convert

    cache = tmp_path / "cache"
    out, formula = tmp_path / "searched.Q4_0.gguf", tmp_path / "yarn.Q4_0.gguf"
    lines: list[str] = []
    measured: list = []
    search_and_convert(band_model, out, _options(), _settings(dev_text, cache, budget=4, seed=0, space="scales"),
                       log=lines.append, on_evaluate=measured.append)
    convert(band_model, formula, _options())

    def dev_nll(path: Path) -> float:
        with Runtime(path, n_ctx=TARGET, threads=2) as rt:
            return perplexity(rt, dev_text.read_text(encoding="utf-8"), quiet=True).mean_nll

    prov = provenance(out)
    search = json.loads(prov["search"])
    assert dev_nll(formula) == pytest.approx(search["start"], abs=1e-9)
    assert dev_nll(out) == pytest.approx(search["reached"], abs=1e-9)
    assert search["reached"] <= search["start"]
    assert search["evaluations"] == len(measured) <= 4 and search["budget"] == 4
    import hashlib

    assert search["dev_text_sha256"] == hashlib.sha256(dev_text.read_bytes()).hexdigest()
    assert search["objective"] == "ppl" and search["space"] == "scales"
    assert prov["band_factors"] == [1.0] * 4  # space "scales": factors stay the formula's
    # searched scales are non-symmetric unless asked, for a library caller as on the command line
    assert prov["bands"] == [0, 1, 7, 13, 32] and prov["band_symmetric"] is False
    assert any("best" in line for line in lines) and lines[0].startswith("search:")


def test_search_from_the_command_line(band_model: Path, dev_text: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("QROAR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "searched.gguf"
    args = [band_model, "-o", out, "--method", "yarn", "--ctx", str(TARGET), "--qtype", "Q4_0", "--threads", "2",
            "--search", "--dev-text", dev_text, "--dev-ctx", str(TARGET), "--dev-chunks", "1",
            "--search-budget", "2", "--search-space", "factors", "--search-objective", "kld"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "search [1/2] start" in result.stdout and "search: best" in result.stdout
    search = json.loads(provenance(out)["search"])
    assert search["objective"] == "kld" and search["evaluations"] == 2 and search["dev_chunks"] == 1
    assert search["dev_scored_tokens"] == 255 and search["reached"] <= search["start"]
    assert len(list((tmp_path / "cache" / "search").glob("*.json"))) == 2
    rerun = run_cli(*args, "--force", "--search-report", tmp_path / "search.json")  # everything cached
    assert rerun.returncode == 0 and rerun.stdout.count("(cached)") == 2, rerun.stdout
    report = json.loads((tmp_path / "search.json").read_text())
    assert len(report["candidates"]) == 2 and report["reached"] == search["reached"]
    assert report["candidates"][0]["factors"] == [1.0] * 4 == report["start_factors"]
    assert report["base"]["method"] == provenance(out)["method"] and report["base"]["target_ctx"] == TARGET
    assert report["candidates"][-1]["best_so_far"] == min(c["objective"] for c in report["candidates"])
    assert provenance(out)["band_factors"] == pytest.approx(report["best_factors"], rel=1e-6)
    unwritable = run_cli(*args, "--force", "--search-report", tmp_path / "missing" / "search.json")
    assert unwritable.returncode == 1 and unwritable.stderr.count("\n") == 1, unwritable.stderr
    assert "--search-report directory" in unwritable.stderr and "does not exist" in unwritable.stderr
    assert "search [" not in unwritable.stdout  # refused before measuring anything
    unquantized = run_cli(*args[:8], "F16", *args[9:], "--force")
    assert unquantized.returncode == 1 and "needs a quantized --qtype" in unquantized.stderr


def test_search_defaults_to_one_window_of_emma(band_model: Path, tmp_path: Path, monkeypatch):
    """`--search` alone is enough: the dev text defaults to Emma (the packaged Austen text), one window."""
    import hashlib

    from qroar_gguf.assets.austen import austen_text

    emma = austen_text("Emma")
    monkeypatch.setenv("QROAR_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "austen").mkdir(parents=True)
    for text in emma.parent.glob("*.txt"):  # the isolated cache gets the already built texts
        (tmp_path / "cache" / "austen" / text.name).write_bytes(text.read_bytes())
    out = tmp_path / "searched.gguf"
    result = run_cli(band_model, "-o", out, "--ctx", str(TARGET), "--qtype", "Q4_0", "--search", "--search-budget", "1")
    assert result.returncode == 0, result.stderr
    assert "Emma" in result.stdout
    search = json.loads(provenance(out)["search"])
    assert search["dev_text_sha256"] == hashlib.sha256(emma.read_bytes()).hexdigest()
    assert search["dev_chunks"] == 1 and search["dev_scored_tokens"] == TARGET // 2 - 1
    # searched band scales are non-symmetric unless asked (explicit --band-scales default to symmetric)
    assert search["symmetric"] is False and provenance(out)["band_symmetric"] is False


def test_a_library_caller_gets_the_command_lines_defaults(monkeypatch, tmp_path: Path):
    """search_and_convert/run_search choose what the command line leaves out: Emma as the dev text (said
    through `log`), one window per candidate, non-symmetric band scales unless asked."""
    import qroar_gguf.search as search
    from qroar_gguf.rope.spec import BandSpec, PlanSpec
    from qroar_gguf.search_settings import DEFAULT_DEV_CHUNKS, SearchSettings

    monkeypatch.setattr(search, "austen_text", lambda title: tmp_path / f"{title}.txt")
    said: list[str] = []
    options, settings = search._with_defaults(_options(), SearchSettings(), said.append)
    assert settings.dev_text == tmp_path / "Emma.txt" and settings.dev_chunks == DEFAULT_DEV_CHUNKS == 1
    assert options.plan.bands.symmetric is False and len(said) == 1 and "Emma.txt" in said[0]
    asked = _options(plan=PlanSpec("yarn", bands=BandSpec(symmetric=True)))
    options, again = search._with_defaults(asked, settings, said.append)
    assert options.plan.bands.symmetric is True and again == settings and len(said) == 1


def test_cmaes_is_deterministic_never_worse_resumes_and_shares_the_descents_cache(band_model: Path, dev_text: Path,
                                                                                  tmp_path: Path):
    from qroar_gguf.search import run_search

    cmaes = dict(strategy="cmaes", population=3, space="both", budget=7)
    cache_a, cache_b = tmp_path / "a", tmp_path / "b"
    first = run_search(band_model, _options(), _settings(dev_text, cache_a, **cmaes))
    again = run_search(band_model, _options(), _settings(dev_text, cache_b, **cmaes, workers=2))  # side by side
    assert _trace(first) == _trace(again) and first.new_evaluations == first.evaluations == 7
    resumed = run_search(band_model, _options(), _settings(dev_text, cache_a, **cmaes))
    assert resumed.new_evaluations == 0 and _trace(resumed) == _trace(first)

    start = first.history[0]
    assert start.factors == (1.0,) * 4 and start.scales == (1.0,) * 4
    assert first.best.objective == min(e.objective for e in first.history) <= start.objective
    assert len({e.key for e in first.history}) == 7
    for ev in first.history[1:]:  # candidates in the grid's range, on its 0.01 resolution, both kinds moved
        values = np.array(ev.factors + ev.scales)
        assert values.min() >= 0.8 and values.max() <= 1.25 and np.allclose(values * 100, np.round(values * 100))
    assert any(ev.scales != (1.0,) * 4 for ev in first.history) and any(ev.factors != (1.0,) * 4
                                                                       for ev in first.history)
    record = first.record
    assert record["strategy"] == "cmaes" and record["population"] == 3 and record["stopped_by"] == "budget"
    assert record["failed"] == 0 and record["evaluations"] == 7

    # the descent's start is the same candidate: read from the population search's cache, not measured again
    descent = run_search(band_model, _options(), _settings(dev_text, cache_a, space="both", budget=1))
    assert descent.new_evaluations == 0 and descent.start.objective == start.objective


def test_a_time_budget_stops_the_search_after_its_start(band_model: Path, dev_text: Path, tmp_path: Path):
    from qroar_gguf.search import run_search

    for strategy in ("descent", "cmaes"):
        said: list[str] = []
        result = run_search(band_model, _options(), _settings(dev_text, tmp_path / "cache", strategy=strategy,
                                                               time_budget=1e-6), log=said.append)
        assert result.evaluations == 1 and result.record["stopped_by"] == "time"
        assert result.record["time_budget"] == 1e-6 and result.best is result.start
        # a budget of 6 and generations of 8 (4 band factors): said to be sampling without learning
        assert any("ends inside the first generation" in line for line in said) == (strategy == "cmaes")


def test_a_candidate_llama_cpp_cannot_run_fails_and_the_search_goes_on(band_model: Path, dev_text: Path,
                                                                       tmp_path: Path, monkeypatch):
    """The second candidate gets a context llama.cpp cannot allocate (what a GPU out of memory looks like to
    the search): it fails with llama.cpp's reason, is not cached, and the search measures the rest."""
    import qroar_gguf.search as search

    real_runtime, opened = search.Runtime, []

    def runtime(path, **kw):
        opened.append(path)
        if len(opened) == 2:
            kw["n_ctx"] = 1 << 26  # a KV cache of 64 GiB: more than the machine has
        return real_runtime(path, **kw)

    monkeypatch.setattr(search, "Runtime", runtime)
    cache = tmp_path / "cache"
    report = tmp_path / "report.json"
    result = search.run_search(band_model, _options(), _settings(dev_text, cache, strategy="cmaes", population=3,
                                                                 budget=4, report=report))
    failed = [ev for ev in result.history if ev.failed]
    assert len(failed) == 1 and failed[0] is result.history[1] and result.evaluations == 4
    assert failed[0].objective == float("inf") and "llama.cpp" in failed[0].failed
    assert result.record["failed"] == 1 and result.record["failures"] == [failed[0].failed]
    assert len(list(cache.glob("*.json"))) == 3 and result.best is not failed[0]
    written = json.loads(report.read_text())["candidates"][1]
    assert written["objective"] is None and written["failed"] == failed[0].failed

    opened.clear()
    monkeypatch.setattr(search, "Runtime", lambda path, **kw: real_runtime(path, **{**kw, "n_ctx": 1 << 26}))
    with pytest.raises(search.QroarError, match="starting plan could not be measured"):
        search.run_search(band_model, _options(), _settings(dev_text, tmp_path / "other", budget=2))


def test_search_settings_that_make_no_sense_are_refused(band_model: Path, dev_text: Path, tmp_path: Path,
                                                        monkeypatch):
    from qroar_gguf.evaluate.runtime import gpu_layers_for, gpu_offload_supported
    from qroar_gguf.search import QroarError, run_search

    for bad, match in ((dict(strategy="anneal"), "unknown search strategy"), (dict(population=1), "at least 2"),
                       (dict(time_budget=0.0), "positive number of seconds"), (dict(budget=0), "at least 1"),
                       (dict(strategy="cmaes", workers=0), "--search-workers")):
        with pytest.raises(QroarError, match=match):
            run_search(band_model, _options(), _settings(dev_text, tmp_path / "cache", **bad))
    monkeypatch.setenv("QROAR_CACHE", str(tmp_path / "cache"))
    base = [band_model, "-o", tmp_path / "out.gguf", "--ctx", str(TARGET), "--qtype", "Q4_0", "--search",
            "--dev-text", dev_text]
    for args in (["--search-budget", "0"], ["--search-time", "0"], ["--search-time", "-5"],
                 ["--search-population", "3"], ["--search-workers", "2"],
                 ["--search-strategy", "cmaes", "--search-population", "1"]):
        result = run_cli(*base, *args)
        assert result.returncode == 2 and result.stderr.startswith("Error:"), (args, result.stderr)
        assert args[-2] in result.stderr and "search [" not in result.stdout, (args, result.stderr)
    without_search = [a for a in base if a != "--search" and a != dev_text and a != "--dev-text"]
    for args in (["--search-strategy", "cmaes"], ["--search-workers", "2"], ["--search-time", "60"]):
        result = run_cli(*without_search, *args)
        assert result.returncode == 2 and "apply to --search only" in result.stderr, (args, result.stderr)
    if gpu_offload_supported():
        pytest.skip("this libllama has a GPU back-end: --gpu-layers is allowed")
    assert gpu_layers_for(None) == 0 and gpu_layers_for(0) == 0
    result = run_cli(*base, "--gpu-layers", "8")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "no GPU back-end" in result.stderr and "search [" not in result.stdout
