"""One picture of a model's rotary pairs: where the weight-norm sensitivity S_k sits relative to the
frequency bands, and what every RoPE plan does to each pair.

:func:`plot_factors` reads the facts and ``S_k`` from an HF checkpoint or a GGUF file, computes every
plan with :func:`qroar_gguf.rope.plans.make_plan` and draws two stacked panels over the pair index
``k`` (top axis: wavelength in tokens):

* top: ``z_k = S_k / mean(S)`` (the quantity qroar protects on), each layer's own profile faintly
  behind it;
* bottom: the factors ``f_k`` of none, linear, ntk, yarn, llama3 and qroar (yarn base) on a log axis.

Both panels shade the three bands of :func:`qroar_gguf.rope.bands.frequency_bands` and mark
where pairs complete 32 turns and 1 turn within the trained context ``L`` (YaRN's ramp, before its
rounding to whole pairs; the 1-turn line is where the wavelength equals ``L``). The function returns
the plotted numbers as a JSON-ready dict so callers and tests can check them without reading pixels.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qroar_gguf.arch.families import family_for
from qroar_gguf.choices import DEFAULT_AGG, DEFAULT_BETA
from qroar_gguf.errors import QroarError
from qroar_gguf.gguf_io.provenance import read_provenance
from qroar_gguf.gguf_io.reader import open_gguf
from qroar_gguf.gguf_io.reader import read_hparams as read_gguf_hparams
from qroar_gguf.outputs import check_destination, temporary_beside
from qroar_gguf.rope.bands import frequency_bands
from qroar_gguf.rope.measure import measure_gguf_sensitivity, measure_sensitivity
from qroar_gguf.rope.plans import (
    PLANS,
    YARN_BETA_FAST,
    YARN_BETA_SLOW,
    RopeFacts,
    make_plan,
    require_extension,
    rotation_pair,
    yarn_correction_range,
)
from qroar_gguf.rope.sensitivity import AGGREGATIONS, SensitivityResult
from qroar_gguf.rope.spec import DEFAULT_SCALE
from qroar_gguf.source.checkpoint import open_checkpoint

#: The plans drawn, in legend order; qroar is computed on a yarn base.
PLOT_METHODS = tuple(PLANS)

_FIGSIZE = (14.0, 9.0)  # inches at _DPI: 1400 x 900 px
_DPI = 100
_BAND_STYLE = {  # name -> (fill colour, label)
    "high": ("#dbe9f6", "high: ≥ 32 turns in L"),
    "ramp": ("#fdebd0", "ramp: 1–32 turns in L"),
    "low": ("#e8e8e8", "low: < 1 turn in L"),
}
_PLAN_STYLE = {  # method -> (colour, line style, line width, marker)
    "none": ("#555555", ":", 1.6, None),
    "linear": ("#1f77b4", "--", 1.8, None),
    "ntk": ("#2ca02c", "-", 1.8, None),
    "yarn": ("#ff7f0e", "-", 5.0, None),  # wide and pale: qroar (yarn base) is drawn over it
    "llama3": ("#9467bd", "-.", 2.0, None),
    "qroar": ("#d62728", "-", 2.2, "o"),
}


@dataclass(frozen=True)
class ModelRope:
    """What the plot needs from a model: a display name, RoPE facts and the measured sensitivity."""

    name: str
    kind: str  # "checkpoint" or "gguf"
    n_rot: int
    theta: float
    trained_ctx: int
    sensitivity: SensitivityResult


# --------------------------------------------------------------------------------------------------
# Reading the model
# --------------------------------------------------------------------------------------------------


def _is_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    if path.is_file():
        try:
            with path.open("rb") as fh:
                return fh.read(4) == b"GGUF"
        except OSError:
            return False
    return False


def read_model_rope(model_path: str | Path, agg: str = DEFAULT_AGG) -> ModelRope:
    """RoPE facts (without a target) and ``S_k`` of an HF checkpoint or a GGUF file.

    GGUF: ``{arch}.rope.dimension_count`` (else head size), ``{arch}.rope.freq_base`` and the trained
    context ``qroar.trained_context`` when the file records one, else ``{arch}.context_length``;
    ``S_k`` from its attn_q/attn_k tensors in llama.cpp's layout. Checkpoint (directory, .safetensors
    or index.json): the family's hyperparameters and ``S_k`` from its Q/K projections in HF's rotate_half layout.
    """
    if agg not in AGGREGATIONS:
        raise QroarError(f"unknown sensitivity aggregation {agg!r}; choose one of {', '.join(AGGREGATIONS)}")
    path = Path(model_path)
    if not path.exists():
        raise QroarError(f"{path} does not exist")
    if _is_gguf(path):
        return _read_gguf(path, agg)
    if path.is_dir() or path.suffix == ".safetensors" or path.name.endswith(".index.json"):
        return _read_checkpoint(path, agg)
    raise QroarError(f"{path}: expected a .gguf file, a .safetensors file, a model.safetensors.index.json "
                     "or a checkpoint directory")


def _read_checkpoint(path: Path, agg: str) -> ModelRope:
    ckpt = open_checkpoint(path)
    family = family_for(ckpt.config)
    hp = family.hparams
    result = measure_sensitivity(ckpt, family, agg=agg)
    name = ckpt.directory.resolve().name
    return ModelRope(name=name, kind="checkpoint", n_rot=hp.n_rot, theta=hp.rope_theta,
                     trained_ctx=hp.context_length, sensitivity=result)


def _read_gguf(path: Path, agg: str) -> ModelRope:
    layout = open_gguf(path)  # the bounded reader: the file's keys are checked before they size anything
    hp = read_gguf_hparams(layout, path)
    trained = (read_provenance(layout) or {}).get("trained_context") or hp.context_length
    try:
        result = measure_gguf_sensitivity(path, agg=agg, layout=layout)
    except (KeyError, TypeError, ValueError) as exc:
        raise QroarError(f"{path}: cannot read its attention weights ({exc})") from None
    return ModelRope(name=path.name.removesuffix(".gguf"), kind="gguf", n_rot=hp.n_rot, theta=hp.rope_theta,
                     trained_ctx=int(trained), sensitivity=result)


# --------------------------------------------------------------------------------------------------
# The numbers
# --------------------------------------------------------------------------------------------------


def factor_plot_data(facts: RopeFacts, sensitivity: SensitivityResult, beta: float = DEFAULT_BETA) -> dict[str, Any]:
    """Everything :func:`plot_factors` draws, as plain (JSON-ready) Python values."""
    s = np.asarray(sensitivity.sensitivity, dtype=np.float64)
    if s.shape != (facts.n_pairs,):
        raise QroarError(f"sensitivity has {s.size} pairs but the model has {facts.n_pairs} rotary pairs")
    mean = float(s.mean())
    z = s / mean if mean > 0 else np.ones_like(s)
    per_layer = np.asarray(sensitivity.per_layer, dtype=np.float64)
    layer_means = per_layer.mean(axis=1, keepdims=True)
    per_layer_z = per_layer / np.where(layer_means > 0, layer_means, 1.0)

    plans = {}
    for method in PLOT_METHODS:
        options = {"sensitivity": s, "beta": beta, "base": "yarn"} if method == "qroar" else {}
        plans[method] = make_plan(method, facts, **options)
    lo, hi = yarn_correction_range(facts, YARN_BETA_FAST, YARN_BETA_SLOW)
    bands = {name: [int(k) for k in ks] for name, ks in frequency_bands(facts)}
    return {
        "n_rot": facts.n_rot,
        "theta": facts.theta,
        "trained_ctx": facts.trained_ctx,
        "target_ctx": facts.target_ctx,
        "scale": facts.scale,
        "agg": sensitivity.agg,
        "beta": float(beta),
        "pairs": list(range(facts.n_pairs)),
        "wavelengths": [float(v) for v in facts.wavelengths()],
        "rotations": [float(v) for v in facts.rotations()],
        "sensitivity": [float(v) for v in s],
        "z": [float(v) for v in z],
        "per_layer_z": [[float(v) for v in row] for row in per_layer_z],
        "argmax_pair": int(np.argmax(s)),
        "factors": {m: [float(v) for v in p.factors] for m, p in plans.items()},
        "attn_scale": {m: float(p.attn_scale) for m, p in plans.items()},
        "bands": bands,
        # fractional pair indices of the marked lines; the bands split at these turn counts
        "band_boundaries": {
            "turns_32": rotation_pair(facts, YARN_BETA_FAST),
            "turns_1": rotation_pair(facts, YARN_BETA_SLOW),
        },
        "trained_ctx_pair": rotation_pair(facts, 1.0),  # wavelength = L
        "target_ctx_pair": rotation_pair(facts, 1.0 / facts.scale),  # wavelength = L'
        "yarn_ramp": [lo, hi],  # YaRN's whole-pair ramp after rounding
    }


# --------------------------------------------------------------------------------------------------
# The picture
# --------------------------------------------------------------------------------------------------


def _check_output(output_png: Path) -> Path:
    output_png = Path(output_png)
    if output_png.suffix.lower() != ".png":
        raise QroarError(f"{output_png}: the plot is a PNG image, give a file name ending in .png")
    check_destination(output_png, force=True, what="output", inputs=())
    return output_png


def _fmt_tokens(n: float) -> str:
    if n >= 1000:
        value = n / 1000
        return f"{value:.0f}k" if value >= 10 or value == int(value) else f"{value:.1f}k"
    return f"{n:.0f}"


def _factor_ticks(r: float) -> list[float]:
    """Readable ticks for a log factor axis from 1 to ``r``: 1, 1.25, 1.5, 2, 3, 4, 6, 8, ... (powers of
    two only when that would give too many), always with ``r`` itself."""
    fine = [1.0, 1.25, 1.5, 2.0] + [m * 2.0 ** e for e in range(1, 40) for m in (1.5, 2.0)]
    ticks = [t for t in fine if t <= r * (1 + 1e-9)]
    if len(ticks) > 9:
        ticks = [2.0 ** e for e in range(0, int(math.log2(r)) + 1)]
        if len(ticks) > 9:
            ticks = ticks[:: math.ceil(len(ticks) / 9)]
    return sorted({*ticks, float(r)})


def _require_matplotlib() -> None:
    """Fail with an install hint, not a bare ImportError: matplotlib is an optional extra.

    The drawing helpers below import what they use inside themselves (never at module level), so the
    package imports without matplotlib; this check runs first so they all find it.
    """
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
        import matplotlib.lines  # noqa: F401
        import matplotlib.patches  # noqa: F401
        import matplotlib.ticker  # noqa: F401
    except ImportError:
        raise QroarError("plotting needs matplotlib, a dependency of qroar-gguf: reinstall it "
                         "(bash tools/setup.sh, or pip install matplotlib)") from None


def _pair_range(n_pairs: int) -> tuple[float, float]:
    """The x range: a little beyond half a pair past the end pairs, so their band shading (k ± 0.5) shows whole."""
    return -0.6, n_pairs - 0.4


def _new_figure():
    """A canvas-backed figure with the sensitivity panel on top and the factor panel below, sharing x."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=_FIGSIZE, dpi=_DPI)
    FigureCanvasAgg(fig)  # attaches itself to fig: savefig needs a canvas, and we avoid pyplot's global state
    # The right quarter is left free for the legends; the top for the title and the wavelength axis.
    gs = fig.add_gridspec(2, 1, height_ratios=[1.0, 1.15], hspace=0.05, left=0.065, right=0.745, top=0.845,
                          bottom=0.07)
    ax_s = fig.add_subplot(gs[0])
    ax_f = fig.add_subplot(gs[1], sharex=ax_s)
    return fig, ax_s, ax_f


