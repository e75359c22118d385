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
