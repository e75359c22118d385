#!/usr/bin/env python3
"""Regenerate the measured sections of README.md and docs/results.md from committed benchmark JSON
(numbers are never typed by hand).

Sections between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->` are replaced; `PAGES` says
which file holds which section (every one must have its markers):
  headline  README's small table: the searched plan, qroar and linear against yarn on the held-out novels
  summary   every contender's paired PPL ratio to yarn, per bench run beyond the trained context
  quality   from bench/*/results.json (tools/bench_smollm2.sh)
  convert   from tools/results/convert_bench.json (tools/bench_convert.py)
  tail      from tools/results/tail_inflation.json (tools/bench_tail.py)
  weights   from tools/results/band_weight_error.json (tools/bench_band_weight_error.py)
  search    from tools/results/search_*.json (`bash tools/bench_smollm2.sh search`)
  patch     from tools/results/patch_bench.json (tools/bench_patch.py) and patch_sizes*.json
            (tools/bench_patch_sizes.py)
  tools     from tools/results/llama_tools_bench.json (tools/bench_llama_tools.py)
  imatrix   from tools/results/imatrix_bench.json (tools/bench_imatrix.py)
  imatrix-gpu  from tools/results/imatrix_gpu.json (tools/gpu_session.sh on a GPU machine)
  context_shift  from tools/results/context_shift_bench.json (tools/bench_context_shift.py)

A benchmark not yet run and committed leaves its section saying so, with the command that fills it.

    python tools/update_readme.py            # rewrite the sections
    python tools/update_readme.py --check    # exit 1, naming the pages, when they are out of date
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMOLLM2_TRAINED_CTX = 8192  # every committed bench run is on SmolLM2 (tools/bench_smollm2.sh)


def _bench_results() -> list[tuple[Path, dict]]:
    return [(path, json.loads(path.read_text())) for path in sorted((REPO / "bench").glob("*/results.json"))]


def quality_section() -> str:
    from qroar_gguf.evaluate.bench import results_markdown

    parts = []
    for path, results in _bench_results():
        rel = path.parent.relative_to(REPO)
        cmd = (f"`qroar-gguf bench` via `bash tools/bench_smollm2.sh` → `{rel}/results.json`")
        parts.append(f"**{rel.name}** ({cmd}; text: {results['text']}, {results['chunks']} window(s) per "
                     f"context, key cache {results['type_k']})\n")
        parts.append(results_markdown(results).split("\n", 2)[2])
    if not parts:
        return "_No benchmark results committed yet: run `bash tools/bench_smollm2.sh`._\n"
    return "\n".join(parts)


def summary_section() -> str:
    """One line per (run, ctx, qtype, key cache) beyond the trained context: every contender against yarn."""
    columns = ("qroar", "searched", "ntk", "llama3", "linear")
    lines = ["| run | text | ctx | qtype | K cache | yarn PPL | " + " | ".join(f"{c} / yarn" for c in columns) + " |",
             "|" + "---|" * (6 + len(columns))]
    for path, results in _bench_results():
        groups: dict = {}
        for r in results["rows"]:
            if r["ctx"] > SMOLLM2_TRAINED_CTX:
                groups.setdefault((r["ctx"], r["qtype"], r["type_k"]), {})[_kind(r["plan"])] = r
        for (ctx, qtype, type_k), rows in sorted(groups.items()):
            if "yarn" not in rows:
                continue
            cells = []
            for c in columns:
                r = rows.get(c)
                if r is None or "ratio_to_yarn" not in r:
                    cells.append("-")
                else:
                    lo, hi = r["ratio_to_yarn_ci95"]
                    cells.append(f"{r['ratio_to_yarn']:.3f} [{lo:.3f}, {hi:.3f}]")
            if all(c == "-" for c in cells):
                continue
            lines.append(f"| {path.parent.name} | {Path(results['text']).stem} | {ctx} | {qtype} | {type_k} | "
                         f"{rows['yarn']['ppl']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def headline_section() -> str:
    """README's table: each committed band search's result at its own context, on every bench run of a text
    other than the search's dev text (held out), against yarn; qroar and linear beside it where measured.

    A search is matched to bench rows by what it found (base method and band factors, at its dev context and
    qtype), so the table says only what the committed JSON says."""
    searches = [json.loads(p.read_text()) for p in sorted((REPO / "tools" / "results").glob("search_*.json"))]
    merged: dict = {}  # (ctx, text, qtype) -> {column: row}; a plan's file is the same in every run (cached)
    for _, results in _bench_results():
        for r in results["rows"]:
            if r["ctx"] > SMOLLM2_TRAINED_CTX and r["type_k"] == "f16":
                cells = merged.setdefault((r["ctx"], Path(results["text"]).stem, r["qtype"], results["text_sha"]), {})
                cells.setdefault(r["plan"], r)
    lines = []
    for s in sorted(searches, key=lambda s: s["dev_ctx"]):
        for (ctx, text, qtype, sha), rows in sorted(merged.items()):
            found = next((r for r in rows.values() if _found_by(r, s)), None)
            if (ctx, qtype) != (s["dev_ctx"], s["base"]["qtype"]) or sha == s["dev_text_sha256"] or found is None \
                    or "yarn" not in rows:
                continue
            cells = [_ratio(r) for r in (found, rows.get("qroar"), rows.get("linear"))]
            lines.append(f"| {ctx} ({ctx // SMOLLM2_TRAINED_CTX}x) | {text.replace('_', ' ')} | {qtype} | "
                         f"{rows['yarn']['ppl']:.2f} | " + " | ".join(cells) + " |")
    if not lines:
        return "_No band search with held-out bench runs committed yet: run `bash tools/bench_smollm2.sh`._\n"
    return ("| context (trained 8192) | held-out novel | qtype | yarn PPL | searched / yarn | qroar / yarn | "
            "linear / yarn |\n|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n\n"
            "SmolLM2-135M-Instruct; paired per-token PPL ratio to yarn with its 95% "
            "interval, below 1 is better; `searched`: what `convert --search` found at that context on Emma "
            "(`tools/results/search_*.json`), a text these novels are not; `-`: not measured. From "
            "`bench/*/results.json` (`bash tools/bench_smollm2.sh`).\n")


def _found_by(row: dict, search: dict) -> bool:
    """Whether a bench row's plan is what `search` found: its base method with the best band values."""
    options = row.get("options") or {}

    def values(key: str) -> list[float]:
        return [float(v) for v in options[key].split("/")] if key in options else []

    scales = values("band_scales") or [1.0] * len(search["best_scales"])
    return (row["method"] == search["base"]["method"] and values("band_factors") == search["best_factors"]
            and scales == search["best_scales"])


