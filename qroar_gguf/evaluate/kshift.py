"""What a context shift does to a GGUF in llama.cpp: cached key norms and logits, shift after shift.

When a chat outgrows its context, llama-server's context shift (``--context-shift``, on in Ollama)
keeps the first tokens, drops the next ones and moves the rest back (``llama_memory_seq_rm``, then
``llama_memory_seq_add``); at the next decode llama.cpp re-ropes the moved keys (the K-shift). A
shift should only rotate them: a key moved by ``d`` positions should be the key written ``d``
positions earlier, with the same norm. :func:`shift_drift` runs that scenario on a file through the
Python bindings and measures how far it is from a rotation:

- ``norm_ratios``: after each shift, every re-roped key's norm over its norm when it was written (each
  layer's K row of each cached token written before the shift); the ratio farthest from 1.
- ``kl_vs_gap``: after each shift, the mean ``KL(gap || shifted)`` over the tokens decoded after it,
  where *gap* is a second run that drops the same tokens without moving the rest (a gap in its
  positions) and writes the kept first tokens again, fresh, just below the rest: its cache holds the
  same keys and values at the same distances from each other, none re-roped.
- ``max_abs_dlogit``: the largest ``|logit difference|`` between the two runs, over all shifts.
- ``nll_shifted``/``nll_gap``: after each shift, the mean negative log-likelihood of the text's next
  token over the tokens decoded after it, in each run (what a user feels: perplexity is its exp).

``stock_shift=True`` sets ``QROAR_STOCK_KSHIFT=1`` for the run: the llama.cpp qroar-gguf builds
(``patches/0002``) then shifts as stock llama.cpp (and Ollama) does, re-applying the attention factor.
The K cache is read back with ``llama_state_seq_get_data``, so it must be F32 or F16.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qroar_gguf.errors import QroarError
from qroar_gguf.evaluate.perplexity import log_softmax_rows
from qroar_gguf.evaluate.runtime import GgufModel, Runtime

#: The environment switch patches/0002 reads at each shift: 1 = stock llama.cpp's shift.
STOCK_SHIFT_ENV = "QROAR_STOCK_KSHIFT"
_STATE_MAGIC = 0xAF143CD8  # llama-context.cpp's io_magic, first in a sequence's state
_SEQ_FILE_MAGIC = 0x67677371  # LLAMA_STATE_SEQ_MAGIC ('ggsq'), first in a saved sequence's file
_K_DTYPES = {0: np.float32, 1: np.float16}  # ggml_type -> numpy, for the caches that can be read back


@dataclass(frozen=True)
class ShiftDrift:
    """What ``n_shifts`` context shifts did (one entry per shift, in order); see the module's doc."""

    norm_ratios: list[float]
    kl_vs_gap: list[float]
    max_abs_dlogit: float
    nll_shifted: list[float]
    nll_gap: list[float]


def shift_drift(
    model_path: str | Path,
    text: str,
    *,
    n_shifts: int = 3,
    n_prompt: int = 321,
    n_keep: int = 1,
    n_discard: int = 64,
    rope_scaling_type: str | None = None,
    rope_freq_scale: float | None = None,
    yarn_orig_ctx: int | None = None,
    stock_shift: bool = False,
    type_k: str = "f32",
    type_v: str = "f32",
    threads: int = 2,
) -> ShiftDrift:
    """Decode ``n_prompt`` tokens of ``text``, then ``n_shifts`` times: drop the ``n_discard`` tokens
    after the first ``n_keep``, move the rest back by ``n_discard`` and decode the next ``n_discard``
    tokens of the text (as llama-server does when its context is full). The same is run with a gap
    instead of each move; the two runs' logits of the new tokens are compared.

    ``rope_scaling_type``, ``rope_freq_scale`` and ``yarn_orig_ctx`` override the file's RoPE scaling
    (llama.cpp's runtime YaRN: ``"yarn"``, 0.5, the trained context). ``stock_shift`` runs stock
    llama.cpp's shift in the patched build. The text must have ``n_prompt + n_shifts * n_discard``
    tokens at least.
    """
    if type_k not in ("f32", "f16"):
        raise QroarError(f"the K cache is read back as floats: type_k must be f32 or f16 (got {type_k})")
    if not (n_shifts >= 1 and n_discard >= 1 and n_keep >= 0 and n_prompt >= n_keep + n_discard + 1):
        raise QroarError(f"a shift needs n_prompt > n_keep + n_discard, n_discard >= 1 and n_shifts >= 1 "
                         f"(got {n_prompt}, {n_keep}, {n_discard}, {n_shifts})")
    n_total = n_prompt + n_shifts * n_discard
    settings = dict(n_ctx=n_total, n_batch=max(n_prompt, n_discard), n_ubatch=max(n_prompt, n_discard),
                    threads=threads, type_k=type_k, type_v=type_v, rope_freq_scale=rope_freq_scale,
                    rope_scaling_type=rope_scaling_type, yarn_orig_ctx=yarn_orig_ctx)
    with GgufModel(model_path) as model, _stock_shift(stock_shift):
        tokens = model.tokenize(text, add_special=True)
        if len(tokens) < n_total:
            raise QroarError(f"the text has {len(tokens)} tokens; {n_shifts} shifts of {n_discard} after "
                             f"{n_prompt} need {n_total}")
        with Runtime(model, **settings) as shifted, Runtime(model, **settings) as gap:
            return _run(shifted, gap, tokens[:n_total], n_shifts, n_prompt, n_keep, n_discard)


