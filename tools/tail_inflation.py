"""Tail Inflation Ratio (TIR): how far the tail of key magnitudes grows beyond the trained context.

The Q-ROAR paper names the diagnostic ("outlier shift from short to long contexts") without a
formula. The definition below is OURS.

Definition
----------
Notation as in docs/plans.md: trained context ``L``, rotary pairs ``k = 0..P-1``, Hugging Face layout
(rotate_half: pair ``k`` of a head is dims ``(k, k + P)``). Given a text, a short context ``S <= L``
and a long context ``L' > L``:

1. **Tokens.** Tokenize the whole text (the tokenizer's post-processor adds BOS where the vocabulary
   asks for it) and take the first ``L'`` tokens, the *long window*. The *short window* is the last
   ``S`` tokens of the long window; where the vocabulary adds BOS its first token is replaced by BOS,
   as llama-perplexity does for every chunk.
2. **Runs.** The *reference run* feeds the short window (positions ``0..S-1``) to the model as
   trained: no factors, no attention scale. A plan's *long run* feeds the long window (positions
   ``0..L'-1``) with the plan's factors (every rotary inverse frequency divided by ``f_k``, exactly
   what llama.cpp does with ``rope_freqs.weight``) and its attention scale ``t`` on q and k (cos and
   sin multiplied by ``t``, as transformers' YaRN does and as the converter folds into W_Q/W_K).
   ``t`` changes the attention and hence later layers' inputs; the keys we read are pre-scale.
3. **Samples.** In every layer, the keys are the output of ``k_proj`` (pre-RoPE; RoPE rotates each
   pair, so a pair's norm is the same before and after it). Per KV head, position and pair the
   sample is the pair norm ``||(k_a, k_b)||``. **Both runs are measured on the same tokens**: the
   short window's tokens at positions ``1..S-1`` in the reference run, and the same tokens, at
   positions ``L'-S+1 .. L'-1``, in the long run. With ``S <= L' - L`` (the defaults: 4096 and 16384
   for an 8192-token model) all of the long run's measured positions lie beyond ``L``, i.e. where the
   model never was in training. The first token of the short window is left out on both sides: it is
   the reference run's attention sink (BOS where the vocabulary adds one), whose keys are atypical.
4. **Ratio.** For each frequency band ``b`` of
   :func:`qroar_gguf.rope.bands.frequency_bands` ("high", "ramp", "low"; plus "all" pairs)::

       TIR_b = Q_q(pair norms of band b, long run) / Q_q(pair norms of band b, reference run)

   with ``Q_q`` the ``q``-quantile (default 0.999, linear interpolation), pooled over layers, KV heads
   and measured positions. Per layer the same ratio is reported, with its maximum over layers.
   ``TIR = 1``: the tail of key magnitudes did not inflate beyond the trained context.

Why these refinements of "short run at ``S`` tokens, long run at positions beyond ``L``": measuring
both runs on the *same tokens* removes the text as a confound, so any ratio other than 1 is caused by
the context (its length and the positions), not by different sentences. A built-in check follows:
layer 0's keys depend on the token alone, so every plan's layer-0 TIR is exactly 1. Alongside the
tail we report the *bulk ratio* (the same ratio at the median), which tells a tail that stretches
apart from a distribution that shifts as a whole.

Control: a ratio away from 1 has two causes, the positions beyond ``L`` and simply more preceding
text. The optional control run (``control_ctx``, e.g. ``L``) separates them: no scaling, the last
``control_ctx`` tokens of the long window, the same measured tokens, all positions within training.
Its ratio is what a longer context does to the keys when the model handles it as trained; a plan's
TIR is best read against it.

The attention scale ``t`` is not in the ratio: a converted file folds ``t`` into W_K, so its stored
keys are ``t`` times ours at every context and ``t`` cancels against the same file at short context.

Cost: one forward per (plan, context): the reference run once, each plan's long run once (a plan
"none" run at ``L' == S`` is the reference run itself). Hooks reduce each layer's keys to float32
pair norms of the measured positions at once; logits are never computed.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tokenizers import Tokenizer

try:  # this tool runs the checkpoint in transformers; the package itself never needs torch
    import torch
    from transformers import AutoModelForCausalLM
except ImportError as exc:
    raise ImportError(f"tools/tail_inflation.py needs torch and transformers ({exc.name} is missing): "
                      "`bash tools/setup.sh test` installs them into .venv") from exc

from qroar_gguf.arch.families import family_for
from qroar_gguf.errors import QroarError
from qroar_gguf.rope.bands import frequency_bands
from qroar_gguf.rope.measure import measure_sensitivity
from qroar_gguf.rope.plans import RopeFacts
from qroar_gguf.rope.spec import PlanSpec
from qroar_gguf.source.checkpoint import open_checkpoint

DEFAULT_QUANTILE = 0.999
BULK_QUANTILE = 0.5


# -- model, tokens, plans ------------------------------------------------------------------------


def _load_model(model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    return model


def _tokenize(model_dir: Path, text: str) -> tuple[np.ndarray, int | None]:
    """All tokens of ``text`` and the BOS id where the vocabulary adds one (else None)."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise QroarError(f"{path} not found: the tail-inflation run needs the model's tokenizer.json")
    tok = Tokenizer.from_file(str(path))
    with_special = tok.encode(text).ids
    plain = tok.encode(text, add_special_tokens=False).ids
    bos = with_special[0] if len(with_special) == len(plain) + 1 and with_special[1:] == plain else None
    return np.asarray(with_special, dtype=np.int64), bos


