"""Reading a text the user gives to measure on: a regular file of UTF-8 text, or one clear line."""

from __future__ import annotations

from pathlib import Path

from qroar_gguf.errors import QroarError


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():  # a pipe or device would block or never end
        raise QroarError(f"{path} is not a regular file: give a UTF-8 text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise QroarError(f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded): convert it to UTF-8 "
                         "first") from None
