#!/usr/bin/env python3
"""On a machine with an NVIDIA GPU: build llama.cpp with CUDA from the pinned source (CMakeLists.txt,
patches/ applied), run a file qroar-gguf made on the CPU and on the GPU, and time a 32k evaluation.

1. Build: `qroar-gguf tools build --cmake-arg -DGGML_CUDA=ON` (a build of its own, next to the CPU one).
2. Logits: SmolLM2 converted for 4x its trained context (32768, yarn, Q4_0) and, as the control, with
   no plan. The bindings load the CPU libllama (all layers on the CPU) or the CUDA build's
   (`LLAMA_CPP_LIB_PATH`, all layers on the GPU); each decodes the same window of Emma, longer than the
   trained context, and we compare the logits at the scored positions. rope_freqs is honoured by the
   CUDA kernels when GPU-vs-CPU differences on the yarn file are small while the control (same weights,
   no factors) is far from the yarn file on either device.
3. Speed: `llama-perplexity` of the CUDA build, all layers offloaded, one 32768-token window; and
   `qroar-gguf eval` on the same window through the CUDA libllama.

Writes JSON (default tools/results/cuda_check.json). Needs the set-up done (`bash tools/setup.sh`) and
the CUDA toolkit (nvcc) on PATH; the sdist is taken from $QROAR_CACHE/sdist when there is no network.
`--cuda-bin`/`--cpu-bin` name builds made elsewhere, and `--phase cpu` does the CPU side alone (while
CUDA builds), `--phase gpu` the rest.

Not yet run to the end. On an H200 (CUDA 13.0) the Python bindings died (SIGSEGV) loading a model from
the CUDA build's libllama, right after llama.cpp initialised the tokenizer, when numpy had loaded
libstdc++ privately first (not when libllama was loaded first, nor with libstdc++ preloaded).
qroar_gguf.evaluate.runtime now makes the loaded libstdc++ global before libllama loads; with that, a
manual check there (output not committed) loaded and decoded a 16k window on the GPU and, in another
process, on the CPU build. tools/gpu_session.sh measures with llama.cpp's tools alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import QROAR, REPO, RESULTS, llama_perplexity, machine
CHILD = r"""
import os
import sys
import numpy as np
from qroar_gguf.evaluate.runtime import Runtime
from qroar_gguf.source.text import read_text
path, text, n_ctx, ngl, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
with Runtime(path, n_ctx=n_ctx, n_batch=n_ctx, n_gpu_layers=ngl, threads=os.cpu_count()) as rt:
    tokens = rt.tokenize(read_text(text))[:n_ctx]
    scored = np.zeros(n_ctx, dtype=bool)
    scored[n_ctx // 2::8] = True  # every 8th position of the second half, beyond the trained context too
    rt.clear()
    rt.decode(tokens, 0, outputs=scored)
    np.save(out, rt.logits().copy())
"""


def logits_on(lib_dir: Path | None, model: Path, text: Path, n_ctx: int, ngl: int, out: Path):
    import numpy as np

    env = dict(os.environ)
    if lib_dir is not None:
        env["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    subprocess.run([sys.executable, "-c", CHILD, str(model), str(text), str(n_ctx), str(ngl), str(out)],
                   env=env, check=True, cwd=REPO)
    return np.load(out)


def compare(a, b) -> dict:
    import numpy as np

    diff = np.abs(a.astype(np.float64) - b)
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "same_argmax": float((a.argmax(-1) == b.argmax(-1)).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ctx", type=int, default=32768)
    parser.add_argument("--logit-ctx", type=int, default=12288, help="window of the logit comparison (> 8192)")
    parser.add_argument("--text", default="Emma")
    parser.add_argument("--cuda-bin", type=Path, help="a CUDA build's bin folder (default: build one)")
    parser.add_argument("--cpu-bin", type=Path, help="the CPU build's bin folder (default: the set-up's)")
    parser.add_argument("--workdir", type=Path, help="keep files and CPU logits here (reused when present)")
    parser.add_argument("--phase", choices=("all", "cpu", "gpu"), default="all",
                        help="cpu: convert and take the CPU logits only (e.g. while CUDA builds); gpu: the rest")
    parser.add_argument("--out", type=Path, default=RESULTS / "cuda_check.json")
    args = parser.parse_args()

    from qroar_gguf.assets.austen import austen_text
    from qroar_gguf.assets.smollm2 import default_model_dir
    from qroar_gguf.llama_tools import build_tools, current_build

    cpu_bin = args.cpu_bin
    if cpu_bin is None:
        cpu = current_build()
        if cpu is None or cpu.info["cmake_args"]:
            raise SystemExit("run bash tools/setup.sh first (the default CPU build), or name --cpu-bin")
        cpu_bin = cpu.bin
    text = austen_text(args.text)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        files = {}
        for method in ("yarn", "none"):
            files[method] = work / f"{method}.Q4_0.gguf"
            if not files[method].is_file():
                subprocess.run([*QROAR, str(default_model_dir(progress=False)), "-o", str(files[method]), "--ctx",
                                str(args.ctx), "--method", method, "--qtype", "Q4_0", "-q"], check=True)
        runs = {}
        for method in ("yarn", "none"):
            saved = work / f"{method}_cpu.{args.logit_ctx}.npy"
            if saved.is_file():
                import numpy as np

                runs[f"{method}_cpu"] = np.load(saved)
            else:
                runs[f"{method}_cpu"] = logits_on(cpu_bin, files[method], text, args.logit_ctx, 0, saved)
        if args.phase == "cpu":
            return

        if shutil.which("nvcc") is None and args.cuda_bin is None:
            raise SystemExit("nvcc is not on PATH: this check needs the CUDA toolkit")
        result: dict = {"machine": machine(gpu=True)}
        if args.cuda_bin is None:
            start = time.monotonic()
            cuda = build_tools(["-DGGML_CUDA=ON"], jobs=os.cpu_count())
            result["cuda_build"] = {"seconds": round(time.monotonic() - start, 1), **cuda.info}
            cuda_bin = cuda.bin
        else:
            cuda_bin = args.cuda_bin
            result["cuda_build"] = {"bin": str(cuda_bin), "built_by": "the caller"}
        for method in ("yarn", "none"):
            runs[f"{method}_gpu"] = logits_on(cuda_bin, files[method], text, args.logit_ctx, 999,
                                              work / f"{method}_gpu.npy")
        result["logits"] = {
            "ctx": args.logit_ctx, "scored_positions": int(runs["yarn_cpu"].shape[0]),
            "yarn_gpu_vs_cpu": compare(runs["yarn_gpu"], runs["yarn_cpu"]),
            "none_gpu_vs_cpu": compare(runs["none_gpu"], runs["none_cpu"]),
            "control_none_vs_yarn_gpu": compare(runs["none_gpu"], runs["yarn_gpu"]),
            "control_none_vs_yarn_cpu": compare(runs["none_cpu"], runs["yarn_cpu"]),
        }
        print(json.dumps(result["logits"]), flush=True)

        tool = llama_perplexity("-m", files["yarn"], "-f", text, "-c", args.ctx, "--chunks", 1,
                                tool=cuda_bin / "llama-perplexity")
        report = work / "eval.json"
        start = time.monotonic()
        subprocess.run([*QROAR, "eval", str(files["yarn"]), "--text", str(text), "--ctx", str(args.ctx),
                        "--chunks", "1", "--json", str(report), "-q"], check=True,
                       env={**os.environ, "LLAMA_CPP_LIB_PATH": str(cuda_bin)})
        eval_seconds = time.monotonic() - start
        ppl_eval = json.loads(report.read_text())["perplexity"]["ppl"]
        result["evaluation_32k"] = {"ctx": args.ctx, "ppl_llama_perplexity": tool["ppl"], "ppl_eval": ppl_eval,
                                    "seconds_llama_perplexity": tool["seconds"],
                                    "seconds_eval": round(eval_seconds, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
