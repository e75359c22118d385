#!/usr/bin/env python3
"""Benchmark llama.cpp's own tools (built by the set-up) on a file qroar-gguf made.

1. Agreement: SmolLM2 converted for 2x its trained context (yarn, Q4_0); `llama-perplexity` and
   `qroar-gguf eval` on the same window(s) of an Austen novel at the target context; their relative
   difference in PPL.
2. llama-server (what Ollama runs for a GGUF) started with `-c TARGET` on that file, and on the
   control (the same weights converted with no plan): passkey prompts filling most of the window, the
   key at several depths, answered through its HTTP API; whether the key comes back, the prompt's
   length and time.
3. With `--builds`: the cost of the two ways to provide llama.cpp, each from scratch in an empty
   cache: CMakeLists.txt's tools build (whose libllama the bindings also load, as the set-up does) plus
   the bindings-only wheel, against the bindings' own portable wheel build (what the set-up did before).

Writes JSON (default tools/results/llama_tools_bench.json); docs/results.md's `llama-tools` section is rendered
from it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchlib import QROAR, REPO, RESULTS, llama_cpp_python_version, llama_perplexity, machine

from qroar_gguf.assets.austen import austen_text
from qroar_gguf.assets.smollm2 import default_model_dir
from qroar_gguf.evaluate.passkey import build_prompt
from qroar_gguf.llama_tools import current_build, fetch_sdist, find_tool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = 10) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def agreement(model: Path, text: Path, ctx: int, chunks: int, threads: int) -> dict:
    theirs = llama_perplexity("-m", model, "-f", text, "-c", ctx, "--chunks", chunks, "-t", threads)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "eval.json"
        start = time.monotonic()
        subprocess.run([*QROAR, "eval", str(model), "--text", str(text), "--ctx", str(ctx), "--chunks", str(chunks),
                        "--threads", str(threads), "--json", str(report), "-q"], check=True)
        eval_seconds = time.monotonic() - start
        ours = json.loads(report.read_text())["perplexity"]
    return {"ctx": ctx, "chunks": chunks, "ppl_llama_perplexity": theirs["ppl"], "ppl_eval": ours["ppl"],
            "n_scored": ours["n_scored"], "relative_difference": (ours["ppl"] - theirs["ppl"]) / theirs["ppl"],
            "seconds_llama_perplexity": theirs["seconds"], "seconds_eval": round(eval_seconds, 1)}


def server_passkeys(model: Path, ctx: int, fill: float, depths: list[float], threads: int) -> dict:
    port = _free_port()
    server = subprocess.Popen([str(find_tool("llama-server")), "-m", str(model), "-c", str(ctx), "--host",
                               "127.0.0.1", "--port", str(port), "-t", str(threads), "-np", "1", "-fa", "on"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trials = []
    try:
        for _ in range(600):
            try:
                if _http(f"http://127.0.0.1:{port}/health", timeout=2).get("status") == "ok":
                    break
            except OSError:
                time.sleep(0.5)
        base = f"http://127.0.0.1:{port}"
        meta = _http(f"{base}/v1/models")["data"][0]["meta"]
        n_filler = _filler_for(base, int(fill * ctx))
        for i, depth in enumerate(depths):
            key = f"{(37_813 * (i + 3)) % 90_000 + 10_000}"
            prompt = build_prompt(key, depth, n_filler).text
            start = time.monotonic()
            answer = _http(f"{base}/completion", {"prompt": prompt, "n_predict": 8, "temperature": 0, "top_k": 1,
                                                   "cache_prompt": False}, timeout=3600)
            trials.append({"depth": depth, "key": key, "answer": answer["content"], "correct": key in answer["content"],
                           "prompt_tokens": answer["tokens_evaluated"], "seconds": round(time.monotonic() - start, 1)})
    finally:
        server.terminate()
        server.wait(timeout=60)
    return {"ctx": ctx, "n_ctx_train_read_by_server": meta["n_ctx_train"], "trials": trials,
            "accuracy": sum(t["correct"] for t in trials) / len(trials)}


def _filler_for(base: str, target_tokens: int) -> int:
    """The largest filler count whose prompt the server tokenizes to at most `target_tokens`."""
    def length(n: int) -> int:
        return len(_http(f"{base}/tokenize", {"content": build_prompt("12345", 0.5, n).text, "add_special": True},
                         timeout=60)["tokens"])

    per = (length(200) - length(0)) / 200
    n = int((target_tokens - length(0)) / per)
    while length(n) > target_tokens:
        n -= 5
    return n


def builds(threads: int) -> dict:
    """Each way of providing llama.cpp, from scratch, in a throwaway cache (the sdist copied in)."""
    out = {}
    sdist = fetch_sdist(lambda message: None)
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "QROAR_CACHE": str(Path(tmp) / "cache")}
        (Path(tmp) / "cache" / "sdist").mkdir(parents=True)
        (Path(tmp) / "cache" / "sdist" / sdist.name).write_bytes(sdist.read_bytes())
        start = time.monotonic()
        subprocess.run([sys.executable, "-m", "qroar_gguf.llama_tools", "build"], env=env, check=True,
                       cwd=REPO, stderr=subprocess.DEVNULL)
        out["tools_build_seconds"] = round(time.monotonic() - start, 1)
        for name, cmake_args in (("bindings_only_wheel_seconds", "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"),
                                 ("portable_wheel_seconds", "-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF")):
            start = time.monotonic()
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(sdist), "-w",
                            str(Path(tmp) / name)], env={**env, "CMAKE_ARGS": cmake_args}, check=True)
            out[name] = round(time.monotonic() - start, 1)
    out["one_llama_cpp_seconds"] = out["tools_build_seconds"] + out["bindings_only_wheel_seconds"]
    out["two_llama_cpps_seconds"] = out["tools_build_seconds"] + out["portable_wheel_seconds"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ctx", type=int, default=16384, help="target context (2x SmolLM2's)")
    parser.add_argument("--text", default="Emma")
    parser.add_argument("--chunks", type=int, default=1)
    parser.add_argument("--depths", default="0.1,0.9")
    parser.add_argument("--fill", type=float, default=0.9, help="passkey prompt length / ctx")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--builds", action="store_true", help="also time the builds from scratch (minutes)")
    parser.add_argument("--out", type=Path, default=RESULTS / "llama_tools_bench.json")
    args = parser.parse_args()

    build = current_build()
    result = {"machine": machine(), "llama_cpp_python": llama_cpp_python_version(), "build": build.info if build else None,
              "model": "SmolLM2-135M-Instruct", "method": "yarn", "qtype": "Q4_0", "text": args.text}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / f"yarn.{args.ctx}.Q4_0.gguf"
        subprocess.run([*QROAR, str(default_model_dir(progress=False)), "-o", str(model), "--ctx", str(args.ctx),
                        "--method", "yarn", "--qtype", "Q4_0", "-q"], check=True)
        result["agreement"] = agreement(model, austen_text(args.text), args.ctx, args.chunks, args.threads)
        print(json.dumps(result["agreement"]), flush=True)
        depths = [float(d) for d in args.depths.split(",")]
        result["server_passkey"] = server_passkeys(model, args.ctx, args.fill, depths, args.threads)
        print(json.dumps(result["server_passkey"]), flush=True)
        control = Path(tmp) / f"none.{args.ctx}.Q4_0.gguf"
        subprocess.run([*QROAR, str(default_model_dir(progress=False)), "-o", str(control), "--ctx", str(args.ctx),
                        "--method", "none", "--qtype", "Q4_0", "-q"], check=True)
        result["server_passkey_control"] = server_passkeys(control, args.ctx, args.fill, depths, args.threads)
        print(json.dumps(result["server_passkey_control"]), flush=True)
    if args.builds:
        result["builds"] = builds(args.threads)
        print(json.dumps(result["builds"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
