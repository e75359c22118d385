"""Tail Inflation Ratio (TIR): how far the tail of key magnitudes grows beyond the trained context.

The Q-ROAR paper names the diagnostic ("outlier shift from short to long contexts") without a
formula. The definition below is OURS.

Definition
----------
Notation as in README's "Plans" table: trained context ``L``, rotary pairs ``k = 0..P-1``, Hugging Face layout
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
   :func:`qroar_gguf.rope.sensitivity.frequency_bands` ("high", "ramp", "low"; plus "all" pairs)::

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
from pathlib import Path
from typing import Iterator

import numpy as np
from tokenizers import Tokenizer

try:  # this tool runs the checkpoint in transformers; the package itself never needs torch
    import torch
    from transformers import AutoModelForCausalLM
except ImportError as exc:
    raise ImportError(f"tools/tail_inflation.py needs torch and transformers ({exc.name} is missing): "
                      "`bash tools/setup.sh test` installs them into .venv") from exc

from qroar_gguf.arch.llama import read_hparams
from qroar_gguf.errors import QroarError
from qroar_gguf.evaluate.bench import PlanSpec
from qroar_gguf.rope.measure import measure_sensitivity
from qroar_gguf.rope.plans import RopeFacts, make_plan
from qroar_gguf.rope.sensitivity import frequency_bands
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


def _plan_for(spec, facts, model_dir: Path, cache: dict):
    """A plan from a parsed spec; qroar's sensitivity is measured once (``agg`` as convert takes it)."""
    options = dict(spec.options)
    agg = options.pop("agg", "max")
    if spec.method == "qroar" and "sensitivity" not in options:
        if agg not in cache:
            ckpt = open_checkpoint(model_dir)
            cache[agg] = measure_sensitivity(ckpt, read_hparams(ckpt.config), agg=agg).sensitivity
        options["sensitivity"] = cache[agg]
    return make_plan(spec.method, facts, **options)


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


# -- the diagnostic -------------------------------------------------------------------------------


