"""A thin owner of libllama objects (through llama-cpp-python's low-level ctypes API).

Everything the evaluators need and nothing more: load a GGUF, make a context whose RoPE settings
come from the file (so a rope_freqs tensor and the file's rope metadata are what is measured),
tokenize, decode a batch asking for logits only where they are wanted, read those logits as a numpy
view, clear the KV cache. ``Runtime`` is a context manager that frees the context, the batch and
(if it loaded it) the model.

Context parameters we set: n_ctx, n_batch, n_ubatch, threads, flash attention, K/V cache types,
and, only when asked, ``rope_freq_scale``, ``rope_scaling_type`` and ``yarn_orig_ctx`` (llama.cpp's
runtime scaling, as ``--rope-scale``, ``--rope-scaling`` and ``--yarn-orig-ctx`` set it). Every other
RoPE/YaRN field keeps
``llama_context_default_params()``'s "from model" value (rope_freq_base 0, rope_freq_scale 0,
yarn_ext_factor -1, yarn_attn_factor -1, yarn_beta_fast/slow -1, yarn_orig_ctx 0,
rope_scaling_type -1).

Numbers depend on batching: llama.cpp's CPU flash attention takes another kernel for small ubatches
(measured: 32-50 tokens differ from 64-256), and per-token NLLs then move by up to ~0.3-0.6 nats
(PPL by a few tenths of a percent on SmolLM2-135M); flash attention on vs off, or an f16 vs f32 KV
cache, differ about as much. Compare runs only at identical n_ctx/n_batch/n_ubatch/flash
attention (the evaluators decode every chunk with the same batches, so runs at equal settings are
comparable token for token).
"""

from __future__ import annotations

import collections
import ctypes
import os
import sys
import threading
import weakref
from pathlib import Path
from typing import Iterable, Sequence

import gguf
import numpy as np

from qroar_gguf.errors import QroarError

# A libllama built with CUDA crashed (SIGSEGV, on an H200 machine) initialising its tokenizer when numpy,
# imported first, had loaded libstdc++ privately (RTLD_LOCAL) and libllama then bound to that copy; it
# loaded when libllama came first, or with libstdc++ preloaded. So the copy already loaded is made
# global before libllama loads (RTLD_NOLOAD: never load one from another path than libllama would).
try:
    ctypes.CDLL("libstdc++.so.6", mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_GLOBAL)
except OSError:  # none loaded (or none by that name): nothing to promote
    pass

try:
    import llama_cpp as _llama
except ImportError as exc:  # pragma: no cover - the project installs it
    _llama = None
    _IMPORT_ERROR: Exception | None = exc
else:
    _IMPORT_ERROR = None

#: KV cache types accepted by ``Runtime(type_k=..., type_v=...)``: ggml type ids from gguf-py's table.
KV_CACHE_TYPES: dict[str, int] = {
    name: gguf.GGMLQuantizationType[name.upper()].value
    for name in ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")
}
_FLOAT_CACHE_TYPES = {"f32", "f16", "bf16"}
#: ``Runtime(rope_scaling_type=...)``: llama.cpp's enum llama_rope_scaling_type.
ROPE_SCALING_TYPES: dict[str, int] = {"none": 0, "linear": 1, "yarn": 2}

_backend_lock = threading.Lock()
_backend_ready = False
# ctypes callbacks must outlive every call libllama makes through them: keep them at module level.
_LOG_CALLBACKS: dict[bool, object] = {}
_log_verbose: bool | None = None


def _lib():
    if _llama is None:
        raise QroarError(
            f"llama-cpp-python is not importable ({_IMPORT_ERROR}): run tools/setup.sh to install it"
        )
    return _llama


def bindings_version() -> str:
    """llama-cpp-python's version. Code in this process reaches the bindings through this module, so
    that the libstdc++ promotion above happens before libllama loads."""
    return _lib().__version__


