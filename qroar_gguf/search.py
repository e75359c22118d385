"""`--search`: per-band rope_freqs multipliers and W_Q/W_K scales chosen on a small dev text.

The Q-ROAR paper's band-wise method, mechanics only (rope/bands.py defines the bands). What is searched
is the **quantized** file that `convert` would write (the `--qtype` being produced), measured by
llama.cpp at `--dev-ctx` on the dev text: perplexity (`ppl`, minimising the mean NLL) or the mean KL
divergence against the candidate's own unquantized file (`kld`: same plan, same band values, F16).

Search: deterministic coordinate descent on a grid.

* Start: the formula plan (`--method`, every band multiplier 1, every scale 1). It is evaluated first
  and is the incumbent; a candidate replaces the incumbent only when its objective is strictly lower,
  so the result is never worse on the dev text than the start.
* Coordinates: a band's factor multiplier and a band's scale (`--search-space` both | factors | scales),
  each on the grid 0.8, 0.9, 1.0, 1.1, 1.25. Bands are visited in the order of the sensitivity prior
  (below); within a band, its factor first, then its scale.
* A coordinate is line-searched: one grid step up or down (which first: drawn from `--search-seed`),
  continuing in a direction while it keeps improving; the other direction is tried only when the first
  did not improve. Passes over all coordinates repeat until a pass improves nothing or the budget is
  spent.
* Budget: the number of distinct candidates measured (the start included), whether measured now or
  read from the cache, so a resumed search retraces the same path and returns the same answer.
  Candidates whose effective values equal one already measured (e.g. a multiplier below 1 on a band
  whose factors are all 1, which the never-below-1 rule turns back into 1) are not measured again and
  cost nothing.
* Prior: pair sensitivity ``S_k`` (W_Q/W_K row norms, rope/measure.py) as ``z_k = S_k/mean(S)``, and the
  base plan's interpolation pressure ``pressure_k`` (rope/sensitivity.py). Bands are searched in
  decreasing ``mean_band(z_k * pressure_k)`` (where the plan compresses outlier-heavy pairs most),
  ties broken by decreasing ``mean_band(z_k)``, then by band index.

Cache: every measured candidate is one JSON file under ``cache_dir()/search/<key>.json``; the key hashes
everything that determines the measurement (qroar-gguf and llama-cpp-python versions, the source files'
names, sizes and mtimes and config.json's content, method and plan options, target context, qtype, the
effective rope_freqs and per-pair W_Q/W_K scales, the dev text's sha256, dev ctx and chunks, objective
and key-cache type). Written as soon as a candidate is measured: an interrupted search loses nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from qroar_gguf import __version__
from qroar_gguf.assets.austen import austen_text
from qroar_gguf.choices import UNQUANTIZED
from qroar_gguf.convert import convert, make_conversion_plan, read_source, route_for
from qroar_gguf.digests import sha256_file
from qroar_gguf.errors import QroarError
from qroar_gguf.evaluate.kld import kl_divergence
from qroar_gguf.evaluate.perplexity import perplexity
from qroar_gguf.evaluate.runtime import Runtime, bindings_version
from qroar_gguf.outputs import check_destination, publish_text
from qroar_gguf.paths import cache_dir
from qroar_gguf.rope.bands import apply_band_factors, band_starts, pair_bands
from qroar_gguf.rope.measure import measure_sensitivity
from qroar_gguf.rope.sensitivity import interpolation_pressure
from qroar_gguf.search_settings import DEFAULT_DEV_TEXT, OBJECTIVES, SEARCH_SYMMETRIC, SPACES, SearchSettings
from qroar_gguf.source.text import read_text

CACHE_VERSION = 1


@dataclass
class Evaluation:
    factors: tuple[float, ...]  # band multipliers as given
    scales: tuple[float, ...]
    objective: float  # mean NLL (ppl) or mean KLD (kld): lower is better
    ppl: float
    kld: float | None
    n_scored: int
    n_text_tokens: int
    seconds: float
    key: str
    cached: bool = False  # read from the cache rather than measured in this run

    def label(self) -> str:
        return f"factors {_fmt(self.factors)} scales {_fmt(self.scales)}"


@dataclass
class SearchResult:
    start: Evaluation
    best: Evaluation
    history: list[Evaluation]  # distinct candidates in the order visited (start first)
    new_evaluations: int  # measured in this run (the rest came from the cache)
    band_order: list[int]
    record: dict = field(default_factory=dict)  # what goes into qroar.search

    @property
    def evaluations(self) -> int:
        return len(self.history)


def _fmt(values) -> str:
    return ",".join(f"{v:g}" for v in values)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return str(value)


class _Context:
    """Everything a search needs about the model, computed once."""

    def __init__(self, source: Path, options, settings: SearchSettings):
        quiet = dataclasses.replace(options, progress=False)
        src = read_source(source, quiet)
        ckpt = src.ckpt
        self.facts = src.facts
        self.plan = make_conversion_plan(quiet, src)
        sensitivity = measure_sensitivity(ckpt, src.family).sensitivity
        self.fingerprint = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(ckpt.source_files)]
        config = ckpt.directory / "config.json"
        self.fingerprint.append(["config.json", sha256_file(config) if config.is_file() else None])
        self.n_bands = options.plan.bands.count
        self.starts = band_starts(self.facts, self.n_bands)
        self.pair_band = pair_bands(self.facts, self.n_bands)
        s = np.asarray(sensitivity, dtype=np.float64)
        z = s / s.mean() if s.mean() > 0 else np.ones_like(s)
        pressure = interpolation_pressure(self.facts, np.asarray(self.plan.factors, dtype=np.float64))
        score = [float(np.mean((z * pressure)[self.pair_band == b])) for b in range(self.n_bands)]
        zmean = [float(np.mean(z[self.pair_band == b])) for b in range(self.n_bands)]
        self.band_order = sorted(range(self.n_bands), key=lambda b: (-round(score[b], 12), -round(zmean[b], 12), b))
        self.prior = {"score": score, "z_mean": zmean}
        self.versions = [__version__, bindings_version()]

    def effective(self, factors: tuple[float, ...], scales: tuple[float, ...], symmetric: bool) -> dict:
        """What determines the candidate's weights and rope_freqs (nominal values that clamp alike agree)."""
        rope = apply_band_factors(self.plan.factors, self.facts, self.n_bands, factors)
        per_pair = np.asarray(scales, dtype=np.float64)[self.pair_band]
        scaled = bool(np.any(per_pair != 1.0))
        return {"rope_freqs": [float(v) for v in rope], "pair_scales": [float(v) for v in per_pair] if scaled else None,
                "symmetric": bool(symmetric) if scaled else None}


