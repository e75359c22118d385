"""RoPE plans: model facts + target context -> per-pair factors and an attention scale.

Styled after transformers' ``modeling_rope_utils.py``: every plan is one pure function
``(facts, **options) -> RopePlan`` with its own validation, all registered in :data:`PLANS`, and
:func:`make_plan` is the one validating entry point the CLI uses. No I/O here.

Conventions (docs/plans.md): ``n_rot`` rotary dims, ``P = n_rot/2`` pairs, base ``b``,
``w_k = b**(-2k/n_rot)``, wavelength ``lam_k = 2*pi/w_k``, trained context ``L``, target ``L'``,
``r = L'/L``. llama.cpp turns pair ``k`` by ``m * w_k / f_k`` where ``f_k = rope_freqs.weight[k]``, so
``f_k = 1`` leaves a pair alone and ``f_k = r`` is linear position interpolation for it. An attention
scale ``t`` is folded into the weights (``W_Q *= t``, ``W_K *= t``) by the converter, never by us.

The math is done in float64; factors are handed out as float32 (the type of ``rope_freqs.weight``).
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from qroar_gguf.choices import DEFAULT_BETA
from qroar_gguf.errors import QroarError

#: YaRN's ramp boundaries in rotations completed within the trained context (the paper's alpha/beta,
#: transformers' and llama.cpp's ``beta_fast``/``beta_slow``). Also the band edges of ``bands.py``.
YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0

#: Methods a qroar plan may start from.
QROAR_BASES = ("linear", "yarn", "llama3")
#: How qroar turns sensitivities into protection weights (see :func:`_plan_qroar`).
QROAR_PROTECTIONS = ("excess", "softmax")


# --------------------------------------------------------------------------------------------------
# Facts and plans
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RopeFacts:
    """What a plan needs to know about the model and the target. Validated on construction."""

    n_rot: int  # rotary dims (rope.dimension_count), even
    theta: float  # rope base b
    trained_ctx: int  # L
    target_ctx: int  # L'

    def __post_init__(self) -> None:
        for name in ("n_rot", "trained_ctx", "target_ctx"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise QroarError(f"{name} must be an integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.n_rot <= 0 or self.n_rot % 2:
            raise QroarError(f"the rotary dimension count must be even and positive, got {self.n_rot}")
        if self.trained_ctx <= 0:
            raise QroarError(f"the trained context must be positive, got {self.trained_ctx}")
        if self.target_ctx <= 0:
            raise QroarError(f"the target context must be positive, got {self.target_ctx}")
        if isinstance(self.theta, bool) or not isinstance(self.theta, numbers.Real):
            raise QroarError(f"rope theta must be a number, got {self.theta!r}")
        theta = float(self.theta)
        if not math.isfinite(theta) or theta <= 1.0:
            raise QroarError(f"rope theta must be a finite number larger than 1, got {self.theta!r}")
        object.__setattr__(self, "theta", theta)

    @property
    def scale(self) -> float:
        """``r = L'/L``."""
        return self.target_ctx / self.trained_ctx

    @property
    def n_pairs(self) -> int:
        """``P = n_rot // 2``."""
        return self.n_rot // 2

    def wavelengths(self) -> np.ndarray:
        """``lam_k = 2*pi / b**(-2k/n_rot) = 2*pi * b**(2k/n_rot)``, float64 ``[P]``, in tokens."""
        k = np.arange(self.n_pairs, dtype=np.float64)
        return 2.0 * math.pi * np.power(self.theta, 2.0 * k / self.n_rot)

    def rotations(self) -> np.ndarray:
        """Turns pair k completes within the trained context, ``L / lam_k``, float64 ``[P]``."""
        return self.trained_ctx / self.wavelengths()

    def as_params(self) -> dict[str, Any]:
        """The facts as a JSON-serialisable dict (part of every plan's ``params``)."""
        return {
            "n_rot": self.n_rot,
            "theta": self.theta,
            "trained_ctx": self.trained_ctx,
            "target_ctx": self.target_ctx,
            "scale": self.scale,
        }


