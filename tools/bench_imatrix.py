#!/usr/bin/env python3
"""Benchmark quantizing for the long context: importance matrices (none, a standard short-context one,
one at the target context), quantization types, and higher types for attn_q/attn_k.

A thin wrapper around `qroar-gguf bench` (its --imatrix and --attn-type axes, --evaluator, --workers,
--deadline) with the committed settings: SmolLM2, one target-context window of one Austen novel
(`--evaluation`), matrices from `--imatrix-tokens` tokens of another (`--calibration`). For every scale
(`--scales`, multiples of the trained context) and plan (`--plans`: `yarn`, or `searched`, the per-band
factors of the committed `tools/results/search_emma<N>k_q4_0.json` for that target context) one bench
runs every `--qtypes` x `--matrices` row, and a second the attn_q/attn_k types (`--attn-types` on
`--attn-qtypes` x `--attn-matrices`, for the plans in `--attn-plans`) with their default rows; the
files and measurements the first built are reused. Each bench keeps its folder under `--workdir`.
`--matrices-only` builds the F16 files and computes the matrices one at a time, timing each (what
tools/results/imatrix_cost.json records), then stops.

The JSON (default tools/results/imatrix_bench.json; docs/results.md's `imatrix` sections are rendered from it)
keeps the shape of this script's earlier, stand-alone version: one entry per row under `runs`, with its
file size, KLD, PPL over the F16 file's and the paired comparisons (vs_none, vs_short, vs_attn_default).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from benchlib import RESULTS, machine

from qroar_gguf.assets.austen import austen_text
from qroar_gguf.assets.smollm2 import default_model_dir
from qroar_gguf.choices import BENCH_EVALUATORS, IMATRIX_SHORT_WINDOW
from qroar_gguf.evaluate.bench import REFERENCE_QTYPE, Bench, run_bench
from qroar_gguf.rope.spec import PlanSpec
from qroar_gguf.outputs import publish_text

TRAINED = 8192  # SmolLM2-135M
#: bench's paired ratios, by the names this script's JSON gives them
PAIRS = {"vs_none": "no_imatrix", "vs_short": "short_imatrix", "vs_attn_default": "default_attn"}


def ctx_of(scale: float) -> int:
    """Target context of a scale (a fraction below 1 only for rehearsals with --plans none)."""
    return int(TRAINED * scale)


def plan_spec(plan: str, target: int) -> str | None:
    """bench's plan for a named plan at a target context (None: no such plan there)."""
    if plan in ("yarn", "none"):  # none: the unscaled control
        return plan
    if plan == "searched":
        path = RESULTS / f"search_emma{target // 1024}k_q4_0.json"
        if not path.is_file():
            return None
        found = json.loads(path.read_text())
        if found["base"]["target_ctx"] != target:
            return None
        options = [f"{k}={v}" for k, v in found["base"].get("plan_options", {}).items()]
        options.append("band_factors=" + "/".join(map(str, found["best_factors"])))
        if any(s != 1 for s in found["best_scales"]):
            options += ["band_scales=" + "/".join(map(str, found["best_scales"])), "symmetric=false"]
        return f"{found['base']['method']}:{','.join(options)}"
    raise SystemExit(f"unknown plan {plan!r}: yarn, searched or none")


def as_run(row: dict, scale, plan: str, folder: Path) -> dict:
    """A bench row as an entry of this script's `runs`."""
    run = {"scale": scale, "target_ctx": row["built_for_ctx"], "plan": plan, "qtype": row["qtype"],
           "imatrix": row["imatrix"], "attn_type": row.get("attn_type")}
    if row["imatrix"] != "none":
        run.update(imatrix_ctx=row["imatrix_ctx"], imatrix_chunks=row["imatrix_chunks"])
    run.update(size_mib=round((folder / "models" / row["file"]).stat().st_size / 2**20, 2), kld_mean=row["kld_mean"],
               kld_se=row.get("kld_se"), kld_p99=row["kld_p99"], same_top_pct=row["same_top_pct"], ppl=row["ppl"],
               ref_ppl=row["ref_ppl"], ppl_ratio_to_f16=row["ppl"] / row["ref_ppl"], n_scored=row["n_scored"],
               eval_seconds=round(row["seconds"], 1), bench_run=row["run"])
    for name, ratio in PAIRS.items():
        if f"ratio_to_{ratio}" in row:
            run[name] = {"ppl_ratio": row[f"ratio_to_{ratio}"], "ppl_ratio_ci95": row[f"ratio_to_{ratio}_ci95"]}
    return run


