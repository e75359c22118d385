"""`qroar-gguf bench`: every plan x quantization x context on the same chunks, in one run, cached.

For each (plan, ctx) the unquantized F16 GGUF is built once and is the KL reference of that plan's
quantized files (so KLD isolates what quantization costs under that plan). Each quantized file is
evaluated in lockstep with its reference on the same chunks, which yields both perplexities, the KL
divergence and per-token NLLs for paired comparisons between plans. Built files and finished
evaluations are cached under OUT/models and OUT/runs, keyed by everything that determines them, so a
rerun (or an interrupted run) redoes nothing already measured.

The importance-matrix axis (`imatrix`) quantizes each file without a matrix, with one from short
windows of a calibration text, or with one from windows of the file's target context, each computed
on that plan's F16 file (the KL reference too) from the same number of calibration tokens, so that
only the window differs; each matrix row is paired with the same plan's row without one.

The attn_q/attn_k axis (`attn_types`) quantizes those two tensors at another ggml type (llama-quantize
--tensor-type) and pairs each such row with the same file at its type's own choice. Evaluations run
through the Python bindings, or (`evaluator="llama-perplexity"`) through llama.cpp's own program:
its KLD against the reference's saved log-probabilities, the NLLs read back from files it saves.
`workers` evaluations run at a time (threads; each built file is built once, under its own lock), and
none starts after `deadline` seconds: those are listed under `skipped`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import gguf
import numpy as np

from qroar_gguf import __version__
from qroar_gguf.arch.families import checkpoint_hparams
from qroar_gguf.choices import (
    BENCH_EVALUATORS,
    DEFAULT_IMATRIX_TOKENS,
    FILE_TYPES,
    IMATRIX_AXIS,
    IMATRIX_SHORT_WINDOW,
    NEEDS_IMATRIX,
    UNQUANTIZED,
)
from qroar_gguf.convert import ConvertOptions, convert
from qroar_gguf.digests import sha256_file
from qroar_gguf.errors import QroarError
from qroar_gguf.evaluate.kld import kl_divergence
from qroar_gguf.evaluate.paired import paired_compare
from qroar_gguf.evaluate.passkey import DEFAULT_DEPTHS, passkey
from qroar_gguf.evaluate.perplexity import n_scored_per_chunk, ppl_standard_error
from qroar_gguf.evaluate.perplexity_tool import kl_divergence_summary, save_logits, saved_nll
from qroar_gguf.evaluate.runtime import Runtime, device_summary, gpu_layers_for
from qroar_gguf.gguf_io.imatrix import TextTooShort, compute_imatrix, default_chunks, tools_identity
from qroar_gguf.gguf_io.quantize import TENSOR_TYPES, TypeOverrides, quantize_gguf
from qroar_gguf.gguf_io.reader import field_value
from qroar_gguf.llama_tools import find_tool
from qroar_gguf.outputs import publish_text, temporary_beside
from qroar_gguf.paths import cache_dir
from qroar_gguf.rope.spec import PlanSpec
from qroar_gguf.source.text import read_text

REFERENCE_QTYPE = "F16"
#: The attn_q/attn_k axis's value for "the type the file type chooses" (no --tensor-type).
DEFAULT_ATTN = "default"


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _source_fingerprint(model: Path) -> list:
    files = sorted(p for p in (model.iterdir() if model.is_dir() else [model]) if p.is_file())
    return [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files]


class Bench:
    def __init__(self, model: Path, text: Path, out: Path, threads: int, progress: bool, chunks: int,
                 passkey_trials: int, passkey_depths: tuple[float, ...] | None = None,
                 imatrix_text: Path | None = None, imatrix_tokens: int = DEFAULT_IMATRIX_TOKENS,
                 evaluator: str = "bindings", gpu_layers: int = -1):
        self.text = read_text(text)  # before any folder is made: a bad text leaves nothing behind
        self.text_digest = _digest(self.text)
        self.imatrix_text, self.imatrix_tokens, self.imatrix_digest = imatrix_text, imatrix_tokens, None
        if imatrix_text is not None:
            self.imatrix_digest = _digest(read_text(imatrix_text))
            if self.imatrix_digest == self.text_digest:
                # A matrix fitted to the very tokens that are then scored flatters every quantized file.
                raise QroarError(f"--imatrix-text {imatrix_text} has the same content as --text {text}: calibrate "
                                 "on a different text than the one you evaluate on")
        self.model, self.text_path, self.out = model, text, out
        self.threads, self.progress, self.chunks = threads, progress, chunks
        self.evaluator, self.gpu_layers = evaluator, gpu_layers
        self._locks: dict[Path, threading.Lock] = {}
        self.matrices: list[dict] = []  # each matrix a row used: its window and what computing it took
        self._locks_guard = threading.Lock()
        self.passkey_trials = passkey_trials
        self.passkey_depths = tuple(float(d) for d in (passkey_depths or DEFAULT_DEPTHS))
        self.runs, self.shared = out / "runs", cache_dir() / "bench-runs"
        self.shared.mkdir(parents=True, exist_ok=True)
        self.source = _source_fingerprint(model if model.is_dir() else model.parent)
        (out / "models").mkdir(parents=True, exist_ok=True)
        self.runs.mkdir(parents=True, exist_ok=True)

    # -- importance matrices -------------------------------------------------------------------
    def imatrix_window(self, kind: str, built_for: int) -> tuple[int, int] | None:
        """(window, chunks) of the matrix `kind` for a file built for `built_for` (None: no matrix). Both
        kinds take the same calibration tokens, so that a difference between them is the window's."""
        if kind == "none":
            return None
        window = IMATRIX_SHORT_WINDOW if kind == "short" else built_for
        return window, default_chunks(window, self.imatrix_tokens)

    def imatrix_record(self, kind: str, built_for: int) -> dict:
        """What a row records of its matrix."""
        window = self.imatrix_window(kind, built_for)
        if window is None:
            return {"imatrix": "none"}
        return {"imatrix": kind, "imatrix_ctx": window[0], "imatrix_chunks": window[1]}

    def matrix(self, spec: PlanSpec, kind: str, built_for: int) -> Path:
        """The matrix `kind` (short or target) of the plan's F16 file built for `built_for`, as the rows
        use it (what computing it took is recorded in `matrices`)."""
        return self._matrix(spec, self.build(spec, built_for, REFERENCE_QTYPE), kind,
                            *self.imatrix_window(kind, built_for))

    def _matrix(self, spec: PlanSpec, reference: Path, kind: str, window: int, chunks: int) -> Path:
        """The matrix computed on the plan's F16 file (cached by compute_imatrix)."""
        started, start = time.time(), time.monotonic()
        try:
            # (one worker computes a matrix that several rows need; compute_imatrix refuses a second at once)
            with self._lock(reference.with_name(f"{reference.name}.imatrix-{window}x{chunks}")):
                matrix = compute_imatrix(reference, self.imatrix_text, ctx=window, chunks=chunks,
                                         threads=self.threads, progress=self.progress)
        except TextTooShort as exc:
            raise QroarError(f"--imatrix-text {self.imatrix_text} is too short for the {kind} matrix of "
                             f"{spec.label} ({window}-token windows): llama-imatrix needs at least {exc.needed} "
                             "tokens; give a longer calibration text") from None
        # llama-imatrix quietly takes fewer windows when the text runs out; the comparison of short and
        # target holds only when both saw the tokens asked for.
        got = field_value(gguf.GGUFReader(matrix), "imatrix.chunk_count")
        if got is not None and got < chunks:
            raise QroarError(f"--imatrix-text {self.imatrix_text} holds only {got} window(s) of {window} tokens, but "
                             f"the {kind} matrix of --imatrix-tokens {self.imatrix_tokens} needs {chunks}: give a "
                             "longer calibration text or a smaller --imatrix-tokens")
        record = {"plan": spec.label, "imatrix": kind, "ctx": window, "chunks": chunks}
        with self._locks_guard:  # once per matrix, by the first row that needed it (seconds None: cached)
            if not any(m.items() >= record.items() for m in self.matrices):
                cached = matrix.stat().st_mtime < started
                self.matrices.append({**record, "seconds": None if cached else round(time.monotonic() - start, 1)})
        return matrix

    def _lock(self, path: Path) -> threading.Lock:
        """One lock per file a worker builds, so that two workers needing it build it once."""
        with self._locks_guard:
            return self._locks.setdefault(path, threading.Lock())

    # -- building ------------------------------------------------------------------------------
    def build(self, spec: PlanSpec, ctx: int, qtype: str, imatrix: str = "none", attn_type: str | None = None) -> Path:
        """The GGUF of one plan at one context and quantization, with importance matrix `imatrix`
        (none, short or target) and attn_q/attn_k at `attn_type` (None: the file type's choice), built once."""
        parts: list = [__version__, self.source, spec.method, spec.record(), ctx, qtype]
        window = self.imatrix_window(imatrix, ctx)
        if window is not None:
            if qtype in UNQUANTIZED:
                raise QroarError(f"--qtype {qtype} is not quantized: it takes no importance matrix")
            # The matrix is determined by the F16 file (the parts above but qtype), the calibration
            # text, the window and the llama.cpp that computes it.
            parts.append({"imatrix": imatrix, "window": window[0], "chunks": window[1], "text": self.imatrix_digest,
                          "tools": tools_identity()})
        if attn_type is not None:
            if qtype in UNQUANTIZED:
                raise QroarError(f"--qtype {qtype} is not quantized: it takes no attn_q/attn_k type")
            parts.append({"attn_type": attn_type})
        path = self.out / "models" / f"{_stem(spec, ctx, qtype, imatrix, attn_type)}.{_digest(*parts)}.gguf"
        with self._lock(path):
            if path.is_file():
                return path
            if qtype == REFERENCE_QTYPE:
                convert(self.model, path, ConvertOptions(plan=spec, target_ctx=ctx, qtype=qtype, threads=self.threads,
                                                         progress=self.progress))
            else:
                reference = self.build(spec, ctx, REFERENCE_QTYPE)
                matrix = None if window is None else self._matrix(spec, reference, imatrix, *window)
                overrides = TypeOverrides(imatrix=matrix, tensor_types=_attn_rules(attn_type))
                with temporary_beside(path, "partial") as partial:
                    quantize_gguf(reference, partial, qtype, self.threads, progress=self.progress,
                                  overrides=overrides)
                    partial.replace(path)
        return path

    # -- measuring -----------------------------------------------------------------------------
    def evaluate(self, spec: PlanSpec, ctx: int, qtype: str, built_for: int, type_k: str = "f16",
                 imatrix: str = "none", attn_type: str | None = None) -> dict:
        """PPL, KLD against the same plan's F16 file, per-token NLLs at `ctx` with key cache `type_k`
        (both models), of the files built for target context `built_for` (the quantized one with
        importance matrix `imatrix` and attn_q/attn_k at `attn_type`), and passkey retrieval when asked;
        each part cached on its own."""
        quant = self.build(spec, built_for, qtype, imatrix, attn_type)
        reference = self.build(spec, built_for, REFERENCE_QTYPE)
        quant_digest = sha256_file(quant)[:16]
        matrix = self.imatrix_record(imatrix, built_for)
        # (the trailing 0 keeps keys of evaluations recorded before passkey had its own record; rows
        # without a matrix keep the keys they had before the imatrix axis)
        parts = [quant_digest, sha256_file(reference)[:16], ctx, self.chunks, self.text_digest, type_k, 0]
        if imatrix != "none":
            parts.append({**matrix, "text": self.imatrix_digest})
        # (rows of the attn axis and of llama-perplexity are keyed apart; the others keep their keys)
        extra = {"attn_type": attn_type} if attn_type is not None else {}
        if attn_type is not None:
            parts.append({"attn_type": attn_type})
        if self.evaluator != "bindings":
            parts.append({"evaluator": self.evaluator})
            extra["evaluator"] = self.evaluator
        name = f"{_stem(spec, ctx, qtype, imatrix, attn_type)}.{_digest(*parts)}.json"
        row = self._cached(name, ".nll.npy")
        if row is None:
            if self.evaluator == "bindings":
                measured, nll = self._measure(spec, ctx, qtype, type_k, quant, reference, imatrix)
            else:
                measured, nll = self._measure_with_tool(ctx, type_k, quant, reference)
            row = {"plan": spec.label, "method": spec.method, "options": spec.record(), "ctx": ctx,
                   "built_for_ctx": built_for, "qtype": qtype, "type_k": type_k, **matrix, **extra,
                   "file": quant.name, **measured}
            self._store(name, row, (".nll.npy", nll))
        row.update(matrix)  # records made before the imatrix axis lack it
        # A record from the shared cache names the file another bench directory built (the same bytes).
        row["file"], row["run"] = quant.name, name
        if self.passkey_trials:
            row.update(self._passkey(spec, ctx, qtype, type_k, quant, quant_digest, imatrix, attn_type))
        return row

    def _measure(self, spec, ctx, qtype, type_k, quant: Path, reference: Path,
                 imatrix: str = "none") -> tuple[dict, np.ndarray]:
        with Runtime(reference, n_ctx=ctx, threads=self.threads, type_k=type_k, n_gpu_layers=self.gpu_layers) as ref, \
                Runtime(quant, n_ctx=ctx, threads=self.threads, type_k=type_k, n_gpu_layers=self.gpu_layers) as rt:
            res = kl_divergence(rt, ref, self.text, max_chunks=self.chunks, quiet=not self.progress,
                                desc=f"{spec.label} {qtype}{_imatrix_suffix(imatrix)} @ {ctx}")
        measured = dict(ppl=res.ppl, ppl_se=ppl_standard_error(res.nll), ref_ppl=res.ref_ppl,
                        ref_ppl_se=ppl_standard_error(res.ref_nll), kld_mean=res.mean, kld_se=res.mean_se,
                        kld_median=res.median, kld_p99=res.p99, same_top_pct=res.same_top_pct, n_chunks=res.n_chunks,
                        n_scored=res.n_scored, seconds=res.seconds)
        return measured, np.stack([res.nll, res.ref_nll])

    def _measure_with_tool(self, ctx: int, type_k: str, quant: Path, reference: Path) -> tuple[dict, np.ndarray]:
        """The same measurement by llama-perplexity: its PPLs and KLD against the reference's saved
        log-probabilities; the per-token NLLs (for the paired ratios) read back from the log-probabilities
        each file saves, which hold 16-bit steps above a floor 16 nats below the top token (a token
        further down reads as that floor)."""
        start = time.perf_counter()
        base, (ref_ppl, ref_ppl_se), ref_nll = self._reference_logits(ctx, type_k, reference)
        settings = dict(ctx=ctx, chunks=self.chunks, threads=self.threads, type_k=type_k, gpu_layers=self.gpu_layers)
        summary = kl_divergence_summary(quant, base, **settings)
        with temporary_beside(self.runs / f"{quant.stem}.logits", "logits") as own:
            _, nll = save_logits(quant, self.text_path, own, **settings)
        if nll.size != ref_nll.size:
            raise QroarError(f"llama-perplexity scored {nll.size} tokens of {quant.name} and {ref_nll.size} of its "
                             "reference: they tokenize the text differently")
        measured = dict(**summary, ref_ppl=ref_ppl, ref_ppl_se=ref_ppl_se, n_chunks=nll.size // n_scored_per_chunk(ctx), n_scored=int(nll.size),
                        seconds=time.perf_counter() - start)
        return measured, np.stack([nll, ref_nll])

    def _reference_logits(self, ctx: int, type_k: str, reference: Path) -> tuple[Path, list[float], np.ndarray]:
        """The reference's log-probabilities on the evaluated windows, saved by llama-perplexity once per
        (file, ctx, chunks, text, key cache); its PPL and error as that run printed them; its NLLs."""
        path = reference.with_name(f"{reference.stem}.{_digest(ctx, self.chunks, self.text_digest, type_k)}.logits")
        estimate = path.with_suffix(".ppl.json")
        with self._lock(path):
            if not path.is_file():
                with temporary_beside(path, "partial") as partial:
                    ppl, _ = save_logits(reference, self.text_path, partial, ctx=ctx, chunks=self.chunks,
                                         threads=self.threads, type_k=type_k, gpu_layers=self.gpu_layers)
                    publish_text(estimate, json.dumps(ppl))  # before the file whose presence marks both done
                    partial.replace(path)
        return path, json.loads(estimate.read_text()), saved_nll(path)

    def _passkey(self, spec, ctx, qtype, type_k, quant: Path, quant_digest: str, imatrix: str = "none",
                 attn_type: str | None = None) -> dict:
        key = _digest(quant_digest, ctx, type_k, self.passkey_trials, self.passkey_depths)
        name = f"{_stem(spec, ctx, qtype, imatrix, attn_type)}.passkey.{key}.json"
        record = self._cached(name)
        if record is None:
            with Runtime(quant, n_ctx=ctx, threads=self.threads, type_k=type_k, n_gpu_layers=self.gpu_layers) as rt:
                pk = passkey(rt, trials=self.passkey_trials, depths=self.passkey_depths, quiet=not self.progress,
                             desc=f"passkey {spec.label} @ {ctx}")
            record = {"passkey": pk.accuracy, "passkey_by_depth": pk.to_dict()["by_depth"],
                      "passkey_trials": self.passkey_trials}
            self._store(name, record)
        return {k: record[k] for k in ("passkey", "passkey_by_depth", "passkey_trials") if k in record}

    # Finished measurements live in OUT/runs and, keyed by the same digests of the files and inputs, in
    # a cache shared by every bench directory, so a new comparison (a passkey table, another plan set)
    # reuses what any earlier bench measured on identical files.
    def _cached(self, name: str, array_suffix: str | None = None) -> dict | None:
        for runs in (self.runs, self.shared):
            record = runs / name
            arrays = record.with_suffix(array_suffix) if array_suffix else None
            if record.is_file() and (arrays is None or arrays.is_file()):
                if runs is self.shared:
                    self._copy_local(record, arrays)
                return json.loads(record.read_text())
        return None

    def _copy_local(self, record: Path, arrays: Path | None) -> None:
        for path in filter(None, (arrays, record)):  # the record last: it marks the entry complete
            shutil.copyfile(path, self.runs / path.name)

    def _store(self, name: str, record: dict, arrays: tuple[str, np.ndarray] | None = None) -> None:
        for runs in (self.runs, self.shared):
            path = runs / name
            if arrays is not None:
                target = path.with_suffix(arrays[0])
                with temporary_beside(target, "tmp") as tmp:
                    with open(tmp, "wb") as fh:
                        np.save(fh, arrays[1])
                    os.replace(tmp, target)
            publish_text(path, json.dumps(record, indent=2))

    def nll(self, row: dict, reference: bool = False) -> np.ndarray:
        """Per-token NLLs of the evaluation behind `row` (the reference's with `reference`)."""
        return np.load((self.runs / row["run"]).with_suffix(".nll.npy"))[1 if reference else 0]


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_=" else "_" for c in label)


