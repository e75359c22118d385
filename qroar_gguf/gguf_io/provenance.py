"""The `qroar.*` metadata keys that record how a file was made: writing them, and reading them back."""

from __future__ import annotations

import json
import math

import gguf
import numpy as np

from qroar_gguf.gguf_io.layout import GgufLayout
from qroar_gguf.gguf_io.rewrite import PADDING  # spaces a rewrite writes to line tensors up: not provenance

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


# What each key must hold to be believed: a file's qroar.* keys are as untrusted as the rest of it.
_TEXT = (VERSION, METHOD, SOURCE, SOURCE_ARCH, NEEDS_PATCH)
_JSON = (PARAMS, SEARCH)
_CONTEXTS = (TRAINED_CTX, TARGET_CTX)
_NUMBERS = (ATTN_SCALE, ATTN_FACTOR)
_NUMBER_ARRAYS = (FACTORS, SOURCE_FACTORS, BAND_FACTORS, BAND_SCALES, BANDS)
_MAX_ITEMS = 1 << 16  # far more rotary pairs than any head has: a longer array was not written here
_MAX_JSON = 1 << 20  # characters of a JSON key; ours hold a few hundred numbers
_MAX_JSON_DEPTH = 8  # ours nest three deep


def read_provenance(reader: GgufLayout) -> dict | None:
    """The file's well-formed `qroar.*` keys without the prefix (JSON values decoded), None when it has
    none; a key that does not hold what qroar-gguf writes there is left out (`provenance_problems`)."""
    return _read(reader)[0]


def provenance_problems(reader: GgufLayout) -> list[str]:
    """The `qroar.*` keys left out of `read_provenance` because they are malformed."""
    return _read(reader)[1]


def _read(reader: GgufLayout) -> tuple[dict | None, list[str]]:
    provenance, problems = {}, []
    for key, field in reader.fields.items():
        if not key.startswith(PREFIX) or key == PADDING:  # spaces that line tensors up (gguf_io.rewrite)
            continue
        value = _checked(field)
        if value is _MALFORMED:
            problems.append(key)
        else:
            provenance[key[len(PREFIX):]] = value
    return provenance or None, problems


_MALFORMED = object()


def _checked(field):
    """The key's value if it holds what qroar-gguf writes there, else _MALFORMED (never decoding an
    array longer than _MAX_ITEMS)."""
    key, length = field.name, field.count
    if length is not None and (length > _MAX_ITEMS or key not in _NUMBER_ARRAYS):
        return _MALFORMED
    value = field.contents()
    if key in _TEXT:
        return value if isinstance(value, str) else _MALFORMED
    if key in _JSON:
        return _json(value)
    if key in _CONTEXTS:
        return value if _whole(value) and value > 0 else _MALFORMED
    if key in _NUMBERS:
        return float(value) if _number(value) else _MALFORMED
    if key in _NUMBER_ARRAYS:
        ok = isinstance(value, list) and all((_whole if key == BANDS else _number)(v) for v in value)
        return value if ok else _MALFORMED
    if key == BAND_SYMMETRIC:
        return value if isinstance(value, bool) else _MALFORMED
    return value  # a key of a later version: a scalar or string (arrays were refused above)


def _json(value):
    if not isinstance(value, str) or len(value) > _MAX_JSON:
        return _MALFORMED
    try:
        decoded = json.loads(value)
    except (ValueError, RecursionError):
        return _MALFORMED
    return decoded if isinstance(decoded, dict) and _depth(decoded) <= _MAX_JSON_DEPTH else _MALFORMED


def _depth(value) -> int:
    """How deep lists and objects nest (walked without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth <= _MAX_JSON_DEPTH:
            children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