def matrices_only(result: dict, model: Path, evaluation: Path, calibration: Path, folder: Path, scale, plan: str,
                  spec: str, args) -> dict:
    """Build the plan's F16 file and compute its matrices (one at a time: their times are reported)."""
    bench = Bench(model, evaluation, folder, args.threads, False, 1, 0, imatrix_text=calibration,
                  imatrix_tokens=args.imatrix_tokens)
    target, plan_spec_ = ctx_of(scale), PlanSpec.parse(spec)
    start = time.monotonic()
    reused = any((folder / "models").glob(f"*.{target}.{REFERENCE_QTYPE}.*.gguf"))
    bench.build(plan_spec_, target, REFERENCE_QTYPE)
    seconds = None if reused else round(time.monotonic() - start, 1)
    for kind in (m for m in args.matrices.split(",") if m != "none"):
        bench.matrix(plan_spec_, kind, target)
        m = bench.matrices[-1]
        result["matrices"].append({"scale": scale, "plan": plan, "imatrix": kind, "ctx": m["ctx"], "chunks": m["chunks"],
                                   "seconds": m["seconds"]})
        print(json.dumps(result["matrices"][-1]), flush=True)
    return {"scale": scale, "plan": plan, "plan_spec": spec, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", default="2", help="multiples of the trained context, e.g. 2,4")
    parser.add_argument("--plans", default="yarn", help="yarn and/or searched")
    parser.add_argument("--qtypes", default="Q4_0")
    parser.add_argument("--matrices", default="none,short,target")
    parser.add_argument("--attn-types", default="", help="types tried for attn_q/attn_k, e.g. q8_0,f16")
    parser.add_argument("--attn-qtypes", default="Q4_0,Q4_K_M", help="base types the attn types are tried on")
    parser.add_argument("--attn-matrices", default="none,short", help="matrices the attn types are tried with")
    parser.add_argument("--attn-plans", default="yarn", help="plans the attn types are tried on")
    parser.add_argument("--calibration", default="Pride & Prejudice")
    parser.add_argument("--evaluation", default="Emma")
    parser.add_argument("--imatrix-tokens", type=int, default=32768, help="calibration tokens of every matrix")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of each job")
    parser.add_argument("--workers", type=int, default=1, help="jobs at a time")
    parser.add_argument("--deadline", type=float, default=None, help="start no job after this many seconds")
    parser.add_argument("--out", type=Path, default=RESULTS / "imatrix_bench.json")
    parser.add_argument("--workdir", type=Path, help="keep bench's folders here (reused when present)")
    parser.add_argument("--evaluator", choices=BENCH_EVALUATORS, default="bindings",
                        help="KLD through the Python bindings (per-token, exact), or llama-perplexity's own "
                             "--kl-divergence against the reference's saved log-probabilities")
    parser.add_argument("--gpu-tools", action="store_true", help="every layer on the GPU (else none)")
    parser.add_argument("--matrices-only", action="store_true",
                        help="build the F16 files and compute the matrices (their cost), then stop")
    args = parser.parse_args()
    if args.calibration.lower() == args.evaluation.lower():
        raise SystemExit("calibrate and evaluate on different texts")
    if args.imatrix_tokens < IMATRIX_SHORT_WINDOW:
        raise SystemExit(f"--imatrix-tokens must be at least one {IMATRIX_SHORT_WINDOW}-token window")
    begun = time.monotonic()
    scales = [float(s) if "." in s else int(s) for s in args.scales.split(",")]
    plans = args.plans.split(",")
    attn_types = [t for t in args.attn_types.split(",") if t]
    model = default_model_dir(progress=False)
    calibration, evaluation = austen_text(args.calibration), austen_text(args.evaluation)
    lib = os.environ.get("LLAMA_CPP_LIB_PATH")
    result = {"machine": {**machine(gpu=bool(lib or args.gpu_tools)), "llama_cpp_lib": lib},
              "model": "SmolLM2-135M-Instruct", "trained_ctx": TRAINED, "calibration": args.calibration,
              "evaluation": args.evaluation, "imatrix_tokens": args.imatrix_tokens, "workers": args.workers,
              "evaluator": args.evaluator, "bench": "qroar-gguf bench (evaluate/bench.py)",
              "references": [], "matrices": [], "runs": []}
    if len(scales) == 1 and len(plans) == 1:  # the single-scale, single-plan form docs/results.md reads
        result.update(method=plans[0], target_ctx=ctx_of(scales[0]))

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        publish_text(args.out, json.dumps(result, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        # In the order given, plan by plan: a run cut short by --deadline has finished the first ones
        for plan in plans:
            for scale in scales:
                target = ctx_of(scale)
                spec = plan_spec(plan, target)
                if spec is None:
                    continue
                folder = workdir / f"{scale}x-{plan}"
                if args.matrices_only:
                    result["references"].append(matrices_only(result, model, evaluation, calibration, folder, scale,
                                                              plan, spec, args))
                    save()
                    continue
                result["references"].append({"scale": scale, "plan": plan, "plan_spec": spec, "seconds": None})
                grids = [(args.qtypes.split(","), args.matrices.split(","), ["default"])]
                if attn_types and plan in args.attn_plans.split(","):
                    grids.append((args.attn_qtypes.split(","), args.attn_matrices.split(","), ["default", *attn_types]))
                rows: dict = {}
                for qtypes, matrices, attn in grids:
                    left = None if args.deadline is None else max(0.0, args.deadline - (time.monotonic() - begun))
                    matrix_options = {} if matrices == ["none"] else {"imatrix_text": calibration,
                                                                      "imatrix_tokens": args.imatrix_tokens}
                    found = run_bench(model, [target], qtypes, [spec], evaluation, folder, chunks=1,
                                      threads=args.threads, progress=False, imatrix=matrices, attn_types=attn,
                                      evaluator=args.evaluator, workers=args.workers, deadline=left,
                                      gpu_layers=-1 if args.gpu_tools else 0, **matrix_options)
                    for row in found["rows"]:
                        rows[row["run"]] = row  # the default rows of the second grid are the first's
                    for m in found.get("matrices", []):
                        result["matrices"].append({"scale": scale, "plan": plan, "imatrix": m["imatrix"],
                                                   "ctx": m["ctx"], "chunks": m["chunks"], "seconds": m["seconds"]})
                    for s in found.get("skipped", []):
                        result["runs"].append({"scale": scale, "target_ctx": target, "plan": plan, "qtype": s["qtype"],
                                               "imatrix": s["imatrix"], "skipped": "deadline",
                                               "attn_type": None if s["attn_type"] == "default" else s["attn_type"]})
                seconds = {(m["imatrix"], m["ctx"]): m["seconds"] for m in result["matrices"]
                           if (m["scale"], m["plan"]) == (scale, plan)}
                for row in rows.values():
                    run = as_run(row, scale, plan, folder)
                    if row["imatrix"] != "none":
                        run["imatrix_seconds"] = seconds.get((row["imatrix"], row["imatrix_ctx"]))
                    result["runs"].append(run)
                    print(f"{scale}x {plan} {row['qtype']} imatrix={row['imatrix']} attn={row.get('attn_type') or '-'}: "
                          + json.dumps({k: run.get(k) for k in ("kld_mean", "ppl_ratio_to_f16", "size_mib")}), flush=True)
                save()
    # a row the first grid left to the deadline may have been measured by the second
    measured = {(r["scale"], r["plan"], r["qtype"], r["imatrix"], r["attn_type"]) for r in result["runs"]
                if "skipped" not in r}
    result["runs"] = [r for r in result["runs"] if "skipped" not in r
                      or (r["scale"], r["plan"], r["qtype"], r["imatrix"], r["attn_type"]) not in measured]
    result["seconds"] = round(time.monotonic() - begun, 1)
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