def _shade_bands(axes, bands: dict[str, list[int]]) -> list:
    """Shade each frequency band in every panel; return the legend handles of the non-empty bands."""
    from matplotlib.patches import Patch

    handles = []
    for name, ks in bands.items():
        colour, label = _BAND_STYLE[name]
        if ks:
            for ax in axes:  # each pair owns [k - 0.5, k + 0.5], so the band covers its pairs' cells
                ax.axvspan(min(ks) - 0.5, max(ks) + 0.5, color=colour, zorder=0, lw=0)
            handles.append(Patch(facecolor=colour, edgecolor="#999999", lw=0.5,
                                 label=f"{label} (k {min(ks)}–{max(ks)})"))
    return handles


def _turn_marks(data: dict[str, Any]) -> list[tuple[float, str, Any, float, str]]:
    """(pair position, colour, line style, width, label) of the vertical lines: 32 turns, 1 turn, λ = L'."""
    c32, c1 = data["band_boundaries"]["turns_32"], data["band_boundaries"]["turns_1"]
    cL2 = data["target_ctx_pair"]
    L, L2 = data["trained_ctx"], data["target_ctx"]
    return [
        (c32, "#b26b00", (0, (5, 3)), 1.4, f"32 turns in L, yarn ramp start (k = {c32:.1f})"),
        (c1, "#000000", "-", 1.6, f"1 turn: λ = L = {L}, ramp end (k = {c1:.1f})"),
        (cL2, "#777777", (0, (1, 2)), 1.4, f"λ = L' = {L2} (k = {cL2:.1f})"),
    ]


