#!/usr/bin/env python3
"""Benchmark quantizing for the long context: importance matrices (none, a standard short-context one,
one at the target context), quantization types, and higher types for attn_q/attn_k.

For every scale (`--scales`, multiples of the trained context) and plan (`--plans`: `yarn`, or
`searched`, the per-band factors of the committed `tools/results/search_emma<N>k_q4_0.json` for that
target context), SmolLM2 is converted unquantized with the plan: that file is the reference. Matrices
are computed with llama-imatrix on the reference over the same number of calibration tokens
(`--imatrix-tokens`) of one Austen novel: in 512-token windows (as people usually make them) or in
windows of the target context. Each quantized file is evaluated on a window of the target context of
*another* novel: KL divergence against the reference and PPL, and per-token NLLs paired against the
same file without a matrix, the target matrix against the short one, and a higher attn_q/attn_k type
against the same file without it (the difference and its standard error).

Jobs run in `--workers` processes. The evaluation runs through the Python bindings (the libllama
`LLAMA_CPP_LIB_PATH` names, else the set-up's) or, with `--evaluator llama-perplexity`, through the
llama.cpp `QROAR_LLAMA_BIN` names (`--gpu-tools`: every layer on the GPU). Jobs not started by
`--deadline` seconds are listed as skipped. The JSON
(default tools/results/imatrix_bench.json; README's `imatrix` section is rendered from it) is rewritten
after every job, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qroar_gguf.assets.austen import austen_text  # noqa: E402
from qroar_gguf.assets.smollm2 import default_model_dir  # noqa: E402
from qroar_gguf.choices import IMATRIX_SHORT_WINDOW  # noqa: E402
from qroar_gguf.evaluate.paired import paired_compare  # noqa: E402
from qroar_gguf.gguf_io.imatrix import compute_imatrix, default_chunks, imatrix_key  # noqa: E402
from qroar_gguf.outputs import publish_text, temporary_beside  # noqa: E402
from qroar_gguf.paths import cache_dir  # noqa: E402

QROAR = [sys.executable, "-m", "qroar_gguf"]
TRAINED = 8192  # SmolLM2-135M
RESULTS = REPO / "tools" / "results"


def ctx_of(scale: float) -> int:
    """Target context of a scale (a fraction below 1 only for rehearsals with --plans none)."""
    return int(TRAINED * scale)


def qroar(*args) -> None:
    subprocess.run([*QROAR, *(str(a) for a in args), "-q"], check=True)


def plan_args(plan: str, target: int) -> list[str] | None:
    """convert's options for a named plan at a target context (None: no such plan there)."""
    if plan in ("yarn", "none"):  # none: the unscaled control
        return ["--method", plan]
    if plan == "searched":
        path = RESULTS / f"search_emma{target // 1024}k_q4_0.json"
        if not path.is_file():
            return None
        found = json.loads(path.read_text())
        if found["base"]["target_ctx"] != target:
            return None
        args = ["--method", found["base"]["method"], "--band-factors", ",".join(map(str, found["best_factors"]))]
        if any(s != 1 for s in found["best_scales"]):
            args += ["--band-scales", ",".join(map(str, found["best_scales"])), "--no-symmetric"]
        return args
    raise SystemExit(f"unknown plan {plan!r}: yarn, searched or none")


def perplexity_tool(*args) -> str:
    """Run llama-perplexity (the build QROAR_LLAMA_BIN or the set-up names; every layer on the GPU
    under --gpu-tools); its log, for parsing."""
    from qroar_gguf.llama_tools import find_tool

    command = [str(find_tool("llama-perplexity")), *(str(a) for a in args), "--chunks", "1", "-fa", "on",
               "-ngl", "999" if os.environ.get("QROAR_TOOLS_GPU") else "0"]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"llama-perplexity failed ({run.returncode}): {run.stderr.strip()[-500:]}")
    return run.stdout + run.stderr


def _stat(log: str, label: str) -> tuple[float, float]:
    found = re.search(re.escape(label) + r"\s*:\s*([-0-9.eE+]+)\s*±\s*([-0-9.eE+]+)", log)
    if found is None:
        raise RuntimeError(f"llama-perplexity printed no '{label}'")
    return float(found.group(1)), float(found.group(2))


