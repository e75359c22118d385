#!/usr/bin/env python3
"""Benchmark: `qroar-gguf convert --qtype F16` against llama.cpp's own convert_hf_to_gguf.py.

Same checkpoint (the default SmolLM2 model unless --model), same machine, same run, alternating
the two tools; reports wall time and peak RSS of each process (GNU time's, benchlib.measure) and their
ratios, plus our peak RSS against the largest tensor's size. Writes JSON (default
tools/results/convert_bench.json).

The reference converter comes from the llama-cpp-python sdist (vendor/llama.cpp), fetched from PyPI
once and cached; it needs torch and transformers (`bash tools/setup.sh test` installs them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from benchlib import QROAR, RESULTS, machine, measure

from qroar_gguf.llama_tools import reference_converter


def largest_tensor_mib(model_dir: Path) -> tuple[str, float]:
    from qroar_gguf.source.checkpoint import open_checkpoint

    ckpt = open_checkpoint(model_dir)
    name = max(ckpt.names, key=lambda n: ckpt.info(n).nbytes)
    return name, ckpt.info(name).nbytes / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="HF checkpoint directory (default: the SmolLM2 default model)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "convert_bench.json")
    args = parser.parse_args()

    if args.model is None:
        from qroar_gguf.assets.smollm2 import default_model_dir

        args.model = default_model_dir(progress=False)
    script = reference_converter()
    ours_cmd = lambda out: [*QROAR, "convert", str(args.model), "-o", str(out),
                            "--method", "none", "--qtype", "F16", "--force", "-q"]
    theirs_cmd = lambda out: [sys.executable, str(script), str(args.model), "--outtype", "f16", "--outfile", str(out)]

    runs: dict[str, list[dict]] = {"qroar_gguf": [], "convert_hf_to_gguf": []}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.gguf"
        for i in range(args.repeats):
            for tool, cmd in (("qroar_gguf", ours_cmd), ("convert_hf_to_gguf", theirs_cmd)):
                took = measure(cmd(out))
                runs[tool].append({"wall_s": took["seconds"], "peak_rss_mib": took["peak_rss_mib"]})
                out.unlink(missing_ok=True)
                print(f"run {i + 1}/{args.repeats} {tool}: {runs[tool][-1]}", file=sys.stderr)

    summary = {tool: {"wall_s_median": statistics.median(r["wall_s"] for r in rs),
                      "peak_rss_mib_max": max(r["peak_rss_mib"] for r in rs), "runs": rs}
               for tool, rs in runs.items()}
    name, tensor_mib = largest_tensor_mib(args.model)
    ours, theirs = summary["qroar_gguf"], summary["convert_hf_to_gguf"]
    result = {
        "benchmark": "qroar-gguf convert --method none --qtype F16 vs llama.cpp convert_hf_to_gguf.py --outtype f16",
        "model": str(args.model.name),
        "machine": machine(),
        "repeats": args.repeats,
        **summary,
        "wall_ratio_ours_over_theirs": ours["wall_s_median"] / theirs["wall_s_median"],
        "rss_ratio_ours_over_theirs": ours["peak_rss_mib_max"] / theirs["peak_rss_mib_max"],
        "largest_tensor": {"name": name, "mib": tensor_mib},
        "our_peak_rss_over_largest_tensor": ours["peak_rss_mib_max"] / tensor_mib,
        "targets": {"wall_ratio_at_most": 0.8, "rss_ratio_below": 1.0},
    }
    result["meets_targets"] = (result["wall_ratio_ours_over_theirs"] <= 0.8 and result["rss_ratio_ours_over_theirs"] < 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("qroar_gguf", "convert_hf_to_gguf")}, indent=2))


if __name__ == "__main__":
    main()
