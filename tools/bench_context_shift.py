#!/usr/bin/env python3
"""Benchmark: what a long chat feels of a context shift, in the stock llama.cpp Ollama runs.

A text longer than the window is streamed through it as llama-server does with `--context-shift`: the
window fills, then `--shifts` times the oldest `--discard` tokens are dropped, the rest moved back (the
K-shift re-ropes every cached key) and the next `--discard` tokens decoded. The same tokens are also
streamed without shifts: the dropped tokens leave a gap and nothing is re-roped, so the cache holds the
same keys at the same distances. The per-token NLL of the decoded tokens after each shift, in both runs,
gives perplexity with and without the shift; the cached keys are read back for their norms.

Files, all SmolLM2 extended 2x with yarn from the same Q4_K_M file: `patch`'s file (the attention scale in
W_Q/W_K's block scales), the key form (`patch --attn-factor-key`, the form patch wrote before: the
attention scale as rope.scaling.attn_factor) and the unscaled model. The stock shift runs (the build's
patches/0002 switched off with QROAR_STOCK_KSHIFT=1): what Ollama runs.

Writes JSON (default tools/results/context_shift_bench.json); docs/results.md renders it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from benchlib import RESULTS, machine, qroar

from qroar_gguf.assets.austen import austen_text
from qroar_gguf.assets.smollm2 import default_model_dir
from qroar_gguf.evaluate.kshift import shift_drift
from qroar_gguf.outputs import publish_text
from qroar_gguf.source.text import read_text


def make_files(model: Path, work: Path, target: int, qtype: str) -> dict[str, Path]:
    files = {"unscaled": work / f"none.{qtype}.gguf", "folded": work / "folded.gguf", "key": work / "key.gguf"}
    qroar(model, "-o", files["unscaled"], "--method", "none", "--qtype", qtype)
    qroar("patch", files["unscaled"], "-o", files["folded"], "--method", "yarn", "--ctx", target)
    qroar("patch", files["unscaled"], "-o", files["key"], "--method", "yarn", "--ctx", target, "--attn-factor-key")
    return files


def measure(path: Path, text: str, args) -> dict:
    start = time.monotonic()
    drift = shift_drift(path, text, n_shifts=args.shifts, n_prompt=args.window, n_keep=0, n_discard=args.discard,
                        stock_shift=True, type_k="f16", type_v="f16", threads=args.threads)
    per_shift = []
    for j in range(args.shifts):
        shifted, gap = math.exp(drift.nll_shifted[j]), math.exp(drift.nll_gap[j])
        per_shift.append({"shift": j + 1, "ppl_shifted": shifted, "ppl_no_shift": gap, "ratio": shifted / gap,
                          "key_norm_ratio": drift.norm_ratios[j], "kl_vs_no_shift": drift.kl_vs_gap[j]})
    return {"per_shift": per_shift, "max_abs_dlogit": drift.max_abs_dlogit, "seconds": time.monotonic() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=4096, help="tokens in the context (Ollama's default num_ctx)")
    parser.add_argument("--discard", type=int, default=2048,
                        help="tokens dropped per shift (llama-server's default: half the window)")
    parser.add_argument("--shifts", type=int, default=4)
    parser.add_argument("--target", type=int, default=16384, help="the files' extended context (2x SmolLM2's)")
    parser.add_argument("--qtype", default="Q4_K_M")
    parser.add_argument("--text", default="Emma")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=RESULTS / "context_shift_bench.json")
    args = parser.parse_args()
    model = default_model_dir(progress=False)
    text = read_text(austen_text(args.text))
    with tempfile.TemporaryDirectory() as tmp:
        files = make_files(model, Path(tmp), args.target, args.qtype)
        results = {}
        for name, path in files.items():
            results[name] = measure(path, text, args)
            print(name, json.dumps(results[name]["per_shift"][-1]), file=sys.stderr)
    result = {
        "benchmark": "perplexity of a text streamed through a window with llama-server's context shifts, stock "
                     "llama.cpp, against the same tokens without shifts",
        "command": "python tools/bench_context_shift.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "model": "SmolLM2-135M-Instruct", "qtype": args.qtype, "plan": f"yarn, --ctx {args.target}",
        "text": args.text, "window": args.window, "discard": args.discard, "shifts": args.shifts,
        "kv_cache": "f16", "files": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    publish_text(args.out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
