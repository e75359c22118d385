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
import subprocess
import sys
from pathlib import Path

import gguf
from tqdm import tqdm

from qroar_gguf.choices import QTYPES, QUANTIZERS
from qroar_gguf.errors import QroarError
from qroar_gguf.llama_tools import find_tool

#: --qtype name -> llama.cpp's llama_ftype, from gguf-py's table of the same enum.
FTYPES: dict[str, int] = {
    name: gguf.LlamaFileType["ALL_F32" if name == "F32" else f"MOSTLY_{name}"].value for name in QTYPES
}
_TOOL_STEP = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")
_NEARLY_FULL = 16 * 2**20  # bytes free below which a failed write is put down to a full disk


def quantize_gguf(source: Path, target: Path, qtype: str, threads: int, progress: bool = True, *,
                  quantizer: str = "libllama") -> None:
    """Write `target` as `source` quantized to `qtype`, with a tensor progress bar.

    `quantizer` "libllama" calls llama_model_quantize through the bindings (in a child process);
    "llama-quantize" runs llama.cpp's program of that name from the tools the set-up built, which
    reaches what the bindings cannot (importance matrices, per-tensor types). Both run the same
    libllama, so they write the same bytes."""
    if qtype not in FTYPES:
        raise QroarError(f"unknown --qtype {qtype}; choose one of {', '.join(FTYPES)}")
    if quantizer == "libllama":
        command = [sys.executable, "-m", "qroar_gguf.gguf_io.quantize_child", str(source), str(target),
                   str(FTYPES[qtype]), str(threads)]
        read_line = _child_line
    elif quantizer == "llama-quantize":
        command = [str(find_tool("llama-quantize")), str(source), str(target), qtype, str(threads)]
        read_line = _tool_line
    else:
        raise QroarError(f"unknown quantizer {quantizer}; choose one of {', '.join(QUANTIZERS)}")
    log: list[str] = []
    bar = tqdm(desc=f"quantize {qtype}", unit="tensor", disable=not progress, leave=False)
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, errors="replace")
    try:
        for line in child.stdout:
            step = read_line(line.rstrip("\n"), log)
            if step is not None:
                done, total = step
                if bar.total != total:
                    bar.reset(total=total)
                bar.n = done
                bar.refresh()
        status = child.wait()
    finally:
        if child.poll() is None:  # we are being stopped: the child must not finish the file
            child.kill()
            child.wait()
        child.stdout.close()
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
    reasons = [line for line in log if "failed to quantize" in line or "error" in line.lower()]
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
