"""`qroar-gguf demo` as a newcomer runs it (without the minutes of perplexity), the command it prints, and its
comparison of the committed band search's plan with yarn (on a short window: the same code, seconds)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from qroar_gguf import choices
from qroar_gguf.assets.austen import austen_text
from qroar_gguf.cli import main
from qroar_gguf.convert import ConvertOptions, convert
from qroar_gguf.demo import COMMITTED_SEARCHES, SEARCHED, comparison_lines, compare_searched, verdict
from qroar_gguf.digests import sha256_file
from qroar_gguf.evaluate.paired import PairedComparison
from qroar_gguf.llama_tools import find_tool
from qroar_gguf.rope.spec import PlanSpec

ROOT = Path(__file__).resolve().parents[1]

#: llama-cli answers one turn and exits (no terminal here)
ONE_TURN = ["-p", "Who is Emma Woodhouse?", "-n", "16", "-st", "--temp", "0", "-t", "2"]


def test_demo_converts_and_prints_a_command_that_runs_the_file(smollm2_dir):
    result = CliRunner().invoke(main, ["demo", "--qtype", "Q4_0", "--no-perplexity", "--quiet"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "3/4 perplexity: skipped (--no-perplexity)" in lines
    run_line = lines[lines.index("    run it with llama-cpp-python (the file needs no rope options):") + 1]
    command = shlex.split(run_line)
    model, n_ctx = command[-3], int(command[-2])
    assert model.endswith(".yarn.16384.Q4_0.gguf") and n_ctx == 16384
    # the committed search's plan at the same context and type, written beside it for the comparison
    searched = [line for line in lines if ".searched.16384.Q4_0.gguf: " in line]
    assert len(searched) == 1 and searched[0].endswith(f"({COMMITTED_SEARCHES[0].plan})"), lines

    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "the model generated nothing"

    # the last line: llama.cpp's llama-cli, built by the set-up, on this file; run here for one turn
    cli = shlex.split(lines[-1])
    assert cli[0] == str(find_tool("llama-cli")) and cli[1:] == ["-m", model, "-c", str(n_ctx)], lines[-1]
    server = shlex.split(lines[-3])
    assert server == [str(find_tool("llama-server")), "-m", model, "-c", str(n_ctx)], lines[-3]
    proc = subprocess.run([*cli, *ONE_TURN], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip(), "llama-cli answered nothing"


def test_the_committed_searches_are_the_ones_in_tools_results():
    reports = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tools" / "results").glob("search_*.json"))
    assert sorted(s.report for s in COMMITTED_SEARCHES) == reports
    for search in COMMITTED_SEARCHES:
        report = json.loads((ROOT / search.report).read_text())
        spec = PlanSpec.parse(search.plan)
        assert spec.method == report["base"]["method"] and not report["base"]["plan_options"], search
        assert list(spec.bands.factors) == report["best_factors"], search
        assert list(spec.bands.scales or [1.0] * spec.bands.count) == report["best_scales"], search
        assert spec.bands.is_symmetric == report["symmetric"] or not spec.bands.scales, search
        assert (search.ctx, search.qtype) == (report["base"]["target_ctx"], report["base"]["qtype"]), search
        assert search.dev_text_sha256 == report["dev_text_sha256"] == sha256_file(austen_text(search.dev_text))
    # the benchmarks run the 16k one by the same string
    bench = (ROOT / "tools" / "bench_smollm2.sh").read_text()
    assert re.search(r'^SEARCHED="([^"]+)"$', bench, re.MULTILINE).group(1) == COMMITTED_SEARCHES[0].plan
    # the demo's defaults: the searches' type, and a novel none of them saw
    assert {s.qtype for s in COMMITTED_SEARCHES} == {choices.DEMO_QTYPE}
    assert sha256_file(austen_text(choices.DEMO_TEXT)) not in {s.dev_text_sha256 for s in COMMITTED_SEARCHES}


def test_the_demo_compares_the_searched_plan_with_yarn_on_the_same_tokens(smollm2_dir, tmp_path: Path):
    search = COMMITTED_SEARCHES[0]
    files = {}
    for label, spec in (("yarn", PlanSpec("yarn")), (SEARCHED, PlanSpec.parse(search.plan))):
        files[label] = tmp_path / f"{label}.gguf"
        convert(smollm2_dir, files[label], ConvertOptions(plan=spec, target_ctx=search.ctx, qtype=search.qtype,
                                                          threads=2, progress=False))
    n_ctx = 1024  # the demo measures at search.ctx; a short window runs the same code in seconds
    title = choices.DEMO_TEXT
    c = compare_searched(search, files["yarn"], files[SEARCHED], search.qtype, title, austen_text(title), n_ctx,
                         threads=2)
    assert c.held_out and c.paired.n == c.yarn.n_scored == c.searched.n_scored == n_ctx - 1 - n_ctx // 2
    assert math.isclose(c.paired.ppl_ratio, c.searched.ppl / c.yarn.ppl, rel_tol=1e-9)
    lines = comparison_lines(c)
    assert lines[0] == (f"Q-ROAR's searched plan against yarn at {n_ctx} tokens, {search.qtype}, on {title}, which the "
                        f"search never saw (its dev text was {search.dev_text}):")
    assert lines[2].split()[:2] == ["yarn", f"{c.yarn.ppl:.2f}"]
    assert lines[3].split()[:2] == [SEARCHED, f"{c.searched.ppl:.2f}"] and search.plan in lines[3]
    assert f"paired on the same {c.paired.n} tokens: {c.paired.mean_diff:+.4f} +/- {c.paired.se:.4f}" in lines[4]
    assert lines[5] == verdict(c.paired, held_out=True)
    # on the search's own dev text the demo says it is no held-out test
    own = comparison_lines(dataclasses.replace(c, text_title=search.dev_text, held_out=False))
    assert own[0].endswith(f"on {search.dev_text}, the search's own dev text: not a held-out test:")
    assert own[5] == verdict(c.paired, held_out=False)


@pytest.mark.parametrize("mean_diff, words", [(-0.0124, "1.2% lower than yarn's on text the search never saw "
                                                         "(5.6 standard errors): Q-ROAR's band search gains"),
                                              (0.0124, "1.2% higher than yarn's on text the search never saw "
                                                       "(5.6 standard errors): Q-ROAR's band search loses"),
                                              (-0.0022, "tie on text the search never saw: the difference (0.2% in "
                                                        "perplexity) is 1.0 standard errors, within noise")])
def test_the_verdict_says_what_the_difference_means(mean_diff: float, words: str):
    p = PairedComparison(n=8191, mean_diff=mean_diff, se=0.0022, ppl_a=38.8, ppl_b=39.3)
    assert words in verdict(p, held_out=True)
    assert "on the search's own dev text" in verdict(p, held_out=False)