def _stem(spec: PlanSpec, ctx: int, qtype: str, imatrix: str, attn_type: str | None = None) -> str:
    """The start of a built file's or a record's name (files without a matrix or attn type keep their names)."""
    return (f"{_safe(spec.label)}.{ctx}.{qtype}" + ("" if imatrix == "none" else f".imatrix-{imatrix}")
            + ("" if attn_type is None else f".attn-{attn_type}"))


def _imatrix_suffix(imatrix: str) -> str:
    return "" if imatrix == "none" else f" imatrix {imatrix}"


def _attn_suffix(attn_type: str | None) -> str:
    return "" if attn_type is None else f" attn {attn_type}"


def _attn_rules(attn_type: str | None) -> tuple[str, ...]:
    """llama-quantize's --tensor-type rules that put attn_q and attn_k at `attn_type`."""
    return () if attn_type is None else (f"attn_q={attn_type}", f"attn_k={attn_type}")


def _check_qtypes(qtypes: list[str]) -> None:
    """Refused before building anything (plans and their options are checked as they are parsed)."""
    unknown = [q for q in qtypes if q not in FILE_TYPES]
    if unknown:
        raise QroarError(f"unknown --qtype {unknown[0]}; choose one of {', '.join(FILE_TYPES)}")


def _check_imatrix(imatrixes: list[str], qtypes: list[str], text: Path | None, tokens: int | None) -> None:
    """Refused before building anything, as the options a user would change."""
    unknown = [m for m in imatrixes if m not in IMATRIX_AXIS]
    if unknown:
        raise QroarError(f"unknown --imatrix {unknown[0]}; choose from {', '.join(IMATRIX_AXIS)}")
    matrices = [m for m in imatrixes if m != "none"]
    if matrices and text is None:
        raise QroarError(f"--imatrix {matrices[0]} needs --imatrix-text FILE: a calibration text other than --text")
    if not matrices and (text is not None or tokens is not None):
        raise QroarError("--imatrix-text and --imatrix-tokens apply to importance matrices only: add short or "
                         "target to --imatrix, e.g. --imatrix none short")
    if tokens is not None and tokens < IMATRIX_SHORT_WINDOW:
        raise QroarError(f"--imatrix-tokens {tokens} is less than one {IMATRIX_SHORT_WINDOW}-token window of a short "
                         f"matrix: give at least {IMATRIX_SHORT_WINDOW}")
    needy = [q for q in qtypes if q in NEEDS_IMATRIX]
    if needy and "none" in imatrixes:
        raise QroarError(f"--qtype {needy[0]} cannot be built without an importance matrix: leave none out of "
                         "--imatrix (e.g. --imatrix short target), and bench the other types in a run of their own")
    if matrices:  # before minutes of building: one line if the tools are not built
        find_tool("llama-imatrix")
        find_tool("llama-quantize")


