"""Text that came from a file, made safe to print: control characters shown, never obeyed.

A GGUF file's strings (arch, model name, keys, tensor names) reach the terminal through `inspect` and
error lines. Printed raw, an escape sequence can clear the screen or set the window title, and a
newline can forge lines of output; shown escaped, the user sees exactly what the file holds.
"""

from __future__ import annotations

import unicodedata

# Cc: C0/C1 controls and DEL; Cf: format characters (bidirectional overrides reorder what is shown);
# Zl/Zp: Unicode's own line and paragraph separators.
_HIDDEN = {"Cc", "Cf", "Zl", "Zp"}


def printable(text: object) -> str:
    """``text`` (made a string) with every control or format character written as an escape."""
    return "".join(_escaped(c) if unicodedata.category(c) in _HIDDEN else c for c in str(text))


def _escaped(c: str) -> str:
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable_all(value):
    """``value`` (JSON-like: dicts, lists, strings, numbers) with every string in it, keys too, printable."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable_all(k): printable_all(v) for k, v in value.items()}
    if isinstance(value, list):
        return [printable_all(v) for v in value]
    return value
