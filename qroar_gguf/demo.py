"""`qroar-gguf demo`: the whole product on the embedded SmolLM2-135M model.

Converts the default model twice (unscaled, and with the chosen plan at 2x its trained context),
then measures perplexity in llama.cpp on a public-domain novel: the unscaled model at its trained
context (the quality to keep), the unscaled model beyond it (what breaks), our file beyond it.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from qroar_gguf.arch.families import checkpoint_hparams
from qroar_gguf.assets.austen import austen_text
from qroar_gguf.assets.smollm2 import default_model_dir
from qroar_gguf.convert import ConvertOptions, convert
from qroar_gguf.errors import QroarError
from qroar_gguf.evaluate.perplexity import perplexity
from qroar_gguf.evaluate.runtime import Runtime
from qroar_gguf.llama_tools import find_tool
from qroar_gguf.paths import cache_dir
from qroar_gguf.rope.plans import extends
from qroar_gguf.rope.spec import PlanSpec


def run_demo(method: str, ctx: int | None, qtype: str, text_title: str, threads: int, progress: bool,
             measure: bool = True) -> list[dict]:
    """The demo's four steps; `measure=False` stops after converting (no perplexity runs)."""
    say = click.echo
    say("1/4 default model: SmolLM2-135M-Instruct rebuilt as a Hugging Face fp16 checkpoint")
    model_dir = default_model_dir(progress=progress)
    text_path = austen_text(text_title)
    text = text_path.read_text(encoding="utf-8")
    say(f"    {model_dir}\n    text: {text_title} by Jane Austen ({len(text.split())} words, {text_path})")

    work = cache_dir() / "demo"
    work.mkdir(exist_ok=True)
    trained = checkpoint_hparams(model_dir).context_length
    target = ctx or 2 * trained
    if not extends(trained, target):  # the plans' one rule: a longer context, never the trained one
        raise QroarError(f"--ctx {target} must be larger than the model's trained context {trained}: the demo "
                         "shows a longer context")

    say(f"2/4 convert: --method {method} --ctx {target} --qtype {qtype} (and an unscaled file to compare)")
    files = {}
    for label, m, c in (("unscaled", "none", trained), (method, method, target)):
        out = work / f"SmolLM2-135M-Instruct.{m}.{c}.{qtype}.gguf"
        result = convert(model_dir, out, ConvertOptions(plan=PlanSpec(m), target_ctx=c, qtype=qtype, threads=threads,
                                                        force=True, progress=progress))
        f = result.factors
        say(f"    {out.name}: {out.stat().st_size / 2**20:.0f} MiB in {result.seconds:.1f} s, rope_freqs "
            f"{f.min():.3g}..{f.max():.3g}, attention scale {result.plan.attn_scale:.4g}")
        files[label] = out

    if measure:
        rows = _measure(files, method, trained, target, text, threads, progress)
    else:
        rows = []
        say("3/4 perplexity: skipped (--no-perplexity)")

    say("4/4 summary")
    if rows:
        base, broken, ours = rows
        say(f"    beyond its trained context ({target} tokens) the unscaled model reaches PPL {broken['ppl']:.1f}; "
            f"with --method {method} it reaches {ours['ppl']:.1f} ({ours['ppl'] / broken['ppl']:.2f}x), against "
            f"{base['ppl']:.1f} at its own {trained} tokens.")
    say("    run it with llama-cpp-python (the file needs no rope options):")
    say(f"      {shlex.join(run_command(files[method], target))}")
    try:
        cli, server = find_tool("llama-cli"), find_tool("llama-server")
    except QroarError as exc:
        say(f"    llama.cpp's own programs are not available here: {exc}")
        return rows
    say("    or serve it as Ollama does (llama.cpp's llama-server, built by the set-up; OpenAI API on port 8080):")
    say(f"      {shlex.join([str(server), '-m', str(files[method]), '-c', str(target)])}")
    say("    or chat with it in llama.cpp's llama-cli:")
    say(f"      {shlex.join([str(cli), '-m', str(files[method]), '-c', str(target)])}")
    return rows


def run_command(model: Path, n_ctx: int, prompt: str = "Emma Woodhouse, handsome, clever, and rich,") -> list[str]:
    """A command that loads `model` at `n_ctx` tokens in this interpreter's llama-cpp-python and continues `prompt`."""
    code = ("import sys; from llama_cpp import Llama; "
            "llm = Llama(sys.argv[1], n_ctx=int(sys.argv[2]), verbose=False); "
            'print(llm(sys.argv[3], max_tokens=24)["choices"][0]["text"])')
    return [sys.executable, "-c", code, str(model), str(n_ctx), prompt]


def _measure(files: dict[str, Path], method: str, trained: int, target: int, text: str, threads: int,
             progress: bool) -> list[dict]:
    say = click.echo
    say(f"3/4 perplexity in llama.cpp (one window each, second half scored, {threads} threads)")
    rows = []
    for label, path, n_ctx in (("unscaled", files["unscaled"], trained), ("unscaled", files["unscaled"], target),
                               (method, files[method], target)):
        with Runtime(path, n_ctx=n_ctx, threads=threads) as rt:
            res = perplexity(rt, text, max_chunks=1, quiet=not progress, desc=f"{label} @ {n_ctx}")
        rows.append({"file": label, "ctx": n_ctx, "ppl": res.ppl, "ppl_se": res.ppl_se, "seconds": res.seconds})
        say(f"    {label:>9} at {n_ctx:>6} tokens: PPL {res.ppl:8.2f} +/- {res.ppl_se:.2f}  ({res.seconds:.0f} s)")
    return rows