@dataclass(frozen=True, eq=False)
class RopePlan:
    """A plan's result. ``factors`` is a read-only float32 ``[P]`` array, every entry finite and > 0."""

    method: str
    factors: np.ndarray  # float32 [P]; llama.cpp divides pair k's angle by factors[k]
    attn_scale: float  # folded into W_Q and W_K (each multiplied by it); 1.0 = none
    params: dict = field(default_factory=dict)  # everything needed to reproduce it; JSON-serialisable

    def __post_init__(self) -> None:
        factors = np.array(self.factors, dtype=np.float32)  # a private copy
        if factors.ndim != 1 or factors.size == 0:
            raise QroarError(f"plan factors must be a non-empty 1-D array, got shape {factors.shape}")
        if not np.all(np.isfinite(factors)) or np.any(factors <= 0):
            raise QroarError(f"plan {self.method!r} produced factors that are not finite and positive")
        factors.setflags(write=False)
        object.__setattr__(self, "factors", factors)
        attn_scale = float(self.attn_scale)
        if not math.isfinite(attn_scale) or attn_scale <= 0:
            raise QroarError(f"plan {self.method!r} produced an invalid attention scale {self.attn_scale!r}")
        object.__setattr__(self, "attn_scale", attn_scale)


# --------------------------------------------------------------------------------------------------
# Shared pieces (float64 math)
# --------------------------------------------------------------------------------------------------


def _plan(method: str, facts: RopeFacts, factors: np.ndarray, scale: float, /, **params: Any) -> RopePlan:
    return RopePlan(method=method, factors=factors, attn_scale=scale, params={**facts.as_params(), **params})


def _ramp_mix(inv_interp: np.ndarray, r: float) -> np.ndarray:
    """``f = 1 / ((1 - s)/r + s)`` for an extrapolation weight ``s`` in [0, 1] (1 = untouched)."""
    f = 1.0 / ((1.0 - inv_interp) / r + inv_interp)
    return np.maximum(f, 1.0)  # only guards rounding: the exact value is in [1, r]


def _linear_factors(facts: RopeFacts) -> np.ndarray:
    return np.full(facts.n_pairs, facts.scale, dtype=np.float64)


def _ntk_factors(facts: RopeFacts) -> np.ndarray:
    # f_k = (b'/b)^(2k/n_rot) with b' = b * r^(n_rot/(n_rot-2))  <=>  log f_k = 2k/(n_rot-2) * log r.
    if facts.n_pairs == 1:  # n_rot = 2: the only pair is k = 0, whose factor is 1 for every b'
        return np.ones(1, dtype=np.float64)
    k = np.arange(facts.n_pairs, dtype=np.float64)
    return np.exp(2.0 * k / (facts.n_rot - 2) * math.log(facts.scale))


def rotation_pair(facts: RopeFacts, rotations: float) -> float:
    """The fractional pair index whose pair completes exactly ``rotations`` turns within ``L``.

    ``L / lam_k = n`` with ``lam_k = 2*pi*b**(2k/n_rot)`` gives ``c(n) = n_rot * ln(L / (2*pi*n)) / (2 * ln b)``:
    YaRN's correction dimension before rounding. May fall outside ``[0, P-1]``.
    """
    return facts.n_rot * math.log(facts.trained_ctx / (rotations * 2.0 * math.pi)) / (2.0 * math.log(facts.theta))


def yarn_correction_range(facts: RopeFacts, beta_fast: float, beta_slow: float) -> tuple[float, float]:
    """YaRN's ramp ends ``(lo, hi)`` in pair indices, exactly as transformers and llama.cpp compute them.

    With ``c`` = :func:`rotation_pair`: ``lo = max(floor(c(beta_fast)), 0)``, ``hi = min(ceil(c(beta_slow)),
    n_rot - 1)``, and ``hi`` is nudged by 0.001 when both coincide (both implementations do that).
    """
    lo = float(max(math.floor(rotation_pair(facts, beta_fast)), 0))
    hi = float(min(math.ceil(rotation_pair(facts, beta_slow)), facts.n_rot - 1))
    if lo == hi:
        hi += 0.001
    return lo, hi


def _yarn_factors(facts: RopeFacts, beta_fast: float, beta_slow: float) -> np.ndarray:
    if facts.scale == 1.0:
        return np.ones(facts.n_pairs)
    lo, hi = yarn_correction_range(facts, beta_fast, beta_slow)
    k = np.arange(facts.n_pairs, dtype=np.float64)
    extrapolation = 1.0 - np.clip((k - lo) / (hi - lo), 0.0, 1.0)
    return _ramp_mix(extrapolation, facts.scale)