def _plan_for(spec: PlanSpec, facts, model_dir: Path, cache: dict):
    """A plan from a parsed spec; qroar's sensitivity is measured once per aggregation, as convert does."""
    agg = spec.aggregation
    if spec.needs_sensitivity and agg not in cache:
        ckpt = open_checkpoint(model_dir)
        cache[agg] = measure_sensitivity(ckpt, agg=agg).sensitivity
    return spec.plan(facts, cache.get(agg) if spec.needs_sensitivity else None)


@contextmanager
def patched_rope(model, factors: np.ndarray | None, attn_scale: float = 1.0) -> Iterator[None]:
    """Run ``model`` as llama.cpp runs a file with ``rope_freqs = factors`` and ``t = attn_scale`` folded in.

    transformers (5.x) keeps the rotary state on ``model.model.rotary_emb``: ``inv_freq`` (``[P]``,
    pair k's angle per position, in rotate_half order) and ``attention_scaling`` (multiplies cos and
    sin, i.e. q and k each). We divide ``inv_freq`` by the factors (multiplying into any scaling the
    checkpoint already carries) and multiply ``attention_scaling`` by ``attn_scale``; both are restored
    on exit.
    """
    rotary = model.model.rotary_emb
    old_inv, old_scaling = rotary.inv_freq.detach().clone(), rotary.attention_scaling
    try:
        if factors is not None:
            f = torch.from_numpy(np.array(factors, dtype=np.float32))
            if f.shape != old_inv.shape:
                raise QroarError(f"{f.numel()} factors for {old_inv.numel()} rotary pairs")
            with torch.no_grad():
                rotary.inv_freq.copy_(old_inv / f.to(old_inv.dtype))
        rotary.attention_scaling = old_scaling * float(attn_scale)
        yield
    finally:
        with torch.no_grad():
            rotary.inv_freq.copy_(old_inv)
        rotary.attention_scaling = old_scaling


# -- one forward -> pair norms -------------------------------------------------------------------


