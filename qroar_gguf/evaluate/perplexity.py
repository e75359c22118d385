"""Perplexity exactly as llama.cpp's ``llama-perplexity`` computes it.

Protocol (llama.cpp's tools/perplexity/perplexity.cpp): tokenize the whole text (BOS only where the vocabulary adds it),
cut consecutive chunks of ``n_ctx`` tokens, make the first token of each chunk BOS where the
vocabulary adds BOS (it replaces the chunk's first token, as llama-perplexity does), decode each
chunk from an empty KV cache, and score only the second half: the logits at positions
``n_ctx/2 .. n_ctx-2`` predict tokens ``n_ctx/2+1 .. n_ctx-1``.

Logits are requested only for the scored positions and are reduced to one float64 NLL per token as
each batch arrives, so memory is one batch of logits (inside libllama) plus ``n_ctx/2`` floats per
chunk. ``PPL = exp(mean NLL)``; its standard error is llama-perplexity's delta-method one,
``PPL * sqrt(var(NLL) / (N - 1))``.

Difference from llama-perplexity: it refuses texts shorter than ``2 * n_ctx`` tokens; we accept any
text of at least one chunk. (It also packs several chunks in one batch when ``n_batch > n_ctx``; we
decode one chunk at a time, which gives the same numbers.)
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import numpy as np
from tqdm import tqdm

from qroar_gguf.errors import QroarError

if TYPE_CHECKING:  # pragma: no cover
    from qroar_gguf.evaluate.runtime import Runtime

#: Rows of logits reduced at once: small enough that the float32 temporaries stay in cache.
ROW_BLOCK = 16


# -- chunking -------------------------------------------------------------------------------------
def scored_positions(n_ctx: int) -> tuple[int, int]:
    """``(first, stop)``: positions ``first .. stop-1`` of a chunk are scored (each predicts the next)."""
    first = n_ctx // 2
    return first, n_ctx - 1


def n_scored_per_chunk(n_ctx: int) -> int:
    first, stop = scored_positions(n_ctx)
    return stop - first


def make_chunks(
    tokens: np.ndarray,
    n_ctx: int,
    *,
    add_bos: bool,
    bos: int | None,
    max_chunks: int | None = None,
) -> np.ndarray:
    """Cut ``tokens`` into consecutive ``(n_chunks, n_ctx)`` chunks (a copy), llama-perplexity style.

    The tail that does not fill a chunk is dropped. Where ``add_bos``, the first token of every chunk
    is replaced by ``bos`` (the first chunk already starts with it after tokenization).
    """
    tokens = np.asarray(tokens, dtype=np.int32)
    if n_ctx < 4:
        raise QroarError(f"--ctx {n_ctx} is too small to score anything: use at least 4")
    if len(tokens) < n_ctx:
        raise QroarError(
            f"text has {len(tokens)} tokens; --ctx {n_ctx} needs at least {n_ctx}: "
            "use a longer text or a smaller --ctx"
        )
    n_chunks = len(tokens) // n_ctx
    if max_chunks is not None:
        if max_chunks < 1:
            raise QroarError(f"--chunks {max_chunks}: use at least 1")
        n_chunks = min(n_chunks, int(max_chunks))
    chunks = tokens[: n_chunks * n_ctx].reshape(n_chunks, n_ctx).copy()
    if add_bos:
        if bos is None or bos < 0:
            raise QroarError("the vocabulary adds BOS but has no BOS token: the GGUF's tokenizer metadata is broken")
        chunks[:, 0] = bos
    return chunks


def tokenize_for_eval(rt: "Runtime", text: str | np.ndarray) -> np.ndarray:
    """A text tokenized as llama-perplexity does (special tokens added per the vocab, not parsed)."""
    if isinstance(text, str):
        return rt.tokenize(text, add_special=True, parse_special=False)
    return np.asarray(text, dtype=np.int32)


def batch_spans(n_ctx: int, n_batch: int) -> Iterator[tuple[int, int, int, int]]:
    """For each batch of a chunk: ``(b0, b1, s0, s1)``: tokens ``b0:b1``, scored positions ``s0:s1``."""
    first, stop = scored_positions(n_ctx)
    for b0 in range(0, n_ctx, n_batch):
        b1 = min(b0 + n_batch, n_ctx)
        s0, s1 = max(b0, first), min(b1, stop)
        yield b0, b1, s0, max(s0, s1)


# -- reductions -----------------------------------------------------------------------------------
def nll_rows(logits: np.ndarray, targets: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``-log softmax(logits)[target]`` per row, float64 (max-subtracted, float64 sums)."""
    n = len(targets)
    if out is None:
        out = np.empty(n, dtype=np.float64)
    for s in range(0, n, ROW_BLOCK):
        x = logits[s : s + ROW_BLOCK]
        t = targets[s : s + ROW_BLOCK]
        m = x.max(axis=1)
        e = np.exp(x - m[:, None])
        lse = np.log(e.sum(axis=1, dtype=np.float64)) + m
        out[s : s + len(t)] = lse - x[np.arange(len(t)), t]
    return out