def gpu_offload_supported() -> bool:
    """Whether the bindings' libllama was built with a GPU back-end (llama.cpp's llama_supports_gpu_offload)."""
    return bool(_lib().llama_supports_gpu_offload())


def gpu_layers_for(requested: int | None) -> int:
    """The ``n_gpu_layers`` to load with for a `--gpu-layers` given as ``requested`` (None: not given).

    Not given: every layer (-1) where libllama has a GPU back-end, none otherwise. Given on a build without
    one: refused, since the user asked for something this build cannot do (0 is always allowed).
    """
    if requested is None:
        return -1 if gpu_offload_supported() else 0
    if isinstance(requested, bool) or int(requested) < -1:
        raise QroarError(f"--gpu-layers {requested!r}: give a number of layers, or -1 for all of them")
    if requested != 0 and not gpu_offload_supported():
        raise QroarError(f"--gpu-layers {requested}: this llama.cpp build has no GPU back-end; leave --gpu-layers "
                         "out, or rebuild with one (QROAR_CMAKE_ARGS=-DGGML_CUDA=ON bash tools/setup.sh)")
    return int(requested)


def device_summary(n_gpu_layers: int) -> dict:
    """What a measurement ran on, for a results file: whether libllama can offload, the layers asked for,
    and llama.cpp's own description of the back-ends it was built with."""
    lib = _lib()
    info = lib.llama_print_system_info()
    return {"gpu_offload": gpu_offload_supported(), "gpu_layers": int(n_gpu_layers),
            "device": "gpu" if gpu_offload_supported() and n_gpu_layers != 0 else "cpu",
            "system_info": (info.decode("utf-8", errors="replace") if isinstance(info, bytes) else str(info)).strip()}


_GGML_LOG_LEVEL_ERROR = 4
# llama.cpp's latest error lines, kept while its log is silenced: they say why a load failed.
_recent_errors: collections.deque[str] = collections.deque(maxlen=4)
_load_lock = threading.Lock()


def _quiet_log(level, text, user_data):  # pragma: no cover - called from C
    if level == _GGML_LOG_LEVEL_ERROR:
        line = text.decode("utf-8", errors="replace").strip()
        if line:
            _recent_errors.append(line)


def _stderr_log(level, text, user_data):  # pragma: no cover - called from C
    try:
        sys.stderr.write(text.decode("utf-8", errors="replace"))
    except Exception:
        pass


def set_llama_logging(verbose: bool) -> None:
    """Route llama.cpp/ggml logging to stderr (verbose) or nowhere (default). Global to the process."""
    global _log_verbose
    lib = _lib()
    if _log_verbose is verbose:
        return
    cb = _LOG_CALLBACKS.get(verbose)
    if cb is None:
        cb = lib.llama_log_callback(_stderr_log if verbose else _quiet_log)
        _LOG_CALLBACKS[verbose] = cb
    lib.llama_log_set(cb, ctypes.c_void_p(0))
    _log_verbose = verbose


def _ensure_backend(verbose: bool) -> None:
    global _backend_ready
    set_llama_logging(verbose)
    with _backend_lock:
        if not _backend_ready:
            _lib().llama_backend_init()
            _backend_ready = True


class _Closing:
    """`with` support and a best-effort close on garbage collection, for owners of libllama handles."""

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