def _check_attn(attn_types: list[str], qtypes: list[str]) -> None:
    """Refused before building anything: a type llama-quantize does not know."""
    asked = [t for t in attn_types if t != DEFAULT_ATTN]
    unknown = [t for t in asked if t.upper() not in TENSOR_TYPES]
    if unknown:
        raise QroarError(f"--attn-type {unknown[0]}: not a ggml type; use {DEFAULT_ATTN} or one of "
                         f"{', '.join(t.lower() for t in TENSOR_TYPES)}")
    if asked and all(q in UNQUANTIZED for q in qtypes):
        raise QroarError(f"--attn-type {asked[0]} applies to quantized types only: add one to --qtype")
    if asked:
        find_tool("llama-quantize")


def _check_evaluator(evaluator: str) -> None:
    if evaluator not in BENCH_EVALUATORS:
        raise QroarError(f"unknown --evaluator {evaluator}; choose from {', '.join(BENCH_EVALUATORS)}")
    if evaluator == "llama-perplexity":
        find_tool("llama-perplexity")


def _imatrixes_for(qtype: str, imatrixes: list[str]) -> list[str]:
    """An unquantized file takes no matrix: its one row is the one without."""
    return ["none"] if qtype in UNQUANTIZED else imatrixes


def _attn_types_for(qtype: str, attn_types: list[str]) -> list[str | None]:
    """The attn_q/attn_k types of a type's rows (None: the type's own choice; an unquantized file has only that)."""
    return [None] if qtype in UNQUANTIZED else [None if t == DEFAULT_ATTN else t for t in attn_types]


