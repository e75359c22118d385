"""Scaling rows of stored tensors through their f16 block scales: every type gguf-py can decode, checked
by decoding (gguf-py's quants.py) before and after; the refused types; rows left alone stay byte-identical."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from qroar_gguf.errors import QroarError
from qroar_gguf.gguf_io.blockscale import SCALE_FIELDS, scale_rows, why_not_scalable

QT = gguf.GGMLQuantizationType


def _decodable(qtype: QT) -> bool:
    try:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
        return True
    except (NotImplementedError, KeyError):
        return False


def random_rows(qtype: QT, n_rows: int, blocks_per_row: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of random blocks whose f16 scale fields hold sane random values (random bits elsewhere)."""
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = rng.integers(0, 256, size=(n_rows, blocks_per_row, size), dtype=np.uint8)
    for offset in SCALE_FIELDS[qtype]:
        d = rng.uniform(0.01, 0.5, size=(n_rows, blocks_per_row)).astype("<f2")
        rows[:, :, offset:offset + 2] = d[..., None].view(np.uint8)
    return rows.reshape(n_rows, blocks_per_row * size)


@pytest.mark.parametrize("qtype", [q for q in SCALE_FIELDS if _decodable(q)], ids=lambda q: q.name)
def test_scaled_rows_decode_to_the_scaled_values(qtype: QT):
    rng = np.random.default_rng(int(qtype))
    rows = random_rows(qtype, 6, 2, rng)
    factors = np.array([1.0, 1.0693, 0.5, 1.0, 2.0, 1.25])
    out = scale_rows(rows, qtype, factors)
    before = gguf.quants.dequantize(rows, qtype).astype(np.float64)
    after = gguf.quants.dequantize(out, qtype).astype(np.float64)
    scale = np.abs(before).max(axis=1, keepdims=True)
    np.testing.assert_allclose(after, before * factors[:, None], rtol=0, atol=float(scale.max()) * 2e-3)
    assert np.abs(after - before).max() > 0  # the scaled rows really changed
    np.testing.assert_array_equal(out[[0, 3]], rows[[0, 3]])  # factor 1: the same bytes
    changed = np.flatnonzero((out != rows).any(axis=0))
    block = gguf.GGML_QUANT_SIZES[qtype][1]
    fields = {o + i for o in SCALE_FIELDS[qtype] for i in (0, 1)}
    assert {int(c) % block for c in changed} <= fields  # only the scale fields moved


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16])
def test_float_rows_scale_value_by_value(qtype: QT):
    rng = np.random.default_rng(1)
    values = rng.standard_normal((4, 8)).astype("<f4" if qtype == QT.F32 else "<f2")
    factors = np.array([1.0, 1.5, 1.0693, 1.0])
    out = scale_rows(values.view(np.uint8), qtype, factors).view(values.dtype)
    np.testing.assert_allclose(out.astype(np.float64), values.astype(np.float64) * factors[:, None],
                               rtol=1e-7 if qtype == QT.F32 else 1e-3)
    np.testing.assert_array_equal(out[[0, 3]], values[[0, 3]])


@pytest.mark.parametrize("name", ["IQ1_M", "MXFP4", "NVFP4", "BF16", "I8", "F64"])
def test_types_without_an_exact_scale_are_refused_with_the_reason(name: str):
    if name not in QT.__members__:
        pytest.skip(f"this gguf-py has no {name}")
    qtype = QT[name]
    reason = why_not_scalable(qtype)
    assert reason
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    with pytest.raises(QroarError, match=f"cannot scale a {name} tensor"):
        scale_rows(np.zeros((2, size), dtype=np.uint8), qtype, np.array([1.0, 1.1]))


def test_a_scale_past_f16s_range_is_refused():
    rows = np.zeros((1, 18), dtype=np.uint8)
    rows[0, 0:2] = np.array([60000.0], dtype="<f2").view(np.uint8)
    with pytest.raises(QroarError, match="overflow"):
        scale_rows(rows, QT.Q4_0, np.array([2.0]))