def tail_inflation(model_dir: Path, text: str, plans: list[str], short_ctx: int, long_ctx: int,
                   quantile: float = DEFAULT_QUANTILE, threads: int = 2, progress: bool = False,
                   control_ctx: int | None = None) -> dict:
    """TIR per plan and frequency band (module docstring); a JSON-serialisable dict.

    ``control_ctx`` (``short_ctx <= control_ctx <= min(long_ctx, L)``) adds the control run under
    ``"control"``: no scaling, the last ``control_ctx`` tokens of the long window, the same measured
    tokens. Its ratio is what the longer context alone does within the trained range.
    """

    model_dir = Path(model_dir)
    if not 0.0 < quantile < 1.0:
        raise QroarError(f"the quantile must lie strictly between 0 and 1, got {quantile}")
    if short_ctx < 2 or long_ctx < short_ctx:
        raise QroarError(f"need 2 <= short context ({short_ctx}) <= long context ({long_ctx})")
    specs = [PlanSpec.parse(p) for p in plans]
    config = json.loads((model_dir / "config.json").read_text())
    hp = read_hparams(config)
    if hp.n_rot != hp.head_dim:
        raise QroarError(f"partial rotary embeddings ({hp.n_rot} of {hp.head_dim} dims) are not supported here")
    trained = hp.context_length
    if short_ctx > trained:
        raise QroarError(f"the short context {short_ctx} must not exceed the trained context {trained}")
    if control_ctx is not None and not short_ctx <= control_ctx <= min(long_ctx, trained):
        raise QroarError(f"the control context {control_ctx} must lie between the short context {short_ctx} "
                         f"and min(long context, trained context) = {min(long_ctx, trained)}")
    facts = RopeFacts(n_rot=hp.n_rot, theta=hp.rope_theta, trained_ctx=trained, target_ctx=long_ctx)
    bands = [*frequency_bands(facts), ("all", np.arange(facts.n_pairs))]
    n_pairs = facts.n_pairs

    tokens, bos = _tokenize(model_dir, text)
    if len(tokens) < long_ctx:
        raise QroarError(f"the text has {len(tokens)} tokens; the long context needs {long_ctx}")
    long_ids = tokens[:long_ctx].copy()
    short_ids = long_ids[long_ctx - short_ctx:].copy()
    if bos is not None:
        short_ids[0] = bos
    measured_from = long_ctx - short_ctx + 1  # first measured position of the long run

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.monotonic()
        model = _load_model(model_dir)
        load_seconds = time.monotonic() - t0
        n_kv = model.config.num_key_value_heads

        def say(msg: str) -> None:
            if progress:
                print(msg, flush=True)

        t0 = time.monotonic()
        with patched_rope(model, None, 1.0):
            ref_norms = _pair_norms(model, short_ids, 1, n_kv, n_pairs)
        ref_seconds = time.monotonic() - t0
        say(f"reference: {short_ctx} tokens in {ref_seconds:.1f} s")
        ref = _band_stats(ref_norms, bands, quantile)

        def compare(stats: dict) -> dict:
            band_out = {}
            for name, pairs in bands:
                if name not in stats:
                    band_out[name] = {"pairs": [], "tir": None}
                    continue
                (lq, lb), lpl = stats[name][0], stats[name][1]
                (sq, sb), spl = ref[name][0], ref[name][1]
                per_layer = [_ratio(a, b) for a, b in zip(lpl[:, 0], spl[:, 0])]
                worst = int(np.argmax(per_layer))
                band_out[name] = {
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
            return band_out

        def summary(band_out: dict) -> str:
            return " ".join(f"{n}={b['tir']:.4f}" for n, b in band_out.items() if b.get("tir") is not None)

        control = None
        if control_ctx is not None:
            control_ids = long_ids[long_ctx - control_ctx:].copy()
            if bos is not None:
                control_ids[0] = bos
            t0 = time.monotonic()
            with patched_rope(model, None, 1.0):
                norms = _pair_norms(model, control_ids, control_ctx - short_ctx + 1, n_kv, n_pairs)
            control = {"method": "none", "ctx": control_ctx,
                       "measured_positions": [control_ctx - short_ctx + 1, control_ctx],
                       "seconds": time.monotonic() - t0, "bands": compare(_band_stats(norms, bands, quantile))}
            del norms
            say(f"control (none at {control_ctx}): {control['seconds']:.1f} s; TIR {summary(control['bands'])}")

        sensitivity_cache: dict = {}
        results: dict = {}
        for spec in specs:
            if spec.label in results:
                continue
            plan = _plan_for(spec, facts, model_dir, sensitivity_cache)
            t0 = time.monotonic()
            if spec.method == "none" and np.array_equal(short_ids, long_ids):
                norms, reused = ref_norms, True  # the very same forward (same tokens, positions, rope)
            else:
                with patched_rope(model, plan.factors, plan.attn_scale):
                    norms = _pair_norms(model, long_ids, measured_from, n_kv, n_pairs)
                reused = False
            seconds = time.monotonic() - t0
            band_out = compare(_band_stats(norms, bands, quantile))
            del norms
            results[spec.label] = {
                "method": plan.method,
                "options": {k: v for k, v in spec.options.items()},
                "factors": [float(v) for v in plan.factors],
                "attn_scale": plan.attn_scale,
                "seconds": seconds,
                "reused_reference_forward": reused,
                "bands": band_out,
            }
            say(f"{spec.label}: {long_ctx} tokens in {seconds:.1f} s; TIR {summary(band_out)}")
    finally:
        torch.set_num_threads(old_threads)

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
        "text_tokens": int(len(tokens)),
        "bos": bos,
        "measured_tokens": [long_ctx - short_ctx + 1, long_ctx],
        "measured_positions_long": [measured_from, long_ctx],
        "measured_beyond_trained": measured_from >= trained,
        "samples_per_layer": (short_ctx - 1) * n_kv * n_pairs,
        "bands": {name: [int(p) for p in pairs] for name, pairs in bands},
        "threads": threads,
        "load_seconds": load_seconds,
        "reference_seconds": ref_seconds,
        "plans": results,
        "control": control,
    }