def _run(shifted: Runtime, gap: Runtime, tokens: np.ndarray, n_shifts: int, n_prompt: int, n_keep: int,
         n_discard: int) -> ShiftDrift:
    # `ids`: the text's token indices the shifted run's cache holds, in position order.
    ids = list(range(n_prompt))
    for rt in (shifted, gap):
        rt.decode(tokens[:n_prompt], 0, slice(0, 0))
    # every cached key's norms (one per layer) as written, by the text's token index: a key written after
    # a shift is measured against itself as written, so windows that drop the whole prompt are measured too
    written = dict(enumerate(_key_norms(shifted).T))
    norm_ratios, kl_vs_gap, max_dlogit, nll_shifted, nll_gap = [], [], 0.0, [], []
    for j in range(n_shifts):
        new0 = n_prompt + j * n_discard
        ids = ids[:n_keep] + ids[n_keep + n_discard:] + list(range(new0, new0 + n_discard))
        new = tokens[new0:new0 + n_discard]

        shifted.remove(n_keep, n_keep + n_discard)
        shifted.shift(n_keep + n_discard, -1, -n_discard)
        shifted.decode(new, n_prompt - n_discard, slice(0, n_discard))
        got = shifted.logits().copy()

        # The gap run re-ropes nothing: it drops the dropped tokens and writes the kept ones again, fresh,
        # just below the rest (they attend only to each other, so they come out as they were, only nearer),
        # so every distance in its cache is the shifted run's. llama.cpp decodes a sequence only onwards
        # from its last position, so they are written into an empty cache and the rest put back after them.
        moved_by = (j + 1) * n_discard
        gap.remove(0, moved_by + n_keep)
        if n_keep:
            rest = SeqState.parse(gap.sequence_state())
            gap.clear()
            gap.decode(tokens[:n_keep], moved_by, slice(0, 0))
            gap.set_sequence_state(SeqState.parse(gap.sequence_state()).joined(rest).pack())
        gap.decode(new, new0, slice(0, n_discard))
        ref = gap.logits()

        norms = _key_norms(shifted)  # (layers, cells in position order)
        moved = [k for k, i in enumerate(ids) if i < new0]  # the keys this shift re-roped
        ratios = norms[:, moved] / np.stack([written[ids[k]] for k in moved], axis=1)
        norm_ratios.append(float(ratios.flat[np.argmax(np.abs(ratios - 1.0))]))
        written.update((ids[k], norms[:, k]) for k in range(len(ids)) if ids[k] >= new0)
        kl_vs_gap.append(float(_kl_rows(ref, got).mean()))
        max_dlogit = max(max_dlogit, float(np.abs(got - ref).max()))
        following = tokens[new0 + 1:new0 + n_discard]  # each new token's successor (the last one's is not decoded)
        nll_shifted.append(_mean_nll(got[:len(following)], following))
        nll_gap.append(_mean_nll(ref[:len(following)], following))
    return ShiftDrift(norm_ratios, kl_vs_gap, max_dlogit, nll_shifted, nll_gap)


@dataclass(frozen=True)
class Replay:
    """A generation replayed without shifts (see :func:`replay_without_shifts`)."""

    logprobs: np.ndarray  # float64, one per answered token: log p(token) where the server predicted it
    n_shifts: int  # how many times the server's rule dropped tokens
    first_shift_at: int  # the position written next when the first shift came: keys below it predate every shift
    cache: SeqState  # the cache at the end, keys as written (never re-roped)


