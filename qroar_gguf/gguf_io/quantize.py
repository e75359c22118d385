"""Quantize an unquantized GGUF with llama.cpp's own quantizer (libllama via llama-cpp-python, or the
`llama-quantize` program built from the same source).

Using libllama rather than gguf-py's reference quantizers gives exactly the tensor-type choices
(Q4_K_M's Q6_K layers, fallbacks for rows that are not a multiple of 256, ...) that `llama-quantize`
makes. The quantizer copies 1-D tensors such as rope_freqs.weight unchanged (F32).

libllama's quantizer cannot be cancelled: a Ctrl-C arriving while it runs would only reach Python
inside its log callback, where ctypes swallows the exception, and the file would be finished and
published. So it runs in a child process (quantize_child.py) that reports progress and errors
line by line; whatever stops the parent (Ctrl-C, SIGTERM, an error) kills the child first, and the
caller removes the partial file.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from qroar_gguf.choices import EXPERTS_ONLY, FILE_TYPES, NEEDS_IMATRIX, QUANTIZERS, TERNARY, UNQUANTIZED
from qroar_gguf.errors import QroarError
from qroar_gguf.gguf_io.imatrix import ImatrixRequest, compute_imatrix, default_chunks
from qroar_gguf.llama_tools import find_tool, run_program

#: ggml's tensor types by name (--tensor-type and friends), from gguf-py's table of the same enum.
TENSOR_TYPES = tuple(t.name for t in gguf.GGMLQuantizationType)
_TOOL_STEP = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")
_NEARLY_FULL = 16 * 2**20  # bytes free below which a failed write is put down to a full disk


@dataclass(frozen=True)
class TypeOverrides:
    """What llama-quantize offers beyond the file type: an importance matrix and per-tensor types
    (ggml type names, e.g. ``q8_0``). The bindings' quantizer cannot take them, so any of them means
    the llama-quantize program."""

    imatrix: Path | None = None
    tensor_types: tuple[str, ...] = ()  # "PATTERN=TYPE", PATTERN a regex on tensor names (attn_q, blk\.0\..*)
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None

    def __bool__(self) -> bool:
        return bool(self.imatrix or self.tensor_types or self.output_tensor_type or self.token_embedding_type)

    def tool_args(self) -> list[str]:
        args = [] if self.imatrix is None else ["--imatrix", str(self.imatrix)]
        for rule in self.tensor_types:
            args += ["--tensor-type", rule]
        if self.output_tensor_type:
            args += ["--output-tensor-type", self.output_tensor_type]
        if self.token_embedding_type:
            args += ["--token-embedding-type", self.token_embedding_type]
        return args


def check_quantization(qtype: str, overrides: TypeOverrides, *, imatrix_coming: bool = False) -> None:
    """One line for a request llama.cpp would refuse late or quietly: an unknown type or tensor type, an
    i-quant without an importance matrix, overrides on an unquantized file."""
    if qtype not in FILE_TYPES:
        raise QroarError(f"unknown --qtype {qtype}; choose one of {', '.join(FILE_TYPES)}")
    has_imatrix = overrides.imatrix is not None or imatrix_coming
    if qtype in NEEDS_IMATRIX and not has_imatrix:
        raise QroarError(f"--qtype {qtype} needs an importance matrix: add --imatrix-text FILE (a text to compute "
                         "one on) or --imatrix FILE (one llama-imatrix made)")
    if qtype in UNQUANTIZED and (overrides or imatrix_coming):
        raise QroarError(f"--qtype {qtype} is not quantized: importance matrices and tensor types apply to quantized "
                         "types only")
    for rule in overrides.tensor_types:
        pattern, sep, type_name = rule.partition("=")
        if not sep or not pattern or not type_name:
            raise QroarError(f"--tensor-type {rule!r}: write PATTERN=TYPE, e.g. attn_q=q8_0")
        _check_tensor_type(type_name, "--tensor-type")
    for option, type_name in (("--output-tensor-type", overrides.output_tensor_type),
                              ("--token-embedding-type", overrides.token_embedding_type)):
        if type_name is not None:
            _check_tensor_type(type_name, option)


def check_type_fits_model(qtype: str, tensor_names: Iterable[str], first_matrix: Callable[[], np.ndarray]) -> None:
    """MXFP4_MOE and the ternary types fit some models only; on others llama.cpp writes a file under their
    name that is something else (Q8_0 throughout) or destroyed (every weight rounded to -1, 0 or 1 times a
    scale). `first_matrix` gives the first layer matrix the type would quantize: a model trained ternary is
    ternary in every one, and one that is not shows it in the first."""
    if qtype in EXPERTS_ONLY and not any("_exps." in name for name in tensor_names):
        raise QroarError(f"--qtype {qtype} is for a mixture-of-experts' expert tensors and this model has none "
                         "(llama.cpp would write Q8_0 throughout under its name): choose Q8_0 or another type")
    if qtype in TERNARY and not is_ternary(first_matrix()):
        raise QroarError(f"--qtype {qtype} keeps only -1, 0 or 1 times a scale per weight, for models trained "
                         "ternary (BitNet b1.58), and this model's weights are not: choose a k-quant or i-quant")


def is_ternary(values: np.ndarray) -> bool:
    """Every block of 256 values (the ternary types' blocks) holds only 0 and one magnitude."""
    values = np.abs(np.asarray(values, dtype=np.float32))
    blocks = values.reshape(-1, 256) if values.size % 256 == 0 else values.reshape(1, -1)
    peak = blocks.max(axis=1, keepdims=True)
    return bool(np.all((blocks == 0) | (np.abs(blocks - peak) <= 1e-3 * peak)))


def check_types_fit(row_lengths: dict[str, int], overrides: TypeOverrides) -> None:
    """Each type asked for a tensor must divide its rows into whole blocks: llama.cpp falls back to
    another type for its own choices but writes a broken file (and fails late) for an explicit one."""
    asked: list[tuple[str, str, str]] = []  # (option, regex on names, type)
    for rule in overrides.tensor_types:
        pattern, _, type_name = rule.partition("=")
        asked.append((f"--tensor-type {rule}", pattern, type_name))
    if overrides.output_tensor_type:  # with tied embeddings llama.cpp gives token_embd the output's type
        output = "output.weight" if "output.weight" in row_lengths else "token_embd.weight"
        asked.append((f"--output-tensor-type {overrides.output_tensor_type}", f"^{re.escape(output)}$",
                      overrides.output_tensor_type))
    if overrides.token_embedding_type:
        asked.append((f"--token-embedding-type {overrides.token_embedding_type}", r"^token_embd\.weight$",
                      overrides.token_embedding_type))
    for option, pattern, type_name in asked:
        try:
            matcher = re.compile(pattern)
        except re.error as exc:
            raise QroarError(f"{option}: the pattern is not a regular expression ({exc})") from None
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name.upper()]][0]
        for name, length in row_lengths.items():
            if matcher.search(name) and length % block:
                raise QroarError(f"{option}: {name} has rows of {length} values, not a multiple of "
                                 f"{type_name.lower()}'s {block}-value blocks; choose a type with 32-value blocks "
                                 "(q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl)")