@dataclass
class _Descent:
    """The coordinate descent's position: grid indices per band of each kind, and the best evaluation."""

    grid: tuple[float, ...]
    current: dict[str, list[int]]  # "factor"/"scale" -> grid index per band
    best: Evaluation | None = None

    def values(self, state: dict[str, list[int]]) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return tuple(self.grid[i] for i in state["factor"]), tuple(self.grid[i] for i in state["scale"])


class _Searcher:
    def __init__(self, source: Path, options, settings: SearchSettings, log, on_evaluate):
        _validate(options, settings)
        if settings.objective == "kld" and options.qtype in UNQUANTIZED:
            raise QroarError(f"--search-objective kld needs a quantized --qtype (got {options.qtype}): "
                             "KL divergence is measured against the unquantized file")
        self.source, self.options, self.settings = Path(source), options, settings
        self.log = log or (lambda line: None)
        self.on_evaluate = on_evaluate
        self.text = read_text(settings.dev_text)
        self.text_sha = sha256_file(Path(settings.dev_text))
        self.ctx = _Context(self.source, options, settings)
        self.dev_ctx = int(settings.dev_ctx or self.ctx.facts.target_ctx)
        self.cache = Path(settings.cache) if settings.cache is not None else cache_dir() / "search"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.visited: dict[str, Evaluation] = {}  # key -> evaluation (distinct candidates)
        self.history: list[Evaluation] = []
        self.new = 0

    # -- one candidate --------------------------------------------------------------------------

    def key(self, factors, scales) -> tuple[str, dict]:
        o = self.options
        inputs = {
            "cache_version": CACHE_VERSION, "versions": self.ctx.versions, "source": self.ctx.fingerprint,
            "method": o.plan.method, "plan_options": o.plan.given_options(), "target_ctx": self.ctx.facts.target_ctx,
            "attn_scale": self.ctx.plan.attn_scale, "qtype": o.qtype,
            **self.ctx.effective(factors, scales, o.plan.bands.symmetric),
            "dev_text_sha256": self.text_sha, "dev_ctx": self.dev_ctx, "dev_chunks": self.settings.dev_chunks,
            "objective": self.settings.objective, "type_k": self.settings.type_k,
        }
        return _digest(inputs)[:32], inputs

    def evaluate(self, factors: tuple[float, ...], scales: tuple[float, ...]) -> tuple[Evaluation, bool]:
        """The candidate's evaluation and whether it is new to this search (counts against the budget)."""
        key, inputs = self.key(factors, scales)
        if key in self.visited:
            return self.visited[key], False
        path = self.cache / f"{key}.json"
        ev = _read_cache(path, key, factors, scales)
        if ev is None:
            ev = self.measure(factors, scales, key)
            record = {"key": key, "inputs": inputs, **dataclasses.asdict(ev)}
            record.pop("cached", None)
            publish_text(path, json.dumps(record, indent=1, default=_json_default) + "\n")
            self.new += 1
            if self.on_evaluate is not None:
                self.on_evaluate(ev)
        self.visited[key] = ev
        self.history.append(ev)
        return ev, True

    def measure(self, factors, scales, key: str) -> Evaluation:
        o, s = self.options, self.settings
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="qroar-search-") as tmp:
            cand, ref = Path(tmp) / "candidate.gguf", Path(tmp) / "reference.F16.gguf"
            opts = dataclasses.replace(o, plan=o.plan.with_bands(tuple(factors), tuple(scales)), band_search=None,
                                       keep_f16=ref if s.objective == "kld" else None, force=True, progress=False)
            convert(self.source, cand, opts)
            with Runtime(cand, n_ctx=self.dev_ctx, threads=o.threads, type_k=s.type_k) as rt:
                if s.objective == "ppl":
                    res = perplexity(rt, self.text, max_chunks=s.dev_chunks, quiet=True)
                    objective, ppl, kld = res.mean_nll, res.ppl, None
                    n_scored, n_tokens = res.n_scored, res.n_text_tokens
                else:
                    with Runtime(ref, n_ctx=self.dev_ctx, threads=o.threads) as ref_rt:
                        res = kl_divergence(rt, ref_rt, self.text, max_chunks=s.dev_chunks, quiet=True)
                    objective, ppl, kld = res.mean, res.ppl, res.mean
                    n_scored = res.n_scored
                    n_tokens = int(len(rt.tokenize(self.text, add_special=True, parse_special=False)))
        if not math.isfinite(objective):
            raise QroarError(f"the dev objective of candidate {_fmt(factors)} / {_fmt(scales)} is not finite")
        return Evaluation(factors=tuple(factors), scales=tuple(scales), objective=float(objective), ppl=float(ppl),
                          kld=None if kld is None else float(kld), n_scored=int(n_scored),
                          n_text_tokens=int(n_tokens), seconds=time.monotonic() - t0, key=key)

    # -- the descent -------------------------------------------------------------------------------

    def run(self) -> SearchResult:
        s = self.settings
        grid = tuple(float(g) for g in s.grid)
        one = grid.index(1.0)
        state = _Descent(grid, {"factor": [one] * self.ctx.n_bands, "scale": [one] * self.ctx.n_bands})
        rng = np.random.default_rng(s.seed)
        kinds = {"both": ("factor", "scale"), "factors": ("factor",), "scales": ("scale",)}[s.space]
        coordinates = [(b, kind) for b in self.ctx.band_order for kind in kinds]
        pairs = ", ".join(f"{a}-{b - 1}" for a, b in zip(self.ctx.starts, self.ctx.starts[1:]))
        self.log(f"search: {self.ctx.n_bands} bands (pairs {pairs}), order {self.ctx.band_order}, "
                 f"objective {s.objective} at ctx {self.dev_ctx}, budget {s.budget}")
        start, _ = self.evaluate(*state.values(state.current))
        self._report(start, start, "start")
        state.best = start
        while self._sweep(state, coordinates, rng):  # until a whole sweep improves nothing, or the budget ends
            pass
        best = state.best
        self.log(f"search: best {best.label()}: {self._value(best)} (start {self._value(start)}), "
                 f"{len(self.history)} candidates, {self.new} measured now")
        return SearchResult(start=start, best=best, history=list(self.history), new_evaluations=self.new,
                            band_order=list(self.ctx.band_order), record=self._record(start, best, grid))

    def _budget_left(self) -> bool:
        return len(self.history) < self.settings.budget

    def _sweep(self, state: _Descent, coordinates, rng) -> bool:
        """One pass over the coordinates, each tried in a random first direction; whether any improved."""
        improved = False
        for band, kind in coordinates:
            if not self._budget_left():
                break
            directions = (1, -1) if rng.random() < 0.5 else (-1, 1)
            for d in directions:
                if self._walk(state, band, kind, d):
                    improved = True
                    break  # the other direction is not tried once one improved
        return improved and self._budget_left()

    def _walk(self, state: _Descent, band: int, kind: str, d: int) -> bool:
        """Step one coordinate along ``d`` while each step improves; whether any did."""
        moved = False
        step = state.current[kind][band] + d
        while 0 <= step < len(state.grid) and self._budget_left():
            trial = {k: list(v) for k, v in state.current.items()}
            trial[kind][band] = step
            ev, fresh = self.evaluate(*state.values(trial))
            if fresh:
                self._report(ev, state.best, f"band {band} {kind} x{state.grid[step]:g}")
            if ev.objective >= state.best.objective:
                break
            state.best, state.current, moved = ev, trial, True
            step += d
        return moved

    def _record(self, start: Evaluation, best: Evaluation, grid: tuple[float, ...]) -> dict:
        """What provenance keeps of the search."""
        s = self.settings
        return {
            "objective": s.objective, "objective_unit": "mean NLL, nats/token" if s.objective == "ppl"
            else "mean KL divergence, nats/token", "start": start.objective, "reached": best.objective,
            "start_ppl": start.ppl, "ppl": best.ppl, "dev_text_sha256": self.text_sha,
            "dev_text_tokens": best.n_text_tokens, "dev_scored_tokens": best.n_scored, "dev_ctx": self.dev_ctx,
            "dev_chunks": s.dev_chunks, "budget": s.budget, "evaluations": len(self.history), "seed": s.seed,
            "space": s.space, "grid": list(grid), "type_k": s.type_k, "band_order": self.ctx.band_order,
            "symmetric": self.options.plan.bands.symmetric,
        }

    def _value(self, ev: Evaluation) -> str:
        if self.settings.objective == "kld":
            return f"KLD {ev.kld:.6f} (ppl {ev.ppl:.4f})"
        return f"ppl {ev.ppl:.4f}"

    def _report(self, ev: Evaluation, best: Evaluation, what: str) -> None:
        where = "cached" if ev.cached else f"{ev.seconds:.1f} s"
        best_now = ev if ev.objective < best.objective else best
        self.log(f"search [{len(self.history)}/{self.settings.budget}] {what}: {ev.label()}: {self._value(ev)} "
                 f"({where}); best {self._value(best_now)}")