def run_bench(model: Path, ctxs: list[int], qtypes: list[str], plans: list[str], text: Path, out: Path,
              chunks: int = 1, type_k: str | list[str] = "f16", passkey_trials: int = 0, threads: int = 2,
              progress: bool = True, passkey_depths: list[float] | None = None, imatrix: str | list[str] = "none",
              imatrix_text: Path | None = None, imatrix_tokens: int | None = None,
              attn_types: list[str] | None = None, evaluator: str = "bindings", workers: int = 1,
              deadline: float | None = None, gpu_layers: int | None = None) -> dict:
    """Every (key cache, ctx, plan, qtype, imatrix, attn type) row, evaluated `workers` at a time; rows not
    started `deadline` seconds after the start are listed under "skipped" instead."""
    specs = [PlanSpec.parse(p) for p in plans]
    qtypes = [q.upper() for q in qtypes]
    type_ks = [type_k] if isinstance(type_k, str) else list(type_k)
    imatrixes = list(dict.fromkeys([imatrix] if isinstance(imatrix, str) else imatrix))
    attn_types = list(dict.fromkeys([t.lower() for t in attn_types or [DEFAULT_ATTN]]))
    trained = checkpoint_hparams(model).context_length
    _check_qtypes(qtypes)
    _check_imatrix(imatrixes, qtypes, imatrix_text, imatrix_tokens)
    _check_attn(attn_types, qtypes)
    _check_evaluator(evaluator)
    if workers < 1:
        raise QroarError(f"--workers {workers}: give at least 1")
    tokens = imatrix_tokens or DEFAULT_IMATRIX_TOKENS
    gpu_layers = gpu_layers_for(gpu_layers)
    bench = Bench(model, text, out, threads, progress and workers == 1, chunks, passkey_trials, passkey_depths,
                  imatrix_text, tokens, evaluator=evaluator, gpu_layers=gpu_layers)

    extended = sorted(c for c in ctxs if c > trained)
    jobs = [(s, c, q, k, m, a) for k in type_ks for c in ctxs for s in specs for q in qtypes
            for m in _imatrixes_for(q, imatrixes) for a in _attn_types_for(q, attn_types)]
    t0 = time.monotonic()

    def run_job(i: int, job: tuple) -> dict | None:
        spec, ctx, qtype, tk, m, attn = job
        if deadline is not None and time.monotonic() - t0 > deadline:
            return None
        # A file is built for a target context; rows at or below the trained context run the file
        # built for the smallest extended target, to show what extension costs at short context.
        built_for = ctx if ctx > trained or spec.method == "none" else (extended[0] if extended else 2 * trained)
        row = bench.evaluate(spec, ctx, qtype, built_for, tk, m, attn)
        click.echo(f"[{i}/{len(jobs)}] {spec.label:<24} {qtype:<7}{_imatrix_suffix(m)}{_attn_suffix(attn)} K {tk:<4} "
                   f"ctx {ctx:>6}: PPL {row['ppl']:8.3f} (F16 {row['ref_ppl']:.3f}), KLD {row['kld_mean']:.4f}"
                   + (f", passkey {row['passkey']:.0%}" if "passkey" in row else "")
                   + f"  [{time.monotonic() - t0:.0f} s]", err=True)
        return row

    if workers == 1:
        done = [run_job(i, job) for i, job in enumerate(jobs, 1)]
    else:
        with ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(run_job, i, job) for i, job in enumerate(jobs, 1)]
            try:
                done = [f.result() for f in futures]
            except BaseException:  # a failure or a stop ends the run: nothing more starts (the running rows
                # finish first: their threads cannot be interrupted, nor the programs they run be reached)
                for f in futures:
                    f.cancel()
                raise
    rows = [row for row in done if row is not None]
    _add_ratios(bench, rows)
    results = {"version": __version__, "model": str(model), "text": text.name, "text_sha": bench.text_digest,
               "chunks": chunks, "type_k": ", ".join(type_ks), "type_ks": type_ks, "ctxs": ctxs, "qtypes": qtypes,
               "plans": plans, "imatrixes": imatrixes, "device": device_summary(gpu_layers), "rows": rows}
    if imatrix_text is not None:
        results.update(imatrix_text=imatrix_text.name, imatrix_text_sha=bench.imatrix_digest, imatrix_tokens=tokens,
                       matrices=bench.matrices)
    # (keys a run without these options never had stay out of its results)
    if attn_types != [DEFAULT_ATTN]:
        results["attn_types"] = attn_types
    if evaluator != "bindings":
        results["evaluator"] = evaluator
    if deadline is not None:
        results["deadline"] = deadline
        results["skipped"] = [{"plan": s.label, "ctx": c, "qtype": q, "type_k": k, "imatrix": m,
                               "attn_type": a or DEFAULT_ATTN}
                              for (s, c, q, k, m, a), row in zip(jobs, done) if row is None]
    publish_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    publish_text(out / "results.md", results_markdown(results))
    try:
        plot_ppl_vs_ctx(results, out / "ppl_vs_ctx.png")
    except ImportError:
        pass
    return results


