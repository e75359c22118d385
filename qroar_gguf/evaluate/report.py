"""`qroar-gguf eval`: measure one GGUF file and format what was measured."""

from __future__ import annotations

from pathlib import Path

from qroar_gguf.errors import QroarError
from qroar_gguf.evaluate.kld import kl_divergence
from qroar_gguf.evaluate.passkey import passkey
from qroar_gguf.evaluate.perplexity import perplexity
from qroar_gguf.evaluate.runtime import Runtime, device_summary, gpu_layers_for
from qroar_gguf.gguf_io.layout import read_layout
from qroar_gguf.source.text import read_text


def evaluate_file(model: Path, text_path: Path, ctx: int, *, chunks: int | None = None, reference: Path | None = None,
                  passkey_trials: int = 0, type_k: str = "f16", threads: int = 2, progress: bool = True,
                  gpu_layers: int | None = None) -> dict:
    """Perplexity (and KLD against `reference`, passkey accuracy) of `model`; returns printable lines and JSON.
    ``gpu_layers``: `--gpu-layers` as given (None: all layers where libllama has a GPU back-end)."""
    text = read_text(text_path)
    _require_gguf(model)
    n_gpu_layers = gpu_layers_for(gpu_layers)
    lines: list[str] = []
    out: dict = {"model": str(model), "text": str(text_path), "ctx": ctx, "type_k": type_k,
                 "device": device_summary(n_gpu_layers)}
    runtime = dict(n_ctx=ctx, threads=threads, type_k=type_k, n_gpu_layers=n_gpu_layers)
    with Runtime(model, **runtime) as rt:
        if reference is not None:
            _require_gguf(reference)
            with Runtime(reference, **runtime) as ref:
                res = kl_divergence(rt, ref, text, max_chunks=chunks, quiet=not progress)
            d = res.to_dict()
            out["kld"] = d
            out["perplexity"] = {"ppl": res.ppl, "n_chunks": res.n_chunks, "n_scored": res.n_scored}
            lines.append(f"PPL {res.ppl:.4f}, reference PPL {res.ref_ppl:.4f} (ratio {res.ppl_ratio:.4f}) over "
                         f"{res.n_chunks} x {ctx} tokens, {res.n_scored} scored")
            lines.append(f"KLD mean {res.mean:.5f} +/- {res.mean_se:.5f}, median {res.median:.5f}, p99 {res.p99:.4f}; "
                         f"same top token {res.same_top_pct:.2f}%")
        else:
            res = perplexity(rt, text, max_chunks=chunks, quiet=not progress)
            out["perplexity"] = res.to_dict()
            lines.append(f"PPL {res.ppl:.4f} +/- {res.ppl_se:.4f} over {res.n_chunks} x {ctx} tokens "
                         f"({res.n_scored} scored), {res.tokens_per_second:.0f} tokens/s")
        if passkey_trials:
            pk = passkey(rt, trials=passkey_trials, quiet=not progress)
            out["passkey"] = pk.to_dict()
            depths = ", ".join(f"{d:.0%}: {a:.0%}" for d, a in pk.by_depth.items())
            lines.append(f"passkey accuracy {pk.accuracy:.0%} at {pk.target_tokens} tokens ({depths})")
    return {"lines": lines, "json": out}


def _require_gguf(path: Path) -> None:
    """A GGUF whose every count, length and offset fits the file (the bounded reader's checks), before
    llama.cpp is given it: a damaged file is then one line from here, whatever llama.cpp would do."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise QroarError(f"{path} is not a GGUF file")
    read_layout(path)
