"""What the scripts in tools/ share: this checkout on sys.path, running qroar-gguf and llama-perplexity,
the time and peak memory of a program, and the machine and versions a result records.

A script imports it before the package (`import benchlib`: Python puts the script's own folder first on
sys.path), so the checkout's qroar_gguf is the one it runs, installed or not. Only the standard library is
imported here; the package is imported where a function needs it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "tools" / "results"
QROAR = [sys.executable, "-m", "qroar_gguf"]


def qroar(*args) -> None:
    """Run `qroar-gguf ARGS -q` from this checkout; a failure stops the script."""
    subprocess.run([*QROAR, *(str(a) for a in args), "-q"], check=True)


def measure(cmd: list, cwd: Path | None = None, env: dict | None = None) -> dict:
    """Wall seconds and peak resident memory (MiB) of one command (run in ``cwd``: `python -m` imports the
    package of the folder it runs in). GNU time starts it: a child forked from this process would report
    this process's memory as its own peak when this one is the larger (Linux keeps the high-water mark
    across exec, and os.wait4's ru_maxrss reads it)."""
    start = time.monotonic()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *(str(c) for c in cmd)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{proc.stderr[-2000:]}")
    return {"seconds": wall, "peak_rss_mib": int(proc.stderr.strip().splitlines()[-1]) / 1024}


def llama_perplexity(*args, tool: Path | None = None, gpu_layers: int = -1) -> dict:
    """llama-perplexity's final estimate (PPL and its error) and the seconds it took, run with `args`
    (`tool`, else the build the set-up made or $QROAR_LLAMA_BIN names)."""
    from qroar_gguf.evaluate.perplexity_tool import final_estimate, run_perplexity

    start = time.monotonic()
    log = run_perplexity(*args, tool=tool, gpu_layers=gpu_layers)
    ppl, se = final_estimate(log)
    return {"ppl": ppl, "se": se, "seconds": round(time.monotonic() - start, 1)}


def gpu_name() -> str | None:
    """nvidia-smi's name, memory and driver of the GPU(s), or None without one."""
    try:
        found = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True)
    except OSError:
        return None
    return found.stdout.strip() or None


def machine(gpu: bool = False) -> dict:
    """The machine a result was measured on (with its GPU when `gpu`)."""
    found = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    if gpu:
        found["gpu"] = gpu_name()
    return found


def versions(*modules: str) -> dict:
    """Python's version and each named module's `__version__`, e.g. versions("torch", "transformers")."""
    import importlib

    return {**{name: importlib.import_module(name).__version__ for name in modules},
            "python": platform.python_version()}


def llama_cpp_python_version() -> str:
    """The llama-cpp-python release whose llama.cpp the set-up builds (one source: llama_tools)."""
    from qroar_gguf.llama_tools import LLAMA_CPP_PYTHON_VERSION

    return LLAMA_CPP_PYTHON_VERSION