def _ratio(row: dict | None) -> str:
    if row is None or "ratio_to_yarn" not in row:
        return "-"
    lo, hi = row["ratio_to_yarn_ci95"]
    return f"{row['ratio_to_yarn']:.3f} [{lo:.3f}, {hi:.3f}]"


def _kind(plan: str) -> str:
    """A bench plan's column: a plan with band factors is a searched variant (the search moved only factors).

    Plans with band scales alone (the symmetric-scale runs) have no summary column: the quality tables hold them.
    """
    return "searched" if "band_factors=" in plan else plan


def _tool_result(name: str) -> dict | None:
    """tools/results/NAME as a dict, or None when that benchmark has not been run and committed."""
    path = REPO / "tools" / "results" / name
    return json.loads(path.read_text()) if path.is_file() else None


def _not_measured(command: str) -> str:
    return f"_Not measured yet: run `{command}`._\n"


def convert_section() -> str:
    r = _tool_result("convert_bench.json")
    if r is None:
        return _not_measured("python tools/bench_convert.py")
    ours, theirs = r["qroar_gguf"], r["convert_hf_to_gguf"]
    return (f"`python tools/bench_convert.py` → `tools/results/convert_bench.json` ({r['model']}, F16, "
            f"{r['machine']['cpus']} cores, median of {r['repeats']} runs):\n\n"
            "| tool | wall time | peak RSS |\n|---|---|---|\n"
            f"| qroar-gguf convert | {ours['wall_s_median']:.2f} s | {ours['peak_rss_mib_max']:.0f} MiB |\n"
            f"| llama.cpp convert_hf_to_gguf.py | {theirs['wall_s_median']:.2f} s | "
            f"{theirs['peak_rss_mib_max']:.0f} MiB |\n\n"
            f"Ratio ours/theirs: wall {r['wall_ratio_ours_over_theirs']:.2f}x, peak RSS "
            f"{r['rss_ratio_ours_over_theirs']:.2f}x; our peak RSS is "
            f"{r['our_peak_rss_over_largest_tensor']:.1f}x the largest tensor "
            f"({r['largest_tensor']['name']}, {r['largest_tensor']['mib']:.0f} MiB).\n")