def log_softmax_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(log_probs float32, logsumexp float64)`` of a block of logit rows."""
    m = x.max(axis=1)
    shifted = x - m[:, None]
    lse0 = np.log(np.exp(shifted).sum(axis=1, dtype=np.float64))
    shifted -= lse0.astype(np.float32)[:, None]
    return shifted, lse0 + m


def progress_enabled(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


# -- result ---------------------------------------------------------------------------------------
def nll_standard_error(nll: np.ndarray) -> float:
    """Standard error of the mean NLL (llama-perplexity's: population variance over N-1)."""
    n = nll.size
    if n < 2:
        return float("nan")
    mean = float(nll.mean())
    var = float(np.mean(nll**2) - mean**2)
    return math.sqrt(max(var, 0.0) / (n - 1))


def ppl_standard_error(nll: np.ndarray) -> float:
    """Delta method: ``PPL * SE(mean NLL)``, as llama-perplexity prints after ``+/-``."""
    return math.exp(float(nll.mean())) * nll_standard_error(nll)


@dataclass
class PerplexityResult:
    """Per-token NLLs (chunk-major, ``n_ctx - 1 - n_ctx//2`` per chunk) and their summary."""

    nll: np.ndarray
    n_ctx: int
    n_chunks: int
    n_text_tokens: int
    seconds: float
    settings: dict = field(default_factory=dict)

    @property
    def n_scored(self) -> int:
        return int(self.nll.size)

    @property
    def mean_nll(self) -> float:
        return float(self.nll.mean())

    @property
    def nll_se(self) -> float:
        return nll_standard_error(self.nll)

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def ppl_se(self) -> float:
        return ppl_standard_error(self.nll)

    @property
    def chunk_ppl(self) -> np.ndarray:
        return np.exp(self.nll.reshape(self.n_chunks, -1).mean(axis=1))

    @property
    def tokens_per_second(self) -> float:
        """Tokens decoded (all of each chunk, scored or not) per second of evaluation."""
        return self.n_chunks * self.n_ctx / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        return {
            "ppl": self.ppl,
            "ppl_se": self.ppl_se,
            "mean_nll": self.mean_nll,
            "nll_se": self.nll_se,
            "n_ctx": self.n_ctx,
            "n_chunks": self.n_chunks,
            "n_scored": self.n_scored,
            "n_text_tokens": self.n_text_tokens,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second,
            **({"settings": self.settings} if self.settings else {}),
        }


# -- evaluation -----------------------------------------------------------------------------------
def perplexity(
    rt: "Runtime",
    text: str | np.ndarray,
    *,
    max_chunks: int | None = None,
    quiet: bool = False,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Perplexity of ``rt``'s model on ``text`` (a string, or tokens from ``tokenize_for_eval``)."""
    tokens = tokenize_for_eval(rt, text)
    n_ctx = rt.n_ctx
    chunks = make_chunks(tokens, n_ctx, add_bos=rt.add_bos, bos=rt.bos, max_chunks=max_chunks)
    n_chunks = len(chunks)
    per_chunk = n_scored_per_chunk(n_ctx)
    nll = np.empty(n_chunks * per_chunk, dtype=np.float64)
    spans = list(batch_spans(n_ctx, rt.n_batch))
    first = scored_positions(n_ctx)[0]

    bar = tqdm(total=n_chunks, desc=desc, unit="chunk", disable=not progress_enabled(quiet), leave=False)
    t0 = time.perf_counter()
    try:
        for c in range(n_chunks):
            chunk = chunks[c]
            rt.clear()
            base = c * per_chunk - first
            for b0, b1, s0, s1 in spans:
                rt.decode(chunk[b0:b1], b0, slice(s0 - b0, s1 - b0))
                if s1 > s0:
                    nll_rows(rt.logits(), chunk[s0 + 1 : s1 + 1], out=nll[base + s0 : base + s1])
            bar.update(1)
            if bar.n and not bar.disable:
                done = bar.n * per_chunk
                bar.set_postfix(ppl=f"{math.exp(nll[:done].mean()):.4f}", refresh=False)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    return PerplexityResult(
        nll=nll,
        n_ctx=n_ctx,
        n_chunks=n_chunks,
        n_text_tokens=int(len(tokens)),
        seconds=seconds,
        settings=rt.describe(),
    )


def decode_only_seconds(rt: "Runtime", text: str | np.ndarray, *, max_chunks: int | None = None) -> float:
    """Time of the bare llama_decode loop that ``perplexity`` runs (same chunks, same output rows).

    The baseline for the evaluation overhead: ``perplexity(...).seconds / decode_only_seconds(...) - 1``.
    """
    tokens = tokenize_for_eval(rt, text)
    chunks = make_chunks(tokens, rt.n_ctx, add_bos=rt.add_bos, bos=rt.bos, max_chunks=max_chunks)
    spans = list(batch_spans(rt.n_ctx, rt.n_batch))
    t0 = time.perf_counter()
    for chunk in chunks:
        rt.clear()
        for b0, b1, s0, s1 in spans:
            rt.decode(chunk[b0:b1], b0, slice(s0 - b0, s1 - b0))
            if s1 > s0:
                rt.logits()  # synchronizes, as reading the logits does
    return time.perf_counter() - t0
