"""llama.cpp's llama-perplexity program as an evaluator: running it, reading its log and its saved
log-probabilities.

`bench --evaluator llama-perplexity` measures with it (llama.cpp's own numbers, and on a GPU build of
the tools the fast way); the benchmark scripts in tools/ read its final estimate through
`final_estimate`. The protocol is the one `evaluate/perplexity.py` follows: consecutive windows of
n_ctx tokens, the second half of each scored.
"""

from __future__ import annotations

import re
from collections import deque
from pathlib import Path

import numpy as np

from qroar_gguf.errors import QroarError
from qroar_gguf.llama_tools import find_tool, run_program

#: "Final estimate: PPL = 12.3456 +/- 0.12345", the last line of a perplexity run
_FINAL = re.compile(r"Final estimate: PPL = ([0-9.eE+-]+) \+/- ([0-9.eE+-]+)")


def run_perplexity(*args, gpu_layers: int = -1, tool: Path | None = None) -> str:
    """Run llama-perplexity (`tool`, else the build `find_tool` names) with `args`, flash attention on as
    our runtime has it, `gpu_layers` layers on a GPU build's GPU (-1: all); its whole log, for parsing."""
    command = [str(tool or find_tool("llama-perplexity")), *(str(a) for a in args), "-fa", "on",
               "-ngl", str(999 if gpu_layers < 0 else gpu_layers)]
    log: deque = deque()
    status = run_program(command, log)
    if status != 0:
        raise QroarError(f"llama-perplexity failed (exit status {status}): "
                         f"{(list(log) or ['no output'])[-1].strip()}")
    return "\n".join(log)


def final_estimate(log: str) -> tuple[float, float]:
    """(PPL, its standard error) of a perplexity run's log."""
    found = _FINAL.search(log)
    if found is None:
        raise QroarError("llama-perplexity printed no 'Final estimate: PPL'")
    return float(found.group(1)), float(found.group(2))


def statistic(log: str, label: str) -> tuple[float, float | None]:
    """One line of the --kl-divergence summary, `label : value [± error]` (the error None if not shown)."""
    found = re.search(re.escape(label) + r"\s*:\s*([-0-9.eE+]+)(?:\s*%?\s*±\s*([-0-9.eE+]+))?", log)
    if found is None:
        raise QroarError(f"llama-perplexity printed no '{label}'")
    return float(found.group(1)), None if found.group(2) is None else float(found.group(2))


def _row_width(n_vocab: int) -> int:
    return 2 * ((n_vocab + 1) // 2) + 4


def saved_shape(path: Path) -> tuple[int, int, int]:
    """(n_ctx, n_vocab, n_chunk) of a complete --kl-divergence-base file. llama-perplexity exits 0 and
    leaves a file holding only its header when the text is too short, so the size is checked too."""
    with open(path, "rb") as f:
        magic = f.read(8)
    header = np.fromfile(path, dtype=np.int32, count=5)
    if magic != b"_logits_" or header.size < 5:
        raise QroarError(f"{path} is not a llama-perplexity logits file")
    n_ctx, n_vocab, n_chunk = int(header[2]), int(header[3]), int(header[4])
    size = 20 + 4 * n_chunk * n_ctx + 2 * n_chunk * (n_ctx - 1 - n_ctx // 2) * _row_width(n_vocab)
    if n_chunk < 1 or path.stat().st_size != size:
        raise QroarError(f"{path} is incomplete ({path.stat().st_size} bytes, {size} expected): is the text "
                         "shorter than one window?")
    return n_ctx, n_vocab, n_chunk


def saved_nll(path: Path) -> np.ndarray:
    """Per-token NLL of every scored token (chunk-major), from a --kl-divergence-base file.

    The file (llama-perplexity's format): "_logits_", n_ctx, n_vocab, n_chunk (int32), the tokens
    (int32, n_chunk * n_ctx), then for each scored token a row of 2*((n_vocab+1)/2) + 4 uint16: a float
    scale and a float minimum log-probability, then each token's log-probability as uint16 steps of the
    scale above the minimum (anything 16 nats or more below the top token reads as the minimum).
    """
    n_ctx, n_vocab, n_chunk = saved_shape(path)
    tokens = np.fromfile(path, dtype=np.int32, count=n_chunk * n_ctx, offset=20).reshape(n_chunk, n_ctx)
    first = n_ctx // 2
    per_chunk, width = n_ctx - 1 - first, _row_width(n_vocab)
    rows = np.memmap(path, dtype=np.uint16, mode="r", offset=20 + 4 * n_chunk * n_ctx,
                     shape=(n_chunk * per_chunk, width))
    head = np.ascontiguousarray(rows[:, :4]).view(np.float32)  # scale, minimum log-probability
    targets = tokens[:, first + 1:n_ctx].reshape(-1)
    steps = rows[np.arange(rows.shape[0]), 4 + targets].astype(np.float64)
    return -(head[:, 0].astype(np.float64) * steps + head[:, 1])


def save_logits(model: Path, text: Path, out: Path, *, ctx: int, chunks: int, threads: int, type_k: str = "f16",
                gpu_layers: int = -1) -> tuple[tuple[float, float], np.ndarray]:
    """Write `model`'s log-probabilities on the first `chunks` windows of `text` to `out` (llama-perplexity
    --kl-divergence-base); its final estimate (PPL, error: exact) and the per-token NLLs read back from the
    file (floored 16 nats below each top token, as the file keeps them)."""
    log = run_perplexity("-m", model, "-f", text, "-c", ctx, "--chunks", chunks, "-t", threads, "-ctk", type_k,
                         "--kl-divergence-base", out, gpu_layers=gpu_layers)
    return final_estimate(log), saved_nll(out)


def kl_divergence_summary(model: Path, base_logits: Path, *, ctx: int, chunks: int, threads: int,
                          type_k: str = "f16", gpu_layers: int = -1) -> dict:
    """llama-perplexity --kl-divergence of `model` against the log-probabilities saved in `base_logits`:
    the model's perplexity with its error (the base's, read from the floored file, is left out), its KLD (mean and error, median, 99th percentile) and
    same-top-token percentage."""
    log = run_perplexity("-m", model, "-c", ctx, "--chunks", chunks, "-t", threads, "-ctk", type_k,
                         "--kl-divergence", "--kl-divergence-base", base_logits, gpu_layers=gpu_layers)
    kld, kld_se = statistic(log, "Mean    KLD")
    ppl, ppl_se = statistic(log, "Mean PPL(Q)")
    return {"ppl": ppl, "ppl_se": ppl_se, "kld_mean": kld, "kld_se": kld_se, "kld_median": statistic(log, "Median  KLD")[0],
            "kld_p99": statistic(log, "99.0%   KLD")[0], "same_top_pct": statistic(log, "Same top p")[0]}
