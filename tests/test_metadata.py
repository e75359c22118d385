"""general.* as llama.cpp's converter writes them: read from the checkpoint (folder name, config, model
card), overridden by --name and --metadata; the default output name built from them."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from runs import fail_cleanly, run_cli


def general(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: reader.get_field(k).contents() for k in reader.fields if k.startswith("general.")}


def test_metadata_comes_from_the_checkpoint_and_names_the_file(smollm2_dir: Path, tmp_path: Path):
    result = run_cli(smollm2_dir, "--ctx", "16384", "--qtype", "Q8_0", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "SmolLM2-135M-Instruct-16k-Q8_0.gguf"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    keys = general(out)
    assert keys["general.name"] == "SmolLM2 135M Instruct" and keys["general.basename"] == "SmolLM2"
    assert keys["general.size_label"] == "135M" and keys["general.finetune"] == "Instruct"
    assert keys["general.license"] == "apache-2.0" and keys["general.languages"] == ["en"]  # the model card


def test_name_and_metadata_override(smollm2_dir: Path, tmp_path: Path):
    overrides = tmp_path / "meta.json"
    overrides.write_text(json.dumps({"general.license": "mit", "general.organization": "Example Org"}))
    out = tmp_path / "out.gguf"
    result = run_cli(smollm2_dir, "-o", out, "--ctx", "16384", "--qtype", "F16", "--name", "My Model",
                     "--metadata", overrides, "-q")
    assert result.returncode == 0, result.stderr
    keys = general(out)
    assert keys["general.name"] == "My Model" and keys["general.license"] == "mit"
    assert keys["general.organization"] == "Example Org"


def test_a_broken_metadata_file_is_refused(smollm2_dir: Path, tmp_path: Path):
    (tmp_path / "in").mkdir()
    overrides = tmp_path / "in" / "meta.json"
    overrides.write_text("{not json")
    fail_cleanly([smollm2_dir, "-o", tmp_path / "out.gguf", "--metadata", overrides], tmp_path, "--metadata",
                 protect=tmp_path / "in")


def _checkpoint_copy(smollm2_dir: Path, target: Path) -> Path:
    import shutil

    target.mkdir()
    for f in smollm2_dir.iterdir():
        (target / f.name).symlink_to(f) if f.name != "README.md" else shutil.copy(f, target / f.name)
    return target


def test_a_card_with_a_numeric_version_names_the_file(smollm2_dir: Path, tmp_path: Path):
    ckpt = _checkpoint_copy(smollm2_dir, tmp_path / "ckpt")
    card = (ckpt / "README.md").read_text().replace("library_name:", "version: 1.0\nlibrary_name:", 1)
    (ckpt / "README.md").write_text(card)
    (tmp_path / "out").mkdir()
    result = run_cli(ckpt, "--ctx", "16384", "--qtype", "F16", "-q", cwd=tmp_path / "out")
    assert result.returncode == 0, result.stderr
    [out] = (tmp_path / "out").iterdir()
    assert general(out)["general.version"] == "1.0" and out.name == "Ckpt-135M-1.0-16k-F16.gguf"


@pytest.mark.parametrize("card, overrides, needle", [
    ("---\nlicense: [unclosed\n---\n", None, "model card"),
    (None, "[1, 2]", "--metadata"),
])
def test_broken_cards_and_overrides_are_one_line(smollm2_dir: Path, tmp_path: Path, card, overrides, needle):
    ckpt = _checkpoint_copy(smollm2_dir, tmp_path / "ckpt")
    args = []
    if card is not None:
        (ckpt / "README.md").write_text(card)
    if overrides is not None:
        (tmp_path / "meta.json").write_text(overrides)
        args = ["--metadata", tmp_path / "meta.json"]
    (tmp_path / "out").mkdir()
    fail_cleanly([ckpt, "-o", tmp_path / "out" / "x.gguf", *args], tmp_path / "out", needle)
