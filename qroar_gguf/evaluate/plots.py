"""One picture of a model's rotary pairs: where the weight-norm sensitivity S_k sits relative to the
frequency bands, and what every RoPE plan does to each pair.

:func:`plot_factors` reads the facts and ``S_k`` from an HF checkpoint or a GGUF file, computes every
plan with :func:`qroar_gguf.rope.plans.make_plan` and draws two stacked panels over the pair index
``k`` (top axis: wavelength in tokens):

* top: ``z_k = S_k / mean(S)`` (the quantity qroar protects on), each layer's own profile faintly
  behind it;
* bottom: the factors ``f_k`` of none, linear, ntk, yarn, llama3 and qroar (yarn base) on a log axis.

Both panels shade the three bands of :func:`qroar_gguf.rope.sensitivity.frequency_bands` and mark
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

from qroar_gguf.arch.llama import read_hparams
from qroar_gguf.errors import QroarError
from qroar_gguf.gguf_io.provenance import TRAINED_CTX
from qroar_gguf.gguf_io.reader import field_value, open_gguf
from qroar_gguf.gguf_io.reader import read_hparams as read_gguf_hparams
from qroar_gguf.outputs import check_destination, temporary_beside
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
from qroar_gguf.rope.sensitivity import AGGREGATIONS, SensitivityResult, frequency_bands
from qroar_gguf.source.checkpoint import open_checkpoint

#: The plans drawn, in legend order; qroar is computed on a yarn base.
PLOT_METHODS = tuple(PLANS)
DEFAULT_SCALE = 4  # target context = 4 x trained when none is given

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


def read_model_rope(model_path: str | Path, agg: str = "max") -> ModelRope:
    """RoPE facts (without a target) and ``S_k`` of an HF checkpoint or a GGUF file.

    GGUF: ``{arch}.rope.dimension_count`` (else head size), ``{arch}.rope.freq_base`` and the trained
    context ``qroar.trained_context`` when the file records one, else ``{arch}.context_length``;
    ``S_k`` from its attn_q/attn_k tensors in llama.cpp's layout. Checkpoint (directory, .safetensors
    or index.json): ``read_hparams`` and ``S_k`` from q_proj/k_proj in HF's rotate_half layout.
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
    hp = read_hparams(ckpt.config)
    result = measure_sensitivity(ckpt, hp, agg=agg)
    name = ckpt.directory.resolve().name
    return ModelRope(name=name, kind="checkpoint", n_rot=hp.n_rot, theta=hp.rope_theta,
                     trained_ctx=hp.context_length, sensitivity=result)


def _read_gguf(path: Path, agg: str) -> ModelRope:
    reader = open_gguf(path)
    hp = read_gguf_hparams(reader, path)
    trained = field_value(reader, TRAINED_CTX) or hp.context_length
    del reader  # release the memory map before the measurement opens the file again
    try:
        result = measure_gguf_sensitivity(path, agg=agg)
    except NotImplementedError as exc:
        raise QroarError(f"{path}: gguf-py cannot dequantize its attention weights ({exc})") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise QroarError(f"{path}: cannot read its attention weights ({exc})") from None
    return ModelRope(name=path.name.removesuffix(".gguf"), kind="gguf", n_rot=hp.n_rot, theta=hp.rope_theta,
                     trained_ctx=int(trained), sensitivity=result)


# --------------------------------------------------------------------------------------------------
# The numbers
# --------------------------------------------------------------------------------------------------


def factor_plot_data(facts: RopeFacts, sensitivity: SensitivityResult, beta: float = 8.0) -> dict[str, Any]:
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


