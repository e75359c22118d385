"""Per-band diagnostics of a set of factors: what `inspect` prints (pure functions)."""

from __future__ import annotations

import numpy as np

from qroar_gguf.rope.bands import frequency_bands
from qroar_gguf.rope.plans import RopeFacts
from qroar_gguf.rope.sensitivity import interpolation_pressure

BAND_LABELS = {"high": "many rotations (>= 32 in the trained context)",
               "ramp": "some rotations (1 to 32)",
               "low": "fewer than one rotation"}


def band_report(facts: RopeFacts, factors: np.ndarray, sensitivity: np.ndarray | None) -> list[dict]:
    """One row per frequency band: pairs, rotations, relative sensitivity z = S/mean(S), factors and
    interpolation pressure (mean over the band's pairs; see sensitivity.interpolation_pressure)."""
    factors = np.asarray(factors, dtype=np.float64)
    pressure = interpolation_pressure(facts, factors)
    rotations = facts.rotations()
    z = None if sensitivity is None else np.asarray(sensitivity, dtype=np.float64) / np.mean(sensitivity)
    rows = []
    for name, pairs in frequency_bands(facts):
        if pairs.size == 0:
            continue
        rows.append({
            "band": name,
            "label": BAND_LABELS[name],
            "pairs": [int(pairs[0]), int(pairs[-1])],
            "rotations": [float(rotations[pairs].min()), float(rotations[pairs].max())],
            "sensitivity_z_mean": None if z is None else float(z[pairs].mean()),
            "sensitivity_z_max": None if z is None else float(z[pairs].max()),
            "factor_min": float(factors[pairs].min()),
            "factor_max": float(factors[pairs].max()),
            "pressure": float(pressure[pairs].mean()),
        })
    return rows