def _draw_turn_marks(axes, data: dict[str, Any], x_range: tuple[float, float]) -> list:
    """Draw the turn-count lines in every panel; return the legend handles of those inside the x range."""
    from matplotlib.lines import Line2D

    x_lo, x_hi = x_range
    handles = []
    for x, colour, style, width, label in _turn_marks(data):
        if x_lo <= x <= x_hi:  # a line off the pair axis would only widen it and confuse the legend
            for ax in axes:
                ax.axvline(x, color=colour, ls=style, lw=width, zorder=1)
            handles.append(Line2D([], [], color=colour, ls=style, lw=width, label=label))
    return handles


def _sensitivity_ylim(z: np.ndarray, per_layer: np.ndarray) -> tuple[float, float]:
    """y limits holding z and every layer's profile, with headroom above for the panel title and peak note."""
    every = np.concatenate([z, per_layer.ravel()])
    low, top = float(every.min()), float(every.max())
    pad = 0.08 * (top - low) if top > low else 0.1
    return max(0.0, low - pad), top + 3.0 * pad


def _panel_title(ax, text: str) -> None:
    """A title inside the panel's top-left corner, on white so the curves behind it do not cross the text."""
    ax.text(0.008, 0.975, text, transform=ax.transAxes, ha="left", va="top", fontsize=10.5, zorder=6,
            bbox=dict(facecolor="white", edgecolor="none", alpha=0.85, pad=2.5))


