#!/usr/bin/env python3
"""Build (or find) the cached default model: SmolLM2-135M-Instruct as an HF checkpoint; prints its paths."""

import argparse
import sys

import benchlib  # noqa: F401  (this checkout's qroar_gguf, installed or not)

from qroar_gguf.assets.smollm2 import default_model_dir, published_gguf
from qroar_gguf.errors import QroarError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rebuild", action="store_true", help="rebuild the checkpoint even if cached")
    parser.add_argument("--quiet", action="store_true", help="no progress messages")
    args = parser.parse_args()
    try:
        print(published_gguf(progress=not args.quiet))
        print(default_model_dir(rebuild=args.rebuild, progress=not args.quiet))
    except QroarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
