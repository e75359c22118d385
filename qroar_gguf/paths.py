"""Where cached assets (built wheel, default model, texts) live."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of qroar-gguf's cache: $QROAR_CACHE, else ~/.cache/qroar-gguf."""
    root = os.environ.get("QROAR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qroar-gguf")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