def _draw_sensitivity_panel(ax, data: dict[str, Any], k: np.ndarray) -> None:
    """Top panel: z_k over the pairs, each layer's own profile faintly behind it, and the z = 1 line."""
    from matplotlib.lines import Line2D

    per_layer = np.asarray(data["per_layer_z"])
    for row in per_layer:
        ax.plot(k, row, color="#4a6fa5", alpha=0.18, lw=0.9, zorder=2)
    z = np.asarray(data["z"])
    ax.plot(k, z, color="#c0392b", lw=2.6, marker="o", ms=4.5, zorder=4)
    ax.axhline(1.0, color="#333333", lw=0.9, ls="--", zorder=3)
    peak = data["argmax_pair"]
    ax.annotate(f"peak k = {peak}\nλ = {_fmt_tokens(data['wavelengths'][peak])}", xy=(peak, z[peak]),
                xytext=(0, 12), textcoords="offset points", ha="center", va="bottom", fontsize=9,
                color="#c0392b", zorder=5)
    ax.set_ylim(*_sensitivity_ylim(z, per_layer))
    ax.set_ylabel("sensitivity  z = S / mean(S)", fontsize=11)
    _panel_title(ax, "weight-norm sensitivity S_k of each rotary pair (its W_Q and W_K rows)")
    # Proxy handles: the per-layer lines are too faint to serve as their own legend entry.
    handles = [
        Line2D([], [], color="#c0392b", lw=2.6, marker="o", ms=4.5, label=f"z_k: {data['agg']} over layers"),
        Line2D([], [], color="#4a6fa5", alpha=0.5, lw=1.0, label=f"{per_layer.shape[0]} layers, each / own mean"),
        Line2D([], [], color="#333333", lw=0.9, ls="--", label="z = 1: qroar protects above"),
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False,
              title="sensitivity", title_fontsize=10, alignment="left")
    ax.tick_params(labelbottom=False)  # the pair numbers are read off the bottom panel


