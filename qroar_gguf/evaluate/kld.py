"""KL divergence of a model against a reference model, on llama-perplexity's chunks.

Both models run the same chunk in lockstep, batch by batch (each in its own context): the
reference's scored rows of a batch are turned into log-probabilities, then the model decodes the
same batch and ``KL(ref || model)`` is computed per scored token. Nothing larger than one batch of
logits per model is ever held, whatever ``n_ctx`` is, and the result is exact (no top-k truncation).

Reported as llama-perplexity's ``--kl-divergence`` does: mean KLD (with standard error), median,
p99, maximum, and "same top token %"; plus both models' per-token NLLs (so PPL and the PPL ratio
come out of the same run).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from qroar_gguf.errors import QroarError
from qroar_gguf.evaluate.perplexity import (
    ROW_BLOCK,
    batch_spans,
    log_softmax_rows,
    make_chunks,
    n_scored_per_chunk,
    progress_enabled,
    scored_positions,
    tokenize_for_eval,
)

if TYPE_CHECKING:  # pragma: no cover
    from qroar_gguf.evaluate.runtime import Runtime


def kld_rows(
    ref_logits: np.ndarray,
    logits: np.ndarray,
    targets: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row: ``(KL(ref||model), same top token, model NLL, reference NLL)``."""
    n = len(targets)
    kld = np.empty(n, dtype=np.float64)
    same = np.empty(n, dtype=bool)
    nll = np.empty(n, dtype=np.float64)
    ref_nll = np.empty(n, dtype=np.float64)
    for s in range(0, n, ROW_BLOCK):
        xr = ref_logits[s : s + ROW_BLOCK]
        xm = logits[s : s + ROW_BLOCK]
        t = targets[s : s + ROW_BLOCK]
        rows = np.arange(len(t))
        lpr, lse_r = log_softmax_rows(xr)
        lpm, lse_m = log_softmax_rows(xm)
        pr = np.exp(lpr)
        lpr -= lpm  # log p_ref - log p_model
        kld[s : s + len(t)] = np.maximum(np.einsum("ij,ij->i", pr, lpr, dtype=np.float64), 0.0)
        same[s : s + len(t)] = xr.argmax(axis=1) == xm.argmax(axis=1)
        nll[s : s + len(t)] = lse_m - xm[rows, t]
        ref_nll[s : s + len(t)] = lse_r - xr[rows, t]
    return kld, same, nll, ref_nll


