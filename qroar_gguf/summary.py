"""What `inspect` reports about a GGUF file: shape, context, rope_freqs, provenance, per-band diagnostics.

The file is read through the bounded reader (gguf_io/layout.py), so a damaged file fails as `patch`
says it does; a valid file with odd keys is still shown, with what cannot be believed left out: bands
only where the keys pass the checks `patch` makes and the attention tensors confirm them, provenance
only where a qroar.* key holds what qroar-gguf writes there.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np

from qroar_gguf.arch.base import PAIR_ROUTES
from qroar_gguf.arch.families import gguf_family
from qroar_gguf.arch.temperature import shift_state
from qroar_gguf.errors import QroarError
from qroar_gguf.gguf_io.layout import GgufLayout, RawTensor, read_layout
from qroar_gguf.gguf_io.provenance import provenance_problems, read_provenance
from qroar_gguf.gguf_io.reader import ARCHITECTURE, check_attention_shapes, read_hparams, scalar_value
from qroar_gguf.rope.diagnostics import band_report
from qroar_gguf.rope.measure import measure_gguf_sensitivity
from qroar_gguf.rope.plans import RopeFacts

#: rope_freqs values listed at most (one per rotary pair: far more than any head has); a longer tensor
#: is reported by its length, so a file cannot make the listing as large as itself.
MAX_LISTED = 1 << 16


def read_summary(path: str | Path) -> dict:
    """Everything `inspect` reports, as plain JSON-ready values (no NaN or infinity: those are strings)."""
    layout = read_layout(path)
    arch = scalar_value(layout, ARCHITECTURE)
    arch_key = arch if isinstance(arch, str) else ""
    summary: dict = {
        "file": str(path),
        "architecture": arch,
        "name": scalar_value(layout, gguf.Keys.General.NAME),
        "file_type": _file_type_name(scalar_value(layout, gguf.Keys.General.FILE_TYPE)),
        "context_length": scalar_value(layout, gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=arch_key)),
        "rope_freq_base": scalar_value(layout, gguf.Keys.Rope.FREQ_BASE.format(arch=arch_key)),
        "rope_dimension_count": scalar_value(layout, gguf.Keys.Rope.DIMENSION_COUNT.format(arch=arch_key)),
        "rope_scaling": {name: scalar_value(layout, key.format(arch=arch_key)) for name, key in (
            ("type", gguf.Keys.Rope.SCALING_TYPE), ("factor", gguf.Keys.Rope.SCALING_FACTOR),
            ("original_context_length", gguf.Keys.Rope.SCALING_ORIG_CTX_LEN))},
        "n_tensors": len(layout.tensors),
        "tensor_types": _count_types(layout),
    }
    # the per-pair factors the file carries: rope_freqs.weight, or phi3's rope_factors_long (the set llama.cpp
    # takes beyond the original context)
    pair_names = [name for route in ("rope_freqs", "rope_factors") for name in PAIR_ROUTES[route][:1]]
    rope = next((t for name in pair_names for t in layout.tensors if t.name == name), None)
    summary["rope_freqs"] = None if rope is None else _values(layout.path, rope)
    summary["rope_freqs_type"] = None if rope is None else rope.tensor_type.name
    summary["rope_freqs_tensor"] = None if rope is None else rope.name
    summary["context_shift"] = _context_shift(layout, arch_key, summary["context_length"])
    provenance = read_provenance(layout)
    summary["qroar"] = provenance
    summary["qroar_malformed"] = provenance_problems(layout)
    summary["bands"] = _bands(layout, summary, provenance or {})
    return _finite(summary)


def _context_shift(layout: GgufLayout, arch: str, context) -> dict:
    """Whether a context shift (llama-server --context-shift, Ollama's default) keeps the file exact."""
    family = gguf_family(arch)
    state = shift_state(layout, arch, context if isinstance(context, int) and not isinstance(context, bool) else None,
                        family is None or family.context_shift)
    return {"exact": state.exact, "factor_per_shift": state.shift_factor, "summary": state.describe()}


def _values(path: Path, t: RawTensor) -> list[float] | None:
    """rope_freqs' values where they are plain floats and not too many to list; None otherwise."""
    dtype = {gguf.GGMLQuantizationType.F32: "<f4", gguf.GGMLQuantizationType.F16: "<f2"}.get(t.tensor_type)
    if dtype is None or t.n_elements > MAX_LISTED:
        return None
    return [float(v) for v in np.fromfile(path, dtype=dtype, count=t.n_elements, offset=t.data_offset)]


def _bands(layout: GgufLayout, summary: dict, provenance: dict) -> list[dict] | None:
    """Per-band diagnostics; sensitivity from the provenance (qroar files) or measured from W_Q/W_K in the
    row order of the file's arch. None where the file's keys do not describe RoPE well enough: `inspect`
    still shows the rest."""
    try:
        hp = read_hparams(layout, layout.path)
        family = gguf_family(hp.architecture)
        if family is None or family.qk_tensors == "split":  # the head size is the tensors', not a claim
            check_attention_shapes(hp, layout.tensors, layout.path)
        facts = RopeFacts(n_rot=hp.n_rot, theta=hp.rope_theta,
                          trained_ctx=provenance.get("trained_context") or hp.context_length,
                          target_ctx=provenance.get("target_context") or hp.context_length)
    except QroarError:
        return None
    factors = summary["rope_freqs"] or [1.0] * facts.n_pairs
    params = provenance.get("params")
    sensitivity = params.get("sensitivity") if isinstance(params, dict) else None
    if sensitivity is None:
        try:
            sensitivity = measure_gguf_sensitivity(layout.path, layout=layout).sensitivity
        except (QroarError, ValueError):
            sensitivity = None  # e.g. a quantization gguf-py cannot dequantize: report without it
    for candidate in (sensitivity, None):  # a recorded sensitivity that does not fit is left out
        try:
            return band_report(facts, np.asarray(factors, dtype=np.float64), candidate)
        except (QroarError, ValueError, TypeError, IndexError):
            continue
    return None


def _count_types(layout: GgufLayout) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in layout.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _file_type_name(value) -> str | None:
    """general.file_type's name; anything but a known whole number is shown as it is."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_")
        except ValueError:
            pass
    return str(value)


def _finite(value):
    """``value`` with every NaN or infinity made a string (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
