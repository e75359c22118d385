#!/usr/bin/env python3
"""Cache Jane Austen's novels (from Debian's r-cran-janeaustenr) as UTF-8 text; prints their paths."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from qroar_gguf.assets.austen import austen_text, list_titles  # noqa: E402
from qroar_gguf.errors import QroarError  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("titles", nargs="*", help=f"titles to print (default: all): {', '.join(list_titles())}")
    args = parser.parse_args()
    try:
        for title in args.titles or list_titles():
            print(austen_text(title))
    except QroarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
