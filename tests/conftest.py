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