#: The rows each importance matrix's row is paired with (same plan), by the name of the ratio.
_IMATRIX_PAIRS = {"none": {}, "short": {"no_imatrix": "none"},
                  "target": {"no_imatrix": "none", "short_imatrix": "short"}}


def _add_ratios(bench: Bench, rows: list[dict]) -> None:
    """Paired PPL ratios with 95% intervals, each on the same tokens (same ctx, qtype and key cache):
    every plan's to linear and to yarn with the same importance matrix and attn type, every matrix's to
    the same plan without one (target's to short too), and every attn type's to the type's own choice."""
    index = {(r["plan"], r["ctx"], r["qtype"], r["type_k"], r["imatrix"], r.get("attn_type")): r for r in rows}
    for row in rows:
        same = (row["ctx"], row["qtype"], row["type_k"])
        attn = row.get("attn_type")
        pairs = [(other, index.get((other, *same, row["imatrix"], attn))) for other in ("linear", "yarn")]
        pairs += [(name, index.get((row["plan"], *same, m, attn))) for name, m in _IMATRIX_PAIRS[row["imatrix"]].items()]
        if attn is not None:
            pairs.append(("default_attn", index.get((row["plan"], *same, row["imatrix"], None))))
        for name, ref in pairs:
            if ref is None or ref is row:
                continue
            # With several windows, the standard error comes from per-window mean differences (tokens
            # within a window are correlated); with one window it is per token.
            block = n_scored_per_chunk(row["ctx"]) if row["n_chunks"] > 1 else None
            cmp = paired_compare(bench.nll(row), bench.nll(ref), block=block)
            row[f"ratio_to_{name}"] = cmp.ppl_ratio
            row[f"ratio_to_{name}_ci95"] = list(cmp.ratio_ci95)


