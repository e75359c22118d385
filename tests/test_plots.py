"""plot_factors: a real PNG, the plotted numbers equal the plans, checkpoint and GGUF agree, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

pytest.importorskip("matplotlib")

from checkpoints import make_tiny_llama, write_gguf, write_safetensors  # noqa: E402

from qroar_gguf.arch.base import to_adjacent  # noqa: E402
from qroar_gguf.arch.families import family_for  # noqa: E402
from qroar_gguf.errors import QroarError  # noqa: E402
from qroar_gguf.evaluate.plots import PLOT_METHODS, plot_factors  # noqa: E402
from qroar_gguf.gguf_io.provenance import TRAINED_CTX  # noqa: E402
from qroar_gguf.rope.bands import frequency_bands  # noqa: E402
from qroar_gguf.rope.measure import measure_gguf_sensitivity, measure_sensitivity  # noqa: E402
from qroar_gguf.rope.plans import RopeFacts, make_plan  # noqa: E402
from qroar_gguf.rope.sensitivity import SensitivityAccumulator  # noqa: E402
from qroar_gguf.source.checkpoint import open_checkpoint  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the signature."""
    raw = path.read_bytes()
    assert raw[:8] == PNG_MAGIC, "not a PNG file"
    assert raw[12:16] == b"IHDR"
    return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")


def _check_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.is_file()
    width, height = _png_size(path)
    assert 1200 <= width <= 1600 and 800 <= height <= 1000, (width, height)
    assert 30_000 < path.stat().st_size < 2_000_000
    pixels = imread(path)  # decodes the whole image: a truncated file fails here
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.05  # something was drawn, not a blank canvas
    assert not list(path.parent.glob(f".{path.name}.*")), "temporary file left behind"


def _check_against_plans(data: dict, facts: RopeFacts, sensitivity: np.ndarray, beta: float = 8.0) -> None:
    assert data["pairs"] == list(range(facts.n_pairs))
    assert list(data["factors"]) == list(PLOT_METHODS)
    for method in PLOT_METHODS:
        options = {"sensitivity": sensitivity, "beta": beta, "base": "yarn"} if method == "qroar" else {}
        plan = make_plan(method, facts, **options)
        np.testing.assert_array_equal(np.asarray(data["factors"][method], dtype=np.float32), plan.factors,
                                      err_msg=method)
        assert data["attn_scale"][method] == pytest.approx(plan.attn_scale)
    assert data["bands"] == {name: [int(k) for k in ks] for name, ks in frequency_bands(facts)}
    np.testing.assert_allclose(data["wavelengths"], facts.wavelengths())
    s = np.asarray(data["sensitivity"])
    np.testing.assert_allclose(s, sensitivity)
    np.testing.assert_allclose(data["z"], s / s.mean())
    assert data["argmax_pair"] == int(np.argmax(sensitivity))
    # The marked lines sit where the pairs complete 32 and 1 turns within L.
    rot = lambda k: facts.trained_ctx / (2 * np.pi * facts.theta ** (2 * k / facts.n_rot))  # noqa: E731
    assert rot(data["band_boundaries"]["turns_32"]) == pytest.approx(32.0)
    assert rot(data["band_boundaries"]["turns_1"]) == pytest.approx(1.0)
    assert data["trained_ctx_pair"] == pytest.approx(data["band_boundaries"]["turns_1"])
    assert rot(data["target_ctx_pair"]) == pytest.approx(facts.trained_ctx / facts.target_ctx)
    json.dumps(data)  # plain values only


