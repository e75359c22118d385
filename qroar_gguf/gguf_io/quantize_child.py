"""The quantizer's own process (started by quantize.py): libllama's llama_model_quantize, reported on stdout.

    python -m qroar_gguf.gguf_io.quantize_child SOURCE TARGET FTYPE THREADS

One line per event: `progress DONE TOTAL` for each tensor, `error TEXT` for llama.cpp's errors,
`log TEXT` for its other messages. Exit status 0 when TARGET is complete, 1 when llama.cpp refused.
"""

from __future__ import annotations

import ctypes
import re
import signal
import sys

import llama_cpp

_PROGRESS_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")
_GGML_LOG_LEVEL_ERROR = 4
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Linux: be killed when the parent dies, even by SIGKILL, so no orphan finishes the file."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the parent still kills us on every way out it sees
        pass


def main(argv: list[str]) -> int:
    source, target, ftype, threads = argv
    # A terminal's Ctrl-C reaches the whole process group: the parent decides, and kills us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = int(threads)

    def emit(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        for line in text.decode("utf-8", "replace").splitlines():
            match = _PROGRESS_LINE.search(line)
            if match:
                emit(f"progress {match.group(1)} {match.group(2)}")
            elif line.strip():
                emit(f"{'error' if level == _GGML_LOG_LEVEL_ERROR else 'log'} {line.strip()}")

    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    status = llama_cpp.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params))
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