def _pair_norms(model, ids: np.ndarray, first: int, n_kv: int, n_pairs: int) -> list[np.ndarray]:
    """Per layer, float32 ``[len(ids) - first, n_kv, P]`` pair norms of ``k_proj``'s output at positions >= first."""
    layers = model.model.layers
    out: list[np.ndarray | None] = [None] * len(layers)

    def hook_for(i: int):
        def hook(_module, _inputs, output):
            k = output[0, first:].float()  # [T, n_kv * head_dim]
            k = k.reshape(k.shape[0], n_kv, 2, n_pairs)  # rotate_half: dims (j, j + P) form pair j
            out[i] = torch.linalg.vector_norm(k, dim=2).numpy().copy()
        return hook

    handles = [layer.self_attn.k_proj.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            model.model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if any(o is None for o in out):
        raise QroarError("the forward pass did not reach every layer's k_proj")
    return out  # type: ignore[return-value]


def _quantiles(norms: list[np.ndarray], pairs: np.ndarray, qs: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(pooled ``[len(qs)]``, per layer ``[n_layer, len(qs)]``) quantiles of the pairs' norms (float64)."""
    per_layer = np.array([np.quantile(n[:, :, pairs].ravel(), qs) for n in norms], dtype=np.float64)
    pooled = np.quantile(np.concatenate([n[:, :, pairs].ravel() for n in norms]), qs).astype(np.float64)
    return pooled, per_layer


def _band_stats(norms: list[np.ndarray], bands: list[tuple[str, np.ndarray]], quantile: float) -> dict:
    qs = (quantile, BULK_QUANTILE)
    return {name: _quantiles(norms, pairs, qs) for name, pairs in bands if len(pairs)}


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 else (1.0 if a == b else math.inf)


@dataclass(frozen=True)
class _KeyProbe:
    """The loaded model and what every run reads from it the same way: KV heads, pairs, bands, quantile."""

    model: Any
    n_kv: int
    n_pairs: int
    bands: list[tuple[str, np.ndarray]]
    quantile: float

    def norms(self, ids: np.ndarray, first: int, factors: np.ndarray | None = None,
              attn_scale: float = 1.0) -> tuple[list[np.ndarray], float]:
        """One forward's pair norms (positions >= ``first``) under the given rope, and its seconds."""
        t0 = time.monotonic()
        with patched_rope(self.model, factors, attn_scale):
            norms = _pair_norms(self.model, ids, first, self.n_kv, self.n_pairs)
        return norms, time.monotonic() - t0

    def stats(self, norms: list[np.ndarray]) -> dict:
        return _band_stats(norms, self.bands, self.quantile)


# -- comparing a run with the reference -----------------------------------------------------------


def _band_ratio(pairs: np.ndarray, stats: tuple, ref_stats: tuple) -> dict:
    """One band's entry: the run's quantiles over the reference run's, pooled and per layer."""
    (lq, lb), lpl = stats
    (sq, sb), spl = ref_stats
    per_layer = [_ratio(a, b) for a, b in zip(lpl[:, 0], spl[:, 0])]
    worst = int(np.argmax(per_layer))
    return {
        "pairs": [int(p) for p in pairs],
        "tir": _ratio(lq, sq),
        "bulk_ratio": _ratio(lb, sb),
        "long_quantile": float(lq),
        "short_quantile": float(sq),
        "per_layer": per_layer,
        "per_layer_max": per_layer[worst],
        "per_layer_max_layer": worst,
        "per_layer_bulk": [_ratio(a, b) for a, b in zip(lpl[:, 1], spl[:, 1])],
    }


def _band_ratios(stats: dict, ref_stats: dict, bands: list[tuple[str, np.ndarray]]) -> dict:
    """Every band's entry, in band order; a band without pairs has no statistics and keeps its place with tir None."""
    return {name: _band_ratio(pairs, stats[name], ref_stats[name]) if name in stats else {"pairs": [], "tir": None}
            for name, pairs in bands}


def _summary(band_out: dict) -> str:
    return " ".join(f"{n}={b['tir']:.4f}" for n, b in band_out.items() if b.get("tir") is not None)


# -- the diagnostic -------------------------------------------------------------------------------


def _check_quantile_and_contexts(quantile: float, short_ctx: int, long_ctx: int) -> None:
    """Argument checks that need no file, so a bad call fails before anything is read."""
    if not 0.0 < quantile < 1.0:
        raise QroarError(f"the quantile must lie strictly between 0 and 1, got {quantile}")
    if short_ctx < 2 or long_ctx < short_ctx:  # the first short-window token is not measured: need one more
        raise QroarError(f"need 2 <= short context ({short_ctx}) <= long context ({long_ctx})")


def _read_checked_hparams(model_dir: Path, short_ctx: int, long_ctx: int, control_ctx: int | None):
    """The checkpoint's hyperparameters, after checking that the contexts fit its trained context."""
    hp = family_for(json.loads((model_dir / "config.json").read_text())).hparams
    if hp.n_rot != hp.head_dim:  # _pair_norms splits the whole head into its rotary pairs
        raise QroarError(f"partial rotary embeddings ({hp.n_rot} of {hp.head_dim} dims) are not supported here")
    trained = hp.context_length
    if short_ctx > trained:  # the reference run is the model as trained
        raise QroarError(f"the short context {short_ctx} must not exceed the trained context {trained}")
    if control_ctx is not None and not short_ctx <= control_ctx <= min(long_ctx, trained):
        raise QroarError(f"the control context {control_ctx} must lie between the short context {short_ctx} "
                         f"and min(long context, trained context) = {min(long_ctx, trained)}")
    return hp


def _bands_with_all(facts: RopeFacts) -> list[tuple[str, np.ndarray]]:
    """The frequency bands plus "all" pairs, in the order the result lists them."""
    return [*frequency_bands(facts), ("all", np.arange(facts.n_pairs))]


def _last_window(long_ids: np.ndarray, ctx: int, bos: int | None) -> np.ndarray:
    """The last ``ctx`` tokens of the long window, opening with BOS where the vocabulary adds one
    (as llama-perplexity's chunks do), so a shorter run starts as the model expects."""
    ids = long_ids[len(long_ids) - ctx:].copy()
    if bos is not None:
        ids[0] = bos
    return ids


def _token_windows(tokens: np.ndarray, bos: int | None, short_ctx: int, long_ctx: int) -> tuple[np.ndarray, np.ndarray]:
    """(long window, short window): the first ``long_ctx`` tokens and their last ``short_ctx``."""
    if len(tokens) < long_ctx:
        raise QroarError(f"the text has {len(tokens)} tokens; the long context needs {long_ctx}")
    long_ids = tokens[:long_ctx].copy()
    return long_ids, _last_window(long_ids, short_ctx, bos)


def _reporter(progress: bool):
    """A print for progress lines, or a no-op when the caller asked for none."""
    def say(msg: str) -> None:
        if progress:
            print(msg, flush=True)
    return say


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` torch threads and give the caller its own count back: the setting is process-wide."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)


@dataclass(frozen=True)
class _ReferenceRun:
    """The reference run: its tokens, its pair norms (plan "none" at L' == S reuses them), its band statistics."""

    ids: np.ndarray
    norms: list[np.ndarray]
    stats: dict
    seconds: float


def _reference_run(probe: _KeyProbe, short_ids: np.ndarray) -> _ReferenceRun:
    """The short window as trained, measured from position 1: position 0 is the attention sink (module docstring)."""
    norms, seconds = probe.norms(short_ids, 1)
    return _ReferenceRun(ids=short_ids, norms=norms, stats=probe.stats(norms), seconds=seconds)


def _control_run(probe: _KeyProbe, reference: _ReferenceRun, long_ids: np.ndarray, bos: int | None,
                 control_ctx: int, short_ctx: int) -> dict:
    """No scaling, the last ``control_ctx`` tokens of the long window, measured on the reference's tokens."""
    first = control_ctx - short_ctx + 1
    norms, seconds = probe.norms(_last_window(long_ids, control_ctx, bos), first)
    return {"method": "none", "ctx": control_ctx, "measured_positions": [first, control_ctx],
            "seconds": seconds, "bands": _band_ratios(probe.stats(norms), reference.stats, probe.bands)}


def _plan_norms(probe: _KeyProbe, spec, plan, reference: _ReferenceRun, long_ids: np.ndarray,
                measured_from: int) -> tuple[list[np.ndarray], float, bool]:
    """A plan's long-run pair norms, their seconds, and whether the reference forward was reused."""
    t0 = time.monotonic()
    if spec.method == "none" and np.array_equal(reference.ids, long_ids):
        norms, reused = reference.norms, True  # the very same forward (same tokens, positions, rope)
    else:
        norms, _ = probe.norms(long_ids, measured_from, plan.factors, plan.attn_scale)
        reused = False
    return norms, time.monotonic() - t0, reused


def _plan_entry(spec, plan, seconds: float, reused: bool, band_out: dict) -> dict:
    """One plan's result: the plan itself (so the numbers can be checked against it) and its band ratios."""
    return {
        "method": plan.method,
        "options": spec.record(),
        "factors": [float(v) for v in plan.factors],
        "attn_scale": plan.attn_scale,
        "seconds": seconds,
        "reused_reference_forward": reused,
        "bands": band_out,
    }


def _measure_plans(probe: _KeyProbe, reference: _ReferenceRun, specs: list, facts: RopeFacts, model_dir: Path,
                   long_ids: np.ndarray, measured_from: int, say) -> dict:
    """Each plan's long run compared with the reference, by label in the order given."""
    sensitivity_cache: dict = {}  # qroar plans with the same agg share one sensitivity measurement
    results: dict = {}
    for spec in specs:
        if spec.label in results:  # a plan named twice is measured once
            continue
        plan = _plan_for(spec, facts, model_dir, sensitivity_cache)
        norms, seconds, reused = _plan_norms(probe, spec, plan, reference, long_ids, measured_from)
        band_out = _band_ratios(probe.stats(norms), reference.stats, probe.bands)
        del norms  # a long run's norms are large: free them before the next forward
        results[spec.label] = _plan_entry(spec, plan, seconds, reused, band_out)
        say(f"{spec.label}: {len(long_ids)} tokens in {seconds:.1f} s; TIR {_summary(band_out)}")
    return results


def _describe_run(model_dir: Path, hp, *, short_ctx: int, long_ctx: int, quantile: float, n_kv: int,
                  n_pairs: int, n_tokens: int, bos: int | None, bands: list[tuple[str, np.ndarray]]) -> dict:
    """The result's header: what was measured and where, ahead of the timings and the per-plan entries."""
    trained = hp.context_length
    measured_from = long_ctx - short_ctx + 1
    return {
        "definition": "TIR_b = Q_q(k_proj pair norms of band b, long run, positions L'-S+1..L'-1) / "
                      "Q_q(same tokens, reference run at positions 1..S-1, no scaling); pooled over "
                      "layers, KV heads, positions (qroar_gguf/evaluate/tail.py)",
        "model": str(model_dir),
        "trained_ctx": trained,
        "short_ctx": short_ctx,
        "long_ctx": long_ctx,
        "scale": long_ctx / trained,
        "quantile": quantile,
        "bulk_quantile": BULK_QUANTILE,
        "n_layer": hp.n_layer,
        "n_kv_head": n_kv,
        "n_pairs": n_pairs,
        "text_tokens": int(n_tokens),
        "bos": bos,
        "measured_tokens": [long_ctx - short_ctx + 1, long_ctx],
        "measured_positions_long": [measured_from, long_ctx],
        "measured_beyond_trained": measured_from >= trained,
        "samples_per_layer": (short_ctx - 1) * n_kv * n_pairs,
        "bands": {name: [int(p) for p in pairs] for name, pairs in bands},
    }


def tail_inflation(model_dir: Path, text: str, plans: list[str], short_ctx: int, long_ctx: int,
                   quantile: float = DEFAULT_QUANTILE, threads: int = 2, progress: bool = False,
                   control_ctx: int | None = None) -> dict:
    """TIR per plan and frequency band (module docstring); a JSON-serialisable dict.

    ``control_ctx`` (``short_ctx <= control_ctx <= min(long_ctx, L)``) adds the control run under
    ``"control"``: no scaling, the last ``control_ctx`` tokens of the long window, the same measured
    tokens. Its ratio is what the longer context alone does within the trained range.
    """
    model_dir = Path(model_dir)
    # Every check runs before the model loads: a bad argument costs no forward.
    _check_quantile_and_contexts(quantile, short_ctx, long_ctx)
    specs = [PlanSpec.parse(p) for p in plans]
    hp = _read_checked_hparams(model_dir, short_ctx, long_ctx, control_ctx)
    facts = RopeFacts(n_rot=hp.n_rot, theta=hp.rope_theta, trained_ctx=hp.context_length, target_ctx=long_ctx)
    bands = _bands_with_all(facts)
    tokens, bos = _tokenize(model_dir, text)
    long_ids, short_ids = _token_windows(tokens, bos, short_ctx, long_ctx)
    measured_from = long_ctx - short_ctx + 1  # first measured position of the long run
    say = _reporter(progress)

    with _torch_threads(threads):
        t0 = time.monotonic()
        model = _load_model(model_dir)
        load_seconds = time.monotonic() - t0
        probe = _KeyProbe(model, model.config.num_key_value_heads, facts.n_pairs, bands, quantile)
        reference = _reference_run(probe, short_ids)
        say(f"reference: {short_ctx} tokens in {reference.seconds:.1f} s")
        control = None
        if control_ctx is not None:
            control = _control_run(probe, reference, long_ids, bos, control_ctx, short_ctx)
            say(f"control (none at {control_ctx}): {control['seconds']:.1f} s; TIR {_summary(control['bands'])}")
        results = _measure_plans(probe, reference, specs, facts, model_dir, long_ids, measured_from, say)

    header = _describe_run(model_dir, hp, short_ctx=short_ctx, long_ctx=long_ctx, quantile=quantile,
                           n_kv=probe.n_kv, n_pairs=facts.n_pairs, n_tokens=len(tokens), bos=bos, bands=bands)
    return {**header, "threads": threads, "load_seconds": load_seconds, "reference_seconds": reference.seconds,
            "plans": results, "control": control}