def patch_section() -> str:
    r = _tool_result("patch_bench.json")
    if r is None:
        return _not_measured("python tools/bench_patch.py")
    s, q = r["speed"], r["quality"]
    p = q["paired"]
    return (f"`python tools/bench_patch.py` → `tools/results/patch_bench.json` ({r['machine']['cpus']} cores).\n\n"
            f"Speed, on SmolLM2 as an unscaled F32 GGUF of {s['file_mib']:.0f} MiB (median of {s['repeats']} runs, "
            "alternating, same run):\n\n"
            "| tool | wall time | peak RSS |\n|---|---|---|\n"
            f"| qroar-gguf patch --method yarn | {s['median']['patch']['seconds']:.2f} s | "
            f"{s['median']['patch']['peak_rss_mib']:.0f} MiB |\n"
            f"| cp | {s['median']['cp']['seconds']:.2f} s | {s['median']['cp']['peak_rss_mib']:.0f} MiB |\n\n"
            f"patch / cp wall time: {s['wall_ratio_patch_over_cp']:.2f}x, Python's start-up included (`qroar-gguf "
            f"--version` alone takes {s['startup_seconds']:.2f} s); "
            f"patch's peak RSS, {s['median']['patch']['peak_rss_mib']:.0f} MiB, is 2x the largest attention tensor "
            f"({s['largest_attention_tensor_mib']:.1f} MiB) plus "
            f"{s['median']['patch']['peak_rss_mib'] - 2 * s['largest_attention_tensor_mib']:.0f} MiB for the "
            "interpreter and its libraries: tensor data never passes through the process.\n\n"
            f"Quality, {q['method']} at {q['ctx']} tokens ({q['ctx'] // q['trained_ctx']}x), {q['qtype']}, one "
            f"window of {q['text']} ({q['n_scored']} scored tokens): the patched file (its attention scale "
            f"{q.get('attention_scale', 'as `attn_factor`, the form patch wrote when this was measured')}) has PPL "
            f"{q['ppl_patched']:.3f}, the file convert makes (scale folded into W_Q/W_K "
            f"before quantizing) {q['ppl_converted']:.3f}; per-token NLL difference {p['mean_diff']:+.4f} "
            f"nats ({p['z']:+.2f} standard errors).\n" + _patch_sizes())


def _patch_sizes() -> str:
    """patch against cp by file size (tools/bench_patch_sizes.py), on ext4 and on a copy-on-write file system."""
    parts = []
    for name in ("patch_sizes.json", "patch_sizes_xfs.json"):
        r = _tool_result(name)
        if r is None:
            continue
        base = f", and the patch of commit {r['baseline_commit']} (before the cuts and block sharing)" if r["baseline_commit"] else ""
        lines = ["", f"`python tools/bench_patch_sizes.py` → `tools/results/{name}` ({r['machine']['cpus']} cores, "
                 f"{r['machine']['ram_gib']:.0f} GiB RAM, {r['machine']['file_system']}, commit {r['commit']}, "
                 f"{r['when']}): synthetic qwen3 Q8_0 files (a keys-only arch), `patch --method yarn --scale 4` "
                 f"against `cp`{base}, alternating, fresh output each run, median of {r['repeats']}; load "
                 "average (1 min) during the runs as measured:", ""]
        tools = ["cp", "patch"] + (["patch_baseline"] if r["baseline_commit"] else [])
        names = {"cp": "cp", "patch": "patch", "patch_baseline": f"patch ({r['baseline_commit']})"}
        lines.append("| file | " + " | ".join(f"{names[t]} wall" for t in tools) + " | patch / cp | "
                     + (f"{names['patch_baseline']} / cp | " if r["baseline_commit"] else "")
                     + "patch peak RSS | space taken by the output: cp, patch | load |")
        lines.append("|---|" + "---|" * (len(tools) + 4 + bool(r["baseline_commit"])))
        for size in r["sizes"]:
            m = size["median"]
            loads = [run["load1"] for runs in size["runs"].values() for run in runs]
            lines.append(f"| {size['file_mib'] / 1024:.2f} GiB ({size['n_layer']} layers of {size['shapes_of']}) | "
                         + " | ".join(f"{m[t]['seconds']:.2f} s" for t in tools)
                         + f" | {size['ratio_patch_over_cp']:.2f}x | "
                         + (f"{size['ratio_baseline_over_cp']:.2f}x | " if r["baseline_commit"] else "")
                         + f"{m['patch']['peak_rss_mib']:.0f} MiB | {m['cp']['grew_mib']:.0f}, {m['patch']['grew_mib']:.0f} MiB | "
                         f"{min(loads):.1f}-{max(loads):.1f} |")
        parts.append("\n".join(lines) + "\n")
    return "".join(parts)


