# assets
# Session-scoped: the default model and texts are built once into the user cache and reused by all tests.
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The published SmolLM2-135M-Instruct Q4_1 GGUF (cached)."""
    from qroar_gguf.assets.smollm2 import published_gguf

    return published_gguf(progress=False)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default model as an HF checkpoint directory, rebuilt from the GGUF (cached)."""
    from qroar_gguf.assets.smollm2 import default_model_dir

    return default_model_dir(progress=False)


@pytest.fixture(scope="session")
def tiny(smollm2_dir: Path, tmp_path_factory):
    """A random 2-layer Llama (hidden 256, GQA 4/2 heads, trained 2048) with SmolLM2's tokenizer, and its tensors."""
    from checkpoints import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "ckpt", smollm2_dir)


@pytest.fixture()
def scratch(tiny, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    import shutil

    directory, _ = tiny
    copy = tmp_path / "ckpt"
    shutil.copytree(directory, copy)
    return copy


@pytest.fixture(scope="session")
def band_model(smollm2_dir: Path, tmp_path_factory) -> Path:
    """The band tests' tiny GQA Llama (4 Q heads, 2 K heads, trained 256) with random q/k biases, so biases
    are checked too."""
    import numpy as np
    from checkpoints import make_tiny_llama, write_safetensors

    directory, tensors = make_tiny_llama(tmp_path_factory.mktemp("bands") / "ckpt", smollm2_dir,
                                         max_position_embeddings=256)
    rng = np.random.default_rng(7)
    for i in range(2):
        tensors[f"model.layers.{i}.self_attn.q_proj.bias"] = 0.1 * rng.standard_normal(4 * 64)
        tensors[f"model.layers.{i}.self_attn.k_proj.bias"] = 0.1 * rng.standard_normal(2 * 64)
    write_safetensors(directory / "model.safetensors", tensors)
    return directory


@pytest.fixture(scope="session")
def dev_text(tmp_path_factory) -> Path:
    from qroar_gguf.assets.austen import austen_text

    text = austen_text("Emma").read_text(encoding="utf-8")[20000:26000]  # about 1400 tokens: 2 windows of 512
    path = tmp_path_factory.mktemp("dev") / "dev.txt"
    path.write_text(text, encoding="utf-8")
    return path
