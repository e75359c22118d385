#!/usr/bin/env python3
"""Benchmark: `convert`'s two routes on the same Qwen3 checkpoint, against llama.cpp's converter alone.

- native: qroar-gguf's own streaming converter (`--converter native --allow-patched-runtime`: rope_freqs,
  for the llama.cpp we build);
- llama.cpp: `--converter llama.cpp` (the default for Qwen3 without --allow-patched-runtime): the pinned
  sdist's convert_hf_to_gguf.py to an unquantized temporary, then patch's plan step (keys), then the quantizer;
- llama.cpp's convert_hf_to_gguf.py alone (--outtype f16), which neither extends nor quantizes.

The checkpoint is a random Qwen3 built by transformers (F32, a few hundred MB) with SmolLM2's tokenizer,
unless --model. Each run is one child process: wall time and peak RSS (benchlib.measure: GNU time's, the
largest of the process and its waited-for descendants: the converter's child, the quantizer's).
Runs alternate, --repeats times; the median is reported. The checkpoint is built in a child process of
its own: a forked child's ru_maxrss starts at its parent's resident size, so a parent holding torch would
put its own size under every measurement. Writes JSON (default
tools/results/convert_routes.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import RESULTS, measure

from qroar_gguf.llama_tools import reference_converter
from qroar_gguf.outputs import publish_text

SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
             num_key_value_heads=4, head_dim=64, max_position_embeddings=4096, rope_theta=1000000.0,
             tie_word_embeddings=True)


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """benchlib.measure's wall time and peak RSS, as this benchmark's JSON names them."""
    got = measure(cmd, env=env)
    return {"wall_s": round(got["seconds"], 2), "peak_rss_mib": round(got["peak_rss_mib"], 1)}


def build_qwen3(directory: Path) -> Path:
    import torch
    import transformers

    from qroar_gguf.assets.smollm2 import default_model_dir

    tokenizer = default_model_dir(progress=False)
    torch.manual_seed(0)
    vocab = transformers.AutoConfig.from_pretrained(tokenizer).vocab_size
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(vocab_size=vocab, **SHAPE)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.05)
    model.save_pretrained(directory, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer / name, directory / name)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a Qwen3 checkpoint directory (default: a random one, built)")
    parser.add_argument("--qtypes", nargs="+", default=["F16", "Q4_K_M"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=RESULTS / "convert_routes.json")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # the child that builds the checkpoint
    args = parser.parse_args()
    if args.build is not None:
        build_qwen3(args.build)
        return

    with tempfile.TemporaryDirectory(prefix="qroar-routes-", dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            model = tmp / "qwen3"
            subprocess.run([sys.executable, __file__, "--build", str(model)], check=True)
        config = json.loads((model / "config.json").read_text())
        size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        ctx = 4 * config["max_position_embeddings"]
        script = reference_converter()
        env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")}
        ours = [sys.executable, "-m", "qroar_gguf", str(model), "--method", "yarn", "--ctx", str(ctx), "-q",
                "--threads", str(args.threads)]
        runs: dict[str, tuple[list[str], dict | None]] = {
            "llama.cpp convert_hf_to_gguf.py alone (F16)": (
                [sys.executable, str(script), str(model), "--outtype", "f16", "--outfile", str(tmp / "ref.gguf")], env)}
        for qtype in args.qtypes:
            runs[f"native {qtype}"] = (ours + ["-o", str(tmp / f"native.{qtype}.gguf"), "--qtype", qtype,
                                               "--converter", "native", "--allow-patched-runtime", "--force"], None)
            runs[f"llama.cpp route {qtype}"] = (ours + ["-o", str(tmp / f"delegated.{qtype}.gguf"), "--qtype", qtype,
                                                        "--converter", "llama.cpp", "--force"], None)
        samples: dict[str, list[dict]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, (cmd, run_env) in runs.items():
                samples[name].append(timed(cmd, run_env))
                print(name, samples[name][-1], flush=True)
        results = {name: {"wall_s": statistics.median(s["wall_s"] for s in got),
                          "peak_rss_mib": statistics.median(s["peak_rss_mib"] for s in got), "samples": got}
                   for name, got in samples.items()}
        reference = results["llama.cpp convert_hf_to_gguf.py alone (F16)"]
        for r in results.values():
            r["wall_vs_converter_alone"] = round(r["wall_s"] / reference["wall_s"], 2)
            r["rss_vs_converter_alone"] = round(r["peak_rss_mib"] / reference["peak_rss_mib"], 2)
    out = {
        "what": "convert's routes on one Qwen3 checkpoint (yarn to 4x), against llama.cpp's converter alone",
        "checkpoint": {"model": str(args.model) if args.model else "random Qwen3 built by transformers",
                       "dtype": "F32" if not args.model else "as stored", "safetensors_mib": round(size / 2**20, 1),
                       **({k: config[k] for k in SHAPE if k in config} | {"vocab_size": config["vocab_size"]})},
        "target_ctx": ctx,
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
                    "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
                    "bench_process_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    publish_text(args.out, json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