# --------------------------------------------------------------------------------------------------
# SmolLM2: the HF checkpoint and the published Q4_1 GGUF
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_plots(smollm2_dir: Path, smollm2_gguf: Path, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("plots")
    return {
        "ckpt": plot_factors(smollm2_dir, out / "ckpt.png"),
        "gguf": plot_factors(smollm2_gguf, out / "gguf.png", target_ctx=16384),
        "out": out,
    }


def test_checkpoint_plot_is_a_png_of_the_plans(smollm2_plots, smollm2_dir: Path):
    data = smollm2_plots["ckpt"]
    _check_png(smollm2_plots["out"] / "ckpt.png")
    assert data["output"] == str(smollm2_plots["out"] / "ckpt.png")
    assert data["kind"] == "checkpoint" and data["model"] == smollm2_dir.name
    ckpt = open_checkpoint(smollm2_dir)
    hp = family_for(ckpt.config).hparams
    measured = measure_sensitivity(ckpt, agg="max")
    # default target: 4 x the trained context
    facts = RopeFacts(n_rot=hp.n_rot, theta=hp.rope_theta, trained_ctx=hp.context_length,
                      target_ctx=4 * hp.context_length)
    assert (data["n_rot"], data["theta"], data["trained_ctx"], data["target_ctx"]) == (64, 1e5, 8192, 32768)
    _check_against_plans(data, facts, measured.sensitivity)
    assert len(data["per_layer_z"]) == hp.n_layer


def test_gguf_plot_reads_facts_from_metadata(smollm2_plots, smollm2_gguf: Path):
    data = smollm2_plots["gguf"]
    _check_png(smollm2_plots["out"] / "gguf.png")
    assert data["kind"] == "gguf" and data["model"] == "SmolLM2-135M-Instruct.Q4_1"
    assert (data["n_rot"], data["theta"], data["trained_ctx"], data["target_ctx"]) == (64, 1e5, 8192, 16384)
    facts = RopeFacts(n_rot=64, theta=1e5, trained_ctx=8192, target_ctx=16384)
    _check_against_plans(data, facts, measure_gguf_sensitivity(smollm2_gguf).sensitivity)


def test_checkpoint_and_gguf_sensitivities_agree(smollm2_plots, smollm2_gguf: Path):
    """Same model in two layouts (HF rotate_half vs llama.cpp adjacent pairs): S must line up pair by pair."""
    s_ckpt = np.asarray(smollm2_plots["ckpt"]["sensitivity"])
    s_gguf = np.asarray(smollm2_plots["gguf"]["sensitivity"])
    assert np.corrcoef(s_ckpt, s_gguf)[0, 1] > 0.95
    assert int(np.argmax(s_ckpt)) == int(np.argmax(s_gguf))
    layers_ckpt = np.asarray(smollm2_plots["ckpt"]["per_layer_z"])
    layers_gguf = np.asarray(smollm2_plots["gguf"]["per_layer_z"])
    assert np.corrcoef(layers_ckpt.ravel(), layers_gguf.ravel())[0, 1] > 0.95

    # The check has teeth: reading the GGUF's rows as if they were in HF layout scrambles the pairs.
    reader = gguf.GGUFReader(smollm2_gguf)
    acc = SensitivityAccumulator(30, 32, agg="max")
    for t in reader.tensors:
        parts = t.name.split(".")
        if len(parts) == 4 and parts[2] in ("attn_q", "attn_k"):
            w = gguf.quants.dequantize(t.data, t.tensor_type)
            query = parts[2] == "attn_q"
            acc.add_weight(int(parts[1]), "q" if query else "k", w, 9 if query else 3, 64, "hf")
    assert np.corrcoef(s_ckpt, acc.sensitivity())[0, 1] < 0.9


def test_agg_mean_and_beta_are_used(smollm2_dir: Path, tmp_path: Path):
    data = plot_factors(smollm2_dir, tmp_path / "mean.png", target_ctx=16384, agg="mean", beta=2.0)
    assert data["agg"] == "mean" and data["beta"] == 2.0
    ckpt = open_checkpoint(smollm2_dir)
    measured = measure_sensitivity(ckpt, agg="mean")
    facts = RopeFacts(n_rot=64, theta=1e5, trained_ctx=8192, target_ctx=16384)
    _check_against_plans(data, facts, measured.sensitivity, beta=2.0)


# --------------------------------------------------------------------------------------------------
# Tiny synthetic models: a planted outlier pair must show up at the same k in both layouts
# --------------------------------------------------------------------------------------------------

OUTLIER_PAIR = 5


@pytest.fixture(scope="module")
def tiny_pair(smollm2_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny HF checkpoint with one loud rotary pair, and the same weights as a llama.cpp-layout GGUF
    that records a trained context (qroar.trained_context) smaller than its context_length."""
    root = tmp_path_factory.mktemp("tiny_plot")
    directory, tensors = make_tiny_llama(root / "ckpt", smollm2_dir, dtype="F32", max_position_embeddings=2048)
    config = json.loads((directory / "config.json").read_text())
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // n_head
    half = head_dim // 2
    # plant the outlier in HF layout (rows k and k + d/2 of head 1 of layer 1's q_proj)
    q = tensors["model.layers.1.self_attn.q_proj.weight"]
    q[head_dim + OUTLIER_PAIR] *= 6.0
    q[head_dim + half + OUTLIER_PAIR] *= 6.0
    write_safetensors(directory / "model.safetensors", tensors, "F32")

    path = root / "tiny.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(8192)  # as if already extended: the trained context comes from qroar.*
    writer.add_uint32(TRAINED_CTX, 2048)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_rope_dimension_count(head_dim)
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.self_attn."
        writer.add_tensor(f"blk.{layer}.attn_q.weight",
                          to_adjacent(tensors[prefix + "q_proj.weight"], n_head, head_dim))
        writer.add_tensor(f"blk.{layer}.attn_k.weight",
                          to_adjacent(tensors[prefix + "k_proj.weight"], n_kv, head_dim))
    write_gguf(writer)
    return directory, path


def test_tiny_outlier_found_in_both_layouts(tiny_pair, tmp_path: Path):
    directory, gguf_path = tiny_pair
    from_dir = plot_factors(directory, tmp_path / "dir.png")
    from_file = plot_factors(directory / "model.safetensors", tmp_path / "file.png")
    from_gguf = plot_factors(gguf_path, tmp_path / "gguf.png")
    for data in (from_dir, from_file, from_gguf):
        assert data["argmax_pair"] == OUTLIER_PAIR
        assert (data["n_rot"], data["theta"], data["trained_ctx"], data["target_ctx"]) == (64, 1e4, 2048, 8192)
    np.testing.assert_allclose(from_dir["sensitivity"], from_file["sensitivity"])
    np.testing.assert_allclose(from_dir["sensitivity"], from_gguf["sensitivity"], rtol=1e-6)
    _check_png(tmp_path / "gguf.png")
    facts = RopeFacts(n_rot=64, theta=1e4, trained_ctx=2048, target_ctx=8192)
    _check_against_plans(from_gguf, facts, np.asarray(from_gguf["sensitivity"]))


def test_a_neox_file_is_read_in_its_own_row_order(tiny_pair, tmp_path: Path):
    """A qwen2 GGUF (as llama.cpp's converter writes it) keeps Hugging Face's NEOX rows: pair k is rows
    (k, k + d/2) of each head. `plot`, `inspect` and patch's qroar read the family's row order, so the
    outlier is found at its pair and S_k equals the checkpoint's (read as adjacent pairs, rows k and
    k + d/2 would land in pairs k/2 and k/2 + d/4)."""
    directory, llama_file = tiny_pair
    config = json.loads((directory / "config.json").read_text())
    reader = gguf.GGUFReader(llama_file)
    path = tmp_path / "neox.gguf"
    writer = gguf.GGUFWriter(path, "qwen2")
    for field in reader.fields.values():
        if field.name.startswith("llama."):
            writer.add_key_value("qwen2." + field.name[len("llama."):], field.contents(), field.types[0])
    writer.add_uint32(TRAINED_CTX, 2048)
    ckpt = open_checkpoint(directory)
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.self_attn."
        writer.add_tensor(f"blk.{layer}.attn_q.weight", ckpt.load(prefix + "q_proj.weight"))  # NEOX: HF's rows
        writer.add_tensor(f"blk.{layer}.attn_k.weight", ckpt.load(prefix + "k_proj.weight"))
    write_gguf(writer)
    from_dir = plot_factors(directory, tmp_path / "dir.png")
    from_neox = plot_factors(path, tmp_path / "neox.png")
    assert from_neox["argmax_pair"] == OUTLIER_PAIR
    np.testing.assert_allclose(from_neox["sensitivity"], from_dir["sensitivity"], rtol=1e-6)
    np.testing.assert_allclose(measure_gguf_sensitivity(path).sensitivity, from_dir["sensitivity"], rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# Errors: one line, QroarError
# --------------------------------------------------------------------------------------------------


def _one_line_error(call, match: str) -> None:
    with pytest.raises(QroarError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_errors(tiny_pair, tmp_path: Path):
    directory, gguf_path = tiny_pair
    out = tmp_path / "x.png"
    _one_line_error(lambda: plot_factors(tmp_path / "missing", out), "does not exist")
    _one_line_error(lambda: plot_factors(tmp_path / "missing.gguf", out), "does not exist")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    _one_line_error(lambda: plot_factors(text, out), "expected a .gguf file")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf at all" * 10)
    _one_line_error(lambda: plot_factors(fake, out), "not a readable GGUF")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    _one_line_error(lambda: plot_factors(empty_dir, out), "config.json|safetensors")
    _one_line_error(lambda: plot_factors(gguf_path, tmp_path / "nowhere" / "x.png"), "does not exist")
    _one_line_error(lambda: plot_factors(gguf_path, tmp_path / "x.jpg"), r"\.png")
    _one_line_error(lambda: plot_factors(gguf_path, empty_dir), "directory|\\.png")
    _one_line_error(lambda: plot_factors(gguf_path, out, target_ctx=2048), "larger than the trained")
    _one_line_error(lambda: plot_factors(gguf_path, out, agg="median"), "aggregation")
    _one_line_error(lambda: plot_factors(gguf_path, out, beta=-1.0), "beta")
    assert not out.exists()