@dataclass
class KldResult:
    """Per-token KL(ref||model), top-token agreement and NLLs (chunk-major), and their summary."""

    kld: np.ndarray
    same_top: np.ndarray
    nll: np.ndarray
    ref_nll: np.ndarray
    n_ctx: int
    n_chunks: int
    seconds: float
    settings: dict = field(default_factory=dict)

    @property
    def n_scored(self) -> int:
        return int(self.kld.size)

    @property
    def mean(self) -> float:
        return float(self.kld.mean())

    @property
    def mean_se(self) -> float:
        n = self.kld.size
        return float(self.kld.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")

    @property
    def median(self) -> float:
        return float(np.median(self.kld))

    @property
    def p99(self) -> float:
        return float(np.percentile(self.kld, 99))

    @property
    def max(self) -> float:
        return float(self.kld.max())

    @property
    def same_top_pct(self) -> float:
        return 100.0 * float(self.same_top.mean())

    @property
    def same_top_pct_se(self) -> float:
        p, n = float(self.same_top.mean()), self.same_top.size
        return 100.0 * math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")

    @property
    def ppl(self) -> float:
        return math.exp(float(self.nll.mean()))

    @property
    def ref_ppl(self) -> float:
        return math.exp(float(self.ref_nll.mean()))

    @property
    def ppl_ratio(self) -> float:
        """PPL(model) / PPL(reference), on exactly the same tokens."""
        return math.exp(float((self.nll - self.ref_nll).mean()))

    def to_dict(self) -> dict:
        return {
            "kld_mean": self.mean,
            "kld_mean_se": self.mean_se,
            "kld_median": self.median,
            "kld_p99": self.p99,
            "kld_max": self.max,
            "same_top_pct": self.same_top_pct,
            "same_top_pct_se": self.same_top_pct_se,
            "ppl": self.ppl,
            "ref_ppl": self.ref_ppl,
            "ppl_ratio": self.ppl_ratio,
            "n_ctx": self.n_ctx,
            "n_chunks": self.n_chunks,
            "n_scored": self.n_scored,
            "seconds": self.seconds,
            **({"settings": self.settings} if self.settings else {}),
        }


def kl_divergence(
    rt: "Runtime",
    ref: "Runtime",
    text: str | np.ndarray,
    *,
    max_chunks: int | None = None,
    quiet: bool = False,
    desc: str = "kld",
) -> KldResult:
    """KL(ref || model) of ``rt``'s model against ``ref``'s on ``text``'s chunks.

    Both runtimes need the same ``n_ctx`` and vocabulary. The text is tokenized with the reference's
    tokenizer, and the model's must agree.
    """
    if rt.n_ctx != ref.n_ctx:
        raise QroarError(f"model context {rt.n_ctx} and reference context {ref.n_ctx} differ: use one --ctx")
    if rt.n_vocab != ref.n_vocab:
        raise QroarError(
            f"model vocabulary ({rt.n_vocab}) and reference vocabulary ({ref.n_vocab}) differ: "
            "compare GGUFs of the same checkpoint"
        )
    tokens = tokenize_for_eval(ref, text)
    if isinstance(text, str) and not np.array_equal(tokens, tokenize_for_eval(rt, text)):
        raise QroarError("model and reference tokenize the text differently: compare GGUFs of the same checkpoint")
    if rt.add_bos != ref.add_bos or (ref.add_bos and rt.bos != ref.bos):
        raise QroarError("model and reference disagree on BOS: compare GGUFs of the same checkpoint")
    n_ctx = ref.n_ctx
    chunks = make_chunks(tokens, n_ctx, add_bos=ref.add_bos, bos=ref.bos, max_chunks=max_chunks)
    n_chunks = len(chunks)
    per_chunk = n_scored_per_chunk(n_ctx)
    n = n_chunks * per_chunk
    kld = np.empty(n, dtype=np.float64)
    same = np.empty(n, dtype=bool)
    nll = np.empty(n, dtype=np.float64)
    ref_nll = np.empty(n, dtype=np.float64)
    spans = list(batch_spans(n_ctx, min(rt.n_batch, ref.n_batch)))
    first = scored_positions(n_ctx)[0]

    bar = tqdm(total=n_chunks, desc=desc, unit="chunk", disable=not progress_enabled(quiet), leave=False)
    t0 = time.perf_counter()
    try:
        for c in range(n_chunks):
            chunk = chunks[c]
            ref.clear()
            rt.clear()
            base = c * per_chunk - first
            for b0, b1, s0, s1 in spans:
                out = slice(s0 - b0, s1 - b0)
                ref.decode(chunk[b0:b1], b0, out)
                rt.decode(chunk[b0:b1], b0, out)
                if s1 > s0:
                    k, sm, nl, rnl = kld_rows(ref.logits(), rt.logits(), chunk[s0 + 1 : s1 + 1])
                    dst = slice(base + s0, base + s1)
                    kld[dst], same[dst], nll[dst], ref_nll[dst] = k, sm, nl, rnl
            bar.update(1)
            if not bar.disable:
                bar.set_postfix(kld=f"{kld[: (c + 1) * per_chunk].mean():.5f}", refresh=False)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    return KldResult(
        kld=kld,
        same_top=same,
        nll=nll,
        ref_nll=ref_nll,
        n_ctx=n_ctx,
        n_chunks=n_chunks,
        seconds=seconds,
        settings={"model": rt.describe(), "reference": ref.describe()},
    )