class GgufModel(_Closing):
    """Weights and vocabulary of one GGUF file (``llama_model``). Close it, or use ``with``."""

    def __init__(self, path: str | Path, *, n_gpu_layers: int = -1, verbose: bool = False):
        lib = _lib()
        self.path = Path(path)
        if not self.path.is_file():
            raise QroarError(f"model file not found: {self.path}")
        _ensure_backend(verbose)
        params = lib.llama_model_default_params()
        params.n_gpu_layers = int(n_gpu_layers)
        with _load_lock:  # the error lines are the process's: one load at a time reads its own
            _recent_errors.clear()
            self._model = lib.llama_model_load_from_file(str(self.path).encode("utf-8"), params)
            reasons = [e for e in _recent_errors if "failed to load model" not in e] or list(_recent_errors)
        if not self._model:
            reason = reasons[0] if reasons else "not a GGUF it supports"
            raise QroarError(f"llama.cpp could not load {self.path}: {reason}")
        self._vocab = lib.llama_model_get_vocab(self._model)
        self._runtimes: "weakref.WeakSet[Runtime]" = weakref.WeakSet()
        self.n_vocab: int = int(lib.llama_vocab_n_tokens(self._vocab))
        self.n_ctx_train: int = int(lib.llama_model_n_ctx_train(self._model))
        self.add_bos: bool = bool(lib.llama_vocab_get_add_bos(self._vocab))
        self.bos: int = int(lib.llama_vocab_bos(self._vocab))
        self.eos: int = int(lib.llama_vocab_eos(self._vocab))

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def handle(self):
        if not self._model:
            raise QroarError("model already closed")
        return self._model

    def close(self) -> None:
        """Free the model, after any context still open on it (a context must not outlive its model)."""
        model = getattr(self, "_model", None)
        if model:
            self._model = None
            for rt in list(getattr(self, "_runtimes", ())):
                rt.close()
            _lib().llama_model_free(model)
            self._vocab = None

    # -- vocabulary ------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> np.ndarray:
        """Tokenize a whole text (int32 array). ``add_special`` adds BOS only if the vocab asks for it."""
        lib = _lib()
        self.handle  # raises if closed
        data = text.encode("utf-8")
        cap = len(data) + 16
        while True:
            buf = (lib.llama_token * cap)()
            n = lib.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
            if n >= 0:
                return np.ctypeslib.as_array(buf)[:n].astype(np.int32, copy=True)
            if -n <= cap:  # pragma: no cover - a negative count that fits means a real failure
                raise QroarError("llama.cpp failed to tokenize the text")
            cap = -n

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        lib = _lib()
        buf = ctypes.create_string_buffer(64)
        n = lib.llama_token_to_piece(self._vocab, int(token), buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lib.llama_token_to_piece(self._vocab, int(token), buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Iterable[int], *, special: bool = False) -> str:
        return b"".join(self.token_to_piece(t, special=special) for t in tokens).decode(
            "utf-8", errors="replace"
        )

    def is_eog(self, token: int) -> bool:
        return bool(_lib().llama_vocab_is_eog(self._vocab, int(token)))


class Runtime(_Closing):
    """One libllama context on a model, plus a reusable batch.

    ``model`` is a path (the runtime loads and owns the model) or an open ``GgufModel`` (shared; the
    caller closes it). ``rope_freq_scale`` is llama.cpp's runtime linear factor on the frequencies
    (0.5 = positions compressed 2x, what ``--rope-scale 2`` does); leave it None to use the file's.
    ``rope_scaling_type`` ("none", "linear", "yarn") and ``yarn_orig_ctx`` likewise override the file's
    (``rope_scaling_type="yarn"`` with ``rope_freq_scale=0.5`` is llama.cpp's own YaRN at 2x).
    """

    def __init__(
        self,
        model: str | Path | GgufModel,
        *,
        n_ctx: int,
        n_batch: int = 2048,
        n_ubatch: int = 512,
        threads: int = 2,
        flash_attn: bool = True,
        type_k: str = "f16",
        type_v: str = "f16",
        rope_freq_scale: float | None = None,
        rope_scaling_type: str | None = None,
        yarn_orig_ctx: int | None = None,
        n_gpu_layers: int = -1,
        verbose: bool = False,
    ):
        lib = _lib()
        if n_ctx < 8:
            raise QroarError(f"--ctx {n_ctx} is too small: use at least 8")
        for name, t in (("type_k", type_k), ("type_v", type_v)):
            if t not in KV_CACHE_TYPES:
                raise QroarError(f"{name} {t!r} unknown: use one of {', '.join(KV_CACHE_TYPES)}")
        if type_v not in _FLOAT_CACHE_TYPES and not flash_attn:
            raise QroarError(f"a quantized V cache ({type_v}) needs flash attention: turn it on or use f16")
        if rope_freq_scale is not None and not rope_freq_scale > 0:
            raise QroarError(f"rope_freq_scale must be > 0 (got {rope_freq_scale})")
        if rope_scaling_type is not None and rope_scaling_type not in ROPE_SCALING_TYPES:
            raise QroarError(f"rope_scaling_type {rope_scaling_type!r} unknown: use one of "
                             f"{', '.join(ROPE_SCALING_TYPES)}")
        if yarn_orig_ctx is not None and not yarn_orig_ctx > 0:
            raise QroarError(f"yarn_orig_ctx must be > 0 (got {yarn_orig_ctx})")

        self._cached = np.empty(0, dtype=np.int32)  # tokens the KV cache holds, as far as prefill knows
        self._own_model = not isinstance(model, GgufModel)
        self.model: GgufModel = GgufModel(model, n_gpu_layers=n_gpu_layers, verbose=verbose) if self._own_model else model  # type: ignore[arg-type]
        self._ctx = None
        self._batch = None
        try:
            n_batch = max(1, min(int(n_batch), int(n_ctx)))
            n_ubatch = max(1, min(int(n_ubatch), n_batch))
            p = lib.llama_context_default_params()
            p.n_ctx = int(n_ctx)
            p.n_batch = n_batch
            p.n_ubatch = n_ubatch
            p.n_seq_max = 1
            p.n_outputs_max = 0  # = n_batch
            p.n_outputs_max_per_seq = 0  # = n_outputs_max: every scored position of a batch
            p.n_threads = int(threads)
            p.n_threads_batch = int(threads)
            p.flash_attn_type = (
                lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
            p.type_k = KV_CACHE_TYPES[type_k]
            p.type_v = KV_CACHE_TYPES[type_v]
            p.no_perf = True
            if rope_freq_scale is not None:
                p.rope_freq_scale = float(rope_freq_scale)
            if rope_scaling_type is not None:
                p.rope_scaling_type = ROPE_SCALING_TYPES[rope_scaling_type]
            if yarn_orig_ctx is not None:
                p.yarn_orig_ctx = int(yarn_orig_ctx)
            self.params = p
            self._ctx = lib.llama_init_from_model(self.model.handle, p)
            if not self._ctx:
                raise QroarError(
                    f"llama.cpp could not create a context (ctx {n_ctx}, cache {type_k}/{type_v}, "
                    f"flash attention {'on' if flash_attn else 'off'}): try a smaller --ctx or f16 cache"
                )
            if int(lib.llama_n_ctx(self._ctx)) < n_ctx:
                raise QroarError(f"llama.cpp gave a context of {lib.llama_n_ctx(self._ctx)} tokens, not {n_ctx}")
            self.model._runtimes.add(self)
            self._mem = lib.llama_get_memory(self._ctx)
            self._batch = lib.llama_batch_init(n_batch, 0, 1)
            self._batch_tokens = np.ctypeslib.as_array(self._batch.token, shape=(n_batch,))
            self._batch_pos = np.ctypeslib.as_array(self._batch.pos, shape=(n_batch,))
            self._batch_nseq = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(n_batch,))
            self._batch_logits = np.ctypeslib.as_array(self._batch.logits, shape=(n_batch,))
            for i in range(n_batch):
                self._batch.seq_id[i][0] = 0
            self._batch_nseq[:] = 1
        except BaseException:
            self.close()
            raise
        self.n_ctx = int(n_ctx)
        self.n_batch = n_batch
        self.n_ubatch = n_ubatch
        self.threads = int(threads)
        self.flash_attn = bool(flash_attn)
        self.type_k = type_k
        self.type_v = type_v
        self.rope_freq_scale = rope_freq_scale
        self.rope_scaling_type = rope_scaling_type
        self.yarn_orig_ctx = yarn_orig_ctx
        self.n_vocab = self.model.n_vocab
        self._n_outputs = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        lib = _llama
        if getattr(self, "_batch", None) is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            lib.llama_free(self._ctx)
            self._ctx = None
        self._cached = np.empty(0, dtype=np.int32)
        model = getattr(self, "model", None)
        if model is not None:
            model._runtimes.discard(self)
            if getattr(self, "_own_model", False):
                self._own_model = False
                model.close()

    # -- conveniences ----------------------------------------------------------------------------
    @property
    def add_bos(self) -> bool:
        return self.model.add_bos

    @property
    def bos(self) -> int:
        return self.model.bos

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> np.ndarray:
        return self.model.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: Iterable[int]) -> str:
        return self.model.detokenize(tokens)

    # -- evaluation ------------------------------------------------------------------------------
    def clear(self) -> None:
        """Empty the KV cache (start a new sequence at position 0)."""
        _llama.llama_memory_clear(self._mem, True)
        self._cached = np.empty(0, dtype=np.int32)

    def prefill(self, tokens: np.ndarray, *, reuse: bool = True) -> int:
        """Put ``tokens`` in the KV cache and leave the last one's logits in ``logits()[-1]``.

        With ``reuse``, the longest common prefix with what the cache already holds (from earlier
        ``prefill``/``append`` calls) is kept and only the rest is decoded. Returns the tokens decoded.
        """
        tokens = np.asarray(tokens, dtype=np.int32)
        n = len(tokens)
        if n == 0:
            raise ValueError("nothing to prefill")
        if n > self.n_ctx:
            raise QroarError(f"a prompt of {n} tokens exceeds --ctx {self.n_ctx}")
        keep = 0
        if reuse and len(self._cached):
            m = min(len(self._cached), n - 1)  # at least one token decoded, for its logits
            diff = np.nonzero(self._cached[:m] != tokens[:m])[0]
            keep = int(diff[0]) if len(diff) else m
        if keep == 0 or not _llama.llama_memory_seq_rm(self._mem, 0, keep, -1):
            self.clear()
            keep = 0
        self._cached = self._cached[:keep]
        for b0 in range(keep, n, self.n_batch):
            b1 = min(b0 + self.n_batch, n)
            self.decode(tokens[b0:b1], b0, None if b1 == n else slice(0, 0))
        self._cached = tokens.copy()
        return n - keep

    def append(self, token: int) -> None:
        """Decode one more token after the cached ones (logits in ``logits()[-1]``)."""
        pos = len(self._cached)
        self.decode(np.array([token], dtype=np.int32), pos, None)
        self._cached = np.append(self._cached, np.int32(token))

    def remove(self, p0: int, p1: int) -> None:
        """Drop the cached tokens at positions [p0, p1) (``llama_memory_seq_rm``; p1 < 0: to the end)."""
        if not _llama.llama_memory_seq_rm(self._mem, 0, int(p0), int(p1)):
            raise QroarError(f"llama.cpp could not remove positions {p0}..{p1 - 1} from the cache")
        self._cached = np.empty(0, dtype=np.int32)  # prefill may no longer assume position = index

    def shift(self, p0: int, p1: int, delta: int) -> None:
        """Move the cached tokens at positions [p0, p1) (p1 < 0: to the end) by ``delta``
        (``llama_memory_seq_add``, what a context shift does). llama.cpp re-ropes their keys (the
        K-shift) at the next decode."""
        _llama.llama_memory_seq_add(self._mem, 0, int(p0), int(p1), int(delta))
        self._cached = np.empty(0, dtype=np.int32)

    def sequence_state(self) -> np.ndarray:
        """The cache's state of sequence 0 as ``llama_state_seq_get_data`` writes it (the cells'
        positions, then each layer's K rows, then V), as bytes in a uint8 array."""
        size = int(_llama.llama_state_seq_get_size(self._ctx, 0))
        buf = np.empty(size, dtype=np.uint8)
        written = int(_llama.llama_state_seq_get_data(self._ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                                      size, 0))
        if written == 0:
            raise QroarError("llama.cpp could not write the sequence's state")
        return buf[:written]

    def set_sequence_state(self, state: np.ndarray) -> None:
        """Replace sequence 0's cache by ``state`` (``llama_state_seq_set_data``; the format
        ``sequence_state`` returns)."""
        state = np.ascontiguousarray(state, dtype=np.uint8)
        read = _llama.llama_state_seq_set_data(self._ctx, state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                               len(state), 0)
        if int(read) == 0:
            raise QroarError("llama.cpp could not load the sequence's state")
        self._cached = np.empty(0, dtype=np.int32)

    def decode(self, tokens: Sequence[int] | np.ndarray, pos0: int, outputs: slice | Sequence[bool] | np.ndarray | None = None) -> int:
        """Decode ``tokens`` at positions ``pos0 ..`` of sequence 0; logits only where ``outputs`` says.

        ``outputs``: a slice of batch indices (e.g. ``slice(128, 255)``), a boolean mask of the batch's
        length, or None for the last token only. Returns the number of output rows; read them with
        ``logits()`` before the next decode.
        """
        if not self._ctx:
            raise QroarError("this runtime is closed")
        n = len(tokens)
        if not 0 < n <= self.n_batch:
            raise ValueError(f"batch of {n} tokens (n_batch {self.n_batch})")
        if pos0 + n > self.n_ctx:
            raise ValueError(f"positions {pos0}..{pos0 + n - 1} exceed the context of {self.n_ctx}")
        self._batch_tokens[:n] = tokens
        self._batch_pos[:n] = np.arange(pos0, pos0 + n, dtype=np.int32)
        flags = self._batch_logits[:n]
        flags[:] = 0
        if outputs is None:
            flags[n - 1] = 1
        elif isinstance(outputs, slice):
            flags[outputs] = 1
        else:
            flags[:] = np.asarray(outputs, dtype=bool)
        self._batch.n_tokens = n
        self._cached = self._cached[:pos0]  # positions from pos0 on are rewritten (prefill/append re-set it)
        rc = _llama.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise QroarError(f"llama_decode failed (code {rc}) on {n} tokens at position {pos0}")
        self._n_outputs = int(flags.sum())
        return self._n_outputs

    def logits(self) -> np.ndarray:
        """The last decode's output rows, shape (n_outputs, n_vocab) float32, in batch order.

        A view into libllama's buffer: valid until the next decode; copy it to keep it.
        """
        if self._n_outputs == 0:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        ptr = _llama.llama_get_logits(self._ctx)
        if not ptr:
            raise QroarError("llama.cpp returned no logits")
        return np.ctypeslib.as_array(ptr, shape=(self._n_outputs, self.n_vocab))

    def logits_ith(self, i: int) -> np.ndarray:
        """Logits of batch index ``i`` of the last decode (a view, like ``logits()``)."""
        ptr = _llama.llama_get_logits_ith(self._ctx, int(i))
        if not ptr:
            raise QroarError(f"no logits for batch index {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def describe(self) -> dict:
        """Settings worth recording next to a measurement."""
        settings = {
            "model": str(self.model.path),
            "n_ctx": self.n_ctx,
            "n_batch": self.n_batch,
            "n_ubatch": self.n_ubatch,
            "threads": self.threads,
            "flash_attn": self.flash_attn,
            "type_k": self.type_k,
            "type_v": self.type_v,
            "rope_freq_scale": self.rope_freq_scale,
        }
        # only when set: records made without them keep their exact form
        for name in ("rope_scaling_type", "yarn_orig_ctx"):
            if getattr(self, name) is not None:
                settings[name] = getattr(self, name)
        return settings