def _plan_label(method: str, beta: float, attn_scale: float) -> str:
    """Legend text of one plan: qroar names its base and β; a plan that scales attention says by how much."""
    label = method if method != "qroar" else f"qroar: yarn base, β = {beta:g}"
    if attn_scale != 1.0:
        label += f"\n   (attention ×{attn_scale:.3f})"
    return label


def _set_factor_axis(ax, r: float) -> None:
    """A log y axis from just below 1 to just above r, with plain-number ticks (log ticks read as 10^x)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_yscale("log")
    ax.set_ylim(1.0 / 1.15, r * 1.3)
    ax.yaxis.set_major_locator(FixedLocator(_factor_ticks(r)))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def _draw_factor_panel(ax, data: dict[str, Any], k: np.ndarray) -> None:
    """Bottom panel: every plan's factors f_k over the pairs, on a log axis."""
    handles = []
    for method in PLOT_METHODS:
        colour, style, width, marker = _PLAN_STYLE[method]
        label = _plan_label(method, data["beta"], data["attn_scale"][method])
        # qroar on top; yarn pale beneath, since qroar (yarn base) coincides with it outside protected pairs
        (h,) = ax.plot(k, np.asarray(data["factors"][method]), color=colour, ls=style, lw=width, marker=marker, ms=4,
                       label=label, zorder=4 if method == "qroar" else 3, alpha=0.45 if method == "yarn" else 1.0)
        handles.append(h)
    r = data["scale"]
    _set_factor_axis(ax, r)
    ax.set_ylabel("factor f_k (angle = m·ω_k / f_k, log)", fontsize=11)
    ax.set_xlabel("rotary pair k  (high frequency → low frequency)", fontsize=11)
    _panel_title(ax, f"rope_freqs factors f_k of every plan (r = L'/L = {r:g})")
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False,
              title="plan", title_fontsize=10, alignment="left")


def _add_marks_legend(fig, handles: list) -> None:
    """One legend for the bands and lines, since both panels share them: bottom right, under the plan legend."""
    fig.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.752, 0.07), fontsize=8.5, frameon=False,
               title="bands and marks (both panels)", title_fontsize=10, alignment="left")


def _pair_tick_step(n_pairs: int) -> int:
    """Every pair labelled while the labels fit, else every 2nd or 4th."""
    return 1 if n_pairs <= 32 else 2 if n_pairs <= 64 else 4


def _format_pair_axes(axes, n_pairs: int, x_range: tuple[float, float]) -> None:
    """The shared pair axis (limits and ticks), and the grid and tick size of every panel."""
    from matplotlib.ticker import FixedLocator

    ax_f = axes[-1]  # sharex: setting the bottom panel sets both
    ax_f.set_xlim(*x_range)
    ax_f.xaxis.set_major_locator(FixedLocator(list(range(0, n_pairs, _pair_tick_step(n_pairs)))))
    for ax in axes:
        ax.grid(axis="y", color="#bbbbbb", lw=0.5, alpha=0.7)
        ax.tick_params(labelsize=9)


def _wavelength_ticks(data: dict[str, Any], x_range: tuple[float, float]) -> list[tuple[float, float]]:
    """(pair position, wavelength) of the powers of ten whose wavelength falls on the pair axis.

    A pair's wavelength is L / (its turns in L), so the position of wavelength λ is where the pairs
    complete L / λ turns.
    """
    L = data["trained_ctx"]
    facts = RopeFacts(n_rot=data["n_rot"], theta=data["theta"], trained_ctx=L, target_ctx=data["target_ctx"])

    def k_of(lam: float) -> float:
        return rotation_pair(facts, L / lam)

    x_lo, x_hi = x_range
    wl = [10.0 ** e for e in range(1, 12)]
    return [(k_of(w), w) for w in wl if x_lo <= k_of(w) <= x_hi]


def _add_wavelength_axis(ax, data: dict[str, Any], x_range: tuple[float, float]) -> None:
    """A top axis reading the pair axis as wavelength in tokens (short labels; exponents from a million)."""
    ticks = _wavelength_ticks(data, x_range)
    sec = ax.secondary_xaxis("top")
    sec.set_xticks([t for t, _ in ticks], labels=[_fmt_tokens(w) if w < 1e6 else f"{w:.0e}" for _, w in ticks])
    sec.tick_params(labelsize=9)
    sec.set_xlabel("wavelength λ_k = 2π·θ^(2k/n_rot) in tokens", fontsize=10)


