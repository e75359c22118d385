#!/usr/bin/env python3
"""Benchmark `qroar-gguf patch`: speed and memory against `cp`, and quality against `convert`.

1. Speed: the default SmolLM2 model as an unscaled F32 GGUF (several hundred MB) is patched and copied
   with `cp`, alternating, in the same run; wall time and peak RSS of each process (GNU time's:
   benchlib.measure), and our peak RSS against the largest attention tensor.
2. Quality: an unscaled file of `--qtype` is patched with `--method` to twice the trained context and
   compared with the file `convert` makes from the checkpoint (same method, context and qtype; convert
   folds the attention scale into W_Q/W_K before quantizing, patch into the quantized blocks' f16 scales):
   perplexity of each at the target context on the same window of Emma, and the paired per-token
   difference in standard errors.

Writes JSON (default tools/results/patch_bench.json); docs/results.md's `patch` section is rendered from it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from benchlib import QROAR, RESULTS, machine, measure, qroar

import gguf

from qroar_gguf.assets.austen import austen_text
from qroar_gguf.assets.smollm2 import default_model_dir
from qroar_gguf.evaluate.paired import paired_compare
from qroar_gguf.evaluate.perplexity import perplexity
from qroar_gguf.evaluate.runtime import Runtime
from qroar_gguf.source.text import read_text


def speed(model: Path, work: Path, repeats: int) -> dict:
    source = work / "none.F32.gguf"
    qroar(model, "-o", source, "--method", "none", "--qtype", "F32")
    attention = max(int(t.n_bytes) for t in gguf.GGUFReader(source).tensors if ".attn_" in t.name)
    runs: dict[str, list[dict]] = {"patch": [], "cp": []}
    for _ in range(repeats):
        for tool in ("cp", "patch"):
            out = work / f"{tool}.gguf"
            out.unlink(missing_ok=True)
            cmd = (["cp", source, out] if tool == "cp"
                   else [*QROAR, "patch", source, "-o", out, "--method", "yarn", "--scale", "2", "-q"])
            runs[tool].append(measure(cmd))
            out.unlink()
    median = {tool: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_rss_mib")}
              for tool, rs in runs.items()}
    startup = statistics.median(measure([*QROAR, "--version"])["seconds"] for _ in range(repeats))
    return {
        "file_mib": source.stat().st_size / 2**20, "largest_attention_tensor_mib": attention / 2**20,
        "repeats": repeats, "runs": runs, "median": median, "startup_seconds": startup,
        "wall_ratio_patch_over_cp": median["patch"]["seconds"] / median["cp"]["seconds"],
        "patch_peak_rss_over_largest_attention": median["patch"]["peak_rss_mib"] / (attention / 2**20),
    }


def quality(model: Path, work: Path, method: str, qtype: str, text: str, threads: int) -> dict:
    trained = 8192
    target = 2 * trained
    unscaled, patched, converted = work / f"none.{qtype}.gguf", work / "patched.gguf", work / "converted.gguf"
    qroar(model, "-o", unscaled, "--method", "none", "--qtype", qtype)
    qroar("patch", unscaled, "-o", patched, "--method", method, "--ctx", target)
    qroar(model, "-o", converted, "--method", method, "--ctx", target, "--qtype", qtype)
    results = {}
    for name, path in (("patched", patched), ("converted", converted)):
        with Runtime(path, n_ctx=target, threads=threads) as rt:
            results[name] = perplexity(rt, text, max_chunks=1, quiet=True)
    diff = paired_compare(results["patched"].nll, results["converted"].nll)
    return {"method": method, "qtype": qtype, "ctx": target, "trained_ctx": trained, "text": "Emma",
            "attention_scale": "in W_Q/W_K's block scales",
            "ppl_patched": results["patched"].ppl, "ppl_converted": results["converted"].ppl,
            "n_scored": int(results["patched"].nll.size), "paired": diff.to_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--method", default="yarn")
    parser.add_argument("--qtype", default="Q4_0")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=RESULTS / "patch_bench.json")
    args = parser.parse_args()
    model = default_model_dir(progress=False)
    text = read_text(austen_text("Emma"))
    with tempfile.TemporaryDirectory() as tmp:
        result = {
            "benchmark": "qroar-gguf patch against cp (speed, memory) and against convert (perplexity)",
            "machine": machine(),
            "speed": speed(model, Path(tmp), args.repeats),
            "quality": quality(model, Path(tmp), args.method, args.qtype, text, args.threads),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result["speed"][k] for k in ("wall_ratio_patch_over_cp", "median", "startup_seconds")},
                     indent=1))
    print(json.dumps({k: v for k, v in result["quality"].items() if k != "paired"}, indent=1))


if __name__ == "__main__":
    main()