def _check_tensor_type(name: str, option: str) -> None:
    if name.upper() not in TENSOR_TYPES:
        raise QroarError(f"{option} {name}: not a ggml type; use one of {', '.join(t.lower() for t in TENSOR_TYPES)}")


def quantize_planned(planned: Path, target: Path, qtype: str, threads: int, *, target_ctx: int,
                     imatrix_from: ImatrixRequest | None, overrides: TypeOverrides, quantizer: str,
                     progress: bool) -> None:
    """A conversion's quantize step: where asked, an importance matrix first, on the plan-applied
    unquantized file (windows of ``imatrix_from.ctx``, else of the target context), then
    :func:`quantize_gguf`. Both routes of `convert` end with it."""
    if imatrix_from is not None:
        window = imatrix_from.ctx or target_ctx
        overrides = replace(overrides, imatrix=compute_imatrix(
            planned, imatrix_from.text, ctx=window, chunks=imatrix_from.chunks or default_chunks(window),
            threads=threads, progress=progress))
    quantize_gguf(planned, target, qtype, threads, progress=progress, quantizer=quantizer, overrides=overrides)


def quantize_gguf(source: Path, target: Path, qtype: str, threads: int, progress: bool = True, *,
                  quantizer: str = "libllama", overrides: TypeOverrides = TypeOverrides()) -> None:
    """Write `target` as `source` quantized to `qtype`, with a tensor progress bar.

    `quantizer` "libllama" calls llama_model_quantize through the bindings (in a child process);
    "llama-quantize" runs llama.cpp's program of that name from the tools the set-up built, which
    reaches what the bindings cannot (`overrides`: importance matrices, per-tensor types; giving any
    chooses it). Both run the same libllama, so they write the same bytes."""
    check_quantization(qtype, overrides)
    if qtype in EXPERTS_ONLY or qtype in TERNARY:  # convert checked the checkpoint already; bench has not
        tensors = gguf.GGUFReader(source).tensors
        layer_matrix = next(t for t in tensors if t.name.startswith("blk.") and len(t.shape) >= 2)
        check_type_fits_model(qtype, [t.name for t in tensors],
                              lambda: gguf.quants.dequantize(layer_matrix.data, layer_matrix.tensor_type))
    if overrides:
        quantizer = "llama-quantize"
    if quantizer == "libllama":
        command = [sys.executable, "-m", "qroar_gguf.gguf_io.quantize_child", str(source), str(target),
                   str(FILE_TYPES[qtype]), str(threads)]
        read_line = _child_line
    elif quantizer == "llama-quantize":
        command = [str(find_tool("llama-quantize")), *overrides.tool_args(), str(source), str(target), qtype,
                   str(threads)]
        read_line = _tool_line
    else:
        raise QroarError(f"unknown quantizer {quantizer}; choose one of {', '.join(QUANTIZERS)}")
    log: list[str] = []
    bar = tqdm(desc=f"quantize {qtype}", unit="tensor", disable=not progress, leave=False)

    def on_line(line: str) -> None:
        step = read_line(line.rstrip("\n"), log)
        if step is not None:
            done, total = step
            if bar.total != total:
                bar.reset(total=total)
            bar.n = done
            bar.refresh()

    try:
        status = run_program(command, deque(maxlen=0), on_line)  # kills the child if we are stopped
    finally:
        bar.close()
    if status != 0:
        reason = _failure(status, log)
        if _disk_full(target.parent):  # llama.cpp's stream error does not say why its write failed
            reason += f" (the disk is full: free space in {target.parent} or write the output elsewhere)"
        raise QroarError(f"llama.cpp could not quantize {source.name} to {qtype}: {reason}")