def yarn_attention_factor(scale: float) -> float:
    """YaRN's ``0.1 * ln(r) + 1`` (1 for ``r <= 1``), applied to q and k each."""
    return 1.0 if scale <= 1.0 else 0.1 * math.log(scale) + 1.0


def _llama3_factors(
    wavelengths: np.ndarray, factor: float, low_freq_factor: float, high_freq_factor: float, original_ctx: int
) -> np.ndarray:
    """Llama 3.1's scaling: ``lam < L/high``: 1; ``lam > L/low``: factor; in between a smooth mix."""
    low_freq_wavelen = original_ctx / low_freq_factor
    high_freq_wavelen = original_ctx / high_freq_factor
    smooth = (original_ctx / wavelengths - low_freq_factor) / (high_freq_factor - low_freq_factor)
    f = np.where(
        wavelengths > low_freq_wavelen,
        factor,
        np.where(wavelengths < high_freq_wavelen, 1.0, 1.0 / ((1.0 - smooth) / factor + smooth)),
    )
    return np.asarray(f, dtype=np.float64)


def _llama3_plan_factors(facts: RopeFacts, low_freq_factor: float, high_freq_factor: float) -> np.ndarray:
    if facts.scale == 1.0:
        return np.ones(facts.n_pairs)
    return _llama3_factors(facts.wavelengths(), facts.scale, low_freq_factor, high_freq_factor, facts.trained_ctx)


