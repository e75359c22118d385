"""Quantize an unquantized GGUF with llama.cpp's own quantizer (libllama via llama-cpp-python).

Using libllama rather than gguf-py's reference quantizers gives exactly the tensor-type choices
(Q4_K_M's Q6_K layers, fallbacks for rows that are not a multiple of 256, ...) that `llama-quantize`
makes. The quantizer copies 1-D tensors such as rope_freqs.weight unchanged (F32).
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

from qroar_gguf.errors import QroarError

# --qtype name -> llama_ftype value (llama.h)
FTYPES: dict[str, int] = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q8_0": 7,
    "Q5_0": 8,
    "Q5_1": 9,
    "Q2_K": 10,
    "Q3_K_S": 11,
    "Q3_K_M": 12,
    "Q3_K_L": 13,
    "Q4_K_S": 14,
    "Q4_K_M": 15,
    "Q5_K_S": 16,
    "Q5_K_M": 17,
    "Q6_K": 18,
    "BF16": 32,
}
UNQUANTIZED = ("F32", "F16", "BF16")

_PROGRESS_LINE = re.compile(rb"\[\s*(\d+)/\s*(\d+)\]")


def quantize_gguf(source: Path, target: Path, qtype: str, threads: int, progress: bool = True) -> None:
    """Write `target` as `source` quantized to `qtype`, with a tensor progress bar."""
    import llama_cpp
    from tqdm import tqdm

    if qtype not in FTYPES:
        raise QroarError(f"unknown --qtype {qtype}; choose one of {', '.join(FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[qtype]
    params.nthread = threads

    bar = tqdm(desc=f"quantize {qtype}", unit="tensor", disable=not progress, leave=False)
    errors: list[str] = []

    # llama.cpp reports each tensor on its log ("[  12/ 272] blk.1.attn_q.weight ..."): we turn those
    # lines into the progress bar and keep errors for the message, instead of flooding the terminal.
    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        match = _PROGRESS_LINE.search(text)
        if match:
            done, total = int(match.group(1)), int(match.group(2))
            if bar.total != total:
                bar.reset(total=total)
            bar.n = done
            bar.refresh()
        elif level == 3:  # GGML_LOG_LEVEL_ERROR
            errors.append(text.decode("utf-8", "replace").strip())

    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    try:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    finally:
        _restore_default_log()
        bar.close()
    if status != 0:
        detail = "; ".join(e for e in errors if e) or f"status {status}"
        raise QroarError(f"llama.cpp could not quantize {source.name} to {qtype}: {detail}")


def _restore_default_log() -> None:
    """Back to the process-wide setting the evaluators use (quiet unless asked)."""
    from qroar_gguf.evaluate.runtime import reinstall_llama_logging

    reinstall_llama_logging()
