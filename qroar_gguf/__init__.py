"""qroar-gguf: Hugging Face checkpoint -> quantized GGUF with per-pair RoPE factors (rope_freqs)."""

__version__ = "0.1.0"  # the only place: pyproject.toml reads it (dynamic version)