def context_shift_section() -> str:
    r = _tool_result("context_shift_bench.json")
    if r is None:
        return _not_measured("python tools/bench_context_shift.py")
    names = {"folded": "patch (scale in W_Q/W_K's block scales)", "key": "patch --attn-factor-key (scale as attn_factor)",
             "unscaled": "the unscaled model"}
    lines = [f"`{r['command'].strip()}` → `tools/results/context_shift_bench.json` ({r['machine']['cpus']} cores): "
             f"{r['model']} {r['qtype']}, {r['plan']}, {r['text']} streamed through a {r['window']}-token window with "
             f"{r['shifts']} stock llama.cpp context shifts of {r['discard']} tokens ({r['kv_cache']} KV cache), "
             "against the same tokens without shifts:", "",
             "| file | " + " | ".join(f"PPL ratio after shift {s['shift']}" for s in r["files"]["folded"]["per_shift"])
             + " | cached key norms after the last | mean PPL ratio over the shifts |",
             "|---|" + "---|" * (len(r["files"]["folded"]["per_shift"]) + 2)]
    for name, f in r["files"].items():
        ratios = [s["ratio"] for s in f["per_shift"]]
        mean = math.exp(sum(math.log(x) for x in ratios) / len(ratios))  # geometric: ratios of perplexities
        lines.append(f"| {names.get(name, name)} | " + " | ".join(f"{x:.4f}" for x in ratios)
                     + f" | x{f['per_shift'][-1]['key_norm_ratio']:.4f} | {mean:.4f} |")
    lines += ["", f"Each shift drops {r['discard']} of the window's {r['window']} tokens, so every cached key is moved by "
              "one shift before it is dropped (llama-server's default drops half the window): the key form's extra "
              "factor is applied once to every key and its cost comes back after every shift. With smaller drops a key "
              "is moved several times and the factor compounds (`tests/test_context_shift.py` measures both)."]
    return "\n".join(lines) + "\n"


