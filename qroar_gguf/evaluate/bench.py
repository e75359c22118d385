"""`qroar-gguf bench`: every plan x quantization x context on the same chunks, in one run, cached.

For each (plan, ctx) the unquantized F16 GGUF is built once and is the KL reference of that plan's
quantized files (so KLD isolates what quantization costs under that plan). Each quantized file is
evaluated in lockstep with its reference on the same chunks, which yields both perplexities, the KL
divergence and per-token NLLs for paired comparisons between plans. Built files and finished
evaluations are cached under OUT/models and OUT/runs, keyed by everything that determines them, so a
rerun (or an interrupted run) redoes nothing already measured.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import click
import numpy as np

from qroar_gguf import __version__
from qroar_gguf.arch.families import checkpoint_hparams
from qroar_gguf.convert import ConvertOptions, convert
from qroar_gguf.digests import sha256_file
from qroar_gguf.errors import QroarError
from qroar_gguf.evaluate.kld import kl_divergence
from qroar_gguf.evaluate.paired import paired_compare
from qroar_gguf.evaluate.passkey import DEFAULT_DEPTHS, passkey
from qroar_gguf.evaluate.perplexity import n_scored_per_chunk, ppl_standard_error
from qroar_gguf.evaluate.runtime import Runtime
from qroar_gguf.gguf_io.quantize import FTYPES, quantize_gguf
from qroar_gguf.outputs import temporary_beside
from qroar_gguf.paths import cache_dir
from qroar_gguf.rope.spec import PlanSpec
from qroar_gguf.source.text import read_text

REFERENCE_QTYPE = "F16"


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _source_fingerprint(model: Path) -> list:
    files = sorted(p for p in (model.iterdir() if model.is_dir() else [model]) if p.is_file())
    return [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files]


class Bench:
    def __init__(self, model: Path, text: Path, out: Path, threads: int, progress: bool, chunks: int,
                 passkey_trials: int, passkey_depths: tuple[float, ...] | None = None):
        self.text = read_text(text)  # before any folder is made: a bad text leaves nothing behind
        self.model, self.text_path, self.out = model, text, out
        self.threads, self.progress, self.chunks = threads, progress, chunks
        self.passkey_trials = passkey_trials
        self.passkey_depths = tuple(float(d) for d in (passkey_depths or DEFAULT_DEPTHS))
        self.runs, self.shared = out / "runs", cache_dir() / "bench-runs"
        self.shared.mkdir(parents=True, exist_ok=True)
        self.text_digest = _digest(self.text)
        self.source = _source_fingerprint(model if model.is_dir() else model.parent)
        (out / "models").mkdir(parents=True, exist_ok=True)
        self.runs.mkdir(parents=True, exist_ok=True)

    # -- building ------------------------------------------------------------------------------
    def build(self, spec: PlanSpec, ctx: int, qtype: str) -> Path:
        """The GGUF of one plan at one context and quantization, built once."""
        key = _digest(__version__, self.source, spec.method, spec.record(), ctx, qtype)
        path = self.out / "models" / f"{_safe(spec.label)}.{ctx}.{qtype}.{key}.gguf"
        if path.is_file():
            return path
        if qtype == REFERENCE_QTYPE:
            convert(self.model, path, ConvertOptions(plan=spec, target_ctx=ctx, qtype=qtype, threads=self.threads,
                                                     progress=self.progress))
        else:
            reference = self.build(spec, ctx, REFERENCE_QTYPE)
            with temporary_beside(path, "partial") as partial:
                quantize_gguf(reference, partial, qtype, self.threads, progress=self.progress)
                partial.replace(path)
        return path

    # -- measuring -----------------------------------------------------------------------------
    def evaluate(self, spec: PlanSpec, ctx: int, qtype: str, built_for: int, type_k: str = "f16") -> dict:
        """PPL, KLD against the same plan's F16 file, per-token NLLs at `ctx` with key cache `type_k`
        (both models), of the files built for target context `built_for`, and passkey retrieval when
        asked; each part cached on its own."""
        quant, reference = self.build(spec, built_for, qtype), self.build(spec, built_for, REFERENCE_QTYPE)
        quant_digest = sha256_file(quant)[:16]
        # (the trailing 0 keeps keys of evaluations recorded before passkey had its own record)
        key = _digest(quant_digest, sha256_file(reference)[:16], ctx, self.chunks, self.text_digest, type_k, 0)
        name = f"{_safe(spec.label)}.{ctx}.{qtype}.{key}.json"
        row = self._cached(name, ".nll.npy")
        if row is None:
            measured, nll = self._measure(spec, ctx, qtype, type_k, quant, reference)
            row = {"plan": spec.label, "method": spec.method, "options": spec.record(), "ctx": ctx,
                   "built_for_ctx": built_for, "qtype": qtype, "type_k": type_k, "file": quant.name, **measured}
            self._store(name, row, (".nll.npy", nll))
        row["run"] = name
        if self.passkey_trials:
            row.update(self._passkey(spec, ctx, qtype, type_k, quant, quant_digest))
        return row

    def _measure(self, spec, ctx, qtype, type_k, quant: Path, reference: Path) -> tuple[dict, np.ndarray]:
        with Runtime(reference, n_ctx=ctx, threads=self.threads, type_k=type_k) as ref, \
                Runtime(quant, n_ctx=ctx, threads=self.threads, type_k=type_k) as rt:
            res = kl_divergence(rt, ref, self.text, max_chunks=self.chunks, quiet=not self.progress,
                                desc=f"{spec.label} {qtype} @ {ctx}")
        measured = dict(ppl=res.ppl, ppl_se=ppl_standard_error(res.nll), ref_ppl=res.ref_ppl,
                        ref_ppl_se=ppl_standard_error(res.ref_nll), kld_mean=res.mean, kld_median=res.median,
                        kld_p99=res.p99, same_top_pct=res.same_top_pct, n_chunks=res.n_chunks,
                        n_scored=res.n_scored, seconds=res.seconds)
        return measured, np.stack([res.nll, res.ref_nll])

    def _passkey(self, spec, ctx, qtype, type_k, quant: Path, quant_digest: str) -> dict:
        key = _digest(quant_digest, ctx, type_k, self.passkey_trials, self.passkey_depths)
        name = f"{_safe(spec.label)}.{ctx}.{qtype}.passkey.{key}.json"
        record = self._cached(name)
        if record is None:
            with Runtime(quant, n_ctx=ctx, threads=self.threads, type_k=type_k) as rt:
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
                np.save(path.with_suffix(arrays[0]), arrays[1])
            path.write_text(json.dumps(record, indent=2))

    def nll(self, row: dict, reference: bool = False) -> np.ndarray:
        """Per-token NLLs of the evaluation behind `row` (the reference's with `reference`)."""
        return np.load((self.runs / row["run"]).with_suffix(".nll.npy"))[1 if reference else 0]


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_=" else "_" for c in label)


def _check_qtypes(qtypes: list[str]) -> None:
    """Refused before building anything (plans and their options are checked as they are parsed)."""
    unknown = [q for q in qtypes if q not in FTYPES]
    if unknown:
        raise QroarError(f"unknown --qtype {unknown[0]}; choose one of {', '.join(FTYPES)}")


def run_bench(model: Path, ctxs: list[int], qtypes: list[str], plans: list[str], text: Path, out: Path,
              chunks: int = 1, type_k: str | list[str] = "f16", passkey_trials: int = 0, threads: int = 2,
              progress: bool = True, passkey_depths: list[float] | None = None) -> dict:
    specs = [PlanSpec.parse(p) for p in plans]
    qtypes = [q.upper() for q in qtypes]
    type_ks = [type_k] if isinstance(type_k, str) else list(type_k)
    trained = checkpoint_hparams(model).context_length
    _check_qtypes(qtypes)
    bench = Bench(model, text, out, threads, progress, chunks, passkey_trials, passkey_depths)

    extended = sorted(c for c in ctxs if c > trained)
    rows: list[dict] = []
    jobs = [(s, c, q, k) for k in type_ks for c in ctxs for s in specs for q in qtypes]
    t0 = time.monotonic()
    for i, (spec, ctx, qtype, tk) in enumerate(jobs, 1):
        # A file is built for a target context; rows at or below the trained context run the file
        # built for the smallest extended target, to show what extension costs at short context.
        built_for = ctx if ctx > trained or spec.method == "none" else (extended[0] if extended else 2 * trained)
        row = bench.evaluate(spec, ctx, qtype, built_for, tk)
        rows.append(row)
        click.echo(f"[{i}/{len(jobs)}] {spec.label:<24} {qtype:<7} K {tk:<4} ctx {ctx:>6}: PPL {row['ppl']:8.3f} "
                   f"(F16 {row['ref_ppl']:.3f}), KLD {row['kld_mean']:.4f}"
                   + (f", passkey {row['passkey']:.0%}" if "passkey" in row else "")
                   + f"  [{time.monotonic() - t0:.0f} s]", err=True)
    _add_ratios(bench, rows)
    results = {"version": __version__, "model": str(model), "text": text.name, "text_sha": bench.text_digest,
               "chunks": chunks, "type_k": ", ".join(type_ks), "type_ks": type_ks, "ctxs": ctxs, "qtypes": qtypes, "plans": plans, "rows": rows}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(results_markdown(results))
    try:
        plot_ppl_vs_ctx(results, out / "ppl_vs_ctx.png")
    except ImportError:
        pass
    return results


def _add_ratios(bench: Bench, rows: list[dict]) -> None:
    """Paired ratios to linear and yarn (same ctx, qtype and key cache, same tokens) with 95% intervals."""
    index = {(r["plan"], r["ctx"], r["qtype"], r["type_k"]): r for r in rows}
    for row in rows:
        for other in ("linear", "yarn"):
            ref = index.get((other, row["ctx"], row["qtype"], row["type_k"]))
            if ref is None or ref is row:
                continue
            # With several windows, the standard error comes from per-window mean differences (tokens
            # within a window are correlated); with one window it is per token.
            block = n_scored_per_chunk(row["ctx"]) if row["n_chunks"] > 1 else None
            cmp = paired_compare(bench.nll(row), bench.nll(ref), block=block)
            row[f"ratio_to_{other}"] = cmp.ppl_ratio
            row[f"ratio_to_{other}_ci95"] = list(cmp.ratio_ci95)


def results_markdown(results: dict) -> str:
    lines = [f"Model `{Path(results['model']).name}`, text {results['text']}, {results['chunks']} chunk(s) per "
             f"context, key cache {results['type_k']}. PPL of the second half of each window "
             "(llama-perplexity's protocol) +/- standard error; ratios are paired on the same tokens (95% "
             "interval); KLD is against the same plan's unquantized F16 file.", "",
             "| plan | qtype | K cache | ctx | PPL | F16 PPL | / linear | / yarn | KLD | same top % | passkey |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(row: dict, other: str) -> str:
        if f"ratio_to_{other}" not in row:
            return "-"
        lo, hi = row[f"ratio_to_{other}_ci95"]
        return f"{row[f'ratio_to_{other}']:.3f} [{lo:.3f}, {hi:.3f}]"

    for r in sorted(results["rows"], key=lambda r: (r["type_k"], r["ctx"], r["qtype"], r["ppl"])):
        passkey = f"{r['passkey']:.0%}" if "passkey" in r else "-"
        lines.append(f"| {r['plan']} | {r['qtype']} | {r['type_k']} | {r['ctx']} | {r['ppl']:.3f} +/- {r['ppl_se']:.3f} | "
                     f"{r['ref_ppl']:.3f} | {ratio(r, 'linear')} | {ratio(r, 'yarn')} | {r['kld_mean']:.4f} | "
                     f"{r['same_top_pct']:.1f} | {passkey} |")
    return "\n".join(lines) + "\n"


def plot_ppl_vs_ctx(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results["qtypes"]), figsize=(6 * len(results["qtypes"]), 4.5), squeeze=False)
    for ax, qtype in zip(axes[0], results["qtypes"]):
        type_ks = results.get("type_ks", [results["type_k"]])
        for plan in results["plans"]:
            for tk in type_ks:
                pts = sorted((r["ctx"], r["ppl"], r["ppl_se"]) for r in results["rows"]
                             if r["plan"] == plan and r["qtype"] == qtype and r["type_k"] == tk)
                if pts:
                    x, y, e = zip(*pts)
                    ax.errorbar(x, y, yerr=e, marker="o", capsize=3,
                                label=plan if len(type_ks) == 1 else f"{plan} (K {tk})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{Path(results['model']).name} {qtype} on {results['text']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