def results_markdown(results: dict) -> str:
    # Results from before the imatrix axis, and runs without matrices, keep the table they had.
    matrices = results.get("imatrixes", ["none"]) != ["none"]
    attn = results.get("attn_types", [DEFAULT_ATTN]) != [DEFAULT_ATTN]
    intro = (f"Model `{Path(results['model']).name}`, text {results['text']}, {results['chunks']} chunk(s) per "
             f"context, key cache {results['type_k']}. PPL of the second half of each window "
             "(llama-perplexity's protocol) +/- standard error; ratios are paired on the same tokens (95% "
             "interval); KLD is against the same plan's unquantized F16 file.")
    if matrices:
        intro += (f" Importance matrices from {results['imatrix_tokens']} tokens of {results['imatrix_text']} "
                  f"each, computed on the plan's F16 file: short in {IMATRIX_SHORT_WINDOW}-token windows, target "
                  "in windows of the file's target context (window x windows); / no imatrix and / short compare "
                  "with the same plan's row.")
    if attn:
        intro += (" attn_q/k: the type of those tensors (default: the file type's own choice); / default attn "
                  "compares with the same file at that choice.")
    if results.get("evaluator", "bindings") != "bindings":
        intro += f" Measured by {results['evaluator']}."

    def ratio(row: dict, other: str) -> str:
        if f"ratio_to_{other}" not in row:
            return "-"
        lo, hi = row[f"ratio_to_{other}_ci95"]
        return f"{row[f'ratio_to_{other}']:.3f} [{lo:.3f}, {hi:.3f}]"

    def imatrix(row: dict) -> str:
        kind = row.get("imatrix", "none")
        return kind if kind == "none" else f"{kind} {row['imatrix_ctx']}x{row['imatrix_chunks']}"

    columns = [("plan", lambda r: r["plan"]), ("qtype", lambda r: r["qtype"])]
    columns += [("imatrix", imatrix)] if matrices else []
    columns += [("attn_q/k", lambda r: r.get("attn_type", DEFAULT_ATTN))] if attn else []
    columns += [("K cache", lambda r: r["type_k"]), ("ctx", lambda r: str(r["ctx"])),
                ("PPL", lambda r: f"{r['ppl']:.3f} +/- {r['ppl_se']:.3f}"),
                ("F16 PPL", lambda r: f"{r['ref_ppl']:.3f}"),
                ("/ linear", lambda r: ratio(r, "linear")), ("/ yarn", lambda r: ratio(r, "yarn"))]
    if matrices:
        columns += [("/ no imatrix", lambda r: ratio(r, "no_imatrix")),
                    ("/ short", lambda r: ratio(r, "short_imatrix"))]
    if attn:
        columns += [("/ default attn", lambda r: ratio(r, "default_attn"))]
    columns += [("KLD", lambda r: f"{r['kld_mean']:.4f}"), ("same top %", lambda r: f"{r['same_top_pct']:.1f}"),
                ("passkey", lambda r: f"{r['passkey']:.0%}" if "passkey" in r else "-")]
    lines = [intro, "", "| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in sorted(results["rows"], key=lambda r: (r["type_k"], r["ctx"], r["qtype"], r["ppl"])):
        lines.append("| " + " | ".join(cell(r) for _, cell in columns) + " |")
    if results.get("skipped"):
        lines += ["", f"Not started by the deadline ({results['deadline']:g} s): " + "; ".join(
            f"{s['plan']} {s['qtype']} imatrix {s['imatrix']} attn {s['attn_type']} K {s['type_k']} ctx {s['ctx']}"
            for s in results["skipped"]) + "."]
    return "\n".join(lines) + "\n"


def plot_ppl_vs_ctx(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results["qtypes"]), figsize=(6 * len(results["qtypes"]), 4.5), squeeze=False)
    for ax, qtype in zip(axes[0], results["qtypes"]):
        type_ks = results.get("type_ks", [results["type_k"]])
        imatrixes = _imatrixes_for(qtype, results.get("imatrixes", ["none"]))
        attn_types = [DEFAULT_ATTN] if qtype in UNQUANTIZED else results.get("attn_types", [DEFAULT_ATTN])
        for plan in results["plans"]:
            for tk in type_ks:
                for m, attn in [(m, a) for m in imatrixes for a in attn_types]:
                    pts = sorted((r["ctx"], r["ppl"], r["ppl_se"]) for r in results["rows"]
                                 if r["plan"] == plan and r["qtype"] == qtype and r["type_k"] == tk
                                 and r.get("imatrix", "none") == m and r.get("attn_type", DEFAULT_ATTN) == attn)
                    if pts:
                        x, y, e = zip(*pts)
                        what = [f"K {tk}"] if len(type_ks) > 1 else []
                        what += [f"imatrix {m}"] if len(imatrixes) > 1 else []
                        what += [f"attn_q/k {attn}"] if len(attn_types) > 1 else []
                        ax.errorbar(x, y, yerr=e, marker="o", capsize=3,
                                    label=plan + (f" ({', '.join(what)})" if what else ""))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{Path(results['model']).name} {qtype} on {results['text']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with temporary_beside(path, "png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    plt.close(fig)