def tail_section() -> str:
    r = _tool_result("tail_inflation.json")
    if r is None:
        return _not_measured("python tools/bench_tail.py")
    lines = [f"`python tools/bench_tail.py` → `tools/results/tail_inflation.json` ({r['model']}, {r['short_ctx']} → "
             f"{r['long_ctx']} tokens, quantile {r['quantile']}; TIR / largest per-layer ratio):", "",
             "| plan | high | ramp | low | all pairs |", "|---|---|---|---|---|"]
    rows = dict(r["plans"])
    if r.get("control"):
        rows[f"control (none at {r['control']['ctx'] if 'ctx' in r['control'] else 'L'})"] = r["control"]
    for name, plan in rows.items():
        cells = []
        for band in ("high", "ramp", "low", "all"):
            b = plan["bands"][band]
            cells.append(f"{b['tir']:.3f} / {max(b['per_layer']):.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def weights_section() -> str:
    r = _tool_result("band_weight_error.json")
    if r is None:
        return _not_measured("python tools/bench_band_weight_error.py")
    lines = [f"`python tools/bench_band_weight_error.py` → `tools/results/band_weight_error.json` ({r['model']}, "
             f"{r['plan']} at {r['ctx']}, {r['bands']} bands; relative W_Q/W_K error per band):", "",
             "| band scales | qtype | band 0 | band 1 | band 2 | band 3 |", "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['setting']} | {row['qtype']} | "
                     + " | ".join(f"{e:.4f}" for e in row["relative_error_per_band"]) + " |")
    return "\n".join(lines) + "\n"


def search_section() -> str:
    results = REPO / "tools" / "results"
    paths = sorted(results.glob("search_*.json")) + sorted(results.glob("population_*.json"))
    if not paths:
        return "_No search committed yet: run `bash tools/bench_smollm2.sh search`._\n"
    parts = []
    for path in paths:
        r = json.loads(path.read_text())
        seconds = sum(c["seconds"] for c in r["candidates"])
        scales = f"{'symmetric' if r.get('symmetric') else 'non-symmetric'} band scales"
        searched = {"factors": "band factors only", "scales": scales, "both": f"band factors and {scales}"}[r["space"]]
        strategy = ("CMA-ES, generations of " + str(r["population"]) if r.get("strategy") == "cmaes"
                    else "coordinate descent")
        stopped = {"budget": ", all of its budget", "time": ", stopped by its time budget",
                   "converged": ", stopped when it converged"}.get(r.get("stopped_by"), "")
        order = f"; bands searched in the order {r['band_order']}" if r.get("strategy", "descent") == "descent" else ""
        parts += [f"`{path.relative_to(REPO)}`: {strategy} from `{r['base']['method']}`, {searched}, objective "
                  f"{r['objective']} at "
                  f"{r['dev_ctx']} tokens, "
                  f"{r['dev_chunks'] or 'all'} window(s) of the dev text ({r['dev_scored_tokens']} scored tokens), "
                  f"budget {r['budget']}, {r['evaluations']} candidates{stopped}, {seconds / 60:.0f} min of "
                  f"measurement on two cores{order}. Dev PPL {r['start_ppl']:.3f} → "
                  f"{r['ppl']:.3f} ({(r['ppl'] / r['start_ppl'] - 1) * 100:+.2f}%).", "",
                  "| # | band factors | band scales | dev PPL | best so far |", "|---|---|---|---|---|"]
        best = None
        for i, c in enumerate(r["candidates"], 1):
            ran = c["objective"] is not None  # a failed candidate has no objective (its reason is in the JSON)
            best = c if ran and (best is None or c["objective"] < best["objective"]) else best
            ppl = f"{c['ppl']:.3f}" if ran else "failed"
            parts.append(f"| {i} | {', '.join(f'{v:g}' for v in c['factors'])} | "
                         f"{', '.join(f'{v:g}' for v in c['scales'])} | {ppl} | {best['ppl']:.3f} |")
        parts.append("")
    return "\n".join(parts)


def tools_section() -> str:
    r = _tool_result("llama_tools_bench.json")
    if r is None:
        return _not_measured("python tools/bench_llama_tools.py --builds")
    a, k = r["agreement"], r["server_passkey"]
    command = "python tools/bench_llama_tools.py" + (" --builds" if r.get("builds") else "")
    lines = [f"`{command}` → `tools/results/llama_tools_bench.json` "
             f"({r['machine']['cpus']} cores; SmolLM2 converted with {r['method']} for {a['ctx']} tokens, "
             f"{r['qtype']}).", ""]
    lines.append(f"- `llama-perplexity` and `qroar-gguf eval` on {a['chunks']} window(s) of {a['ctx']} tokens of "
                 f"{r['text']} ({a['n_scored']} scored tokens): PPL {a['ppl_llama_perplexity']:.4f} and "
                 f"{a['ppl_eval']:.4f}, a relative difference of {a['relative_difference']:+.1e} "
                 f"({a['seconds_llama_perplexity']:.0f} s and {a['seconds_eval']:.0f} s).")
    answers = ", ".join(f"{t['depth']:.0%}: {'found' if t['correct'] else 'missed'} ({t['prompt_tokens']} tokens, "
                        f"{t['seconds']:.0f} s)" for t in k["trials"])
    lines.append(f"- `llama-server -c {k['ctx']}` (the file's context, read back as n_ctx_train "
                 f"{k['n_ctx_train_read_by_server']}), passkey prompts through its HTTP API, key depth: {answers}.")
    c = r.get("server_passkey_control")
    if c:
        missed = ", ".join(f"{t['depth']:.0%}: {'found' if t['correct'] else 'missed'}" for t in c["trials"])
        lines.append(f"- The same prompts to the control (the same weights converted with no plan, so positions past "
                     f"the trained context are not rescaled): {missed}.")
    if r.get("build"):
        lines.append(f"- The set-up's build of llama.cpp that these ran (`llama_cpp_version` "
                     f"{r['build']['llama_cpp_version']}, patches {', '.join(r['build']['patches']) or 'none'}) took "
                     f"{r['build']['build_seconds']:.0f} s.")
    b = r.get("builds")
    if b:
        lines.append(f"- Providing llama.cpp from scratch: the tools' build (its libllama serving the bindings too) "
                     f"{b['tools_build_seconds']:.0f} s plus the bindings-only wheel {b['bindings_only_wheel_seconds']:.0f} s "
                     f"= {b['one_llama_cpp_seconds']:.0f} s, against {b['two_llama_cpps_seconds']:.0f} s with the bindings' "
                     f"own portable wheel ({b['portable_wheel_seconds']:.0f} s) built as well; the set-up does the first.")
    return "\n".join(lines) + "\n"


def imatrix_section() -> str:
    r = _tool_result("imatrix_bench.json")
    if r is None:
        return _not_measured("python tools/bench_imatrix.py")
    lines = [f"`python tools/bench_imatrix.py` → `tools/results/imatrix_bench.json` ({r['machine']['cpus']} cores): "
             f"SmolLM2 with {r['method']} at {r['target_ctx']} tokens ({r['target_ctx'] // r['trained_ctx']}x); matrices "
             f"from {r['imatrix_tokens']} tokens of {r['calibration']} on the plan-applied F16; evaluated on one "
             f"{r['target_ctx']}-token window of {r['evaluation']} against that F16.", "",
             "| type | imatrix | size | KLD | PPL / F16 | vs no imatrix (PPL ratio, 95% CI) | matrix cost |",
             "|---|---|---|---|---|---|---|"]
    for run in r["runs"]:
        if run["imatrix"] == "none":
            matrix, paired, cost = "none", "", ""
        else:
            matrix = f"{run['imatrix']} ({run['imatrix_chunks']} x {run['imatrix_ctx']})"
            paired = _ci(run["vs_none"], digits=4)
            cost = "cached" if run["imatrix_seconds"] is None else f"{run['imatrix_seconds']:.0f} s"
        lines.append(f"| {run['qtype']} | {matrix} | {run['size_mib']:.1f} MiB | {run['kld_mean']:.4f} ± "
                     f"{run['kld_se']:.4f} | {run['ppl_ratio_to_f16']:.4f} | {paired} | {cost} |")
    return "\n".join(lines) + "\n"


def _ci(v: dict, digits: int = 3) -> str:
    """A paired PPL ratio with its 95% interval."""
    lo, hi = v["ppl_ratio_ci95"]
    return f"{v['ppl_ratio']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def ctx_label(scale, trained: int) -> str:
    return f"{scale}x ({int(trained * scale)} tokens)"


def _imatrix_findings(runs: list[dict]) -> list[str]:
    """The issue's questions, answered from the rows (each line only where its rows were measured)."""
    def row(ctx, plan, qtype, imatrix, attn=None):
        return next((r for r in runs if (r["target_ctx"], r["plan"], r["qtype"], r["imatrix"], r["attn_type"])
                     == (ctx, plan, qtype, imatrix, attn)), None)

    lines = []
    for ctx in sorted({r["target_ctx"] for r in runs}):
        for plan in sorted({r["plan"] for r in runs if r["target_ctx"] == ctx}, reverse=True):
            parts = []
            none, short = row(ctx, plan, "Q4_K_M", "none"), row(ctx, plan, "Q4_K_M", "short")
            if none and short:
                parts.append(f"Q4_K_M's PPL over F16 {100 * (none['ppl_ratio_to_f16'] - 1):.1f}% without a matrix, "
                             f"{100 * (short['ppl_ratio_to_f16'] - 1):.1f}% with the short one (target: within 3%)")
            cuts = [(qtype, none, short) for qtype in ("Q4_0", "Q3_K_M")
                    for none, short in [(row(ctx, plan, qtype, "none"), row(ctx, plan, qtype, "short"))]
                    if none and short]
            if cuts:
                parts.append("the short matrix cuts the KLD of " + ", ".join(
                    f"{qtype} by {100 * (1 - short['kld_mean'] / none['kld_mean']):.0f}%" for qtype, none, short in cuts)
                    + " (target for Q4_0: halved)")
            versus = [f"{r['qtype']} {_ci(r['vs_short'])}" for r in runs
                      if (r["target_ctx"], r["plan"]) == (ctx, plan) and not r["attn_type"] and "vs_short" in r]
            if versus:
                parts.append("target-context matrix / short one, PPL ratio: " + ", ".join(versus))
            if parts:
                lines.append(f"- {ctx} tokens, {plan}: " + "; ".join(parts) + ".")
        parts = []
        for name in ("none", "short", "target"):
            higher = [r for r in runs if r["target_ctx"] == ctx and r["attn_type"] and r["imatrix"] == name
                      and "vs_attn_default" in r]
            if not higher:
                continue
            ratios = [r["vs_attn_default"]["ppl_ratio"] for r in higher]
            kld = [100 * (r["kld_mean"] / row(ctx, r["plan"], r["qtype"], name)["kld_mean"] - 1) for r in higher]
            worse = sum(r["vs_attn_default"]["ppl_ratio_ci95"][0] > 1 for r in higher)
            better = sum(r["vs_attn_default"]["ppl_ratio_ci95"][1] < 1 for r in higher)
            parts.append(f"{'without a matrix' if name == 'none' else f'with the {name} matrix'} ({len(higher)} "
                         f"files) KLD {min(kld):+.0f}% to {max(kld):+.0f}%, PPL ratio {min(ratios):.3f} to "
                         f"{max(ratios):.3f} (better in {better}, worse in {worse})")
        if parts:
            higher = [r for r in runs if r["target_ctx"] == ctx and r["attn_type"]]
            lines.append(f"- {ctx} tokens, attn_q/attn_k at {' or '.join(sorted({r['attn_type'] for r in higher}))} "
                         f"against the type's default ({', '.join(sorted({r['plan'] for r in higher}))}): "
                         + "; ".join(parts) + ".")
    return lines


def imatrix_grid_section() -> str:
    r = _tool_result("imatrix_gpu.json")
    if r is None:
        return _not_measured("bash tools/gpu_session.sh (on a machine with an NVIDIA GPU)")
    gpu = r["machine"].get("gpu", "a GPU")
    done = [run for run in r["runs"] if "kld_mean" in run]
    skipped = [run for run in r["runs"] if "kld_mean" not in run]
    order = {"none": 0, "short": 1, "target": 2}

    def key(x):
        return x["target_ctx"], x["plan"] != "yarn", x["plan"], x["qtype"], order[x["imatrix"]], x["attn_type"] or ""

    def matrix(run):
        return run["imatrix"] if run["imatrix"] == "none" else \
            f"{run['imatrix']} ({run['imatrix_chunks']} x {run['imatrix_ctx']})"

    def quality(run):
        return f"{run['kld_mean']:.4f} ± {run['kld_se']:.4f} | {run['ppl_ratio_to_f16']:.4f}"

    lines = [f"`bash tools/gpu_session.sh` → `tools/results/imatrix_gpu.json` (llama.cpp built with CUDA, {gpu}; "
             f"{r['machine']['cpus']} cores): SmolLM2 (trained {r['trained_ctx']}) with each plan at each target "
             f"context (`searched`: the band factors of the committed `search_emma*k_q4_0.json`); matrices from "
             f"{r['imatrix_tokens']} tokens of {r['calibration']} on the plan-applied F16; evaluated on one "
             f"target-context window of {r['evaluation']} against that F16 (KLD, PPL ratio). Paired columns: "
             "per-token NLL against the same file without a matrix, and the target matrix against the short one "
             "(PPL ratio, 95% CI; below 1 is better).", "",
             "| ctx | plan | type | imatrix | size | KLD | PPL / F16 | vs none | target vs short |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in sorted((x for x in done if not x["attn_type"]), key=key):
        cells = [_ci(run[k]) if k in run else "" for k in ("vs_none", "vs_short")]
        lines.append(f"| {run['target_ctx']} | {run['plan']} | {run['qtype']} | {matrix(run)} | "
                     f"{run['size_mib']:.1f} MiB | {quality(run)} | " + " | ".join(cells) + " |")
    higher = sorted((x for x in done if x["attn_type"]), key=key)
    if higher:
        lines += ["", "attn_q/attn_k at a higher type (`--tensor-type`), size against quality; the last column "
                  "pairs each file with the same one at the type's own attn_q/attn_k type.", "",
                  "| ctx | plan | type | imatrix | attn_q/k | size | KLD | PPL / F16 | vs default attn |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for run in higher:
            base = next((x for x in done if not x["attn_type"] and key(x)[:5] == key(run)[:5]), None)
            grown = f" (+{run['size_mib'] - base['size_mib']:.1f})" if base else ""
            lines.append(f"| {run['target_ctx']} | {run['plan']} | {run['qtype']} | {matrix(run)} | "
                         f"{run['attn_type']} | {run['size_mib']:.1f} MiB{grown} | {quality(run)} | "
                         f"{_ci(run['vs_attn_default']) if 'vs_attn_default' in run else ''} |")
    lines += [""] + _imatrix_findings(done)
    cost = _tool_result("imatrix_cost.json")
    if cost:
        ref = cost["references"][0]
        mats = ", ".join(f"{m['imatrix']} ({m['chunks']} x {m['ctx']}) {m['seconds']:.0f} s" for m in cost["matrices"]
                         if m["seconds"] is not None)
        lines.append(f"- Cost on {cost['machine']['cpus']} cores (`tools/bench_imatrix.py --matrices-only`, "
                     f"`tools/results/imatrix_cost.json`), at {ctx_label(ref['scale'], cost['trained_ctx'])}: "
                     f"converting the F16 file {ref['seconds']:.0f} s; the matrices: {mats}. At 2x see the cost column "
                     "of the CPU table above.")
    if skipped:
        lines += ["", "Not measured in that run (time ran out or failed): "
                  + "; ".join(f"{x['target_ctx']} {x['plan']} {x['qtype']} {x['imatrix']}"
                              + (f" attn {x['attn_type']}" if x["attn_type"] else "") for x in skipped) + "."]
    return "\n".join(lines) + "\n"


#: Which page holds which generated section; each page must carry the markers of all of its sections.
PAGES = {
    "README.md": {"headline": headline_section},
    "docs/results.md": {"summary": summary_section, "quality": quality_section, "search": search_section,
                        "tail": tail_section, "weights": weights_section, "patch": patch_section,
                        "context_shift": context_shift_section, "convert": convert_section, "tools": tools_section,
                        "imatrix": imatrix_section, "imatrix-gpu": imatrix_grid_section},
}


def render(page: str, text: str) -> str:
    """`text` (the page's current content) with each of its generated sections rewritten."""
    for name, section in PAGES[page].items():
        pattern = re.compile(rf"(<!-- generated:{name} -->\n).*?(<!-- /generated:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{page} has no generated:{name} markers")
        body = section()
        text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
    return text


def main(argv: list[str]) -> int:
    check = argv == ["--check"]
    if argv and not check:
        print("usage: python tools/update_readme.py [--check]", file=sys.stderr)
        return 2
    stale = []
    for page in PAGES:
        path = REPO / page
        text = path.read_text(encoding="utf-8")
        new = render(page, text)
        if new != text:
            stale.append(page)
            if not check:
                path.write_text(new, encoding="utf-8")
    if check and stale:
        print(f"out of date: {', '.join(stale)}; run python tools/update_readme.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
