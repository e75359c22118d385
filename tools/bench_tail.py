#!/usr/bin/env python3
"""Benchmark: Tail Inflation Ratio (our definition, tools/tail_inflation.py) per plan and band.

Runs the HF checkpoint in transformers (float32, CPU): the reference run at --short tokens without
scaling, one --long run per plan with its factors, and a control run without scaling at the trained
context, all measured on the same tokens of the text; writes
tools/results/tail_inflation.json. Needs torch and transformers, which the package itself does not:
`bash tools/setup.sh test` installs them into .venv.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from benchlib import RESULTS, versions


def main() -> None:
    try:
        from tail_inflation import DEFAULT_QUANTILE, tail_inflation
    except ImportError as exc:
        sys.exit(f"error: {exc}")

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="HF checkpoint directory (default: the SmolLM2 demo model)")
    parser.add_argument("--text", type=Path, help="text file (default: Austen's Emma)")
    parser.add_argument("--plans", nargs="+", default=["none", "linear", "ntk", "yarn", "llama3", "qroar"])
    parser.add_argument("--short", type=int, default=4096, help="reference context (<= trained)")
    parser.add_argument("--long", type=int, default=16384, help="long context (the plans' target)")
    parser.add_argument("--control-ctx", type=int,
                        help="control run without scaling at this context (default: the trained context)")
    parser.add_argument("--no-control", action="store_true", help="skip the control run")
    parser.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "tail_inflation.json")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args()
    if args.model is None:
        from qroar_gguf.assets.smollm2 import default_model_dir

        args.model = default_model_dir(progress=False)
    if args.text is None:
        from qroar_gguf.assets.austen import austen_text

        args.text = austen_text("Emma")

    control = None
    if not args.no_control:
        from qroar_gguf.arch.families import family_for

        trained = family_for(json.loads((args.model / "config.json").read_text())).hparams.context_length
        control = args.control_ctx or min(trained, args.long)

    start = time.monotonic()
    result = tail_inflation(args.model, args.text.read_text(encoding="utf-8"), args.plans, args.short, args.long,
                            quantile=args.quantile, threads=args.threads, progress=not args.quiet,
                            control_ctx=control)
    result["text"] = args.text.name
    result["model"] = args.model.name
    result["total_seconds"] = time.monotonic() - start
    result["versions"] = versions("torch", "transformers")
    result["machine"] = platform.machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")

    print(f"{'plan':<14}" + "".join(f"{b:>18}" for b in ("high", "ramp", "low", "all")) + "   (TIR / per-layer max)")
    rows = list(result["plans"].items())
    if result["control"] is not None:
        rows.append((f"control@{result['control']['ctx']}", result["control"]))
    for label, entry in rows:
        cells = []
        for name in ("high", "ramp", "low", "all"):
            band = entry["bands"][name]
            cells.append("-" if band["tir"] is None else f"{band['tir']:.3f}/{band['per_layer_max']:.3f}")
        print(f"{label:<14}" + "".join(f"{c:>18}" for c in cells) + f"   {entry['seconds']:.0f} s")
    print(f"wrote {args.out} ({result['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
