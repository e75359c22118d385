"""Importance matrices computed with llama.cpp's llama-imatrix, on the unquantized file with the plan
already applied: the activations of the long-context model. The window defaults to llama.cpp's usual
512 tokens: docs/results.md's measurement (tools/bench_imatrix.py) found matrices from windows of the target
context no better, at 2x and 4x, for several times the cost; a window can still be asked for.

A matrix is cached under ``$QROAR_CACHE/imatrix`` by the digests of the model file and the text, the
context, the chunk count and the llama.cpp build, so a second conversion with the same plan and text
reuses it.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from qroar_gguf.choices import DEFAULT_IMATRIX_TOKENS, IMATRIX_SHORT_WINDOW
from qroar_gguf.digests import sha256_file
from qroar_gguf.errors import QroarError
from qroar_gguf.llama_tools import BIN_OVERRIDE_ENV, current_build, find_tool, run_program
from qroar_gguf.outputs import exclusive, temporary_beside
from qroar_gguf.paths import cache_dir

_TOO_SHORT = re.compile(r"you need at least (\d+) tokens")


def default_chunks(window: int, tokens: int = DEFAULT_IMATRIX_TOKENS) -> int:
    """Windows when none are asked for: as many as make `tokens` calibration tokens (at least one), so
    that a larger window costs no more text (and no more compute per token) than the default one."""
    return max(1, tokens // window)


@dataclass(frozen=True)
class ImatrixRequest:
    """Compute the matrix at conversion: on `text`, `chunks` windows of `ctx` tokens (None: the target
    context; the default number of windows)."""

    text: Path
    ctx: int | None = IMATRIX_SHORT_WINDOW  # the window when none is asked for (see the module's note)
    chunks: int | None = None  # default_chunks(ctx)


class TextTooShort(QroarError):
    """The text holds fewer tokens than llama-imatrix needs for one window (`needed`); callers that
    choose the window for the user say what to change in their own terms."""

    def __init__(self, message: str, needed: int):
        super().__init__(message)
        self.needed = needed


def tools_identity() -> str:
    """Which llama.cpp computes the matrices: the folder $QROAR_LLAMA_BIN names (it overrides the set-up's
    build, as in find_tool), else the set-up's build key."""
    override = os.environ.get(BIN_OVERRIDE_ENV)
    if override:
        # the folder's llama-imatrix as it is now: a rebuild in the same folder is another build
        tool = Path(override).resolve() / "llama-imatrix"
        stat = tool.stat() if tool.is_file() else None
        return f"{tool} {stat.st_size} {stat.st_mtime_ns}" if stat else str(tool)
    build = current_build()
    return build.info["key"] if build is not None else ""


def imatrix_key(model: Path, text: Path, ctx: int, chunks: int) -> str:
    parts = [sha256_file(model), sha256_file(text), str(ctx), str(chunks), tools_identity()]
    return hashlib.sha256(" ".join(parts).encode()).hexdigest()[:24]


def compute_imatrix(model: Path, text: Path, *, ctx: int, chunks: int, threads: int, progress: bool = True) -> Path:
    """Path of the importance matrix of `model` over the first `chunks` windows of `ctx` tokens of
    `text` (GGUF format, as llama-quantize --imatrix reads it); computed once, then cached."""
    tool = find_tool("llama-imatrix")
    folder = cache_dir() / "imatrix"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{imatrix_key(model, text, ctx, chunks)}.imatrix.gguf"
    if path.is_file():
        return path
    with exclusive(path):
        if path.is_file():
            return path
        with temporary_beside(path, "imatrix.gguf") as partial:
            if progress:
                print(f"imatrix: {chunks} window(s) of {ctx} tokens of {text.name} through llama-imatrix "
                      "(a forward pass per window)", file=sys.stderr, flush=True)
            started = time.monotonic()
            _run([str(tool), "-m", str(model), "-f", str(text), "-o", str(partial), "-c", str(ctx),
                  "-b", str(min(ctx, 2048)), "--chunks", str(chunks), "-t", str(threads), "--no-ppl",
                  "--output-format", "gguf"], text, ctx)
            if progress:
                print(f"imatrix: done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
            os.replace(partial, path)
    return path


def _run(command: list[str], text: Path, ctx: int) -> None:
    log: deque = deque(maxlen=60)
    status = run_program(command, log)
    if status != 0:
        joined = "\n".join(log)
        short = _TOO_SHORT.search(joined)
        if short:
            raise TextTooShort(f"{text} is too short for an importance matrix at --imatrix-ctx {ctx}: llama-imatrix "
                               f"needs at least {short.group(1)} tokens; give a longer text or a smaller --imatrix-ctx",
                               int(short.group(1)))
        errors = [line for line in log if " E " in line or "error" in line.lower()]
        raise QroarError(f"llama-imatrix failed (exit status {status}): {(errors or list(log) or ['no output'])[-1].strip()}")
