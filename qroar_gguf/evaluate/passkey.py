"""Passkey retrieval (the test of llama.cpp's ``llama-passkey`` and the landmark-attention paper).

A random 5-digit key is hidden at a given depth of filler text sized (with the model's own tokenizer)
to fill the target context; the model is asked for it and decodes greedily a few tokens. A trial is
correct when the key's digits appear in what it wrote.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
from tqdm import tqdm

from qroar_gguf.errors import QroarError
from qroar_gguf.evaluate.perplexity import progress_enabled

if TYPE_CHECKING:  # pragma: no cover
    from qroar_gguf.evaluate.runtime import Runtime

PREFIX = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize them. I will quiz you about the important information there."
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"

DEFAULT_DEPTHS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class PasskeyPrompt:
    text: str
    key: str
    depth: float  # asked for: fraction of the filler before the needle
    n_filler: int  # filler repetitions
    needle_at: int  # filler repetitions before the needle


def build_prompt(key: str, depth: float, n_filler: int) -> PasskeyPrompt:
    """The prompt with ``n_filler`` filler sentences and the needle after ``round(depth*n_filler)``."""
    if not 0.0 <= depth <= 1.0:
        raise QroarError(f"passkey depth {depth} outside 0..1")
    at = int(round(depth * n_filler))
    text = PREFIX + FILLER * at + NEEDLE.format(key=key) + FILLER * (n_filler - at) + QUESTION
    return PasskeyPrompt(text=text, key=key, depth=depth, n_filler=n_filler, needle_at=at)


def fit_filler(rt: "Runtime", target_tokens: int, key: str = "12345") -> int:
    """The largest filler count whose prompt tokenizes to at most ``target_tokens`` tokens."""

    def length(n: int) -> int:
        return len(rt.tokenize(build_prompt(key, 0.5, n).text))

    base = length(0)
    if base > target_tokens:
        raise QroarError(
            f"a passkey prompt needs at least {base} tokens; the target of {target_tokens} is too small: use a larger --ctx"
        )
    per = max(1e-9, (length(20) - base) / 20)
    n = max(0, int((target_tokens - base) / per))
    while n > 0 and length(n) > target_tokens:
        n -= 1
    while length(n + 1) <= target_tokens:
        n += 1
    return n


@dataclass
class PasskeyTrial:
    depth: float
    key: str
    answer: str
    correct: bool
    prompt_tokens: int
    needle_token: int  # index of the prompt token where the needle starts
    seconds: float

    @property
    def needle_depth(self) -> float:
        """Where the needle actually sits, as a fraction of the prompt's tokens."""
        return self.needle_token / self.prompt_tokens


@dataclass
class PasskeyResult:
    trials: list[PasskeyTrial]
    n_ctx: int
    target_tokens: int
    n_filler: int
    settings: dict = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return float(np.mean([t.correct for t in self.trials])) if self.trials else float("nan")

    @property
    def by_depth(self) -> dict[float, float]:
        out: dict[float, list[bool]] = {}
        for t in self.trials:
            out.setdefault(t.depth, []).append(t.correct)
        return {d: float(np.mean(v)) for d, v in sorted(out.items())}

    def to_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "by_depth": {f"{d:g}": a for d, a in self.by_depth.items()},
            "n_ctx": self.n_ctx,
            "target_tokens": self.target_tokens,
            "n_filler": self.n_filler,
            "trials": [
                {
                    "depth": t.depth,
                    "key": t.key,
                    "answer": t.answer,
                    "correct": t.correct,
                    "prompt_tokens": t.prompt_tokens,
                    "needle_depth": t.needle_depth,
                }
                for t in self.trials
            ],
            **({"settings": self.settings} if self.settings else {}),
        }


def greedy_continue(rt: "Runtime", prompt: np.ndarray, n_gen: int, *, reuse_prefix: bool = False) -> list[int]:
    """Decode ``prompt``, then up to ``n_gen`` greedy tokens (stops at end of generation).

    With ``reuse_prefix`` the KV cache keeps what it shares with the previous prompt (see ``Runtime.prefill``).
    """
    if len(prompt) + n_gen > rt.n_ctx:
        raise QroarError(f"prompt of {len(prompt)} tokens + {n_gen} to generate exceed --ctx {rt.n_ctx}")
    rt.prefill(prompt, reuse=reuse_prefix)
    out: list[int] = []
    for _ in range(n_gen):
        tok = int(np.argmax(rt.logits()[-1]))
        if rt.model.is_eog(tok):
            break
        out.append(tok)
        if len(out) == n_gen:
            break
        rt.append(tok)
    return out


def passkey(
    rt: "Runtime",
    *,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    trials: int = 1,
    seed: int = 0,
    n_gen: int = 6,
    target_tokens: int | None = None,
    reuse_prefix: bool = True,
    quiet: bool = False,
    desc: str = "passkey",
) -> PasskeyResult:
    """Passkey accuracy of ``rt``'s model with prompts of about ``target_tokens`` tokens.

    ``target_tokens`` defaults to ``rt.n_ctx - n_gen``. Keys come from ``random.Random(seed)``, one per
    (depth, trial), so every plan sees the same keys at the same depths. Trials run in order of depth
    and, with ``reuse_prefix``, each keeps the KV cache of the filler before the previous needle
    (about 40% less prefill for 9 depths); the numbers then differ from a cold run only by batching.
    """
    if trials < 1:
        raise QroarError(f"--trials {trials}: use at least 1")
    target = rt.n_ctx - n_gen if target_tokens is None else int(target_tokens)
    if target + n_gen > rt.n_ctx:
        raise QroarError(f"passkey prompts of {target} tokens + {n_gen} generated exceed --ctx {rt.n_ctx}")
    rng = random.Random(seed)
    n_filler = fit_filler(rt, target)
    jobs = [(d, str(rng.randint(10000, 99999))) for d in depths for _ in range(trials)]
    order = sorted(range(len(jobs)), key=lambda i: jobs[i][0])  # shallow first: consecutive prompts share more

    results: list[PasskeyTrial | None] = [None] * len(jobs)
    rt.clear()
    for i in tqdm(order, desc=desc, unit="trial", disable=not progress_enabled(quiet), leave=False):
        depth, key = jobs[i]
        p = build_prompt(key, depth, n_filler)
        tokens = rt.tokenize(p.text)
        # token index of the needle: the tokens of the text before it (its leading space starts a token)
        before = p.text[: len(PREFIX) + len(FILLER) * p.needle_at]
        needle_token = len(rt.tokenize(before))
        t0 = time.perf_counter()
        gen = greedy_continue(rt, tokens, n_gen, reuse_prefix=reuse_prefix)
        answer = rt.detokenize(gen)
        results[i] = PasskeyTrial(
            depth=depth,
            key=key,
            answer=answer,
            correct=key in answer,
            prompt_tokens=len(tokens),
            needle_token=needle_token,
            seconds=time.perf_counter() - t0,
        )
    return PasskeyResult(trials=[t for t in results if t is not None], n_ctx=rt.n_ctx, target_tokens=target, n_filler=n_filler, settings=rt.describe())