def saved_shape(path: Path) -> tuple[int, int, int]:
    """(n_ctx, n_vocab, n_chunk) of a complete --kl-divergence-base file; llama-perplexity exits 0 and
    leaves a file holding only its header when the text is too short, so the size is checked too."""
    with open(path, "rb") as f:
        magic = f.read(8)
    header = np.fromfile(path, dtype=np.int32, count=5, offset=0)
    if magic != b"_logits_" or header.size < 5:
        raise RuntimeError(f"{path} is not a llama-perplexity logits file")
    n_ctx, n_vocab, n_chunk = int(header[2]), int(header[3]), int(header[4])
    nv = 2 * ((n_vocab + 1) // 2) + 4
    size = 20 + 4 * n_chunk * n_ctx + 2 * n_chunk * (n_ctx - 1 - n_ctx // 2) * nv
    if n_chunk < 1 or path.stat().st_size != size:
        raise RuntimeError(f"{path} is incomplete ({path.stat().st_size} bytes, {size} expected): is the text "
                           "shorter than one window?")
    return n_ctx, n_vocab, n_chunk


def saved_nll(path: Path):
    """Per-token NLL of the scored tokens of the first window, from a --kl-divergence-base file.

    The file (llama-perplexity's format): "_logits_", n_ctx, n_vocab, n_chunk (int32), the tokens
    (int32, n_chunk * n_ctx), then for each scored token a row of 2*((n_vocab+1)/2) + 4 uint16: a float
    scale and a float minimum log-probability, then each token's log-probability as uint16 steps of the
    scale above the minimum (anything 16 nats or more below the top token reads as the minimum).
    """
    n_ctx, n_vocab, n_chunk = saved_shape(path)
    tokens = np.fromfile(path, dtype=np.int32, count=n_chunk * n_ctx, offset=20)
    first = n_ctx // 2
    n_scored, nv = n_ctx - 1 - first, 2 * ((n_vocab + 1) // 2) + 4
    rows = np.memmap(path, dtype=np.uint16, mode="r", offset=20 + 4 * n_chunk * n_ctx, shape=(n_scored, nv))
    head = np.ascontiguousarray(rows[:, :4]).view(np.float32)  # scale, minimum log-probability
    targets = tokens[first + 1:n_ctx]
    steps = rows[np.arange(n_scored), 4 + targets].astype(np.float64)
    return -(head[:, 0].astype(np.float64) * steps + head[:, 1])


def evaluate_with_tool(job: dict, out: Path) -> dict:
    """KLD and PPL of `out` against the reference's saved log-probabilities, by llama-perplexity; the
    per-token NLLs (for the paired comparisons) from a second run that saves the file's own."""
    log = perplexity_tool("-m", out, "-c", job["target_ctx"], "--kl-divergence", "--kl-divergence-base",
                          job["reference_logits"])
    kld, kld_se = _stat(log, "Mean    KLD")
    ln_ratio, ln_ratio_se = _stat(log, "Mean ln(PPL(Q)/PPL(base))")
    same_top, _ = _stat(log, "Same top p")
    ppl, _ = _stat(log, "Mean PPL(Q)")
    ref_ppl, _ = _stat(log, "Mean PPL(base)")
    with temporary_beside(Path(job["nll"]).with_suffix(".logits"), "logits") as own:
        perplexity_tool("-m", out, "-f", job["evaluation"], "-c", job["target_ctx"], "--kl-divergence-base", own)
        nll = saved_nll(own)
    np.save(job["nll"], nll)
    return {"kld_mean": kld, "kld_se": kld_se, "same_top_pct": same_top, "ppl": ppl, "ref_ppl": ref_ppl,
            "ppl_ratio_to_f16": math.exp(ln_ratio), "ln_ppl_ratio_se": ln_ratio_se, "n_scored": int(nll.size),
            "ppl_from_saved": math.exp(float(nll.mean()))}


def save_reference_logits(reference: Path, evaluation: Path, ctx: int) -> Path:
    path = reference.with_suffix(".logits")
    if not path.is_file():
        with temporary_beside(path, "partial") as partial:
            perplexity_tool("-m", reference, "-f", evaluation, "-c", ctx, "--kl-divergence-base", partial)
            saved_shape(partial)
            partial.replace(path)
    return path


def run_job(job: dict) -> dict:
    """Convert one file and evaluate it against its reference (runs in a child process)."""
    from qroar_gguf.evaluate.kld import kl_divergence
    from qroar_gguf.evaluate.runtime import Runtime
    from qroar_gguf.source.text import read_text

    out = Path(job["out"])
    extra = ["--imatrix", job["imatrix_path"]] if job["imatrix_path"] else []
    if job["attn_type"]:
        extra += ["--tensor-type", f"attn_q={job['attn_type']}", "--tensor-type", f"attn_k={job['attn_type']}"]
    start = time.monotonic()
    converted = not out.is_file()  # convert writes a file only when it is complete
    if converted:
        qroar(default_model_dir(progress=False), "-o", out, "--ctx", job["target_ctx"], *job["plan_args"],
              "--qtype", job["qtype"], "--threads", job["threads"], *extra)
    convert_seconds = round(time.monotonic() - start, 1) if converted else None
    if job.get("convert_only"):
        return {"convert_seconds": convert_seconds}
    start = time.monotonic()
    if job["evaluator"] == "llama-perplexity":
        measured = evaluate_with_tool(job, out)
        return {"size_mib": round(out.stat().st_size / 2**20, 2), **measured, "convert_seconds": convert_seconds,
                "eval_seconds": round(time.monotonic() - start, 1)}
    with Runtime(out, n_ctx=job["target_ctx"], threads=job["threads"]) as rt, \
            Runtime(job["reference"], n_ctx=job["target_ctx"], threads=job["threads"]) as ref:
        kld = kl_divergence(rt, ref, read_text(job["evaluation"]), max_chunks=1, quiet=True)
    np.save(job["nll"], kld.nll)
    return {"size_mib": round(out.stat().st_size / 2**20, 2), "kld_mean": kld.mean, "kld_se": kld.mean_se,
            "kld_p99": kld.p99, "same_top_pct": kld.same_top_pct, "ppl": kld.ppl, "ref_ppl": kld.ref_ppl,
            "ppl_ratio_to_f16": kld.ppl_ratio, "n_scored": kld.n_scored,
            "convert_seconds": convert_seconds, "eval_seconds": round(time.monotonic() - start, 1)}


def job_name(job: dict) -> str:
    return f"{job['scale']}x {job['plan']} {job['qtype']} imatrix={job['imatrix']} attn={job['attn_type'] or '-'}"


def pairs(runs: list[dict], nll_of) -> None:
    """Paired NLL comparisons: matrix vs none, target vs short, higher attn type vs none (same matrix)."""
    def find(run, **changed):
        want = {k: run[k] for k in ("scale", "plan", "qtype", "imatrix", "attn_type")} | changed
        return next((r for r in runs if all(r[k] == v for k, v in want.items()) and "kld_mean" in r), None)

    for run in runs:
        if "kld_mean" not in run:
            continue
        for label, base in (("vs_none", find(run, imatrix="none") if run["imatrix"] != "none" else None),
                            ("vs_short", find(run, imatrix="short") if run["imatrix"] == "target" else None),
                            ("vs_attn_default", find(run, attn_type=None) if run["attn_type"] else None)):
            if base is not None:
                run[label] = paired_compare(np.load(nll_of(run)), np.load(nll_of(base))).to_dict()


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
    parser.add_argument("--workdir", type=Path, help="keep the reference files here (reused when present)")
    parser.add_argument("--prepare-only", action="store_true", help="write the reference files and stop")
    parser.add_argument("--matrices-only", action="store_true",
                        help="write the reference files and compute the matrices (their cost), then stop")
    parser.add_argument("--evaluator", choices=("bindings", "llama-perplexity"), default="bindings",
                        help="KLD through the Python bindings (per-token, exact), or llama-perplexity's own "
                             "--kl-divergence against the reference's saved log-probabilities")
    parser.add_argument("--gpu-tools", action="store_true", help="llama-perplexity with every layer on the GPU")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gpu_tools:
        os.environ["QROAR_TOOLS_GPU"] = "1"  # read by the job processes
    if args.job:
        print(json.dumps(run_job(json.loads(args.job))), flush=True)
        return
    if args.calibration.lower() == args.evaluation.lower():
        raise SystemExit("calibrate and evaluate on different texts")
    unknown = set(args.matrices.split(",") + args.attn_matrices.split(",")) - {"none", "short", "target"}
    if unknown:
        raise SystemExit(f"unknown matrices {sorted(unknown)}: none, short or target")
    if args.imatrix_tokens < IMATRIX_SHORT_WINDOW:
        raise SystemExit(f"--imatrix-tokens must be at least one {IMATRIX_SHORT_WINDOW}-token window")
    begun = time.monotonic()
    scales = [float(s) if "." in s else int(s) for s in args.scales.split(",")]
    plans, qtypes = args.plans.split(","), args.qtypes.split(",")
    matrices = args.matrices.split(",")
    calibration, evaluation = austen_text(args.calibration), austen_text(args.evaluation)
    gpu = os.environ.get("LLAMA_CPP_LIB_PATH")
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "llama_cpp_lib": gpu},
              "model": "SmolLM2-135M-Instruct", "trained_ctx": TRAINED, "calibration": args.calibration,
              "evaluation": args.evaluation, "imatrix_tokens": args.imatrix_tokens, "workers": args.workers,
              "matrices_concurrent": bool(gpu or args.gpu_tools) and args.workers > 1,
              "references": [], "matrices": [], "runs": []}
    result["evaluator"] = args.evaluator
    if gpu or args.gpu_tools:
        try:
            result["machine"]["gpu"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True, text=True).stdout.strip() or None
        except OSError:  # a CPU build named by LLAMA_CPP_LIB_PATH
            pass
    # The single-scale, single-plan form of the first version of this file, which README reads.
    if len(scales) == 1 and len(plans) == 1:
        result.update(method=plans[0], target_ctx=ctx_of(scales[0]))
    lock = threading.Lock()

    def save() -> None:
        with lock:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            publish_text(args.out, json.dumps(result, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        workdir = args.workdir or tmp
        workdir.mkdir(parents=True, exist_ok=True)
        default_model_dir(progress=False)  # rebuilt once, before the workers need it
        # In the order given, plan by plan: a run cut short by --deadline has finished the first ones
        setups = [(s, p, plan_args(p, ctx_of(s))) for p in plans for s in scales]
        setups = [(s, p, tuple(a)) for s, p, a in setups if a is not None]
        references = {}

        def make_reference(setup) -> None:
            scale, plan, extra = setup
            path = workdir / f"{scale}x-{plan}.F16.gguf"
            start = time.monotonic()
            reused = path.is_file()  # convert writes a file only when it is complete
            if not reused:
                qroar(default_model_dir(progress=False), "-o", path, "--ctx", ctx_of(scale), *extra,
                      "--qtype", "F16")
            references[scale, plan] = path
            result["references"].append({"scale": scale, "plan": plan, "plan_args": list(extra),
                                         "seconds": None if reused else round(time.monotonic() - start, 1)})

        with ThreadPoolExecutor(max(1, min(args.workers, len(setups)))) as pool:
            list(pool.map(make_reference, setups))
        jobs = []
        for scale, plan, extra in setups:
            for qtype in qtypes:
                for name in matrices:
                    jobs.append((scale, plan, extra, qtype, name, None))
            if plan not in args.attn_plans.split(","):
                continue
            for attn_type in filter(None, args.attn_types.split(",")):
                for qtype in args.attn_qtypes.split(","):
                    for name in args.attn_matrices.split(","):
                        jobs.append((scale, plan, extra, qtype, name, attn_type))
                        if (scale, plan, extra, qtype, name, None) not in jobs:
                            jobs.append((scale, plan, extra, qtype, name, None))
        jobs = list(dict.fromkeys(jobs))

        def job_spec(job, matrix) -> dict:
            scale, plan, extra, qtype, name, attn_type = job
            stem = workdir / f"{scale}x-{plan}-{qtype}-{name}-{attn_type or 'default'}"
            reference = references[scale, plan]
            return {"out": f"{stem}.gguf", "nll": f"{stem}.npy", "reference": str(reference),
                    "reference_logits": str(reference.with_suffix(".logits")), "evaluator": args.evaluator,
                    "target_ctx": ctx_of(scale), "plan_args": list(extra), "qtype": qtype, "imatrix": name,
                    "attn_type": attn_type, "imatrix_path": matrix["path"] if matrix else None,
                    "threads": args.threads, "evaluation": str(evaluation), "scale": scale, "plan": plan}

        def run_child(spec: dict) -> dict:
            child = subprocess.run([sys.executable, __file__, "--job", json.dumps(spec)], capture_output=True,
                                   text=True)
            if child.returncode:
                return {"error": [f"exit status {child.returncode}",
                                  *(child.stderr or child.stdout).strip().splitlines()[-3:]]}
            return json.loads(child.stdout.strip().splitlines()[-1])

        if args.prepare_only:  # the files that need no matrix, while nothing else runs
            plain = [job_spec(job, None) | {"convert_only": True} for job in jobs if job[4] == "none"]
            with ThreadPoolExecutor(max(1, args.workers)) as pool:
                list(pool.map(run_child, plain))
            return
        built = {}
        wanted = []
        for scale, plan, _ in setups:
            target = ctx_of(scale)
            for name, window in (("short", (IMATRIX_SHORT_WINDOW, default_chunks(IMATRIX_SHORT_WINDOW,
                                                                                 args.imatrix_tokens))),
                                 ("target", (target, default_chunks(target, args.imatrix_tokens)))):
                if name in matrices or (args.attn_types and name in args.attn_matrices.split(",")):
                    wanted.append((scale, plan, name, *window))

        def make_matrix(spec) -> None:
            scale, plan, name, ctx, chunks = spec
            reference = references[scale, plan]
            cached = (cache_dir() / "imatrix" / f"{imatrix_key(reference, calibration, ctx, chunks)}.imatrix.gguf").is_file()
            start = time.monotonic()
            path = compute_imatrix(reference, calibration, ctx=ctx, chunks=chunks, threads=args.threads, progress=False)
            seconds = None if cached else round(time.monotonic() - start, 1)
            built[scale, plan, name] = {"path": str(path), "ctx": ctx, "chunks": chunks, "seconds": seconds}
            with lock:
                result["matrices"].append({"scale": scale, "plan": plan, "imatrix": name, "ctx": ctx,
                                           "chunks": chunks, "seconds": seconds})
            print(json.dumps(result["matrices"][-1]), flush=True)

        def reference_logits(setup) -> None:
            scale, plan, _ = setup
            save_reference_logits(references[scale, plan], evaluation, ctx_of(scale))

        # Matrices one at a time when they share the CPU (their times are reported), together on a GPU,
        # beside the references' saved log-probabilities (llama-perplexity's evaluation)
        tasks = [(make_matrix, w) for w in wanted]
        if args.evaluator == "llama-perplexity":
            tasks += [(reference_logits, setup) for setup in setups]
        with ThreadPoolExecutor(max(1, min(args.workers, len(tasks))) if gpu or args.gpu_tools else 1) as pool:
            list(pool.map(lambda task: task[0](task[1]), tasks))
        if args.matrices_only:
            result["seconds"] = round(time.monotonic() - begun, 1)
            save()
            return
        save()

        specs = []
        for job in jobs:
            scale, plan, extra, qtype, name, attn_type = job
            matrix = built.get((scale, plan, name))
            run = {"scale": scale, "target_ctx": ctx_of(scale), "plan": plan, "qtype": qtype, "imatrix": name,
                   "attn_type": attn_type}
            if matrix:
                run.update(imatrix_ctx=matrix["ctx"], imatrix_chunks=matrix["chunks"],
                           imatrix_seconds=matrix["seconds"])
            result["runs"].append(run)
            specs.append((run, job_spec(job, matrix)))
        nll_files = {id(run): spec["nll"] for run, spec in specs}

        def launch(item) -> None:
            run, spec = item
            if args.deadline is not None and time.monotonic() - begun > args.deadline:
                run["skipped"] = "deadline"
                return
            run.update(run_child(spec))
            with lock:
                pairs(result["runs"], lambda r: nll_files[id(r)])
            print(f"{job_name(spec)}: " + json.dumps({k: run.get(k) for k in
                                                       ("kld_mean", "ppl_ratio_to_f16", "size_mib", "error")}),
                  flush=True)
            save()

        with ThreadPoolExecutor(max(1, args.workers)) as pool:
            list(pool.map(launch, specs))
    result["seconds"] = round(time.monotonic() - begun, 1)
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