def _child_line(line: str, log: list[str]) -> tuple[int, int] | None:
    """quantize_child's protocol: `progress DONE TOTAL`, `error ...`, `log ...`."""
    kind, _, rest = line.partition(" ")
    if kind == "progress":
        done, total = map(int, rest.split())
        return done, total
    if rest or kind:
        log.append(rest if kind in ("error", "log") else line.strip())
    return None


def _tool_line(line: str, log: list[str]) -> tuple[int, int] | None:
    """llama-quantize's output: `[  12/ 272]  name - [shape], type = ...` per tensor, the rest its log."""
    found = _TOOL_STEP.match(line)
    if found:
        return int(found.group(1)), int(found.group(2))
    if line.strip():
        log.append(line.strip())
    return None


def _failure(status: int, log: list[str]) -> str:
    """The reason in llama.cpp's words where it gave one, else what became of the quantizer."""
    reasons = ([line for line in log if "failed to quantize:" in line]  # libllama's own reason
               or [line for line in log if "failed to quantize" in line or "error" in line.lower()])
    if reasons:
        return reasons[-1].split("failed to quantize:", 1)[-1].strip()
    if status < 0:
        return f"the quantizer crashed (signal {-status}); {log[-1] if log else 'it printed nothing'}"
    return log[-1] if log else f"the quantizer stopped with status {status} and printed nothing"


def _disk_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL
    except OSError:
        return False
