"""`--search`: per-band rope_freqs multipliers and W_Q/W_K scales chosen on a small dev text.

The Q-ROAR paper's band-wise method, mechanics only (rope/bands.py defines the bands). What is searched
is the **quantized** file that `convert` would write (the `--qtype` being produced), measured by
llama.cpp at `--dev-ctx` on the dev text: perplexity (`ppl`, minimising the mean NLL) or the mean KL
divergence against the candidate's own unquantized file (`kld`: same plan, same band values, F16).

Two strategies (`--search-strategy`), both deterministic under `--search-seed`, both starting from the same
incumbent and sharing the cache (a candidate is keyed by what it is, not by who proposed it):

**descent** (the default): coordinate descent on a grid.

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
* Prior (descent's band order): pair sensitivity ``S_k`` (W_Q/W_K row norms, rope/measure.py) as
  ``z_k = S_k/mean(S)``, and the base plan's interpolation pressure ``pressure_k`` (rope/sensitivity.py).
  Bands are searched in decreasing ``mean_band(z_k * pressure_k)`` (where the plan compresses outlier-heavy pairs most),
  ties broken by decreasing ``mean_band(z_k)``, then by band index.

**cmaes**: CMA-ES (population.py) over the same coordinates, every one in ``[grid[0], grid[-1]]``, starting at
1 (the formula plan) with first steps CMAES_SIGMA (factors) and CMAES_SCALE_STEP (scales), candidates rounded
to CMAES_RESOLUTION. A generation is
``--search-population`` candidates (default: CMA-ES's 4 + floor(3 ln n) for n coordinates), independent of each
other. It stops at the budget, or when a whole generation brings no new candidate (it has converged on candidates
already measured). The start is measured first and the incumbent rule is the same, so it is never worse.

Both: `--search-time` is a budget in seconds (no new candidate starts after it); a candidate that llama.cpp
cannot load or make a context for (memory it cannot allocate, e.g. on a GPU already holding other candidates)
fails with llama.cpp's reason, ranks last and is not cached, and the search goes on; the record counts
failures and keeps their reasons. The start must run: without it there is nothing to compare with. (An
out-of-memory inside a decode aborts the process in llama.cpp's CUDA back-end: no search can catch that.)
Failures that depend on what runs beside the candidate (memory) make a search with failures depend on
`--search-workers`; one without failures is the same at any number.

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
import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from qroar_gguf import __version__
from qroar_gguf.assets.austen import austen_text
from qroar_gguf.choices import UNQUANTIZED
from qroar_gguf.convert import convert, make_conversion_plan, read_source, route_for
from qroar_gguf.digests import sha256_file
from qroar_gguf.errors import QroarError
from qroar_gguf.evaluate.kld import kl_divergence
from qroar_gguf.evaluate.perplexity import perplexity
from qroar_gguf.evaluate.runtime import Runtime, bindings_version, gpu_layers_for
from qroar_gguf.outputs import check_destination, publish_text
from qroar_gguf.paths import cache_dir
from qroar_gguf.population import CmaEs, default_population
from qroar_gguf.rope.bands import apply_band_factors, band_starts, pair_bands
from qroar_gguf.rope.measure import measure_sensitivity
from qroar_gguf.rope.sensitivity import interpolation_pressure
from qroar_gguf.search_settings import (CMAES_RESOLUTION, CMAES_SCALE_STEP, CMAES_SIGMA, DEFAULT_DEV_TEXT,
                                        OBJECTIVES, SEARCH_SYMMETRIC, SPACES, STRATEGIES, SearchSettings)
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
    failed: str | None = None  # why llama.cpp could not measure it (objective inf, never cached)

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
        self.gpu_layers = gpu_layers_for(settings.gpu_layers)
        self.ctx = _Context(self.source, options, settings)
        self.dev_ctx = int(settings.dev_ctx or self.ctx.facts.target_ctx)
        self.cache = Path(settings.cache) if settings.cache is not None else cache_dir() / "search"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.visited: dict[str, Evaluation] = {}  # key -> evaluation (distinct candidates)
        self.history: list[Evaluation] = []
        self.new = 0
        self.t0 = time.monotonic()
        self.stopped_by = "converged"  # or "budget", "time"

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
            # layers on a GPU (its kernels round differently from the CPU's); absent on the CPU, as before
            **({"gpu_layers": self.gpu_layers} if self.gpu_layers != 0 else {}),
        }
        return _digest(inputs)[:32], inputs

    def evaluate(self, factors: tuple[float, ...], scales: tuple[float, ...]) -> tuple[Evaluation, bool]:
        """The candidate's evaluation and whether it is new to this search (counts against the budget)."""
        evaluations = self.evaluate_many([(factors, scales)], timed=False)  # its caller checked the budget
        try:
            return next(evaluations)
        finally:
            evaluations.close()

    def evaluate_many(self, candidates: list[tuple[tuple[float, ...], tuple[float, ...]]], *, timed: bool = True
                      ) -> Iterator[tuple[Evaluation, bool]]:
        """Each candidate's evaluation, in order, with whether it is new to this search. Those neither visited
        nor cached are measured `--search-workers` at a time, each cached as soon as it is measured; none
        starts once the time budget is spent, and the candidates then end before the first one that was not
        measured. The search's own record (history, budget, on_evaluate) is kept in the candidates' order,
        whatever order they finished in, so a search that runs every candidate is the same at any number of
        workers."""
        keyed = [(f, s, *self.key(f, s)) for f, s in candidates]
        cached = {key: _read_cache(self.cache / f"{key}.json", key, f, s) for f, s, key, _ in keyed
                  if key not in self.visited}
        pending = {key: (f, s, inputs) for f, s, key, inputs in keyed if key in cached and cached[key] is None}

        def measure(item):
            key, (f, s, inputs) = item
            if timed and self._time_spent():
                return key, None
            return key, self._measure_and_cache(f, s, key, inputs)

        workers = max(1, min(self.settings.workers, len(pending)))
        with contextlib.ExitStack() as stack:
            if workers == 1:
                finished = map(measure, pending.items())
            else:  # a stop waits for the candidates already running (their threads cannot be interrupted)
                finished = stack.enter_context(ThreadPoolExecutor(workers)).map(measure, pending.items())
                stack.callback(finished.close)  # first: cancels the candidates not started yet
            measured: dict[str, Evaluation | None] = {}
            for f, s, key, _ in keyed:
                if key in self.visited:
                    yield self.visited[key], False
                    continue
                ev = cached[key]
                while ev is None and key not in measured:
                    done_key, done = next(finished)  # in submission order: the one wanted comes in turn
                    measured[done_key] = done
                ev = ev or measured[key]
                if ev is None:  # the time budget ran out before it started
                    return
                if not ev.cached:
                    self.new += 1
                    if self.on_evaluate is not None:
                        self.on_evaluate(ev)
                self.visited[key] = ev
                self.history.append(ev)
                yield ev, True

    def _measure_and_cache(self, factors, scales, key: str, inputs: dict) -> Evaluation:
        ev = self.measure(factors, scales, key)
        if ev.failed is None:  # a failure is not kept: the next run tries it again
            record = {"key": key, "inputs": inputs, **dataclasses.asdict(ev)}
            record.pop("cached", None)
            record.pop("failed", None)
            publish_text(self.cache / f"{key}.json", json.dumps(record, indent=1, default=_json_default) + "\n")
        return ev

    def measure(self, factors, scales, key: str) -> Evaluation:
        o, s = self.options, self.settings
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="qroar-search-") as tmp:
            cand, ref = Path(tmp) / "candidate.gguf", Path(tmp) / "reference.F16.gguf"
            opts = dataclasses.replace(o, plan=o.plan.with_bands(tuple(factors), tuple(scales)), band_search=None,
                                       keep_f16=ref if s.objective == "kld" else None, force=True, progress=False)
            convert(self.source, cand, opts)
            try:
                objective, ppl, kld, n_scored, n_tokens = self._objective(cand, ref)
            except QroarError as exc:  # llama.cpp could not run this candidate: the search goes on without it
                return self._failure(factors, scales, key, str(exc), t0, (cand, ref))
        if not math.isfinite(objective):
            return self._failure(factors, scales, key, "its dev objective is not finite", t0)
        return Evaluation(factors=tuple(factors), scales=tuple(scales), objective=float(objective), ppl=float(ppl),
                          kld=None if kld is None else float(kld), n_scored=int(n_scored),
                          n_text_tokens=int(n_tokens), seconds=time.monotonic() - t0, key=key)

    def _objective(self, candidate: Path, reference: Path) -> tuple[float, float, float | None, int, int]:
        """(objective, ppl, kld or None, scored tokens, text tokens) of one written candidate."""
        o, s = self.options, self.settings
        runtime = dict(n_ctx=self.dev_ctx, threads=o.threads, n_gpu_layers=self.gpu_layers)
        with Runtime(candidate, type_k=s.type_k, **runtime) as rt:
            if s.objective == "ppl":
                res = perplexity(rt, self.text, max_chunks=s.dev_chunks, quiet=True)
                return res.mean_nll, res.ppl, None, res.n_scored, res.n_text_tokens
            with Runtime(reference, **runtime) as ref_rt:
                res = kl_divergence(rt, ref_rt, self.text, max_chunks=s.dev_chunks, quiet=True)
            n_tokens = int(len(rt.tokenize(self.text, add_special=True, parse_special=False)))
            return res.mean, res.ppl, res.mean, res.n_scored, n_tokens

    @staticmethod
    def _failure(factors, scales, key: str, reason: str, t0: float, files: tuple[Path, ...] = ()) -> Evaluation:
        for path in files:  # the temporary folder's name says nothing and differs between runs
            reason = reason.replace(str(path), path.name)
        return Evaluation(factors=tuple(factors), scales=tuple(scales), objective=math.inf, ppl=math.nan, kld=None,
                          n_scored=0, n_text_tokens=0, seconds=time.monotonic() - t0, key=key, failed=reason)

    # -- the strategies ----------------------------------------------------------------------------

    def run(self) -> SearchResult:
        s = self.settings
        grid = tuple(float(g) for g in s.grid)
        kinds = {"both": ("factor", "scale"), "factors": ("factor",), "scales": ("scale",)}[s.space]
        pairs = ", ".join(f"{a}-{b - 1}" for a, b in zip(self.ctx.starts, self.ctx.starts[1:]))
        how = (f"order {self.ctx.band_order}" if s.strategy == "descent"
               else f"CMA-ES, {self._population(kinds)} per generation")
        self.log(f"search: {self.ctx.n_bands} bands (pairs {pairs}), {how}, objective {s.objective} at ctx "
                 f"{self.dev_ctx}, budget {s.budget}" + (f" or {s.time_budget:g} s" if s.time_budget else ""))
        if s.strategy == "cmaes" and s.budget < 1 + self._population(kinds):
            self.log(f"search: a budget of {s.budget} ends inside the first generation "
                     f"({self._population(kinds)} candidates after the start), so CMA-ES samples without learning "
                     f"from them: give --search-budget {1 + 2 * self._population(kinds)} or more for two generations")
        ones = (1.0,) * self.ctx.n_bands
        start, _ = self.evaluate(ones, ones)
        if start.failed is not None:
            raise QroarError(f"the starting plan could not be measured, so there is nothing to compare with: "
                             f"{start.failed}")
        self._report(start, start, "start")
        if s.strategy == "descent":
            best = self._descend(start, grid, kinds)
        else:
            best = self._evolve(start, grid, kinds)
        failed = [e for e in self.history if e.failed is not None]
        self.log(f"search: best {best.label()}: {self._value(best)} (start {self._value(start)}), "
                 f"{len(self.history)} candidates, {self.new} measured now"
                 + (f", {len(failed)} failed" if failed else "") + f"; stopped: {self.stopped_by}")
        return SearchResult(start=start, best=best, history=list(self.history), new_evaluations=self.new,
                            band_order=list(self.ctx.band_order), record=self._record(start, best, grid, kinds))

    def _descend(self, start: Evaluation, grid: tuple[float, ...], kinds: tuple[str, ...]) -> Evaluation:
        one = grid.index(1.0)
        state = _Descent(grid, {"factor": [one] * self.ctx.n_bands, "scale": [one] * self.ctx.n_bands}, best=start)
        rng = np.random.default_rng(self.settings.seed)
        coordinates = [(b, kind) for b in self.ctx.band_order for kind in kinds]
        while self._sweep(state, coordinates, rng):  # until a whole sweep improves nothing, or the budget ends
            pass
        return state.best

    def _population(self, kinds: tuple[str, ...]) -> int:
        return self.settings.population or default_population(self.ctx.n_bands * len(kinds))

    def _evolve(self, start: Evaluation, grid: tuple[float, ...], kinds: tuple[str, ...]) -> Evaluation:
        """CMA-ES over the searched kinds' band values, one generation after another."""
        n = self.ctx.n_bands
        steps = np.concatenate([np.full(n, 1.0 if kind == "factor" else CMAES_SCALE_STEP / CMAES_SIGMA)
                                for kind in kinds])
        es = CmaEs(mean=np.ones(n * len(kinds)), sigma=CMAES_SIGMA, lower=grid[0], upper=grid[-1],
                   population=self._population(kinds), seed=self.settings.seed, resolution=CMAES_RESOLUTION,
                   scales=steps)
        best = start

        def band_values(point: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
            values = {kind: tuple(round(float(v), 6) for v in point[i * n:(i + 1) * n]) for i, kind in enumerate(kinds)}
            return values.get("factor", (1.0,) * n), values.get("scale", (1.0,) * n)

        while self._budget_left():
            points = es.ask()
            results = []
            for i, (ev, fresh) in enumerate(self.evaluate_many(self._affordable([band_values(p) for p in points]))):
                results.append((ev, fresh))
                if fresh:
                    self._report(ev, best, f"generation {es.generation + 1} #{i + 1}")
                if ev.objective < best.objective:
                    best = ev
            if len(results) < len(points):  # the budget (in candidates or in time) ended inside the generation
                self._budget_left()
                return best
            if not any(fresh for _, fresh in results):
                self.stopped_by = "converged"
                return best
            es.tell(points, [ev.objective for ev, _ in results])
        return best

    def _affordable(self, candidates: list) -> list:
        """The longest prefix of ``candidates`` whose candidates new to this search fit in the budget left."""
        left, seen = self.settings.budget - len(self.history), set()
        for i, (factors, scales) in enumerate(candidates):
            key, _ = self.key(factors, scales)
            if key not in self.visited and key not in seen:
                if len(seen) == left:
                    return candidates[:i]
                seen.add(key)
        return candidates

    def _budget_left(self) -> bool:
        """Whether another candidate may start (and if not, says why in ``stopped_by``)."""
        if len(self.history) >= self.settings.budget:
            self.stopped_by = "budget"
            return False
        if self._time_spent():
            self.stopped_by = "time"
            return False
        return True

    def _time_spent(self) -> bool:
        limit = self.settings.time_budget
        return limit is not None and time.monotonic() - self.t0 >= limit

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

    def _record(self, start: Evaluation, best: Evaluation, grid: tuple[float, ...], kinds: tuple[str, ...]) -> dict:
        """What provenance keeps of the search."""
        s = self.settings
        failed = [e for e in self.history if e.failed is not None]
        strategy = {"strategy": s.strategy, "stopped_by": self.stopped_by, "time_budget": s.time_budget,
                    "failed": len(failed), "failures": sorted({e.failed for e in failed})}
        if s.strategy == "cmaes":
            strategy.update(population=self._population(kinds), sigma=CMAES_SIGMA, scale_step=CMAES_SCALE_STEP,
                            resolution=CMAES_RESOLUTION)
        return {**strategy,
            "objective": s.objective, "objective_unit": "mean NLL, nats/token" if s.objective == "ppl"
            else "mean KL divergence, nats/token", "start": start.objective, "reached": best.objective,
            "start_ppl": start.ppl, "ppl": best.ppl, "dev_text_sha256": self.text_sha,
            "dev_text_tokens": best.n_text_tokens, "dev_scored_tokens": best.n_scored, "dev_ctx": self.dev_ctx,
            "dev_chunks": s.dev_chunks, "budget": s.budget, "evaluations": len(self.history), "seed": s.seed,
            "space": s.space, "grid": list(grid), "type_k": s.type_k, "band_order": self.ctx.band_order,
            "symmetric": self.options.plan.bands.symmetric,
        }

    def _value(self, ev: Evaluation) -> str:
        if ev.failed is not None:
            return f"failed ({ev.failed})"
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
    if settings.strategy not in STRATEGIES:
        raise QroarError(f"unknown search strategy {settings.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if settings.population is not None and (isinstance(settings.population, bool) or int(settings.population) < 2):
        raise QroarError(f"--search-population must be at least 2, got {settings.population!r}")
    if isinstance(settings.workers, bool) or int(settings.workers) < 1:
        raise QroarError(f"--search-workers must be at least 1, got {settings.workers!r}")
    if settings.time_budget is not None and not (math.isfinite(settings.time_budget) and settings.time_budget > 0):
        raise QroarError(f"--search-time must be a positive number of seconds, got {settings.time_budget!r}")
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
    candidates = [{"factors": list(ev.factors), "scales": list(ev.scales),
                   "objective": None if ev.failed else ev.objective, "ppl": None if ev.failed else ev.ppl,
                   "kld": ev.kld, "seconds": round(ev.seconds, 1), **({"failed": ev.failed} if ev.failed else {}),
                   "best_so_far": min(e.objective for e in result.history[: i + 1])}
                  for i, ev in enumerate(result.history)]
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
