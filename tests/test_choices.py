"""The command line's import-free lists (qroar_gguf/choices.py) equal the tables that own each fact."""

from __future__ import annotations

import re
import tarfile

import gguf
import pytest

from qroar_gguf import choices
from qroar_gguf.evaluate.runtime import KV_CACHE_TYPES
from qroar_gguf.file_types import canonical_qtype
from qroar_gguf.rope.plans import PLANS


def test_methods_are_the_plan_registry():
    assert choices.METHODS == tuple(PLANS)
    assert choices.DEFAULT_METHOD in PLANS


def _pinned_source(suffix: str) -> str:
    """A file of the llama.cpp vendored in the pinned llama-cpp-python sdist (the set-up keeps it)."""
    from qroar_gguf.llama_tools import fetch_sdist

    with tarfile.open(fetch_sdist(lambda message: None)) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("vendor/llama.cpp/" + suffix))
        return tar.extractfile(member).read().decode("utf-8")


@pytest.fixture(scope="module")
def llama_quantize_names() -> dict[str, int]:
    """llama-quantize's QUANT_OPTIONS (name -> llama_ftype's number from llama.h), as the pinned source has them."""
    numbers = {name: int(value) for name, value in
               re.findall(r"^\s*(LLAMA_FTYPE_\w+)\s*=\s*(\d+)", _pinned_source("include/llama.h"), re.MULTILINE)}
    table = _pinned_source("tools/quantize/quantize.cpp").split("QUANT_OPTIONS = {", 1)[1].split("};", 1)[0]
    options = re.findall(r'\{\s*"(\w+)",\s*(LLAMA_FTYPE_\w+)\s*,', table)
    assert len(options) > 30, "quantize.cpp's table was not found"
    return {name: numbers[ftype] for name, ftype in options}


def test_qtypes_are_llama_quantize_names(llama_quantize_names: dict[str, int]):
    names = dict(llama_quantize_names)
    assert names.pop("COPY") == 0  # llama-quantize's "copy the tensors as they are": no type of its own
    assert choices.FILE_TYPES == names
    # what a user can type: every command's --qtype offers exactly llama-quantize's names
    from qroar_gguf.cli import main

    offered = {name: next(p for p in command.params if p.name in ("qtype", "qtypes")).type.choices
               for name, command in main.commands.items()
               if any(p.name in ("qtype", "qtypes") for p in command.params)}
    assert set(offered) >= {"convert", "bench", "demo"}, offered
    for name, choices_offered in offered.items():
        assert sorted(choices_offered) == sorted(names), name


@pytest.mark.parametrize("name", choices.QTYPES)
def test_every_name_round_trips_to_its_file_type(name: str, llama_quantize_names: dict[str, int]):
    for spelled in (name, name.lower(), name.capitalize()):
        own = canonical_qtype(spelled)
        assert choices.FILE_TYPES[own] == llama_quantize_names[name]
        assert canonical_qtype(own) == own
    own = canonical_qtype(name)  # where gguf-py (older than the pinned llama.cpp) has the type, the same number
    member = "ALL_F32" if own == "F32" else f"MOSTLY_{own}"
    if member in gguf.LlamaFileType.__members__:
        assert gguf.LlamaFileType[member].value == choices.FILE_TYPES[name]


def test_qtype_lists_are_in_the_table():
    assert choices.FILE_TYPES["Q4_K_M"] == gguf.LlamaFileType.MOSTLY_Q4_K_M == 15  # llama.h's LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert canonical_qtype("q4_k") == "Q4_K_M" and canonical_qtype("Q3_K") == "Q3_K_M"
    for names in (choices.UNQUANTIZED, choices.NEEDS_IMATRIX, choices.EXPERTS_ONLY, choices.TERNARY,
                  (choices.DEFAULT_QTYPE,)):
        assert all(canonical_qtype(name) == name for name in names)
    for name in choices.QTYPES:  # every i-quant below 4 bits, as the family's line says
        if name.startswith(("IQ1", "IQ2", "IQ3")):
            assert name in choices.NEEDS_IMATRIX


def test_key_cache_types_are_ggml_types():
    assert set(choices.KEY_CACHE_TYPES) <= set(KV_CACHE_TYPES)
    assert KV_CACHE_TYPES["q8_0"] == gguf.GGMLQuantizationType.Q8_0 == 8 and KV_CACHE_TYPES["bf16"] == 30


def test_native_routes_are_the_families():
    """--help's list of the architectures qroar-gguf converts itself is arch/families.py's."""
    from qroar_gguf.arch.families import supported_architectures

    assert set(choices.NATIVE_ROUTES) == set(supported_architectures())
