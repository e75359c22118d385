"""`qroar-gguf demo`: the whole product on the embedded SmolLM2-135M model.

Converts the default model (unscaled, with the chosen plan at 2x its trained context, and with the
committed band search's plan at that context), then measures perplexity in llama.cpp on a public-domain
novel: the unscaled model at its trained context (the quality to keep), the unscaled model beyond it
(what breaks), our file beyond it, and the searched Q-ROAR plan against yarn on the same tokens (what
Q-ROAR adds). The default novel, Persuasion, is one the search never saw (its dev text was Emma).
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from qroar_gguf.arch.families import checkpoint_hparams
from qroar_gguf.assets.austen import austen_text
from qroar_gguf.assets.smollm2 import default_model_dir
from qroar_gguf.convert import ConvertOptions, convert
from qroar_gguf.digests import sha256_file
from qroar_gguf.errors import QroarError
from qroar_gguf.evaluate.paired import PairedComparison, paired_compare
from qroar_gguf.evaluate.perplexity import PerplexityResult, perplexity
from qroar_gguf.evaluate.runtime import Runtime
from qroar_gguf.llama_tools import find_tool
from qroar_gguf.paths import cache_dir
from qroar_gguf.rope.plans import extends
from qroar_gguf.rope.spec import PlanSpec


@dataclass(frozen=True)
class CommittedSearch:
    """A band search's result on SmolLM2 as committed in ``tools/results`` (`bash tools/bench_smollm2.sh
    search` and `search32k`); `tests/test_demo.py` holds these fields equal to that JSON."""

    plan: str  # the searched plan as a `method:key=value` string (PlanSpec.parse), as bench_smollm2.sh runs it
    ctx: int  # the target context it was searched at (a search's result does not carry over to another)
    qtype: str  # the quantization it was searched for
    dev_text: str  # the Austen novel it was measured on
    dev_text_sha256: str  # that text's digest, as the search recorded it
    report: str  # the JSON, relative to the repository


#: One per target context. The demo compares the one at its target context against yarn.
COMMITTED_SEARCHES = (
    CommittedSearch("qroar:band_factors=1/1/1.1/1,band_scales=1/1/1/1,symmetric=false", 16384, "Q4_0", "Emma",
                    "7c67b5985c6d0de1efaeb5d342d52cb82c38083c40e2295129e30e87ee690ebe",
                    "tools/results/search_emma16k_q4_0.json"),
    CommittedSearch("yarn:band_factors=1/1/0.9/0.9", 32768, "Q4_0", "Emma",
                    "7c67b5985c6d0de1efaeb5d342d52cb82c38083c40e2295129e30e87ee690ebe",
                    "tools/results/search_emma32k_q4_0.json"),
)
SEARCHED = "searched"  # the searched plan's label in the demo's output and file names


@dataclass(frozen=True)
class Comparison:
    """The searched plan against yarn at one context, on the same tokens of one text."""

    search: CommittedSearch
    qtype: str
    text_title: str
    held_out: bool  # the text is not the search's dev text
    searched: PerplexityResult
    yarn: PerplexityResult
    paired: PairedComparison  # searched - yarn, per token


def run_demo(method: str, ctx: int | None, qtype: str, text_title: str, threads: int, progress: bool,
             measure: bool = True, full: bool = False) -> dict:
    """The demo's four steps; `measure=False` stops after converting (no perplexity runs). `full` also
    compares every other committed search (at its own context) with yarn. Returns the measurements."""
    say = click.echo
    say("1/4 default model: SmolLM2-135M-Instruct rebuilt as a Hugging Face fp16 checkpoint")
    model_dir = default_model_dir(progress=progress)
    text_path = austen_text(text_title)
    text = text_path.read_text(encoding="utf-8")
    say(f"    {model_dir}\n    text: {text_title} by Jane Austen ({len(text.split())} words, {text_path})")

    work = cache_dir() / "demo"
    work.mkdir(exist_ok=True)
    trained = checkpoint_hparams(model_dir).context_length
    target = ctx or 2 * trained
    if not extends(trained, target):  # the plans' one rule: a longer context, never the trained one
        raise QroarError(f"--ctx {target} must be larger than the model's trained context {trained}: the demo "
                         "shows a longer context")
    searches = [s for s in COMMITTED_SEARCHES if s.ctx == target or (full and extends(trained, s.ctx))]
    searches.sort(key=lambda s: s.ctx != target)

    say(f"2/4 convert: --method {method} --ctx {target} --qtype {qtype} (and an unscaled file to compare"
        + (f"; the committed band search's plan and yarn at {', '.join(str(s.ctx) for s in searches)})" if searches
           else ")"))
    wanted = [("unscaled", PlanSpec("none"), trained), (method, PlanSpec(method), target)]
    for s in searches:
        wanted += [("yarn", PlanSpec("yarn"), s.ctx), (SEARCHED, PlanSpec.parse(s.plan), s.ctx)]
    files: dict[tuple[str, int], Path] = {}
    for label, spec, c in wanted:
        if (label, c) in files:
            continue
        out = work / f"SmolLM2-135M-Instruct.{label if label == SEARCHED else spec.method}.{c}.{qtype}.gguf"
        result = convert(model_dir, out, ConvertOptions(plan=spec, target_ctx=c, qtype=qtype, threads=threads,
                                                        force=True, progress=progress))
        f = result.factors
        say(f"    {out.name}: {out.stat().st_size / 2**20:.0f} MiB in {result.seconds:.1f} s, rope_freqs "
            f"{f.min():.3g}..{f.max():.3g}, attention scale {result.plan.attn_scale:.4g}"
            + (f" ({spec.label})" if label == SEARCHED else ""))
        files[(label, c)] = out
    if target not in {s.ctx for s in COMMITTED_SEARCHES}:
        say(f"    no committed band search at {target} tokens (they are at "
            f"{', '.join(str(s.ctx) for s in COMMITTED_SEARCHES)}; a search's result does not carry over to "
            "another context): no Q-ROAR comparison")

    rows: list[dict] = []
    comparisons: list[Comparison] = []
    if measure:
        rows, comparisons = _measure(files, method, trained, target, searches, qtype, text_title, text_path, text,
                                     threads, progress)
    else:
        say("3/4 perplexity: skipped (--no-perplexity)")

    say("4/4 summary")
    if rows:
        base, broken, ours = rows[:3]
        say(f"    beyond its trained context ({target} tokens) the unscaled model reaches PPL {broken['ppl']:.1f}; "
            f"with --method {method} it reaches {ours['ppl']:.1f} ({ours['ppl'] / broken['ppl']:.2f}x), against "
            f"{base['ppl']:.1f} at its own {trained} tokens.")
    for comparison in comparisons:
        for line in comparison_lines(comparison):
            say("    " + line)
    say("    run it with llama-cpp-python (the file needs no rope options):")
    say(f"      {shlex.join(run_command(files[(method, target)], target))}")
    measured = {"rows": rows, "comparisons": comparisons}
    try:
        cli, server = find_tool("llama-cli"), find_tool("llama-server")
    except QroarError as exc:
        say(f"    llama.cpp's own programs are not available here: {exc}")
        return measured
    say("    or serve it as Ollama does (llama.cpp's llama-server, built by the set-up; OpenAI API on port 8080):")
    say(f"      {shlex.join([str(server), '-m', str(files[(method, target)]), '-c', str(target)])}")
    say("    or chat with it in llama.cpp's llama-cli:")
    say(f"      {shlex.join([str(cli), '-m', str(files[(method, target)]), '-c', str(target)])}")
    return measured


def run_command(model: Path, n_ctx: int, prompt: str = "Emma Woodhouse, handsome, clever, and rich,") -> list[str]:
    """A command that loads `model` at `n_ctx` tokens in this interpreter's llama-cpp-python and continues `prompt`."""
    code = ("import sys; from llama_cpp import Llama; "
            "llm = Llama(sys.argv[1], n_ctx=int(sys.argv[2]), verbose=False); "
            'print(llm(sys.argv[3], max_tokens=24)["choices"][0]["text"])')
    return [sys.executable, "-c", code, str(model), str(n_ctx), prompt]


def compare_searched(search: CommittedSearch, yarn_file: Path, searched_file: Path, qtype: str, text_title: str,
                     text_path: Path, n_ctx: int, threads: int, progress: bool = False,
                     yarn: PerplexityResult | None = None) -> Comparison:
    """Both files on the same window of the text at `n_ctx` tokens, paired per token (`yarn`: its window
    already measured)."""
    text = text_path.read_text(encoding="utf-8")
    if yarn is None:
        yarn = _window(yarn_file, "yarn", n_ctx, text, threads, progress)
    searched = _window(searched_file, SEARCHED, n_ctx, text, threads, progress)
    return Comparison(search=search, qtype=qtype, text_title=text_title,
                      held_out=sha256_file(text_path) != search.dev_text_sha256, searched=searched, yarn=yarn,
                      paired=paired_compare(searched.nll, yarn.nll))


def comparison_lines(c: Comparison) -> list[str]:
    """The comparison as a small table and one line saying what the numbers mean (from the numbers)."""
    p, n_ctx = c.paired, c.searched.n_ctx
    source = (f"{c.text_title}, which the search never saw (its dev text was {c.search.dev_text})" if c.held_out
              else f"{c.text_title}, the search's own dev text: not a held-out test")
    lo, hi = p.ratio_ci95
    lines = [f"Q-ROAR's searched plan against yarn at {n_ctx} tokens, {c.qtype}, on {source}:",
             f"  {'plan':<9} {'PPL':>8}",
             f"  {'yarn':<9} {c.yarn.ppl:8.2f} +/- {c.yarn.ppl_se:.2f}",
             f"  {SEARCHED:<9} {c.searched.ppl:8.2f} +/- {c.searched.ppl_se:.2f}   {c.search.plan} ({c.search.report}"
             + (f", searched for {c.search.qtype})" if c.search.qtype != c.qtype else ")"),
             f"  searched - yarn, paired on the same {p.n} tokens: {p.mean_diff:+.4f} +/- {p.se:.4f} nats/token "
             f"(PPL ratio {p.ppl_ratio:.3f}, 95% CI {lo:.3f}..{hi:.3f})",
             verdict(p, c.held_out)]
    return lines


def verdict(p: PairedComparison, held_out: bool) -> str:
    """One line: what the paired difference says, in words, from its value and standard error."""
    change = abs(p.ppl_ratio - 1) * 100
    where = "on text the search never saw" if held_out else "on the search's own dev text"
    if abs(p.z) < 2:
        return (f"=> the two plans tie {where}: the difference ({change:.1f}% in perplexity) is {abs(p.z):.1f} "
                "standard errors, within noise.")
    better = p.mean_diff < 0
    return (f"=> the searched plan's perplexity is {change:.1f}% {'lower' if better else 'higher'} than yarn's "
            f"{where} ({abs(p.z):.1f} standard errors): Q-ROAR's band search "
            + ("gains over yarn here." if better else "loses to yarn here."))


def _window(path: Path, label: str, n_ctx: int, text: str, threads: int, progress: bool) -> PerplexityResult:
    with Runtime(path, n_ctx=n_ctx, threads=threads) as rt:
        res = perplexity(rt, text, max_chunks=1, quiet=not progress, desc=f"{label} @ {n_ctx}")
    click.echo(f"    {label:>9} at {n_ctx:>6} tokens: PPL {res.ppl:8.2f} +/- {res.ppl_se:.2f}  ({res.seconds:.0f} s)")
    return res


def _measure(files: dict[tuple[str, int], Path], method: str, trained: int, target: int,
             searches: list[CommittedSearch], qtype: str, text_title: str, text_path: Path, text: str, threads: int,
             progress: bool) -> tuple[list[dict], list[Comparison]]:
    click.echo(f"3/4 perplexity in llama.cpp (one window each, second half scored, {threads} threads)")
    rows, measured = [], {}
    for label, key, n_ctx in (("unscaled", ("unscaled", trained), trained), ("unscaled", ("unscaled", trained), target),
                              (method, (method, target), target)):
        res = measured[(key, n_ctx)] = _window(files[key], label, n_ctx, text, threads, progress)
        rows.append({"file": label, "ctx": n_ctx, "ppl": res.ppl, "ppl_se": res.ppl_se, "seconds": res.seconds})
    comparisons = [compare_searched(s, files[("yarn", s.ctx)], files[(SEARCHED, s.ctx)], qtype, text_title, text_path,
                                    s.ctx, threads, progress, yarn=measured.get((("yarn", s.ctx), s.ctx)))
                   for s in searches]
    return rows, comparisons
