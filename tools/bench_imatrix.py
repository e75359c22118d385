#!/usr/bin/env python3
"""Benchmark importance matrices for the long context: none, a standard short-context one, one at the
target context.

SmolLM2 converted with `--method` for `--scale` x its trained context; the plan-applied unquantized
file is the reference. Matrices are computed with llama-imatrix on that file over the same number of
calibration tokens (`--imatrix-tokens`) of one Austen novel: in 512-token windows (as people usually
make them) or in windows of the target context. Each quantized file is evaluated on a window of the
target context of *another* novel: KL divergence against the reference and PPL, and each matrix's
per-token NLL paired against the file without one (the difference and its standard error).

Writes JSON (default tools/results/imatrix_bench.json); README's `imatrix` section is rendered from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qroar_gguf.assets.austen import austen_text  # noqa: E402
from qroar_gguf.assets.smollm2 import default_model_dir  # noqa: E402
from qroar_gguf.evaluate.kld import kl_divergence  # noqa: E402
from qroar_gguf.evaluate.paired import paired_compare  # noqa: E402
from qroar_gguf.evaluate.runtime import Runtime  # noqa: E402
from qroar_gguf.gguf_io.imatrix import compute_imatrix, imatrix_key  # noqa: E402
from qroar_gguf.paths import cache_dir  # noqa: E402
from qroar_gguf.source.text import read_text  # noqa: E402

QROAR = [sys.executable, "-m", "qroar_gguf"]
TRAINED = 8192  # SmolLM2-135M


def qroar(*args) -> None:
    subprocess.run([*QROAR, *(str(a) for a in args), "-q"], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="yarn")
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--qtypes", default="Q4_0")
    parser.add_argument("--calibration", default="Pride & Prejudice")
    parser.add_argument("--evaluation", default="Emma")
    parser.add_argument("--imatrix-tokens", type=int, default=32768, help="calibration tokens of every matrix")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=REPO / "tools" / "results" / "imatrix_bench.json")
    args = parser.parse_args()
    if args.calibration.lower() == args.evaluation.lower():
        raise SystemExit("calibrate and evaluate on different texts")

    target = TRAINED * args.scale
    calibration, evaluation = austen_text(args.calibration), austen_text(args.evaluation)
    eval_text = read_text(evaluation)
    matrices = {"none": None, "short": (512, args.imatrix_tokens // 512),
                "target": (target, max(1, args.imatrix_tokens // target))}
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "model": "SmolLM2-135M-Instruct",
              "method": args.method, "trained_ctx": TRAINED, "target_ctx": target, "calibration": args.calibration,
              "evaluation": args.evaluation, "imatrix_tokens": args.imatrix_tokens, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        reference = tmp / "plan.F16.gguf"
        qroar(default_model_dir(progress=False), "-o", reference, "--ctx", target, "--method", args.method,
              "--qtype", "F16")
        built = {}
        for name, window in matrices.items():
            if window is None:
                continue
            ctx, chunks = window
            cached = (cache_dir() / "imatrix" / f"{imatrix_key(reference, calibration, ctx, chunks)}.imatrix.gguf").is_file()
            start = time.monotonic()
            path = compute_imatrix(reference, calibration, ctx=ctx, chunks=chunks, threads=args.threads, progress=True)
            built[name] = {"path": path, "ctx": ctx, "chunks": chunks,
                           "seconds": None if cached else round(time.monotonic() - start, 1)}
        for qtype in args.qtypes.split(","):
            baseline = None
            for name in matrices:
                out = tmp / f"{name}.{qtype}.gguf"
                extra = [] if name == "none" else ["--imatrix", built[name]["path"]]
                qroar(default_model_dir(progress=False), "-o", out, "--ctx", target, "--method", args.method,
                      "--qtype", qtype, *extra)
                with Runtime(out, n_ctx=target, threads=args.threads) as rt, \
                        Runtime(reference, n_ctx=target, threads=args.threads) as ref:
                    kld = kl_divergence(rt, ref, eval_text, max_chunks=1, quiet=False, desc=f"{qtype} {name}")
                run = {"qtype": qtype, "imatrix": name, "size_mib": round(out.stat().st_size / 2**20, 2),
                       "kld_mean": float(kld.kld.mean()), "kld_se": float(kld.kld.std(ddof=1) / kld.kld.size ** 0.5),
                       "ppl": kld.ppl, "ref_ppl": kld.ref_ppl, "ppl_ratio_to_f16": kld.ppl / kld.ref_ppl,
                       "n_scored": kld.n_scored}
                if name != "none":
                    run["imatrix_ctx"], run["imatrix_chunks"] = built[name]["ctx"], built[name]["chunks"]
                    run["imatrix_seconds"] = built[name]["seconds"]
                    run["vs_none"] = paired_compare(kld.nll, baseline.nll).to_dict()
                else:
                    baseline = kld
                result["runs"].append(run)
                print(json.dumps(run), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
