"""The `qroar.*` metadata keys that record how a file was made, and reading a GGUF back for `inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

from qroar_gguf.errors import QroarError

PREFIX = "qroar."
VERSION = "qroar.version"
METHOD = "qroar.method"
PARAMS = "qroar.params"  # JSON object: the plan's options
TRAINED_CTX = "qroar.trained_context"
TARGET_CTX = "qroar.target_context"
FACTORS = "qroar.factors"  # float32 array: the rope_freqs.weight values written
SOURCE_FACTORS = "qroar.source_factors"  # float32 array: factors the source already had (llama3), if any
ATTN_SCALE = "qroar.attention_scale_folded"  # the scale multiplied into W_Q and W_K (1 = none)
SOURCE = "qroar.source"  # the checkpoint's name
# Band-wise method (rope/bands.py, search.py); written only when band values are given or searched.
BANDS = "qroar.bands"  # int array [N + 1]: first pair of every band, then P
BAND_FACTORS = "qroar.band_factors"  # float32 array [N]: rope_freqs multipliers per band
BAND_SCALES = "qroar.band_scales"  # float32 array [N]: W_Q/W_K row scales per band
BAND_SYMMETRIC = "qroar.band_symmetric"  # bool: W_K divided (true) or multiplied (false) by the scale
SEARCH = "qroar.search"  # JSON object: dev text sha256 and tokens, budget, evaluations, objectives


def add_provenance(writer: gguf.GGUFWriter, *, version: str, method: str, params: dict, trained_ctx: int,
                   target_ctx: int, factors: np.ndarray, source_factors: np.ndarray | None, attn_scale: float,
                   source: str) -> None:
    writer.add_string(VERSION, version)
    writer.add_string(METHOD, method)
    writer.add_string(PARAMS, json.dumps(params, sort_keys=True))
    writer.add_uint32(TRAINED_CTX, trained_ctx)
    writer.add_uint32(TARGET_CTX, target_ctx)
    writer.add_array(FACTORS, [float(f) for f in factors])
    if source_factors is not None:
        writer.add_array(SOURCE_FACTORS, [float(f) for f in source_factors])
    writer.add_float32(ATTN_SCALE, float(attn_scale))
    writer.add_string(SOURCE, source)


def add_band_provenance(writer: gguf.GGUFWriter, bands: dict | None, search: dict | None) -> None:
    """``bands``: BandFold.provenance() (bands, band_factors, band_scales, band_symmetric); ``search``:
    the search record (stored as JSON under qroar.search)."""
    if bands is not None:
        writer.add_array(BANDS, [int(v) for v in bands["bands"]])
        writer.add_array(BAND_FACTORS, [float(v) for v in bands["band_factors"]])
        writer.add_array(BAND_SCALES, [float(v) for v in bands["band_scales"]])
        writer.add_bool(BAND_SYMMETRIC, bool(bands["band_symmetric"]))
    if search is not None:
        writer.add_string(SEARCH, json.dumps(search, sort_keys=True))


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise QroarError(f"{path} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # GGUFReader raises ValueError/struct errors on non-GGUF input
        raise QroarError(f"{path} is not a readable GGUF file ({exc})") from None


def field_value(reader: gguf.GGUFReader, key: str):
    field = reader.get_field(key)
    if field is None:
        return None
    value = field.contents()
    return value


def read_summary(path: str | Path) -> dict:
    """Everything `inspect` reports, as plain JSON-ready values."""
    reader = open_gguf(path)
    arch = field_value(reader, "general.architecture")
    summary: dict = {
        "file": str(path),
        "architecture": arch,
        "name": field_value(reader, "general.name"),
        "file_type": _file_type_name(field_value(reader, "general.file_type")),
        "context_length": field_value(reader, f"{arch}.context_length"),
        "rope_freq_base": field_value(reader, f"{arch}.rope.freq_base"),
        "rope_dimension_count": field_value(reader, f"{arch}.rope.dimension_count"),
        "n_tensors": len(reader.tensors),
        "tensor_types": _count_types(reader),
    }
    rope = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    summary["rope_freqs"] = None if rope is None else [float(v) for v in np.asarray(rope.data, dtype=np.float32)]
    summary["rope_freqs_type"] = None if rope is None else rope.tensor_type.name
    provenance = {}
    for key in reader.fields:
        if key.startswith(PREFIX):
            value = field_value(reader, key)
            if key in (PARAMS, SEARCH):
                value = json.loads(value)
            provenance[key[len(PREFIX):]] = value
    summary["qroar"] = provenance or None
    summary["bands"] = _bands(path, summary, provenance)
    return summary


def _bands(path: str | Path, summary: dict, provenance: dict) -> list[dict] | None:
    """Per-band diagnostics; sensitivity from the provenance (qroar files) or measured from attn_q/attn_k."""
    from qroar_gguf.rope.diagnostics import band_report
    from qroar_gguf.rope.measure import measure_gguf_sensitivity
    from qroar_gguf.rope.plans import RopeFacts

    n_rot, theta = summary["rope_dimension_count"], summary["rope_freq_base"]
    if summary["architecture"] is None or n_rot is None or theta is None:
        return None
    trained = provenance.get("trained_context") or summary["context_length"]
    target = provenance.get("target_context") or summary["context_length"]
    facts = RopeFacts(n_rot=int(n_rot), theta=float(theta), trained_ctx=int(trained), target_ctx=int(target))
    factors = summary["rope_freqs"] or [1.0] * facts.n_pairs
    sensitivity = (provenance.get("params") or {}).get("sensitivity")
    if sensitivity is None:
        try:
            sensitivity = measure_gguf_sensitivity(path).sensitivity
        except (QroarError, NotImplementedError, KeyError, ValueError):
            sensitivity = None  # e.g. a quantization gguf-py cannot dequantize: report without it
    return band_report(facts, np.asarray(factors), sensitivity)


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