def _read_cache(path: Path, key: str, factors, scales) -> Evaluation | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:
            return None
        return Evaluation(factors=tuple(factors), scales=tuple(scales), objective=float(data["objective"]),
                          ppl=float(data["ppl"]), kld=None if data.get("kld") is None else float(data["kld"]),
                          n_scored=int(data["n_scored"]), n_text_tokens=int(data["n_text_tokens"]),
                          seconds=float(data["seconds"]), key=key, cached=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged entry is measured again


def _with_defaults(options, settings: SearchSettings, log: Callable[[str], None] | None):
    """``options`` and ``settings`` with what was left to the search chosen: the dev text
    (DEFAULT_DEV_TEXT, said through `log`) and whether band scales are symmetric (SEARCH_SYMMETRIC)."""
    if settings.dev_text is None:
        settings = dataclasses.replace(settings, dev_text=austen_text(DEFAULT_DEV_TEXT))
        if log is not None:
            log(f"search: dev text {settings.dev_text} (pass --dev-text to choose another)")
    bands = options.plan.bands
    if bands.symmetric is None:
        bands = dataclasses.replace(bands, symmetric=SEARCH_SYMMETRIC)
        options = dataclasses.replace(options, plan=dataclasses.replace(options.plan, bands=bands))
    return options, settings


def _validate(options, settings: SearchSettings) -> None:
    if options.plan.bands.given:
        raise QroarError("--search chooses the band values itself: drop --band-factors/--band-scales")
    if settings.objective not in OBJECTIVES:
        raise QroarError(f"unknown search objective {settings.objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if settings.space not in SPACES:
        raise QroarError(f"unknown search space {settings.space!r}; choose one of {', '.join(SPACES)}")
    if isinstance(settings.budget, bool) or int(settings.budget) < 1:
        raise QroarError(f"--search-budget must be at least 1, got {settings.budget!r}")
    grid = [float(g) for g in settings.grid]
    if 1.0 not in grid or sorted(grid) != grid or any(not (math.isfinite(g) and g > 0) for g in grid):
        raise QroarError("the search grid must be increasing positive numbers that include 1")


def run_search(source: str | Path, options, settings: SearchSettings, *, log: Callable[[str], None] | None = None,
               on_evaluate: Callable[[Evaluation], None] | None = None) -> SearchResult:
    """Search band factors/scales for ``options`` (a ConvertOptions; its band values must be unset).

    ``on_evaluate`` is called once per candidate measured in this run (not for cache hits).
    """
    options, settings = _with_defaults(options, settings, log)
    searcher = _Searcher(Path(source), options, settings, log, on_evaluate)
    result = searcher.run()
    if settings.report is not None:
        base = {"method": options.plan.method, "plan_options": options.plan.given_options(), "qtype": options.qtype,
                "target_ctx": searcher.ctx.facts.target_ctx}
        write_report(result, Path(settings.report), base)
    return result


def write_report(result: SearchResult, path: Path, base: dict) -> None:
    """The search record (what goes into provenance), the base plan it started from (``base``: method, plan
    options, qtype, target context; provenance holds those apart) and every candidate visited, in order, as JSON."""
    candidates = [{"factors": list(ev.factors), "scales": list(ev.scales), "objective": ev.objective, "ppl": ev.ppl,
                   "kld": ev.kld, "seconds": round(ev.seconds, 1), "best_so_far": min(
                       e.objective for e in result.history[: i + 1])} for i, ev in enumerate(result.history)]
    report = {**result.record, "base": base, "start_factors": list(result.start.factors), "start_scales": list(result.start.scales),
              "best_factors": list(result.best.factors), "best_scales": list(result.best.scales),
              "candidates": candidates}
    path.parent.mkdir(parents=True, exist_ok=True)
    publish_text(path, json.dumps(report, indent=2, default=_json_default) + "\n")


def search_and_convert(source: str | Path, output: str | Path, options, settings: SearchSettings, *,
                       log: Callable[[str], None] | None = None, on_evaluate=None):
    """Search, then write ``output`` with the best band values and the search record in provenance."""
    delegated = route_for(source, options)
    if delegated is not None:
        raise QroarError(f"--search converts each candidate with qroar-gguf's own converter, and "
                         f"{delegated.hf_architecture} goes through llama.cpp's: search on a family qroar-gguf "
                         "converts itself, or give the plan (--method, --band-factors) directly")
    options, settings = _with_defaults(options, settings, log)
    ckpt = read_source(source, options).ckpt  # fail on the input and destinations before the search
    check_destination(Path(output), force=options.force, what="output", inputs=ckpt.source_files)
    if settings.report is not None:  # a report is rewritten by every run: no --force needed
        inputs = [*ckpt.source_files, Path(settings.dev_text)]
        check_destination(Path(settings.report), force=True, what="--search-report", inputs=inputs)
    result = run_search(source, options, settings, log=log, on_evaluate=on_evaluate)
    final = dataclasses.replace(options, plan=options.plan.with_bands(result.best.factors, result.best.scales),
                                band_search=result.record)
    return convert(source, output, final)