def _draw(data: dict[str, Any], title: str, subtitle: str, output_png: Path) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    except ImportError:
        raise QroarError("plotting needs matplotlib: pip install 'qroar-gguf[plot]'") from None

    k = np.asarray(data["pairs"], dtype=np.float64)
    n_pairs = k.size
    n_rot, theta = data["n_rot"], data["theta"]
    L, L2 = data["trained_ctx"], data["target_ctx"]
    x_lo, x_hi = -0.6, n_pairs - 0.4

    fig = Figure(figsize=_FIGSIZE, dpi=_DPI)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(2, 1, height_ratios=[1.0, 1.15], hspace=0.05, left=0.065, right=0.745, top=0.845,
                          bottom=0.07)
    ax_s = fig.add_subplot(gs[0])
    ax_f = fig.add_subplot(gs[1], sharex=ax_s)

    # Bands (pair membership: each pair owns [k-0.5, k+0.5]) and the turn-count lines, in both panels.
    band_handles = []
    for name, ks in data["bands"].items():
        colour, label = _BAND_STYLE[name]
        if ks:
            for ax in (ax_s, ax_f):
                ax.axvspan(min(ks) - 0.5, max(ks) + 0.5, color=colour, zorder=0, lw=0)
            band_handles.append(Patch(facecolor=colour, edgecolor="#999999", lw=0.5,
                                      label=f"{label} (k {min(ks)}–{max(ks)})"))
    c32, c1 = data["band_boundaries"]["turns_32"], data["band_boundaries"]["turns_1"]
    cL2 = data["target_ctx_pair"]
    marks = [
        (c32, "#b26b00", (0, (5, 3)), 1.4, f"32 turns in L, yarn ramp start (k = {c32:.1f})"),
        (c1, "#000000", "-", 1.6, f"1 turn: λ = L = {L}, ramp end (k = {c1:.1f})"),
        (cL2, "#777777", (0, (1, 2)), 1.4, f"λ = L' = {L2} (k = {cL2:.1f})"),
    ]
    line_handles = []
    for x, colour, style, width, label in marks:
        if x_lo <= x <= x_hi:
            for ax in (ax_s, ax_f):
                ax.axvline(x, color=colour, ls=style, lw=width, zorder=1)
            line_handles.append(Line2D([], [], color=colour, ls=style, lw=width, label=label))

    # Top: z_k and the per-layer profiles.
    per_layer = np.asarray(data["per_layer_z"])
    for row in per_layer:
        ax_s.plot(k, row, color="#4a6fa5", alpha=0.18, lw=0.9, zorder=2)
    z = np.asarray(data["z"])
    ax_s.plot(k, z, color="#c0392b", lw=2.6, marker="o", ms=4.5, zorder=4)
    ax_s.axhline(1.0, color="#333333", lw=0.9, ls="--", zorder=3)
    peak = data["argmax_pair"]
    ax_s.annotate(f"peak k = {peak}\nλ = {_fmt_tokens(data['wavelengths'][peak])}", xy=(peak, z[peak]),
                  xytext=(0, 12), textcoords="offset points", ha="center", va="bottom", fontsize=9,
                  color="#c0392b", zorder=5)
    every = np.concatenate([z, per_layer.ravel()])
    low, top = float(every.min()), float(every.max())
    pad = 0.08 * (top - low) if top > low else 0.1
    ax_s.set_ylim(max(0.0, low - pad), top + 3.0 * pad)
    ax_s.set_ylabel("sensitivity  z = S / mean(S)", fontsize=11)
    ax_s.text(0.008, 0.975, "weight-norm sensitivity S_k of each rotary pair (its W_Q and W_K rows)",
              transform=ax_s.transAxes, ha="left", va="top", fontsize=10.5, zorder=6,
              bbox=dict(facecolor="white", edgecolor="none", alpha=0.85, pad=2.5))
    s_handles = [
        Line2D([], [], color="#c0392b", lw=2.6, marker="o", ms=4.5,
               label=f"z_k: {data['agg']} over layers"),
        Line2D([], [], color="#4a6fa5", alpha=0.5, lw=1.0,
               label=f"{per_layer.shape[0]} layers, each / own mean"),
        Line2D([], [], color="#333333", lw=0.9, ls="--", label="z = 1: qroar protects above"),
    ]
    ax_s.legend(handles=s_handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False,
                title="sensitivity", title_fontsize=10, alignment="left")
    ax_s.tick_params(labelbottom=False)

    # Bottom: factors on a log axis.
    handles = []
    for method in PLOT_METHODS:
        colour, style, width, marker = _PLAN_STYLE[method]
        f = np.asarray(data["factors"][method])
        label = method if method != "qroar" else f"qroar: yarn base, β = {data['beta']:g}"
        scale = data["attn_scale"][method]
        if scale != 1.0:
            label += f"\n   (attention ×{scale:.3f})"
        (h,) = ax_f.plot(k, f, color=colour, ls=style, lw=width, marker=marker, ms=4, label=label,
                         zorder=4 if method == "qroar" else 3, alpha=0.45 if method == "yarn" else 1.0)
        handles.append(h)
    r = data["scale"]
    ax_f.set_yscale("log")
    ax_f.set_ylim(1.0 / 1.15, r * 1.3)
    ticks = _factor_ticks(r)
    ax_f.yaxis.set_major_locator(FixedLocator(ticks))
    ax_f.yaxis.set_minor_locator(NullLocator())
    ax_f.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax_f.set_ylabel("factor f_k (angle = m·ω_k / f_k, log)", fontsize=11)
    ax_f.set_xlabel("rotary pair k  (high frequency → low frequency)", fontsize=11)
    ax_f.text(0.008, 0.975, f"rope_freqs factors f_k of every plan (r = L'/L = {r:g})", transform=ax_f.transAxes,
              ha="left", va="top", fontsize=10.5, zorder=6,
              bbox=dict(facecolor="white", edgecolor="none", alpha=0.85, pad=2.5))
    ax_f.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False,
                title="plan", title_fontsize=10, alignment="left")
    fig.legend(handles=band_handles + line_handles, loc="lower left", bbox_to_anchor=(0.752, 0.07),
               fontsize=8.5, frameon=False, title="bands and marks (both panels)", title_fontsize=10,
               alignment="left")

    ax_f.set_xlim(x_lo, x_hi)
    step = 1 if n_pairs <= 32 else 2 if n_pairs <= 64 else 4
    ax_f.xaxis.set_major_locator(FixedLocator(list(range(0, n_pairs, step))))
    for ax in (ax_s, ax_f):
        ax.grid(axis="y", color="#bbbbbb", lw=0.5, alpha=0.7)
        ax.tick_params(labelsize=9)

    # Top axis: wavelength in tokens at the pair positions of powers of ten (lam = L / rotations).
    facts = RopeFacts(n_rot=n_rot, theta=theta, trained_ctx=L, target_ctx=L2)

    def k_of(lam: float) -> float:
        return rotation_pair(facts, L / lam)

    wl = [10.0 ** e for e in range(1, 12)]
    tick_k = [(k_of(w), w) for w in wl if x_lo <= k_of(w) <= x_hi]
    sec = ax_s.secondary_xaxis("top")
    sec.set_xticks([t for t, _ in tick_k], labels=[_fmt_tokens(w) if w < 1e6 else f"{w:.0e}" for _, w in tick_k])
    sec.tick_params(labelsize=9)
    sec.set_xlabel("wavelength λ_k = 2π·θ^(2k/n_rot) in tokens", fontsize=10)

    fig.suptitle(title, fontsize=15, fontweight="bold", x=0.065, ha="left", y=0.985)
    fig.text(0.065, 0.945, subtitle, fontsize=10, ha="left", va="top", color="#333333")

    with temporary_beside(output_png, "png") as tmp:  # a failure never leaves a half-written PNG behind
        fig.savefig(tmp, dpi=_DPI, format="png")
        os.replace(tmp, output_png)


def plot_factors(model_path: Path, output_png: Path, target_ctx: int | None = None, agg: str = "max",
                 beta: float = 8.0) -> dict:
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