def replay_without_shifts(
    model_path: str | Path,
    prompt: Sequence[int],
    answer: Sequence[int],
    *,
    n_ctx: int,
    n_discard: int,
    type_k: str = "f32",
    type_v: str = "f32",
    threads: int = 2,
) -> Replay:
    """What a generation in llama-server should have been, shifts apart: ``prompt`` decoded, then each
    ``answer`` token but the last, one by one; where llama-server's rule shifts the slot's context
    (``tokens cached + 1 >= n_ctx`` before a sampled token is decoded), the ``n_discard`` oldest cached
    tokens are dropped and the rest left where they are: a gap, so every distance in the cache is the
    server's and nothing is re-roped. A shift that only rotates gives the server these log-probabilities
    and keys of these norms. For n_keep 0 (llama-server's default on a model without BOS): kept first
    tokens would sit farther from the rest here than in the server."""
    if not (n_discard >= 1 and len(prompt) + 1 < n_ctx):
        raise QroarError(f"a replay needs n_discard >= 1 and a prompt shorter than the context "
                         f"(got {n_discard}, {len(prompt)} of {n_ctx})")
    logprobs, n_shifts, first_shift_at = [], 0, -1
    n_positions = len(prompt) + len(answer)  # a gap keeps positions growing past the server's context
    with Runtime(model_path, n_ctx=n_positions, n_batch=len(prompt), n_ubatch=len(prompt), threads=threads,
                 type_k=type_k, type_v=type_v) as rt:
        rt.decode(np.asarray(prompt, dtype=np.int32), 0, None)
        live = list(range(len(prompt)))  # the cached tokens' positions, oldest first
        for i, token in enumerate(answer):
            lp, _ = log_softmax_rows(rt.logits()[-1:])
            logprobs.append(float(lp[0, int(token)]))
            if i + 1 == len(answer):
                break
            if len(live) + 1 >= n_ctx:
                rt.remove(live[0], live[n_discard])
                live, n_shifts = live[n_discard:], n_shifts + 1
                first_shift_at = live[-1] + 1 if first_shift_at < 0 else first_shift_at
            position = live[-1] + 1
            rt.decode(np.asarray([token], dtype=np.int32), position, None)
            live.append(position)
        return Replay(np.array(logprobs), n_shifts, first_shift_at, SeqState.parse(rt.sequence_state()))


def saved_slot_cache(path: str | Path, slot: int) -> SeqState:
    """The cache of llama-server's slot ``slot`` saved to a file (``/slots/N?action=save``, written by
    ``llama_state_seq_save_file``: magic, version, a count and that many int32s (llama-server's own
    serialisation of the slot's tokens, skipped here), then the sequence's state without the io magic
    and sequence id that ``llama_state_seq_get_data`` puts first; a slot's sequence id is its number)."""
    data = np.fromfile(path, dtype=np.uint8)
    if len(data) < 12:
        raise QroarError(f"{path}: too short for a saved sequence")
    magic, version, n_tokens = (int(x) for x in data[:12].view("<u4"))
    if magic != _SEQ_FILE_MAGIC or 12 + 4 * n_tokens > len(data):
        raise QroarError(f"{path}: not a saved sequence (magic {magic:#x}, version {version})")
    head = np.array([_STATE_MAGIC, slot], dtype="<u4").view(np.uint8)
    return SeqState.parse(np.concatenate([head, data[12 + 4 * n_tokens:]]))


def key_norms(state: SeqState) -> np.ndarray:
    """The L2 norm of every layer's K row of every cell, cells in position order: (layers, cells)."""
    order = np.argsort(state.positions, kind="stable")
    return np.stack([np.linalg.norm(k[order].astype(np.float64), axis=1) for k in state.keys()])


def _mean_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean ``-log p(target)`` of rows of next-token logits (NaN for no rows)."""
    if len(targets) == 0:
        return float("nan")
    lp, _ = log_softmax_rows(logits)
    return float(-lp[np.arange(len(targets)), np.asarray(targets)].mean())


def _kl_rows(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """``KL(ref || model)`` of each row of next-token logits."""
    lp_ref, _ = log_softmax_rows(ref_logits)
    lp, _ = log_softmax_rows(logits)
    return np.maximum(np.einsum("ij,ij->i", np.exp(lp_ref), lp_ref - lp, dtype=np.float64), 0.0)


@contextmanager
def _stock_shift(on: bool) -> Iterator[None]:
    """Set (or clear) QROAR_STOCK_KSHIFT for the run, restoring what it was after."""
    before = os.environ.get(STOCK_SHIFT_ENV)
    if on:
        os.environ[STOCK_SHIFT_ENV] = "1"
    else:
        os.environ.pop(STOCK_SHIFT_ENV, None)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(STOCK_SHIFT_ENV, None)
        else:
            os.environ[STOCK_SHIFT_ENV] = before


def _key_norms(rt: Runtime) -> np.ndarray:
    """:func:`key_norms` of sequence 0's cache."""
    return key_norms(SeqState.parse(rt.sequence_state()))


