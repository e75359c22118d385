#!/usr/bin/env python3
"""Benchmark: what Q-ROAR's sensitivity analysis costs inside convert + quantize (target: < 3%).

Times, on the same checkpoint (default: SmolLM2), `measure_sensitivity` alone (reads W_Q/W_K only)
and the whole `convert --method qroar --qtype Q4_K_M`, median of --repeats, and writes
tools/results/sensitivity_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchlib import RESULTS


def main() -> None:
    from qroar_gguf.convert import ConvertOptions, convert
    from qroar_gguf.rope.measure import measure_sensitivity
    from qroar_gguf.rope.spec import PlanSpec
    from qroar_gguf.source.checkpoint import open_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "sensitivity_cost.json")
    args = parser.parse_args()
    if args.model is None:
        from qroar_gguf.assets.smollm2 import default_model_dir

        args.model = default_model_dir(progress=False)

    analysis, whole = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            ckpt = open_checkpoint(args.model)
            t0 = time.perf_counter()
            measure_sensitivity(ckpt)
            analysis.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            convert(args.model, Path(tmp) / "q.gguf", ConvertOptions(plan=PlanSpec("qroar"), qtype="Q4_K_M", force=True,
                                                                      progress=False, threads=os.cpu_count() or 1))
            whole.append(time.perf_counter() - t0)
    result = {
        "benchmark": "measure_sensitivity vs convert --method qroar --qtype Q4_K_M (which includes it)",
        "model": args.model.name,
        "cpus": os.cpu_count(),
        "analysis_s": analysis,
        "convert_quantize_s": whole,
        "analysis_s_median": statistics.median(analysis),
        "convert_quantize_s_median": statistics.median(whole),
        "fraction": statistics.median(analysis) / statistics.median(whole),
        "target_fraction_below": 0.03,
    }
    result["meets_target"] = result["fraction"] < 0.03
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
