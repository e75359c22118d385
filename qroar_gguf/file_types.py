"""llama.cpp's file types by name: the name a user types, the type a file's name claims, and which one
a command uses when both say something.

Names are choices.FILE_TYPES's (llama-quantize's, case-insensitive); an alias stands for its type's own
name (Q4_K for Q4_K_M), so a file is named and reported the one way. A file's name claims a type the way
llama.cpp's converter and people name files: as a part of the name set off by `.`, `-` or `_`
(model.Q8_0.gguf, x-q5_k_m.gguf, SmolLM2-135M-32k-Q4_K_M.gguf).
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf

from qroar_gguf.choices import DEFAULT_QTYPE, FILE_TYPES
from qroar_gguf.errors import QroarError, UsageProblem
from qroar_gguf.gguf_io.layout import read_layout
from qroar_gguf.gguf_io.reader import field_value

#: Each file type's own name: the first of the table's names with its number (aliases follow it).
_OWN_NAME = {ftype: name for name, ftype in reversed(FILE_TYPES.items())}
# Longest names first, so that Q4_K_M is found where Q4_K also matches; a name is set off by anything
# but a letter or digit (`_` included: model_q8_0.gguf).
_NAMED = re.compile(r"(?<![a-z0-9])(" + "|".join(sorted(FILE_TYPES, key=len, reverse=True)) + r")(?![a-z0-9])",
                    re.IGNORECASE)


def canonical_qtype(name: str) -> str:
    """The type's own name for any name llama-quantize takes, in any case: q4_k -> Q4_K_M."""
    ftype = FILE_TYPES.get(name.upper())
    if ftype is None:
        raise QroarError(f"unknown --qtype {name}; choose one of {', '.join(FILE_TYPES)}")
    return _OWN_NAME[ftype]


def qtype_named_by(path: Path) -> str | None:
    """The type a file's name claims (the last one named, as llama.cpp's naming puts it last), or None."""
    found = _NAMED.findall(path.name.removesuffix(".gguf"))
    return canonical_qtype(found[-1]) if found else None


def choose_qtype(asked: str | None, output: Path | None, *, force: bool) -> tuple[str, str]:
    """The type convert writes and where it came from, as the summary line says it: --qtype, else the type
    -o's name claims, else the default. A --qtype that -o's name contradicts is refused (the file would lie about itself) unless
    `force`."""
    named = None if output is None else qtype_named_by(output)
    if asked is None:
        return (named, "as the output's name says") if named else (DEFAULT_QTYPE, "by default")
    qtype = canonical_qtype(asked)
    if named is not None and named != qtype and not force:
        raise UsageProblem(f"-o {output.name} names {named} but --qtype is {qtype}: name the output for {qtype}, "
                           f"leave --qtype out to write {named}, or pass --force to write it anyway")
    return qtype, "as --qtype asked"


def kept_type_warning(source: Path, output: Path) -> str | None:
    """patch copies every tensor as it is, so the output keeps `source`'s type: a warning when the output's
    name claims another (None when it claims none, or the source says nothing of its type)."""
    named = qtype_named_by(output)
    if named is None:
        return None
    ftype = field_value(read_layout(source), gguf.Keys.General.FILE_TYPE)  # the header only, as patch reads it
    kept = _OWN_NAME.get(ftype) if isinstance(ftype, int) else None
    if kept is None or named == kept:
        return None
    return (f"warning: {output.name} names {named}, but the file keeps {source.name}'s type {kept} (patch never "
            "re-quantizes: use convert from the checkpoint for another type)")
