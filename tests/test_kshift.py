"""A context shift only rotates the cached keys in the llama.cpp qroar-gguf builds (patches/0002), and
QROAR_STOCK_KSHIFT=1 gives stock llama.cpp's shift back (what Ollama runs), in the same build.

Real shifts through the bindings (evaluate.kshift): SmolLM2 as F32 with an F32 KV cache, 321 tokens,
then 3 times: drop 64 after the first token, move the rest back, decode 64 more. Exact means the cached
keys keep their norms (within 1e-3) and the logits equal a run that drops the same tokens without a
shift (KL below 1e-4)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from runs import convert_ok

from qroar_gguf.errors import QroarError
from qroar_gguf.evaluate.kshift import STOCK_SHIFT_ENV, SeqState, shift_drift
from qroar_gguf.evaluate.runtime import Runtime
from qroar_gguf.gguf_io.layout import pack_key, read_layout
from qroar_gguf.gguf_io.rewrite import TensorOut, rewritten_header, write_rewritten

N_SHIFTS = 3
NORM_TOL = 1e-3
KL_EXACT = 1e-4
#: llama.cpp's own YaRN at 2x on a file trained at 8192 (--rope-scaling yarn --rope-scale 2 --yarn-orig-ctx 8192)
RUNTIME_YARN_2X = dict(rope_scaling_type="yarn", rope_freq_scale=0.5, yarn_orig_ctx=8192)
#: YaRN's attention factor at 2x, 1 + 0.1 ln 2: what ggml's rope_yarn multiplies by when ext_factor != 0
MSCALE_2X = 1.0 + 0.1 * math.log(2.0)


@pytest.fixture(scope="module")
def unscaled(smollm2_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kshift") / "none.F32.gguf"
    convert_ok(smollm2_dir, "-o", out, "--method", "none", "--qtype", "F32")
    return out


@pytest.fixture(scope="module")
def keyed(unscaled: Path) -> Path:
    """The unscaled file with `llama.rope.scaling.attn_factor` = YaRN's factor at 2x and no YaRN type (as
    Phi-3-style files and `patch`'s key form carry it): the shift's other branch (ext_factor 0)."""
    out = unscaled.with_name("keyed.F32.gguf")
    layout = read_layout(unscaled)
    key = gguf.Keys.Rope.SCALING_ATTN_FACTOR.format(arch="llama")
    tensors = [TensorOut(t.name, source=t) for t in layout.tensors]
    header = rewritten_header(layout, {key: pack_key(key, gguf.GGUFValueType.FLOAT32, MSCALE_2X)}, tensors)
    write_rewritten(out, layout, header, tensors, progress=False)
    return out


@pytest.fixture(scope="module")
def text(dev_text: Path) -> str:
    return dev_text.read_text(encoding="utf-8")


def assert_exact(drift) -> None:
    assert len(drift.norm_ratios) == len(drift.kl_vs_gap) == N_SHIFTS
    assert all(abs(r - 1.0) < NORM_TOL for r in drift.norm_ratios), drift
    assert all(kl < KL_EXACT for kl in drift.kl_vs_gap), drift


def assert_compounds(drift, factor: float) -> None:
    """Every shift multiplied every cached key by `factor` again, and the logits left the gap run's."""
    expected = [factor ** j for j in range(1, N_SHIFTS + 1)]
    assert drift.norm_ratios == pytest.approx(expected, rel=NORM_TOL), drift
    assert drift.kl_vs_gap[-1] > KL_EXACT, drift


def test_a_shift_under_runtime_yarn_only_rotates_unless_the_stock_switch_is_on(unscaled: Path, text: str,
                                                                                monkeypatch):
    """patches/0002 cancels rope_yarn's mscale in the shift; with the switch, each shift multiplies the
    keys by it again, as stock llama.cpp (Ollama's llama-server) does. The switch is read at each shift
    and put back after the run, so the patched run after the stock one is patched again."""
    monkeypatch.setenv(STOCK_SHIFT_ENV, "0")
    assert_compounds(shift_drift(unscaled, text, n_shifts=N_SHIFTS, stock_shift=True, **RUNTIME_YARN_2X), MSCALE_2X)
    assert os.environ[STOCK_SHIFT_ENV] == "0"
    assert_exact(shift_drift(unscaled, text, n_shifts=N_SHIFTS, **RUNTIME_YARN_2X))


@pytest.mark.parametrize("stock", [False, True], ids=["patched", "stock"])
def test_an_attention_factor_key_is_applied_again_only_by_the_stock_shift(keyed: Path, text: str, stock: bool):
    """The shift's other branch (no YaRN, ext_factor 0): the patched shift passes 1 as the factor."""
    drift = shift_drift(keyed, text, n_shifts=N_SHIFTS, stock_shift=stock)
    if stock:
        assert_compounds(drift, MSCALE_2X)
    else:
        assert_exact(drift)


def test_a_file_without_attention_factor_shifts_exactly_in_stock_llama_cpp(unscaled: Path, text: str):
    """The reference for files meant for stock runtimes: a plain rotation is exact under the stock shift
    (and the measurement finds no drift where there is none, the kept first token included)."""
    assert_exact(shift_drift(unscaled, text, n_shifts=N_SHIFTS, stock_shift=True))


def test_bad_settings_are_one_line(unscaled: Path, text: str):
    with pytest.raises(QroarError, match="type_k must be f32 or f16"):
        shift_drift(unscaled, text, type_k="q8_0")
    with pytest.raises(QroarError, match="need 641"):
        shift_drift(unscaled, text[:2000], n_shifts=5)


def test_a_sequence_state_reads_back_and_packs_to_the_same_bytes(unscaled: Path, text: str):
    """The gap run rebuilds its cache from parsed states: parsing and packing loses nothing, and llama.cpp
    takes the packed state back."""
    with Runtime(unscaled, n_ctx=64, type_k="f32", type_v="f32") as rt:
        tokens = rt.tokenize(text)[:40]
        rt.decode(tokens, 0, slice(0, 0))
        state = rt.sequence_state()
        parsed = SeqState.parse(state)
        assert list(parsed.positions) == list(range(40))
        assert len(parsed.keys()) == len(parsed.v) and parsed.keys()[0].shape[0] == 40
        assert np.array_equal(parsed.pack(), state)
        rt.set_sequence_state(parsed.pack())
        assert np.array_equal(rt.sequence_state(), state)
