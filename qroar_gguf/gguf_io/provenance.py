"""The `qroar.*` metadata keys that record how a file was made: writing them, and reading them back."""

from __future__ import annotations

import json

import gguf
import numpy as np

from qroar_gguf.gguf_io.reader import field_value

PREFIX = "qroar."
VERSION = "qroar.version"
METHOD = "qroar.method"
PARAMS = "qroar.params"  # JSON object: the plan's options
TRAINED_CTX = "qroar.trained_context"
TARGET_CTX = "qroar.target_context"
FACTORS = "qroar.factors"  # float32 array: the rope_freqs.weight values written
SOURCE_FACTORS = "qroar.source_factors"  # float32 array: factors the source already had (llama3), if any
ATTN_SCALE = "qroar.attention_scale_folded"  # the scale multiplied into W_Q and W_K (1 = none)
SOURCE = "qroar.source"  # the checkpoint's name (patch: the input file's)
SOURCE_ARCH = "qroar.source_arch"  # patch: the input's GGUF arch, where it was rewritten as another
ATTN_FACTOR = "qroar.attention_factor"  # patch: the plan's scale, written into <arch>.rope.scaling.attn_factor
SHIFT_FOLDED = "qroar.shift_folded"  # patch --fix-shift: the factor a context shift re-applied, moved into the weights
# Band-wise method (rope/bands.py, search.py); written only when band values are given or searched.
BANDS = "qroar.bands"  # int array [N + 1]: first pair of every band, then P
BAND_FACTORS = "qroar.band_factors"  # float32 array [N]: rope_freqs multipliers per band
BAND_SCALES = "qroar.band_scales"  # float32 array [N]: W_Q/W_K row scales per band
BAND_SYMMETRIC = "qroar.band_symmetric"  # bool: W_K divided (true) or multiplied (false) by the scale
NEEDS_PATCH = "qroar.needs_patch"  # the patches/ file a runtime needs to load this file (qwen3 + rope_freqs)
SEARCH = "qroar.search"  # JSON object: dev text sha256 and tokens, budget, evaluations, objectives


def add_provenance(writer: gguf.GGUFWriter, *, version: str, method: str, params: dict, trained_ctx: int,
                   target_ctx: int, factors: np.ndarray, source_factors: np.ndarray | None, attn_scale: float,
                   source: str, needs_patch: str | None = None) -> None:
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
    if needs_patch is not None:
        writer.add_string(NEEDS_PATCH, needs_patch)


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


def read_provenance(reader: gguf.GGUFReader) -> dict | None:
    """The file's `qroar.*` keys without the prefix (JSON values decoded), None when it has none."""
    provenance = {}
    for key in reader.fields:
        if key.startswith(PREFIX):
            value = field_value(reader, key)
            if key in (PARAMS, SEARCH):
                try:
                    value = json.loads(value)
                except (TypeError, ValueError):  # written by something else: shown as it is
                    pass
            provenance[key[len(PREFIX):]] = value
    return provenance or None