def _add_titles(fig, title: str, subtitle: str) -> None:
    """Title and subtitle left-aligned with the panels."""
    fig.suptitle(title, fontsize=15, fontweight="bold", x=0.065, ha="left", y=0.985)
    fig.text(0.065, 0.945, subtitle, fontsize=10, ha="left", va="top", color="#333333")


def _save_png(fig, output_png: Path) -> None:
    """Write the PNG through a temporary file beside it: a failure never leaves a half-written PNG behind."""
    with temporary_beside(output_png, "png") as tmp:
        fig.savefig(tmp, dpi=_DPI, format="png")
        os.replace(tmp, output_png)


def _draw(data: dict[str, Any], title: str, subtitle: str, output_png: Path) -> None:
    """Draw the two panels of :func:`plot_factors` from its data dict and save them as ``output_png``.

    The steps run in this order on purpose: artists of equal z-order draw in the order they were added.
    """
    _require_matplotlib()
    k = np.asarray(data["pairs"], dtype=np.float64)
    x_range = _pair_range(k.size)

    fig, ax_s, ax_f = _new_figure()
    axes = (ax_s, ax_f)
    band_handles = _shade_bands(axes, data["bands"])
    line_handles = _draw_turn_marks(axes, data, x_range)
    _draw_sensitivity_panel(ax_s, data, k)
    _draw_factor_panel(ax_f, data, k)
    _add_marks_legend(fig, band_handles + line_handles)
    _format_pair_axes(axes, k.size, x_range)
    _add_wavelength_axis(ax_s, data, x_range)
    _add_titles(fig, title, subtitle)
    _save_png(fig, output_png)


def plot_factors(model_path: Path, output_png: Path, target_ctx: int | None = None, agg: str = DEFAULT_AGG,
                 beta: float = DEFAULT_BETA) -> dict:
    """Draw ``S_k`` and every plan's factors for a model into one PNG; return the plotted numbers.

    ``model_path``: an HF checkpoint (directory, .safetensors or model.safetensors.index.json) or a
    .gguf file. ``target_ctx`` defaults to 4 x the trained context. ``agg`` aggregates S over layers
    ("max" or "mean"); ``beta`` is qroar's protection strength (on a yarn base). The PNG is about
    1400 x 900 px. The returned dict (JSON-ready) holds, besides the inputs: ``sensitivity`` (S_k),
    ``z``, ``per_layer_z``, ``factors`` and ``attn_scale`` per method, ``bands`` (pair indices per
    band), ``band_boundaries`` (fractional pair indices of 32 and 1 turns in L), ``yarn_ramp``,
    ``model``, ``kind`` and ``output``. Raises :class:`QroarError` on bad input.
    """
    output_png = _check_output(Path(output_png))
    model = read_model_rope(model_path, agg=agg)
    if target_ctx is None:
        target_ctx = model.trained_ctx * DEFAULT_SCALE
    if isinstance(target_ctx, bool) or not isinstance(target_ctx, (int, np.integer)):
        raise QroarError(f"the target context must be an integer number of tokens, got {target_ctx!r}")
    facts = RopeFacts(n_rot=model.n_rot, theta=model.theta, trained_ctx=model.trained_ctx, target_ctx=int(target_ctx))
    require_extension(facts, None)
    data = factor_plot_data(facts, model.sensitivity, beta=beta)
    data.update(model=model.name, kind=model.kind, output=str(output_png))

    title = f"{model.name}: L = {facts.trained_ctx} → L' = {facts.target_ctx} tokens (r = {facts.scale:g})"
    subtitle = (f"θ = {facts.theta:g},  "
                f"{facts.n_pairs} rotary pairs (n_rot = {facts.n_rot}),  S from the {model.kind}'s W_Q/W_K, "
                f"{agg} over layers;  peak S at pair {data['argmax_pair']} "
                f"(λ = {_fmt_tokens(data['wavelengths'][data['argmax_pair']])} tokens)")
    _draw(data, title, subtitle, output_png)
    return data
