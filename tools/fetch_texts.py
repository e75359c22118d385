#!/usr/bin/env python3
"""Cache Jane Austen's novels (from Debian's r-cran-janeaustenr) as UTF-8 text; prints their paths."""

import argparse
import sys

import benchlib  # noqa: F401  (this checkout's qroar_gguf, installed or not)

from qroar_gguf.assets.austen import austen_text, list_titles
from qroar_gguf.errors import QroarError


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
