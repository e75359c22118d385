"""A RoPE plan as asked for: the method, its options, how qroar aggregates S, and the band values.

One typed value, validated once on construction, whether it comes from the command line's options or
from a ``method[:key=value,...]`` string (:meth:`PlanSpec.parse`, the form ``bench`` and the tools
take). Convert, search, bench and the tools all hand it on as it is; :meth:`PlanSpec.plan` turns it into
factors through :func:`plans.make_plan` (which validates the option values against the model's facts),
and :meth:`BandSpec.fold` into the band fold. No I/O.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from qroar_gguf.choices import AGGREGATIONS, DEFAULT_AGG, DEFAULT_METHOD
from qroar_gguf.errors import QroarError, UsageProblem
from qroar_gguf.rope.bands import DEFAULT_BANDS, BandFold, band_fold, check_band_count, check_band_values
from qroar_gguf.rope.plans import PLANS, RopeFacts, RopePlan, make_plan, plan_options, require_extension


@dataclass(frozen=True)
class BandSpec:
    """Band values to fold in (rope/bands.py); ``factors``/``scales`` None: not given (all 1)."""

    count: int = DEFAULT_BANDS
    factors: tuple[float, ...] | None = None
    scales: tuple[float, ...] | None = None
    #: scales: W_Q *= a and W_K /= a (True), or both *= a (False); None: not asked, the default of the use:
    #: symmetric for scales given (``is_symmetric``), search_settings.SEARCH_SYMMETRIC for a search.
    symmetric: bool | None = None

    def __post_init__(self) -> None:
        count = check_band_count(self.count)
        object.__setattr__(self, "count", count)
        for name, what in (("factors", "--band-factors"), ("scales", "--band-scales")):
            values = getattr(self, name)
            if values is not None:
                object.__setattr__(self, name, check_band_values(values, count, what))
        if self.symmetric is not None:
            if not isinstance(self.symmetric, (bool, np.bool_)):
                raise QroarError(f"symmetric must be true or false, got {self.symmetric!r}")
            object.__setattr__(self, "symmetric", bool(self.symmetric))

    @property
    def is_symmetric(self) -> bool:
        """Whether the scales are folded symmetrically: as asked, else yes."""
        return True if self.symmetric is None else self.symmetric

    @property
    def given(self) -> bool:
        """Whether there is anything to fold."""
        return self.factors is not None or self.scales is not None

    def fold(self, facts: RopeFacts, *, n_head: int, n_kv_head: int, head_dim: int) -> BandFold | None:
        return band_fold(facts, self.count, self.factors, self.scales, self.is_symmetric,
                         n_head=n_head, n_kv_head=n_kv_head, head_dim=head_dim)

    @staticmethod
    def parse_values(text: str, count: int, what: str, separator: str = ",") -> tuple[float, ...]:
        """``"1,1.1,0.9,1"`` -> one float per band (``separator`` is ``/`` inside a plan string)."""
        parts = [p.strip() for p in str(text).split(separator)]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise QroarError(f"{what} takes {'comma' if separator == ',' else 'slash'}-separated numbers "
                             f"(one per band), got {text!r}") from None
        return check_band_values(values, check_band_count(count), what)


#: The options only method qroar takes (its own and its aggregation).
QROAR_ONLY = ("beta", "agg", "base")


@dataclass(frozen=True)
class PlanSpec:
    """What to build: ``method`` (a key of ``PLANS``) with ``options`` (its keyword options, checked by
    name here and by value when the plan is made), ``agg`` (qroar's aggregation; None: the default)
    and ``bands``. ``text``: the string it was parsed from, if any (bench's label)."""

    method: str = DEFAULT_METHOD
    options: Mapping[str, Any] = field(default_factory=dict)
    agg: str | None = None
    bands: BandSpec = field(default_factory=BandSpec)
    text: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.method not in PLANS:
            raise QroarError(f"unknown RoPE method {self.method!r}; choose one of {', '.join(PLANS)}")
        accepted = plan_options(self.method)
        unknown = sorted(set(self.options) - set(accepted))
        if self.text is None and self.method != "qroar" and (self.agg is not None or set(unknown) & set(QROAR_ONLY)):
            # options given one by one (the command line's --beta, --agg, --base), not in a plan string
            raise UsageProblem(f"--beta, --agg and --base apply to --method qroar only (got --method {self.method})")
        if unknown:
            raise QroarError(f"method {self.method} takes no option {unknown[0]} "
                             f"(it takes: {', '.join(accepted) or 'none'})")
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        if self.agg is not None:
            if self.method != "qroar":
                raise QroarError(f"agg (how sensitivity is aggregated) applies to qroar only, not {self.method}")
            if self.agg not in AGGREGATIONS:
                raise QroarError(f"agg must be one of {', '.join(AGGREGATIONS)}, got {self.agg!r}")
        if not isinstance(self.bands, BandSpec):
            raise QroarError(f"bands must be a BandSpec, got {type(self.bands).__name__}")

    @property
    def label(self) -> str:
        """The text it came from, or ``method[:key=value,...]``."""
        if self.text is not None:
            return self.text
        items = [f"{k}={v}" for k, v in self.given_options().items() if k != "sensitivity"]
        return self.method + (":" + ",".join(items) if items else "")

    @property
    def aggregation(self) -> str:
        return self.agg or DEFAULT_AGG

    @property
    def needs_sensitivity(self) -> bool:
        """qroar without a sensitivity of its own: the caller measures W_Q/W_K (``aggregation``)."""
        return self.method == "qroar" and "sensitivity" not in self.options

    def given_options(self) -> dict[str, Any]:
        """The plan options as given, ``agg`` among them: the form search records and caches key on."""
        return {**self.options, **({} if self.agg is None else {"agg": self.agg})}

    def record(self) -> dict[str, Any]:
        """Everything given, JSON-ready: the options as :meth:`given_options`, then any band values."""
        record = {k: v for k, v in self.given_options().items() if k != "sensitivity"}
        if self.bands.given:
            b = self.bands
            record.update(bands=b.count, band_factors=b.factors and list(b.factors),
                          band_scales=b.scales and list(b.scales), symmetric=b.is_symmetric)
        return record

    def with_bands(self, factors: tuple[float, ...] | None, scales: tuple[float, ...] | None) -> PlanSpec:
        return dataclasses.replace(self, bands=dataclasses.replace(self.bands, factors=factors, scales=scales))

    def plan(self, facts: RopeFacts, sensitivity: np.ndarray | None = None) -> RopePlan:
        """The factors and attention scale; ``sensitivity`` is needed exactly when ``needs_sensitivity``."""
        options = dict(self.options)
        if self.needs_sensitivity:
            if sensitivity is None:
                raise QroarError("method qroar needs the pairs' sensitivity (measured from W_Q/W_K)")
            options["sensitivity"] = sensitivity
        plan = make_plan(self.method, facts, **options)
        if self.method == "qroar":
            plan.params["agg"] = self.aggregation  # how S was aggregated: part of what reproduces the factors
        return plan

    @classmethod
    def parse(cls, text: str) -> PlanSpec:
        """``method[:key=value,...]``, e.g. ``yarn``, ``yarn:attn_scale=false``, ``qroar:beta=4,agg=mean``.

        Band values use ``/`` between bands, since ``,`` separates options:
        ``qroar:band_factors=1/1/1.1/1.25,band_scales=1/1/0.9/1,symmetric=false`` (``bands`` defaults to 4).
        """
        method, _, rest = str(text).partition(":")
        values: dict[str, Any] = {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise QroarError(f"plan {text!r}: options are key=value, e.g. qroar:beta=4")
            values[key.strip()] = value.strip()
        if method not in PLANS:
            raise QroarError(f"unknown plan {method!r} in {text!r}; choose from {', '.join(PLANS)}")
        try:
            count = int(values.pop("bands", DEFAULT_BANDS))
        except ValueError:
            raise QroarError(f"plan {text!r}: bands must be a whole number") from None
        band_values = {name: BandSpec.parse_values(values.pop(key), count, f"plan {text!r}: {key}", "/")
                       for key, name in (("band_factors", "factors"), ("band_scales", "scales")) if key in values}
        symmetric = _parse_scalar(values.pop("symmetric")) if "symmetric" in values else None
        bands = BandSpec(count=count, symmetric=symmetric, **band_values)
        agg = values.pop("agg", None)
        options = {key: _parse_scalar(value) for key, value in values.items()}
        return cls(method=method, options=options, agg=agg, bands=bands, text=str(text))


#: The target context when neither --ctx nor --scale is given: this many times the trained one.
DEFAULT_SCALE = 4
MAX_CONTEXT = 2**32 - 1  # <arch>.context_length is a uint32


def rope_facts_for(n_rot: int, theta: float, trained_ctx: int, method: str, target_ctx: int | None = None,
                   scale: float | None = None) -> RopeFacts:
    """The facts for a target given as ``--ctx`` or ``--scale`` (neither: ``DEFAULT_SCALE`` x the trained
    context, or the trained one for method "none"), checked to extend the context for every method but "none"."""
    if target_ctx is not None and scale is not None:
        raise UsageProblem("give either --ctx or --scale, not both")
    if target_ctx is not None:
        target = int(target_ctx)
    elif scale is not None:
        if not math.isfinite(float(scale)) or float(scale) <= 0:
            raise QroarError(f"--scale must be a finite positive number, got {scale}")
        product = trained_ctx * float(scale)
        if not product <= MAX_CONTEXT:  # before rounding: 1e308 x a context is infinite
            raise QroarError(f"--scale {scale} makes a context of {product:.4g} tokens: GGUF stores at most "
                             f"{MAX_CONTEXT}")
        target = int(round(product))
    else:
        target = trained_ctx if method == "none" else trained_ctx * DEFAULT_SCALE
    if not 0 < target <= MAX_CONTEXT:
        # a whole number of any size (--ctx with hundreds of digits) is shown by its size, never as a float
        shown = target if target.bit_length() <= 64 else f"of {target.bit_length()} bits"
        raise QroarError(f"target context {shown} is out of range: GGUF stores at most {MAX_CONTEXT} tokens")
    facts = RopeFacts(n_rot=n_rot, theta=theta, trained_ctx=trained_ctx, target_ctx=target)
    require_extension(facts, method)
    return facts


def _parse_scalar(value: str) -> Any:
    """``true``/``false``, an int, a float, or the string itself."""
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        number = float(value) if any(c in lowered for c in ".e") else int(value)
    except ValueError:
        return value
    return number if not isinstance(number, float) or math.isfinite(number) else value