def _check_number(name: str, value: Any, *, low: float | None = None, strict: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise QroarError(f"option {name} must be a finite number, got {value!r}")
    value = float(value)
    if low is not None and (value <= low if strict else value < low):
        raise QroarError(f"option {name} must be {'>' if strict else '>='} {low:g}, got {value:g}")
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise QroarError(f"option {name} must be true or false, got {value!r}")
    return bool(value)


# --------------------------------------------------------------------------------------------------
# The plans: one function each
# --------------------------------------------------------------------------------------------------


def _plan_none(facts: RopeFacts) -> RopePlan:
    """Leave RoPE as trained: every factor 1, no attention scale (any target context is allowed)."""
    return _plan("none", facts, np.ones(facts.n_pairs), 1.0)


def _plan_linear(facts: RopeFacts) -> RopePlan:
    """Linear position interpolation (PI): ``f_k = r`` for every pair."""
    require_extension(facts, "linear")
    return _plan("linear", facts, _linear_factors(facts), 1.0)


def _plan_ntk(facts: RopeFacts) -> RopePlan:
    """NTK-aware scaling as a new base ``b' = b * r^(n_rot/(n_rot-2))``: ``f_k = (b'/b)^(2k/n_rot)``.

    Pair 0 keeps ``f = 1``, the last pair gets exactly ``f = r``; log-linear in between.
    """
    require_extension(facts, "ntk")
    return _plan("ntk", facts, _ntk_factors(facts), 1.0)


def _plan_yarn(
    facts: RopeFacts, *, attn_scale: bool = True, beta_fast: float = YARN_BETA_FAST, beta_slow: float = YARN_BETA_SLOW
) -> RopePlan:
    """YaRN ("NTK-by-parts" + attention temperature), as transformers and llama.cpp compute it.

    Pairs that complete >= ``beta_fast`` rotations within ``L`` are left alone, pairs below
    ``beta_slow`` get linear interpolation ``r``, a linear ramp in pair index between
    (:func:`yarn_correction_range`): ``e_k = 1 - clamp((k - lo)/(hi - lo), 0, 1)``,
    ``f_k = 1/((1 - e_k)/r + e_k)``. Attention scale ``0.1*ln(r) + 1`` (applied to q and k each, as
    llama.cpp's ``mscale`` does), or 1.0 with ``attn_scale=False``.
    """
    require_extension(facts, "yarn")
    attn_scale = _check_bool("attn_scale", attn_scale)
    beta_fast = _check_number("beta_fast", beta_fast, low=0.0)
    beta_slow = _check_number("beta_slow", beta_slow, low=0.0)
    if beta_fast <= beta_slow:
        raise QroarError(f"option beta_fast ({beta_fast:g}) must be larger than beta_slow ({beta_slow:g})")
    factors = _yarn_factors(facts, beta_fast, beta_slow)
    scale = yarn_attention_factor(facts.scale) if attn_scale else 1.0
    lo, hi = yarn_correction_range(facts, beta_fast, beta_slow)
    return _plan(
        "yarn", facts, factors, scale,
        attn_scale=attn_scale, beta_fast=beta_fast, beta_slow=beta_slow, ramp_lo=lo, ramp_hi=hi,
        attention_factor=yarn_attention_factor(facts.scale),
    )


def _plan_llama3(facts: RopeFacts, *, low_freq_factor: float = 1.0, high_freq_factor: float = 4.0) -> RopePlan:
    """Llama 3.1's scaling with ``factor = r`` and original context ``L``.

    ``lam_k < L/high_freq_factor``: 1; ``lam_k > L/low_freq_factor``: r; otherwise
    ``s = (L/lam_k - low)/(high - low)`` and ``f_k = 1/((1 - s)/r + s)``. No attention scale.
    """
    require_extension(facts, "llama3")
    low = _check_number("low_freq_factor", low_freq_factor, low=0.0)
    high = _check_number("high_freq_factor", high_freq_factor, low=0.0)
    if high <= low:
        raise QroarError(f"option high_freq_factor ({high:g}) must be larger than low_freq_factor ({low:g})")
    factors = _llama3_plan_factors(facts, low, high)
    return _plan("llama3", facts, factors, 1.0, low_freq_factor=low, high_freq_factor=high)


def _qroar_keep(z: np.ndarray, beta: float, protection: str) -> np.ndarray:
    """``1 - p_k``: the share of the base plan's log-factor each pair keeps."""
    if protection == "excess":
        return np.exp(-beta * np.maximum(z - 1.0, 0.0))
    # "softmax": the seed's literal p = softmax(beta*z) / max(softmax(beta*z)) = exp(beta*(z - max z)).
    return -np.expm1(beta * (z - z.max()))


def _plan_qroar(
    facts: RopeFacts,
    *,
    sensitivity: np.ndarray,
    beta: float = DEFAULT_BETA,
    base: str = "yarn",
    attn_scale: bool | None = None,
    protection: str = "excess",
) -> RopePlan:
    """Q-ROAR (our formulation of the seed): a base plan with milder interpolation on outlier pairs.

    ``sensitivity`` is ``S_k`` (``[P]``, finite, >= 0; see ``sensitivity.SensitivityAccumulator``);
    ``z_k = S_k / mean(S)`` is a pair's sensitivity in units of the average pair. Each pair gets a
    protection weight ``p_k`` in [0, 1) and ``log f_k = log f_k(base) * (1 - p_k)``, i.e.
    ``f_k = f_k(base) ** (1 - p_k)``; pairs whose wavelength is at least ``L`` (never a full turn in
    training) keep the base factor, because milder interpolation there means angles never seen in
    training. The attention scale is the base plan's.

    Protection weights (``protection="excess"``, the default)::

        p_k = 1 - exp(-beta * max(z_k - 1, 0))

    ``beta = 0`` gives the base plan bit for bit, a larger beta never interpolates a pair more, and a
    flat profile protects nothing; why this form and not the seed's softmax: docs/qroar_formulation.md.

    ``protection="softmax"`` is the seed's literal formula, kept only to reproduce the prototype's
    measurements; it does NOT reproduce the base plan at beta 0.

    Options: ``beta`` (>= 0, default 8), ``base`` (one of "linear", "yarn", "llama3"; default "yarn"),
    ``attn_scale`` (passed to a yarn base; a non-yarn base has none, so only ``None``/``False`` are
    accepted there), ``protection`` ("excess" | "softmax").
    """
    require_extension(facts, "qroar")
    beta = _check_number("beta", beta, low=0.0, strict=False)
    if base not in QROAR_BASES:
        raise QroarError(f"option base must be one of {', '.join(QROAR_BASES)}, got {base!r}")
    if protection not in QROAR_PROTECTIONS:
        raise QroarError(f"option protection must be one of {', '.join(QROAR_PROTECTIONS)}, got {protection!r}")
    try:
        s = np.array(sensitivity, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise QroarError(f"option sensitivity must be an array of numbers ({exc})") from None
    if s.shape != (facts.n_pairs,):
        raise QroarError(f"option sensitivity must have one value per rotary pair ({facts.n_pairs}), got shape {s.shape}")
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise QroarError("option sensitivity must be finite and non-negative")

    base_options: dict[str, Any] = {}
    if base == "yarn":
        if attn_scale is not None:
            base_options["attn_scale"] = _check_bool("attn_scale", attn_scale)
    elif attn_scale is not None and _check_bool("attn_scale", attn_scale):
        raise QroarError(f"option attn_scale applies to a yarn base only; base {base!r} has no attention scale")
    base_plan = PLANS[base](facts, **base_options)
    f_base = _BASE_FACTORS64[base](facts, base_plan)

    peak = s.max()
    z = np.ones_like(s) if peak == 0 else (s / peak) / np.mean(s / peak)  # scale-free; z <= P
    keep = _qroar_keep(z, beta, protection)
    keep = np.where(facts.wavelengths() >= facts.trained_ctx, 1.0, keep)  # safety rule
    factors = np.where(keep == 1.0, f_base, np.power(f_base, keep))
    return _plan(
        "qroar", facts, factors, base_plan.attn_scale,
        beta=beta, base=base, protection=protection, attn_scale=base_options.get("attn_scale"),
        sensitivity=[float(v) for v in s], base_params=base_plan.params,
    )


# The base plans' factors in float64 (qroar works from these so that beta 0 casts to the same float32).
_BASE_FACTORS64: dict[str, Callable[[RopeFacts, RopePlan], np.ndarray]] = {
    "linear": lambda facts, plan: _linear_factors(facts),
    "yarn": lambda facts, plan: _yarn_factors(facts, plan.params["beta_fast"], plan.params["beta_slow"]),
    "llama3": lambda facts, plan: _llama3_plan_factors(
        facts, plan.params["low_freq_factor"], plan.params["high_freq_factor"]
    ),
}


#: method name -> plan function ``(facts, **options) -> RopePlan``.
PLANS: dict[str, Callable[..., RopePlan]] = {
    "none": _plan_none,
    "linear": _plan_linear,
    "ntk": _plan_ntk,
    "yarn": _plan_yarn,
    "llama3": _plan_llama3,
    "qroar": _plan_qroar,
}


def plan_options(method: str) -> dict[str, Any]:
    """The options a method accepts and their defaults (``inspect.Parameter.empty`` = required)."""
    if method not in PLANS:
        raise QroarError(f"unknown RoPE method {method!r}; choose one of {', '.join(PLANS)}")
    params = inspect.signature(PLANS[method]).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def make_plan(method: str, facts: RopeFacts, **options: Any) -> RopePlan:
    """Validate and dispatch: the one entry point for callers.

    Rejects unknown methods and options, missing required options, and (for every method but
    "none") a target context that is not larger than the trained one.
    """
    accepted = plan_options(method)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        allowed = ", ".join(accepted) or "none"
        raise QroarError(f"method {method} does not take option(s) {', '.join(unknown)} (accepted: {allowed})")
    missing = [n for n, d in accepted.items() if d is inspect.Parameter.empty and n not in options]
    if missing:
        raise QroarError(f"method {method} needs option(s) {', '.join(missing)}")
    if not isinstance(facts, RopeFacts):
        raise QroarError(f"make_plan needs RopeFacts, got {type(facts).__name__}")
    require_extension(facts, method)
    return PLANS[method](facts, **options)


def extends(trained_ctx: int, target_ctx: int) -> bool:
    """The one target-context rule: a plan that extends needs ``L' > L``. At ``L' = L`` every plan's factors
    are 1 and its attention scale 1, a file that names a plan and changes nothing: refused like a shorter
    target (``--method none`` keeps the context)."""
    return target_ctx > trained_ctx


def require_extension(facts: RopeFacts, method: str | None) -> None:
    """Every plan but "none" extends the context: the target must exceed the trained context
    (:func:`extends`). ``method=None``: a caller that draws every plan at once."""
    if method != "none" and not extends(facts.trained_ctx, facts.target_ctx):
        hint = " (use --method none to keep it)" if method is not None else ""
        raise QroarError(f"target context {facts.target_ctx} must be larger than the trained context "
                         f"{facts.trained_ctx}{hint}")


# --------------------------------------------------------------------------------------------------
# Factors the source checkpoint already carries
# --------------------------------------------------------------------------------------------------


def _rope_scaling(config: dict) -> dict | None:
    """The config's scaling dict (``rope_scaling``, or transformers v5's ``rope_parameters``), or None."""
    scaling = config.get("rope_scaling")
    if scaling is None:
        scaling = config.get("rope_parameters")
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise QroarError(f"config rope_scaling must be a mapping, got {type(scaling).__name__}")
    if "rope_type" not in scaling and "type" not in scaling and any(isinstance(v, dict) for v in scaling.values()):
        raise QroarError("per-layer-type rope parameters are not supported")
    return scaling


def source_factors(config: dict, n_rot: int) -> tuple[np.ndarray | None, int]:
    """The factors an HF config's RoPE scaling implies, and the original trained context.

    Returns ``(factors, trained_ctx)``: ``factors`` is float32 ``[n_rot/2]`` in llama.cpp's convention
    (angle divided by the factor), or None when the config has no scaling (absent, "default").
    ``trained_ctx`` is ``original_max_position_embeddings`` for llama3 (falling back to
    ``max_position_embeddings`` as transformers does), and for "linear" the same key when present,
    else ``max_position_embeddings``. Other scaling types (dynamic, yarn, longrope, ...) raise.

    Note: with llama3 the returned context is the *pre-training* length (8192 for Llama 3.1); ``r =
    L'/L`` measured from it and :func:`combine_with_source` multiplying our factors into the source's
    would count the source's own extension twice, so the converter measures ``r`` from
    ``max_position_embeddings`` instead (convert.py, ``_rope_facts``).
    """
    if isinstance(n_rot, bool) or not isinstance(n_rot, numbers.Integral) or n_rot <= 0 or n_rot % 2:
        raise QroarError(f"the rotary dimension count must be even and positive, got {n_rot!r}")
    max_pos = config.get("max_position_embeddings")
    scaling = _rope_scaling(config)
    kind = None if scaling is None else (scaling.get("rope_type") or scaling.get("type"))
    if kind in (None, "default"):
        if max_pos is None:
            raise QroarError("config has no max_position_embeddings")
        return None, int(max_pos)

    factor = scaling.get("factor")
    if factor is None:
        raise QroarError(f"config rope_scaling of type {kind} has no factor")
    factor = _check_number("rope_scaling.factor", factor, low=0.0)
    original = scaling.get("original_max_position_embeddings", config.get("original_max_position_embeddings", max_pos))
    if original is None:
        raise QroarError("config has no max_position_embeddings")
    if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
        raise QroarError(f"config original_max_position_embeddings must be a positive whole number, got {original!r}")

    if kind == "linear":
        return np.full(n_rot // 2, factor, dtype=np.float32), original
    if kind == "llama3":
        theta = scaling.get("rope_theta", config.get("rope_theta", 10000.0))
        try:
            low = scaling["low_freq_factor"]
            high = scaling["high_freq_factor"]
        except KeyError as exc:
            raise QroarError(f"config rope_scaling of type llama3 has no {exc.args[0]}") from None
        low = _check_number("rope_scaling.low_freq_factor", low, low=0.0)
        high = _check_number("rope_scaling.high_freq_factor", high, low=0.0)
        if high <= low:
            raise QroarError("config rope_scaling: high_freq_factor must be larger than low_freq_factor")
        facts = RopeFacts(n_rot=n_rot, theta=theta, trained_ctx=original, target_ctx=original)
        factors = _llama3_factors(facts.wavelengths(), factor, low, high, original)
        return factors.astype(np.float32), original
    raise QroarError(
        f"the source config's rope scaling type {kind!r} is not supported (supported: linear, llama3)"
    )


def combine_with_source(plan_factors: np.ndarray, source_factors: np.ndarray | None) -> np.ndarray:
    """Multiply our factors into the ones the source already has (never replace them); float32 ``[P]``."""
    ours = np.asarray(plan_factors, dtype=np.float64)
    if source_factors is None:
        return ours.astype(np.float32)
    theirs = np.asarray(source_factors, dtype=np.float64)
    if ours.shape != theirs.shape or ours.ndim != 1:
        raise QroarError(f"cannot combine factors of shape {ours.shape} with the source's {theirs.shape}")
    for name, values in (("plan", ours), ("source", theirs)):
        if not np.all(np.isfinite(values)) or np.any(values <= 0):
            raise QroarError(f"{name} factors must be finite and positive")
    return (ours * theirs).astype(np.float32)