@dataclass(frozen=True)
class SeqState:
    """One sequence's KV cache as ``llama_state_seq_get_data`` writes it (llama-kv-cache.cpp's
    state_write): one stream, cells without extra per-cell data, a K and a V entry per layer, V rows
    not transposed (flash attention). Rows are kept as raw bytes, (cells, row bytes) per layer."""

    seq_id: int
    positions: np.ndarray  # int32, one per cell, in cell order
    k: list[tuple[int, np.ndarray]]  # per layer: (ggml type, rows)
    v: list[tuple[int, np.ndarray]]

    @classmethod
    def parse(cls, state: np.ndarray) -> SeqState:
        buf = np.ascontiguousarray(state, dtype=np.uint8)
        at = 0

        def take(dtype, count: int = 1) -> np.ndarray:
            nonlocal at
            size = np.dtype(dtype).itemsize * count
            if at + size > len(buf):
                raise QroarError("the sequence state ends early: not a KV cache layout this reader knows")
            out = buf[at:at + size].view(dtype)
            at += size
            return out

        magic, seq_id, n_stream = int(take("<u4")[0]), int(take("<i4")[0]), int(take("<u4")[0])
        if magic != _STATE_MAGIC or not 1 <= n_stream <= 64:
            raise QroarError(f"not a sequence state (magic {magic:#x}, {n_stream} streams)")
        found = None  # a sequence lives in one stream; the others are written as empty (llama-server's -np)
        for _ in range(n_stream):
            n_cells = int(take("<u4")[0])
            if n_cells == 0:
                continue
            if found is not None:
                raise QroarError("the sequence's cells are in more than one stream: a layout this reader does not know")
            found = cls._stream(take, seq_id, n_cells)
        if found is None:
            raise QroarError("the sequence state holds no cells")
        if at != len(buf):
            raise QroarError("the sequence state holds more than one KV cache (SWA?): a layout this reader "
                             "does not know")
        return found

    @classmethod
    def _stream(cls, take, seq_id: int, n_cells: int) -> SeqState:
        positions = np.empty(n_cells, dtype=np.int32)
        for c in range(n_cells):
            positions[c] = take("<i4")[0]
            n_seq = int(take("<u4")[0])
            seqs = take("<i4", n_seq)
            if n_seq != 1 or int(seqs[0]) != seq_id:  # also what per-cell extras (M-RoPE) would give
                raise QroarError("the KV cache's cells carry more than the sequence id: a layout this reader "
                                 "does not know")
        if int(take("<u4")[0]) != 0:
            raise QroarError("the V cache is transposed (flash attention off): a layout this reader does not know")
        n_layer = int(take("<u4")[0])

        def rows() -> tuple[int, np.ndarray]:
            kind, row_size = int(take("<i4")[0]), int(take("<u8")[0])
            return kind, take(np.uint8, n_cells * row_size).reshape(n_cells, row_size)

        k = [rows() for _ in range(n_layer)]
        v = [rows() for _ in range(n_layer)]
        return cls(seq_id, positions, k, v)

    def pack(self) -> np.ndarray:
        """The state as ``llama_state_seq_set_data`` reads it."""
        n_cells = len(self.positions)
        head = [np.array([_STATE_MAGIC, self.seq_id, 1, n_cells], dtype="<u4").view(np.uint8)]
        cells = np.empty((n_cells, 3), dtype="<i4")
        cells[:, 0], cells[:, 1], cells[:, 2] = self.positions, 1, self.seq_id
        parts = head + [cells.view(np.uint8).ravel(), np.array([0, len(self.k)], dtype="<u4").view(np.uint8)]
        for kind, rows in self.k + self.v:
            parts += [np.array([kind], dtype="<i4").view(np.uint8),
                      np.array([rows.shape[1]], dtype="<u8").view(np.uint8), rows.ravel()]
        return np.concatenate(parts)

    def joined(self, other: SeqState) -> SeqState:
        """This state's cells, then ``other``'s (same layers and types)."""
        if [kind for kind, _ in self.k + self.v] != [kind for kind, _ in other.k + other.v]:
            raise QroarError("cannot join the states of two differently typed caches")
        return SeqState(self.seq_id, np.concatenate([self.positions, other.positions]),
                        [(kind, np.concatenate([a, b])) for (kind, a), (_, b) in zip(self.k, other.k)],
                        [(kind, np.concatenate([a, b])) for (kind, a), (_, b) in zip(self.v, other.v)])

    def keys(self) -> list[np.ndarray]:
        """Each layer's K rows as floats, (cells, n_embd_k_gqa): F32 or F16 caches only."""
        out = []
        for kind, rows in self.k:
            if kind not in _K_DTYPES:
                raise QroarError(f"the K cache's ggml type {kind} is not F32 or F16: cannot read it back")
            out.append(np.ascontiguousarray(rows).view(np.dtype(_K_DTYPES[kind]).newbyteorder("<")))
        return out
