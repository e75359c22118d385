"""Scaling rows of a stored tensor without re-quantizing it: multiply the f16 scale fields of its blocks.

Every legacy, k- and most i-quant block decodes as ``d * q`` (or ``d * q - dmin * m``, ``d * q + m``),
where ``d``, ``dmin`` and ``m`` are f16 fields of the block and ``q``/``m`` come from its packed bits
(gguf-py's ``quants.py`` spells out each layout). Multiplying those f16 fields by ``t`` multiplies every
value of the block by ``t``, up to the f16 rounding of the new field (a relative 2^-11 at most), with the
packed bits untouched. Blocks never straddle rows, so a tensor's rows can be scaled one by one: what a
patch needs to put an attention temperature into W_Q/W_K (or the rotary rows of a fused QKV) of a
quantized file. Float tensors are scaled value by value (F32 exactly, F16 with the same rounding).

Types refused, with the reason: IQ1_M splits its f16 scale across the scale nibbles; MXFP4's E8M0
exponent holds powers of two only; NVFP4's UE4M3 scales round by several percent; BF16 keeps 8 bits of
mantissa, so every weight would round by about 0.2%; integer types are no weights to scale.
"""

from __future__ import annotations

import gguf
import numpy as np

from qroar_gguf.errors import QroarError

QT = gguf.GGMLQuantizationType

#: Byte offsets of the f16 fields to multiply, within one block (names as ggml-common.h spells them).
_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q8_1": (0, 2),
    "Q1_0": (0,), "Q2_0": (0,),
    "Q2_K": (80, 82),  # scales[16], qs[64], d, dmin
    "Q3_K": (108,),  # hmask[32], qs[64], scales[12], d
    "Q4_K": (0, 2), "Q5_K": (0, 2),  # d, dmin, then scales and quants
    "Q6_K": (208,),  # ql[128], qh[64], scales[16], d
    "IQ2_XXS": (0,), "IQ2_XS": (0,), "IQ2_S": (0,), "IQ3_XXS": (0,), "IQ3_S": (0,), "IQ1_S": (0,),
    "IQ4_NL": (0,), "IQ4_XS": (0,),
    "TQ1_0": (52,),  # qs[48], qh[4], d
    "TQ2_0": (64,),  # qs[64], d
}
SCALE_FIELDS: dict[QT, tuple[int, ...]] = {QT[name]: offsets for name, offsets in _FIELDS.items()
                                           if name in QT.__members__}

_WHY_NOT = {
    "IQ1_M": "IQ1_M keeps its f16 block scale split across the nibbles of its sub-block scales",
    "MXFP4": "MXFP4's E8M0 block exponents hold powers of two only",
    "NVFP4": "NVFP4's UE4M3 block scales would round by several percent",
    "BF16": "BF16 keeps 8 bits of mantissa, so every weight would round by about 0.2%",
}


def why_not_scalable(qtype: QT) -> str | None:
    """None when rows of a ``qtype`` tensor can be scaled exactly (up to f16 rounding); else the reason."""
    if qtype in (QT.F32, QT.F16) or qtype in SCALE_FIELDS:
        return None
    return _WHY_NOT.get(qtype.name, f"{qtype.name} tensors hold no scale fields this tool knows")


def scale_rows(rows: np.ndarray, qtype: QT, row_factors: np.ndarray) -> np.ndarray:
    """``rows`` (``[n_rows, bytes per row]``, uint8, as stored) with row ``i``'s values multiplied by
    ``row_factors[i]``; a new array, the input untouched. Rows whose factor is 1 keep their bytes."""
    reason = why_not_scalable(qtype)
    if reason is not None:
        raise QroarError(f"cannot scale a {qtype.name} tensor in place: {reason}")
    n_rows, row_bytes = rows.shape
    factors = np.asarray(row_factors, dtype=np.float64)
    if factors.shape != (n_rows,) or not np.all(np.isfinite(factors)) or np.any(factors <= 0):
        raise ValueError("one finite, positive factor per row is needed")
    out = np.array(rows, dtype=np.uint8, copy=True)
    scaled = np.flatnonzero(factors != 1.0)
    if scaled.size == 0:
        return out
    if qtype == QT.F32:
        values = out[scaled].view("<f4").astype(np.float64) * factors[scaled, None]
        out[scaled] = values.astype("<f4").view(np.uint8)
        return out
    if qtype == QT.F16:
        out[scaled] = _f16(out[scaled].view("<f2").astype(np.float64) * factors[scaled, None]).view(np.uint8)
        return out
    _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    if row_bytes % block_bytes:
        raise QroarError(f"a {qtype.name} row of {row_bytes} bytes is not a whole number of blocks")
    blocks = out[scaled].reshape(scaled.size, row_bytes // block_bytes, block_bytes)
    for offset in SCALE_FIELDS[qtype]:
        field = np.ascontiguousarray(blocks[:, :, offset:offset + 2]).view("<f2")[..., 0]
        new = _f16(field.astype(np.float64) * factors[scaled, None])
        blocks[:, :, offset:offset + 2] = new[..., None].view(np.uint8)
    out[scaled] = blocks.reshape(scaled.size, row_bytes)
    return out


def _f16(values: np.ndarray) -> np.ndarray:
    """``values`` as f16, refusing what f16 cannot hold (a scale pushed past 65504)."""
    with np.errstate(over="ignore"):
        out = values.astype("<f2")
    if not np.all(np.isfinite(out) | ~np.isfinite(values)):
        raise QroarError("a scaled f16 field would overflow (a block scale beyond 65504)")
    return out
