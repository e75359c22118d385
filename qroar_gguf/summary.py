"""What `inspect` reports about a GGUF file: shape, context, rope_freqs, provenance, per-band diagnostics."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from qroar_gguf.arch.temperature import shift_state
from qroar_gguf.errors import QroarError
from qroar_gguf.gguf_io.layout import read_layout
from qroar_gguf.gguf_io.provenance import read_provenance
from qroar_gguf.gguf_io.reader import ARCHITECTURE, field_value, open_gguf
from qroar_gguf.rope.diagnostics import band_report
from qroar_gguf.rope.measure import measure_gguf_sensitivity
from qroar_gguf.rope.plans import RopeFacts

ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"


def read_summary(path: str | Path) -> dict:
    """Everything `inspect` reports, as plain JSON-ready values."""
    reader = open_gguf(path)
    arch = field_value(reader, ARCHITECTURE)
    summary: dict = {
        "file": str(path),
        "architecture": arch,
        "name": field_value(reader, gguf.Keys.General.NAME),
        "file_type": _file_type_name(field_value(reader, gguf.Keys.General.FILE_TYPE)),
        "context_length": field_value(reader, gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=arch)),
        "rope_freq_base": field_value(reader, gguf.Keys.Rope.FREQ_BASE.format(arch=arch)),
        "rope_dimension_count": field_value(reader, gguf.Keys.Rope.DIMENSION_COUNT.format(arch=arch)),
        "n_tensors": len(reader.tensors),
        "tensor_types": _count_types(reader),
    }
    rope = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    summary["rope_freqs"] = None if rope is None else [float(v) for v in np.asarray(rope.data, np.float32).ravel()]
    summary["rope_freqs_type"] = None if rope is None else rope.tensor_type.name
    summary["context_shift"] = _context_shift(path, arch, summary["context_length"])
    provenance = read_provenance(reader)
    summary["qroar"] = provenance
    summary["bands"] = _bands(path, summary, provenance or {})
    return summary


def _context_shift(path: str | Path, arch: str, context) -> dict:
    """Whether a context shift (llama-server --context-shift, Ollama's default) keeps the file exact."""
    state = shift_state(read_layout(path), arch, context if isinstance(context, int) else None)
    return {"exact": state.exact, "factor_per_shift": state.shift_factor, "summary": state.describe()}


def _bands(path: str | Path, summary: dict, provenance: dict) -> list[dict] | None:
    """Per-band diagnostics; sensitivity from the provenance (qroar files) or measured from attn_q/attn_k.
    None where the file's keys do not describe RoPE well enough: `inspect` still shows the rest."""
    n_rot, theta = summary["rope_dimension_count"], summary["rope_freq_base"]
    trained = provenance.get("trained_context") or summary["context_length"]
    target = provenance.get("target_context") or summary["context_length"]
    try:
        facts = RopeFacts(n_rot=n_rot, theta=theta, trained_ctx=trained, target_ctx=target)
    except QroarError:
        return None
    factors = summary["rope_freqs"] or [1.0] * facts.n_pairs
    params = provenance.get("params")
    sensitivity = params.get("sensitivity") if isinstance(params, dict) else None
    if sensitivity is None:
        try:
            sensitivity = measure_gguf_sensitivity(path).sensitivity
        except (QroarError, NotImplementedError, KeyError, ValueError):
            sensitivity = None  # e.g. a quantization gguf-py cannot dequantize: report without it
    for candidate in (sensitivity, None):  # a recorded sensitivity that does not fit is left out
        try:
            return band_report(facts, np.asarray(factors, dtype=np.float64), candidate)
        except (QroarError, ValueError, TypeError, IndexError):
            continue
    return None


def _count_types(reader: gguf.GGUFReader) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _file_type_name(value) -> str | None:
    if value is None:
        return None
    try:
        return gguf.LlamaFileType(int(value)).name.removeprefix("MOSTLY_")
    except ValueError:
        return str(value)
