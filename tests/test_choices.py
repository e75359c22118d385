"""The command line's import-free lists (qroar_gguf/choices.py) equal the tables that own each fact."""

from __future__ import annotations

import gguf

from qroar_gguf import choices
from qroar_gguf.evaluate.runtime import KV_CACHE_TYPES
from qroar_gguf.gguf_io.quantize import FTYPES
from qroar_gguf.rope.plans import PLANS


def test_methods_are_the_plan_registry():
    assert choices.METHODS == tuple(PLANS)
    assert choices.DEFAULT_METHOD in PLANS


def test_qtypes_are_llama_cpp_file_types():
    assert tuple(FTYPES) == choices.QTYPES
    assert FTYPES["Q4_K_M"] == gguf.LlamaFileType.MOSTLY_Q4_K_M == 15  # llama.h's LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert FTYPES["F32"] == 0 and FTYPES["BF16"] == 32
    assert set(choices.UNQUANTIZED) <= set(choices.QTYPES)


def test_key_cache_types_are_ggml_types():
    assert set(choices.KEY_CACHE_TYPES) <= set(KV_CACHE_TYPES)
    assert KV_CACHE_TYPES["q8_0"] == gguf.GGMLQuantizationType.Q8_0 == 8 and KV_CACHE_TYPES["bf16"] == 30
