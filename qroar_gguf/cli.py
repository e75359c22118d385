"""Command line: parses options and delegates. `qroar-gguf MODEL -o OUT` means `convert`."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import click

from qroar_gguf import __version__
from qroar_gguf.choices import (
    AGGREGATIONS,
    BENCH_EVALUATORS,
    CONVERTERS,
    DEFAULT_AGG,
    DEFAULT_BETA,
    DEFAULT_IMATRIX_TOKENS,
    DEFAULT_METHOD,
    DEMO_QTYPE,
    DEMO_TEXT,
    IMATRIX_AXIS,
    IMATRIX_SHORT_WINDOW,
    KEY_CACHE_TYPES,
    METHODS,
    NATIVE_ROUTES,
    QTYPE_FAMILIES,
    QTYPES,
    QUANTIZERS,
)
from qroar_gguf.display import printable
from qroar_gguf.errors import QroarError, Stopped, UsageProblem, stop_on_signals
from qroar_gguf.outputs import check_destination, describe_os_error, publish_text
from qroar_gguf.search_settings import (
    DEFAULT_BUDGET,
    DEFAULT_DEV_CHUNKS,
    DEFAULT_DEV_TEXT,
    DEFAULT_SPACE,
    OBJECTIVES,
    SPACES,
    STRATEGIES,
)

THREADS = click.IntRange(min=1, max=512)  # ggml's GGML_MAX_N_THREADS: more crash its thread pool
QTYPE = click.Choice(QTYPES, case_sensitive=False)  # llama-quantize's names; file_types canonicalizes aliases


def _qtype_list() -> str:
    """--help's list of the --qtype names by family, a line on what each family is for."""
    import textwrap

    lines = ["Quantization types (--qtype, any case; Q3_K, Q4_K and Q5_K stand for their _M):", ""]
    for family, (purpose, types) in QTYPE_FAMILIES.items():
        own: dict[int, str] = {}  # each type by its own name, the first with its number (aliases follow it)
        for name, ftype in types.items():
            own.setdefault(ftype, name)
        lines.append("\b")
        lines += textwrap.wrap(f"{family}: {' '.join(own.values())}", 78, subsequent_indent="    ")
        lines += textwrap.wrap(purpose, 78, initial_indent="    ", subsequent_indent="    ")
        lines.append("")
    return "\n".join(lines)


def _route_list() -> str:
    """--help's list of the families and the route each takes."""
    import textwrap

    lines = ["Routes (--converter auto): qroar-gguf's own converter for", "", "\b"]
    lines += [f"  {name}: {route}" for name, route in NATIVE_ROUTES.items()]
    lines += [""] + textwrap.wrap(
        "Every other architecture llama.cpp's convert_hf_to_gguf.py takes (Qwen3-MoE, Gemma 2/3, Phi-3/4, OLMo 2, "
        "GLM-4, Granite, ...) goes through it (from the pinned llama.cpp; needs torch and transformers), then "
        "through patch's plan step: per-pair factors as rope_freqs where the GGUF arch's loader reads them, "
        "llama.cpp's rope keys elsewhere (yarn, linear, ntk; YaRN's temperature folded into the q/k rows; Gemma 3: "
        "linear or ntk, its sliding layers keep no YaRN temperature exact; deepseek2: the keys alone, llama.cpp builds "
        "its temperature from them). Refused with the reason: multimodal RoPE, arches without RoPE.", 78)
    return "\n".join(lines + [""])


class DefaultToConvert(click.Group):
    """A group whose first argument, when it is not a subcommand, is the model to convert."""

    # Options of these commands take several values at once (`--ctx 16384 32768`): click wants the
    # option repeated, so the values are spread over repeated options before parsing.
    LIST_OPTIONS = {"bench": ("--ctx", "--qtype", "--plans", "--type-k", "--imatrix", "--attn-type", "--passkey-depths")}

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["convert", *args]
        if args and args[0] in self.LIST_OPTIONS:
            args = _spread_lists(args, self.LIST_OPTIONS[args[0]])
        return super().parse_args(ctx, args)

    def main(self, args=None, prog_name=None, **extra):
        """Exit statuses: 0 done, 1 an error in the input or the environment, 2 a command-line usage
        error, 128+N stopped by signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP). Each error is one line
        on stderr, and no output file is left half-written."""
        try:
            stop_on_signals()
            status = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help())
            sys.exit(0)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"Error: {printable(_one_line(exc.format_message()))}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:  # escaped: the message may quote a file's names
            click.echo(f"Error: {printable(_one_line(exc.format_message()))}", err=True)
            sys.exit(exc.exit_code)
        except BrokenPipeError:
            _reader_left()
        except click.Abort as exc:  # click turns a KeyboardInterrupt outside a command into Abort
            _exit_interrupted(exc.__cause__)
        except KeyboardInterrupt as exc:  # one that arrived outside click's own handling
            _exit_interrupted(exc)
        try:
            sys.stdout.flush()  # here, not at shutdown, where a closed pipe would print a warning
        except BrokenPipeError:
            _reader_left()
        sys.exit(status if isinstance(status, int) else 0)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UsageProblem as exc:
            raise click.UsageError(str(exc)) from None
        except QroarError as exc:
            raise click.ClickException(str(exc)) from None
        except BrokenPipeError:  # before OSError: not a problem with any file
            _reader_left()
        except OSError as exc:  # the environment (disk, permissions, names), not a bug: one line
            raise click.ClickException(describe_os_error(exc, "use", exc.filename or "a file")) from None
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP as Stopped; every `finally` has run
            _exit_interrupted(exc)


def _exit_interrupted(exc: BaseException | None) -> None:
    """Every `finally` has run by now; leave at once with 128 + the signal's number, so that nothing in
    the interpreter's shutdown (a second Ctrl-C, a library's exit hook) can change the status."""
    signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
    click.echo("interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


def _reader_left() -> None:
    """Whoever read our output closed it (`qroar-gguf inspect F | head`): there is nothing wrong to report
    and no one to report it to. Leave silently as a process that SIGPIPE stops does, 128 + SIGPIPE, with
    stdout on /dev/null so that nothing at shutdown tries the closed pipe again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    os._exit(128 + signal.SIGPIPE)


def _refuse_same_file(named: list[tuple[str, Path | None]]) -> None:
    """Two options naming one file would have one overwrite the other (or an input)."""
    seen: dict[Path, str] = {}
    for option, path in named:
        if path is None:
            continue
        key = path.resolve()
        if key in seen:
            raise click.UsageError(f"{seen[key]} and {option} name the same file {path}: give each its own")
        seen[key] = option


def _model_files(model: Path) -> list[Path]:
    """The files a model argument stands for: a checkpoint's folder holds config, tokenizer and weights."""
    folder = model if model.is_dir() else model.parent if model.suffix != ".gguf" else None
    return [model] + ([p for p in folder.iterdir() if p.is_file()] if folder is not None else [])


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _spread_lists(args: list[str], options: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    current = None
    for arg in args:
        if arg.startswith("-"):
            current = arg if arg in options else None
            out.append(arg)
        elif current is not None and out[-1] != current:
            out += [current, arg]
        else:
            out.append(arg)
    return out


def _show_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


@click.group(cls=DefaultToConvert, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qroar-gguf")
def main() -> None:
    """Turn a Hugging Face checkpoint (Llama, Mistral, Qwen2 with qroar-gguf's own converter; Qwen3,
    Qwen3-MoE, Gemma 3, Phi-3, OLMo 2, GLM-4 and any other architecture llama.cpp's converter takes,
    through it) into a quantized GGUF that stock llama.cpp, Ollama and llama-cpp-python run beyond its
    trained context with no runtime flags: per-pair RoPE factors as the tensor rope_freqs.weight where
    the arch's loader reads it, llama.cpp's own rope keys elsewhere.

    \b
    qroar-gguf model.safetensors -o model.Q4_K_M.gguf --ctx 32768
    qroar-gguf patch downloaded.Q4_K_M.gguf -o extended.Q4_K_M.gguf --ctx 32768
    qroar-gguf inspect model.Q4_K_M.gguf
    qroar-gguf demo
    """


def _options(*decorators):
    """Options several commands share, applied in the order listed."""
    def apply(f):
        for decorator in reversed(decorators):
            f = decorator(f)
        return f
    return apply


_target_options = _options(
    click.option("--ctx", "target_ctx", type=click.IntRange(min=1), default=None,
                 help="Target context length in tokens. Default: 4x the trained context (1x for --method none)."),
    click.option("--scale", type=click.FloatRange(min=1.0), default=None,
                 help="Target context as a multiple of the trained one (instead of --ctx)."),
    click.option("--method", type=click.Choice(METHODS), default=DEFAULT_METHOD, show_default=True,
                 help="RoPE plan: none, linear (position interpolation), ntk, yarn, llama3, or qroar "
                      "(outlier-protecting factors measured from W_Q/W_K)."),
)
_plan_detail_options = _options(
    click.option("--beta", type=click.FloatRange(min=0.0), default=None,
                 help="qroar: protection strength for outlier pairs (0 = the base plan exactly). "
                      f"Default {DEFAULT_BETA:g}."),
    click.option("--agg", type=click.Choice(AGGREGATIONS), default=None,
                 help=f"qroar: how pair sensitivity is aggregated over layers. Default {DEFAULT_AGG}."),
    click.option("--base", type=click.Choice(["linear", "yarn", "llama3"]), default=None,
                 help="qroar: the plan whose interpolation is softened on protected pairs. Default yarn."),
    click.option("--attn-scale/--no-attn-scale", default=None,
                 help="yarn (and qroar on a yarn base): YaRN's attention scale 0.1*ln(r)+1, folded into W_Q and "
                      "W_K (patch: into their block scales). Default on."),
    click.option("--bands", type=click.IntRange(min=1), default=4, show_default=True,
                 help="Frequency bands of rotary pairs (by rotations in the trained context) for --band-factors, "
                      "--band-scales and --search."),
    click.option("--band-factors", default=None, metavar="M1,M2,...",
                 help="Per-band rope_freqs multipliers on top of the plan (one per band; factors never below 1)."),
)


def _plan_spec(method: str, beta: float | None, agg: str | None, base: str | None, attn_scale: bool | None,
               bands: int, band_factors: str | None, band_scales: str | None, symmetric: bool | None):
    """The PlanSpec the plan options ask for (PlanSpec refuses options of another method as usage errors)."""
    from qroar_gguf.rope.spec import BandSpec, PlanSpec

    plan_options = {k: v for k, v in {"beta": beta, "base": base, "attn_scale": attn_scale}.items() if v is not None}
    band_spec = BandSpec(
        count=bands, symmetric=symmetric,
        factors=None if band_factors is None else BandSpec.parse_values(band_factors, bands, "--band-factors"),
        scales=None if band_scales is None else BandSpec.parse_values(band_scales, bands, "--band-scales"))
    return PlanSpec(method, plan_options, agg, band_spec)


@main.command(epilog=_route_list() + "\n" + _qtype_list())
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="GGUF file to write (appears only when complete). Default: NAME-SIZE-CTX-QTYPE.gguf in the "
                   "current folder, named from the model's metadata as llama.cpp's converter names files.")
@_target_options
@click.option("--qtype", type=QTYPE, default=None, metavar="TYPE",
              help="Quantization (any name llama-quantize takes, listed below), done by llama.cpp's own quantizer. "
                   "Default: the type -o's name says (model.Q8_0.gguf), else Q4_K_M; a --qtype that -o's name "
                   "contradicts is refused unless --force.")
@click.option("--threads", type=THREADS, default=os.cpu_count() or 1, show_default=True,
              help="Threads for quantization.")
@click.option("--quantizer", type=click.Choice(QUANTIZERS), default="libllama", show_default=True,
              help="llama.cpp's quantizer through the Python bindings, or its llama-quantize program "
                   "(`qroar-gguf tools`); the same code, the same bytes.")
@click.option("--imatrix", "imatrix", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Quantize with this importance matrix (llama-imatrix's output).")
@click.option("--imatrix-text", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Compute the importance matrix on this UTF-8 text with llama-imatrix, on the unquantized file with "
                   "the plan applied, in --imatrix-ctx windows (cached). Never the text you evaluate on.")
@click.option("--imatrix-ctx", type=click.IntRange(min=16), default=None,
              help=f"--imatrix-text: window in tokens. Default: {IMATRIX_SHORT_WINDOW}, as llama.cpp's matrices are "
                   "usually made (docs/results.md compares windows of the target context).")
@click.option("--imatrix-chunks", type=click.IntRange(min=1), default=None,
              help=f"--imatrix-text: windows of the text to use (fewer if the text runs out). Default: as many as "
                   f"make {DEFAULT_IMATRIX_TOKENS} tokens.")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="PATTERN=TYPE",
              help="Type of the tensors whose names match PATTERN, e.g. attn_q=q8_0 (repeatable; llama-quantize's "
                   "option).")
@click.option("--output-tensor-type", default=None, metavar="TYPE", help="Type of output.weight, e.g. q8_0.")
@click.option("--token-embedding-type", default=None, metavar="TYPE", help="Type of token_embd.weight, e.g. q8_0.")
@click.option("--keep-f16", type=click.Path(path_type=Path), default=None,
              help="Also keep the unquantized intermediate GGUF at this path.")
@_plan_detail_options
@click.option("--band-scales", default=None, metavar="A1,A2,...",
              help="Per-band scales folded into W_Q/W_K rows (both rows of each pair, every head).")
@click.option("--symmetric/--no-symmetric", default=None,
              help="Band scales: W_Q*a and W_K/a (full-precision logits unchanged), or both *a (a per-band logit "
                   "temperature). Default: symmetric for --band-scales, non-symmetric for --search (symmetric "
                   "scales barely change 4-bit weight error, so a search over them measures noise).")
@click.option("--search", is_flag=True,
              help="Search per-band factors (and scales, with --search-space), starting from --method, on --dev-text "
                   "for the quantized file (cached). `--search` alone is the configuration docs/results.md "
                   "measures at 4x; each candidate is a full-context evaluation (docs/results.md gives the time "
                   "it takes).")
@click.option("--dev-text", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help=f"--search: UTF-8 text to measure candidates on. Default: Jane Austen's {DEFAULT_DEV_TEXT} "
                   "(public domain, from Debian's r-cran-janeaustenr).")
@click.option("--dev-ctx", type=click.IntRange(min=8), default=None,
              help="--search: window length in tokens. Default: the target context.")
@click.option("--dev-chunks", type=click.IntRange(min=1), default=None,
              help=f"--search: at most this many windows of the dev text. Default: {DEFAULT_DEV_CHUNKS} (each window "
                   "of each candidate is a full-context evaluation).")
@click.option("--search-budget", type=click.IntRange(min=1), default=DEFAULT_BUDGET, show_default=True,
              help="--search: candidate evaluations at most (the starting plan included).")
@click.option("--search-seed", type=int, default=0, show_default=True,
              help="--search: seed (descent: order of moves; cmaes: its samples).")
@click.option("--search-strategy", type=click.Choice(STRATEGIES), default="descent", show_default=True,
              help="--search: coordinate descent on a grid of 0.8..1.25, or CMA-ES (a population search inside "
                   "the same range, generations of independent candidates).")
@click.option("--search-population", type=click.IntRange(min=2), default=None,
              help="--search-strategy cmaes: candidates per generation. Default: CMA-ES's 4 + 3 ln(coordinates).")
@click.option("--search-workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="--search-strategy cmaes: candidates measured at a time, each with --threads (a generation's "
                   "candidates are independent: on a GPU with memory for several, they run side by side). The "
                   "same search at any number, unless candidates fail for memory. A stop (Ctrl-C) waits for the "
                   "running ones.")
@click.option("--search-time", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="--search: start no candidate later than this many seconds after the start (with "
                   "--search-budget, whichever comes first).")
@click.option("--gpu-layers", type=click.IntRange(min=-1), default=None,
              help="--search: layers on the GPU while measuring (-1: all). Default: all where llama.cpp was "
                   "built with a GPU back-end, none otherwise.")
@click.option("--search-objective", type=click.Choice(OBJECTIVES), default="ppl", show_default=True,
              help="--search: perplexity, or KL divergence against each candidate's unquantized file.")
@click.option("--search-space", type=click.Choice(SPACES), default=DEFAULT_SPACE,
              show_default=True, help="--search: which band values to search.")
@click.option("--search-type-k", type=click.Choice(KEY_CACHE_TYPES), default="f16", show_default=True,
              help="--search: key cache type while measuring.")
@click.option("--search-report", type=click.Path(dir_okay=False, path_type=Path),
              help="--search: also write the search (every candidate, the best) to this JSON file.")
@click.option("--name", default=None,
              help="general.name. Default: from the checkpoint (config, model card, folder name).")
@click.option("--metadata", "metadata_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="JSON file of general.* values that override what the checkpoint says "
                                 "(llama.cpp's --metadata format, e.g. {\"general.license\": \"apache-2.0\"}).")
@click.option("--allow-patched-runtime", is_flag=True,
              help="Write a family whose rope_freqs only a patched llama.cpp loads (Qwen3: the tools the set-up "
                   "builds; stock llama.cpp and Ollama refuse such files).")
@click.option("--converter", type=click.Choice(CONVERTERS), default="auto", show_default=True,
              help="auto: qroar-gguf's own converter where the family has one (routes below), else llama.cpp's "
                   "convert_hf_to_gguf.py; native or llama.cpp insist on one.")
@click.option("--modelfile", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write an Ollama Modelfile (FROM the output, num_ctx its context, its chat template).")
@click.option("--force", is_flag=True,
              help="Overwrite existing output files, and write a --qtype that -o's name contradicts.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or summary.")
def convert(model: Path, output: Path | None, target_ctx: int | None, scale: float | None, method: str,
            qtype: str | None,
            threads: int, quantizer: str, imatrix: Path | None, imatrix_text: Path | None, imatrix_ctx: int | None,
            imatrix_chunks: int | None, tensor_types: tuple[str, ...], output_tensor_type: str | None,
            token_embedding_type: str | None, keep_f16: Path | None, beta: float | None, agg: str | None, base: str | None,
            attn_scale: bool | None, bands: int, band_factors: str | None, band_scales: str | None,
            symmetric: bool | None, search: bool, dev_text: Path | None, dev_ctx: int | None, dev_chunks: int | None,
            search_budget: int, search_seed: int, search_strategy: str, search_population: int | None,
            search_workers: int, search_time: float | None, gpu_layers: int | None, search_objective: str,
            search_space: str, search_type_k: str,
            search_report: Path | None, name: str | None, metadata_file: Path | None, allow_patched_runtime: bool,
            converter: str, modelfile: Path | None, force: bool, quiet: bool) -> None:
    """Convert MODEL (a .safetensors file with config.json and tokenizer beside it, a
    model.safetensors.index.json, or the checkpoint directory) to a GGUF file."""
    from qroar_gguf.convert import ConvertOptions
    from qroar_gguf.convert import convert as run_convert

    if not search and (any(v is not None for v in (dev_text, dev_ctx, dev_chunks, search_report, search_population,
                                                   search_time, gpu_layers))
                       or search_strategy != "descent" or search_workers > 1):
        raise click.UsageError("--dev-text, --dev-ctx, --dev-chunks, --search-report, --search-strategy, "
                               "--search-population, --search-workers, --search-time and --gpu-layers apply to "
                               "--search only")
    if (search_population is not None or search_workers > 1) and search_strategy != "cmaes":
        raise click.UsageError("--search-population and --search-workers apply to --search-strategy cmaes only")
    if symmetric is not None and band_scales is None and not search:
        raise click.UsageError("--symmetric/--no-symmetric applies to --band-scales or --search only")
    if output is not None and not output.name:
        raise click.UsageError("-o needs a file name")
    from qroar_gguf.file_types import choose_qtype
    from qroar_gguf.search_settings import SearchSettings

    qtype, qtype_origin = choose_qtype(qtype, output, force=force)

    if imatrix_text is None and (imatrix_ctx is not None or imatrix_chunks is not None):
        raise click.UsageError("--imatrix-ctx and --imatrix-chunks apply to --imatrix-text only")
    plan = _plan_spec(method, beta, agg, base, attn_scale, bands, band_factors, band_scales, symmetric)
    from qroar_gguf.gguf_io.imatrix import ImatrixRequest
    from qroar_gguf.gguf_io.quantize import TypeOverrides

    overrides = TypeOverrides(imatrix=imatrix, tensor_types=tensor_types, output_tensor_type=output_tensor_type,
                              token_embedding_type=token_embedding_type)
    imatrix_from = None
    if imatrix_text is not None:  # the window, unless given, is the request's default
        window = {} if imatrix_ctx is None else {"ctx": imatrix_ctx}
        imatrix_from = ImatrixRequest(imatrix_text, chunks=imatrix_chunks, **window)
    options = ConvertOptions(plan=plan, target_ctx=target_ctx, scale=scale,
                             qtype=qtype, threads=threads, quantizer=quantizer, overrides=overrides,
                             imatrix_from=imatrix_from, keep_f16=keep_f16,
                             force=force, progress=_show_progress(quiet), name=name, metadata=metadata_file,
                             allow_patched_runtime=allow_patched_runtime, converter=converter, modelfile=modelfile)
    if output is None:
        from qroar_gguf.convert import default_output

        output = default_output(model, options)
    _refuse_same_file([("-o", output), ("--keep-f16", keep_f16), ("--modelfile", modelfile), ("--search-report", search_report),
                       ("--dev-text", dev_text), ("--metadata", metadata_file), ("--imatrix", imatrix),
                       ("--imatrix-text", imatrix_text)])
    if search:
        from qroar_gguf.search import search_and_convert

        given = {k: v for k, v in dict(dev_text=dev_text, dev_ctx=dev_ctx, dev_chunks=dev_chunks).items()
                 if v is not None}  # the rest is the search's own default
        settings = SearchSettings(**given, budget=search_budget, seed=search_seed, objective=search_objective,
                                  space=search_space, type_k=search_type_k, report=search_report,
                                  strategy=search_strategy, population=search_population, time_budget=search_time,
                                  workers=search_workers,
                                  gpu_layers=gpu_layers)
        result = search_and_convert(model, output, options, settings, log=None if quiet else click.echo)
    else:
        result = run_convert(model, output, options)
    if not quiet:
        f = result.factors
        click.echo(f"wrote {result.output} ({result.qtype} {qtype_origin}, "
                   f"{result.output.stat().st_size / 2**20:.1f} MiB) in {result.seconds:.1f} s")
        if result.route == "llama.cpp":
            click.echo(f"converted by llama.cpp's convert_hf_to_gguf.py (GGUF arch {result.gguf_arch})")
        if result.scaling_keys is not None:
            click.echo(f"context {result.trained_ctx} -> {result.target_ctx} tokens, method {result.plan.method}, "
                       f"as llama.cpp's rope keys: {result.scaling_keys}; attention scale "
                       f"{result.attn_folded:.4g} folded into the q/k rows")
        else:
            click.echo(f"context {result.trained_ctx} -> {result.target_ctx} tokens, method {result.plan.method}, "
                       f"rope_freqs {f.min():.3g}..{f.max():.3g} over {f.size} pairs, "
                       f"attention scale {result.plan.attn_scale:.4g}")
        if result.intermediate is not None:
            click.echo(f"kept unquantized {result.intermediate}")
        if result.modelfile is not None:
            click.echo(f"wrote {result.modelfile} (ollama create NAME -f {result.modelfile})")


@main.command()
@click.argument("gguf_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="GGUF file to write (appears only when complete).")
@_target_options
@_plan_detail_options
@click.option("--band-scales", default=None, hidden=True)  # refused with a reason: they rescale W_Q/W_K
@click.option("--modelfile", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write an Ollama Modelfile here (FROM the output, num_ctx the new context, the chat "
                   "template): `ollama create NAME -f PATH`.")
@click.option("--attn-factor-key", is_flag=True,
              help="Write the attention scale as <arch>.rope.scaling.attn_factor instead of folding it into W_Q/W_K's "
                   "block scales: needed for BF16, IQ1_M, MXFP4 or NVFP4 attention weights, but llama.cpp applies "
                   "the key again to every cached key at each context shift (Ollama's default), so long chats drift.")
@click.option("--allow-patched-runtime", is_flag=True,
              help="On qwen3 files, write rope_freqs.weight (any plan) instead of llama.cpp's rope keys (yarn, linear, "
                   "ntk only): only a llama.cpp with patches/0001 (the tools the set-up builds) loads such a file.")
@click.option("--fix-shift", is_flag=True,
              help="Instead of extending: rewrite a file whose attention scale a context shift re-applies (a YaRN "
                   "scaling type, an attn_factor key; `inspect` says) so that shifts only rotate, with the same "
                   "logits otherwise. Takes no plan options; a file already exact is left alone.")
@click.option("--force", is_flag=True,
              help="Overwrite existing output files, and patch a file qroar-gguf already made or patched (its "
                   "factors then multiply into the ones it has).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or summary.")
@click.pass_context
def patch(ctx: click.Context, gguf_file: Path, output: Path, target_ctx: int | None, scale: float | None, method: str,
          beta: float | None, agg: str | None, base: str | None, attn_scale: bool | None, bands: int,
          band_factors: str | None, band_scales: str | None, modelfile: Path | None, attn_factor_key: bool,
          allow_patched_runtime: bool, fix_shift: bool, force: bool, quiet: bool) -> None:
    """Extend GGUF_FILE (quantized or not, e.g. a downloaded Q4_K_M) to a longer context without
    re-quantizing it: rope_freqs.weight is added (or multiplied into the file's own), the context length
    is raised, and an attention scale goes into the block scales of W_Q/W_K's rotary rows, where a context
    shift cannot apply it again; every other tensor is copied byte for byte.

    \b
    qroar-gguf patch model.Q4_K_M.gguf -o model.32k.Q4_K_M.gguf --ctx 32768 --modelfile Modelfile
    ollama create model-32k -f Modelfile
    qroar-gguf patch downloaded-128k.gguf -o fixed.gguf --fix-shift   # exact under context shifts
    """
    from qroar_gguf.patch import PatchOptions
    from qroar_gguf.patch import patch as run_patch

    if not output.name:
        raise click.UsageError("-o needs a file name")
    _refuse_same_file([("GGUF_FILE", gguf_file), ("-o", output), ("--modelfile", modelfile)])
    if fix_shift:
        plan_given = [f"--{name.replace('_', '-')}" for name in ("target_ctx", "scale", "method", "beta", "agg", "base",
                                                                  "attn_scale", "bands", "band_factors", "band_scales",
                                                                  "attn_factor_key", "allow_patched_runtime")
                      if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT]
        if plan_given:
            raise click.UsageError(f"--fix-shift keeps the file's RoPE as it is: {', '.join(plan_given)} do not "
                                   "apply (fix first, then patch the fixed file to extend it)")
        _fix_shift(gguf_file, output, PatchOptions(force=force, progress=_show_progress(quiet), modelfile=modelfile),
                   quiet)
        return
    plan = _plan_spec(method, beta, agg, base, attn_scale, bands, band_factors, band_scales, None)
    from qroar_gguf.file_types import kept_type_warning

    warning = kept_type_warning(gguf_file, output)
    if warning is not None:
        click.echo(warning, err=True)
    options = PatchOptions(plan=plan, target_ctx=target_ctx, scale=scale, force=force,
                           progress=_show_progress(quiet), modelfile=modelfile, attn_factor_key=attn_factor_key,
                           allow_patched_runtime=allow_patched_runtime)
    result = run_patch(gguf_file, output, options)
    if not quiet:
        f = result.factors
        copied = ("every tensor of the input copied unchanged" if not result.scaled_tensors else
                  f"every tensor of the input copied unchanged but {len(result.scaled_tensors)} whose rotary rows "
                  f"carry the attention scale {result.attn_folded:.4g}")
        click.echo(f"wrote {result.output} ({result.output.stat().st_size / 2**20:.1f} MiB) in {result.seconds:.1f} s, "
                   + copied)
        tensors = "/".join(name.removesuffix(".weight") for name in result.pair_tensors)
        rope = (f"{tensors} {f.min():.3g}..{f.max():.3g} over {f.size} pairs" if result.scaling_keys is None
                else f"llama.cpp's rope keys: {result.scaling_keys}")
        click.echo(f"context {result.trained_ctx} -> {result.target_ctx} tokens, method {result.plan.method}, {rope}"
                   + ("" if result.attn_factor is None or result.scaling_keys is not None else
                      f", rope.scaling.attn_factor {result.attn_factor:.4g} (re-applied at every context shift)"))
        if result.modelfile is not None:
            click.echo(f"wrote {result.modelfile}: ollama create NAME -f {result.modelfile}")


def _fix_shift(gguf_file: Path, output: Path, options, quiet: bool) -> None:
    from qroar_gguf.patch import fix_shift

    result = fix_shift(gguf_file, output, options)
    if result.output is None:
        click.echo(f"{printable(gguf_file)} is already exact under context shifts ({printable(result.before.describe())}); "
                   "nothing written")
        return
    if not quiet:
        key = ("rope.scaling.attn_factor removed" if result.attn_factor is None else
               f"rope.scaling.attn_factor {result.attn_factor:.6g} cancels YaRN's kernel factor")
        click.echo(f"wrote {result.output} in {result.seconds:.1f} s: the factor {result.moved:.6g} a context shift "
                   f"re-applied now lives in {len(result.scaled_tensors)} tensors' rotary rows; {key}")
        if result.modelfile is not None:
            click.echo(f"wrote {result.modelfile}: ollama create NAME -f {result.modelfile}")


@main.command()
@click.argument("gguf_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(gguf_file: Path, as_json: bool) -> None:
    """Show a GGUF file's context, rope_freqs factors and qroar provenance."""
    from qroar_gguf.inspect_text import render_summary
    from qroar_gguf.summary import read_summary

    summary = read_summary(gguf_file)
    if as_json:  # json escapes control characters itself
        click.echo(json.dumps(summary, indent=2, allow_nan=False))
        return
    for line in render_summary(summary):  # line by line: a reader that leaves early (`| head`) stops us there
        click.echo(line)


@main.command()
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="PNG file to write.")
@click.option("--ctx", "target_ctx", type=click.IntRange(min=1), default=None,
              help="Target context for the factor curves. Default: 4x the trained context.")
@click.option("--agg", type=click.Choice(AGGREGATIONS), default=DEFAULT_AGG, show_default=True)
@click.option("--beta", type=click.FloatRange(min=0.0), default=DEFAULT_BETA, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the plotted data as JSON.")
def plot(model: Path, output: Path, target_ctx: int | None, agg: str, beta: float, json_out: Path | None) -> None:
    """Plot per-pair sensitivity S_k and every plan's factors for MODEL (HF checkpoint or GGUF)."""
    from qroar_gguf.evaluate.plots import plot_factors

    if json_out is not None:  # before drawing: a bad --json must not leave the PNG behind
        _refuse_same_file([("-o", output), ("--json", json_out)])
        check_destination(json_out, force=True, what="--json", inputs=_model_files(model))
    data = plot_factors(model, output, target_ctx=target_ctx, agg=agg, beta=beta)
    if json_out is not None:
        publish_text(json_out, json.dumps(data, indent=2) + "\n")
    click.echo(f"wrote {output}")


@main.command(name="eval")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--text", "text_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="UTF-8 text to measure on.")
@click.option("--ctx", type=click.IntRange(min=8), required=True, help="Window (context) length in tokens.")
@click.option("--chunks", type=click.IntRange(min=1), default=None, help="At most this many windows. Default: all.")
@click.option("--reference", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Also report KL divergence against this GGUF (e.g. the unquantized file of the same plan).")
@click.option("--passkey", is_flag=True, help="Also measure passkey retrieval at the full context.")
@click.option("--passkey-trials", type=click.IntRange(min=1), default=1, show_default=True,
              help="Keys per depth (depths 10%..90%).")
@click.option("--type-k", type=click.Choice(KEY_CACHE_TYPES), default="f16", show_default=True,
              help="KV cache type of keys (llama.cpp type_k).")
@click.option("--threads", type=THREADS, default=os.cpu_count() or 1, show_default=True)
@click.option("--gpu-layers", type=click.IntRange(min=-1), default=None,
              help="Layers on the GPU (-1: all). Default: all where llama.cpp was built with a GPU back-end, "
                   "none otherwise.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write all results to this JSON file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def eval_command(model: Path, text_path: Path, ctx: int, chunks: int | None, reference: Path | None, passkey: bool,
                 passkey_trials: int, type_k: str, threads: int, gpu_layers: int | None, json_out: Path | None,
                 quiet: bool) -> None:
    """Perplexity of MODEL (a GGUF) on a text as llama.cpp's llama-perplexity computes it, and
    optionally KL divergence against a reference GGUF and passkey retrieval."""
    from qroar_gguf.evaluate.report import evaluate_file

    if json_out is not None:  # before minutes of evaluation
        check_destination(json_out, force=True, what="--json", inputs=[p for p in (model, text_path, reference) if p])
    result = evaluate_file(model, text_path, ctx, chunks=chunks, reference=reference, passkey_trials=passkey_trials
                           if passkey else 0, type_k=type_k, threads=threads, progress=_show_progress(quiet),
                           gpu_layers=gpu_layers)
    for line in result["lines"]:
        click.echo(line)
    if json_out is not None:
        publish_text(json_out, json.dumps(result["json"], indent=2) + "\n")


@main.command()
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--ctx", "ctxs", type=click.IntRange(min=8), multiple=True, required=True,
              help="Context(s) to evaluate at; repeat or list: --ctx 8192 16384 32768.")
@click.option("--qtype", "qtypes", type=QTYPE, multiple=True, metavar="TYPE",
              default=["Q4_0", "Q4_K_M"], show_default=True,
              help="Quantization(s), convert's names (`qroar-gguf convert --help` lists them); every plan's F16 file "
                   "is the KL reference.")
@click.option("--plans", "plans", multiple=True, default=list(METHODS),
              show_default=True, help="Plans, each `method[:key=value,...]`, e.g. yarn:attn_scale=false qroar:beta=4.")
@click.option("--text", "text_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--chunks", type=click.IntRange(min=1), default=1, show_default=True, help="Windows per context.")
@click.option("--type-k", "type_ks", type=click.Choice(KEY_CACHE_TYPES), multiple=True, default=["f16"],
              show_default=True, help="Key cache type(s), an axis like --ctx: --type-k f16 q4_0.")
@click.option("--imatrix", "imatrixes", type=click.Choice(IMATRIX_AXIS), multiple=True, default=["none"],
              show_default=True,
              help="Importance matrix axis, like --type-k: none, short (windows of "
                   f"{IMATRIX_SHORT_WINDOW} tokens, as matrices are usually made) or target (windows of the file's "
                   "target context), each computed on the plan's F16 file from --imatrix-text: --imatrix none short "
                   "target. Each matrix row is paired with the same plan's row without one.")
@click.option("--imatrix-text", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="--imatrix short/target: the UTF-8 calibration text. Never the --text you evaluate on.")
@click.option("--imatrix-tokens", type=click.IntRange(min=IMATRIX_SHORT_WINDOW), default=None,
              help="--imatrix short/target: calibration tokens of every matrix, the same for both, so that only the "
                   f"window differs (target takes at least one window). Default: {DEFAULT_IMATRIX_TOKENS}.")
@click.option("--attn-type", "attn_types", multiple=True, default=["default"], show_default=True, metavar="TYPE",
              help="attn_q/attn_k type axis, like --type-k: default (the --qtype's own choice) or a ggml type "
                   "given to both through llama-quantize, e.g. --attn-type default q8_0 f16. Each row of a type is "
                   "paired with the same file at default.")
@click.option("--evaluator", type=click.Choice(BENCH_EVALUATORS), default="bindings", show_default=True,
              help="What measures each row: the Python bindings (per token, exact), or llama.cpp's "
                   "llama-perplexity (its PPLs and --kl-divergence against the F16 file's saved "
                   "log-probabilities; the paired ratios from the per-token log-probabilities it saves, in 16-bit "
                   "steps).")
@click.option("--gpu-layers", type=click.IntRange(min=-1), default=None,
              help="Layers on the GPU, for either evaluator (-1: all). Default: all where llama.cpp was built "
                   "with a GPU back-end, none otherwise.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Rows evaluated at a time (each with --threads); each file is still built once. With more "
                   "than one, a stop (Ctrl-C) starts no new row but waits for the running ones.")
@click.option("--deadline", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Start no row later than this many seconds after the start; results.json lists the rows "
                   "left out under skipped.")
@click.option("--passkey-trials", type=click.IntRange(min=0), default=0, show_default=True,
              help="Passkey keys per depth (0: no passkey test).")
@click.option("--passkey-depths", "passkey_depths", type=click.FloatRange(0, 1), multiple=True,
              help="Depths of the hidden key, fractions of the prompt: --passkey-depths 0.1 0.5 0.9. "
                   "Default: 0.1 to 0.9 in steps of 0.1.")
@click.option("--threads", type=THREADS, default=os.cpu_count() or 1, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for results.json, results.md, ppl_vs_ctx.png and the cached files.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def bench(model: Path, ctxs: tuple[int, ...], qtypes: tuple[str, ...], plans: tuple[str, ...], text_path: Path,
          chunks: int, type_ks: tuple[str, ...], imatrixes: tuple[str, ...], imatrix_text: Path | None,
          imatrix_tokens: int | None, attn_types: tuple[str, ...], evaluator: str, gpu_layers: int | None, workers: int,
          deadline: float | None, passkey_trials: int, passkey_depths: tuple[float, ...], threads: int,
          out: Path, quiet: bool) -> None:
    """Build every plan's GGUF from MODEL (HF checkpoint) and compare them all on the same chunks.

    Plans may carry band values with `/` between bands, e.g. a searched variant
    `qroar:band_factors=1/1/1.1/1.25,band_scales=1/1/0.9/1,symmetric=false`.
    """
    from qroar_gguf.evaluate.bench import run_bench
    from qroar_gguf.file_types import canonical_qtype

    run_bench(model, list(ctxs), [canonical_qtype(q) for q in qtypes], list(plans), text_path, out, chunks=chunks,
              type_k=list(type_ks), imatrix=list(imatrixes), imatrix_text=imatrix_text, imatrix_tokens=imatrix_tokens,
              attn_types=list(attn_types), evaluator=evaluator, gpu_layers=gpu_layers, workers=workers,
              deadline=deadline, passkey_trials=passkey_trials, passkey_depths=list(passkey_depths) or None, threads=threads,
              progress=_show_progress(quiet))
    click.echo(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'ppl_vs_ctx.png'}")
    click.echo((out / "results.md").read_text())


@main.command()
@click.option("--method", type=click.Choice(METHODS[1:]), default=DEFAULT_METHOD, show_default=True,
              help="RoPE plan to demonstrate.")
@click.option("--ctx", "target_ctx", type=click.IntRange(min=1), default=None,
              help="Target context. Default: 2x the trained context (16384 for SmolLM2).")
@click.option("--qtype", type=QTYPE, default=DEMO_QTYPE, show_default=True, metavar="TYPE",
              help="Quantization, convert's names (`qroar-gguf convert --help` lists them); the default is the "
                   "type the committed band searches were run for.")
@click.option("--text", "text_title", default=DEMO_TEXT, show_default=True,
              help="Which Jane Austen novel to measure on; the default is one the band searches never saw "
                   "(their dev text is Emma).")
@click.option("--threads", type=THREADS, default=os.cpu_count() or 1, show_default=True)
@click.option("--perplexity/--no-perplexity", "measure", default=True, show_default=True,
              help="Measure perplexity (minutes); --no-perplexity stops after converting.")
@click.option("--full", is_flag=True,
              help="Also compare the committed band search at its other context (4x, 32768 tokens): two more "
                   "windows, about a quarter of an hour more on two cores.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def demo(method: str, target_ctx: int | None, qtype: str, text_title: str, threads: int, measure: bool,
         full: bool, quiet: bool) -> None:
    """Convert the embedded SmolLM2-135M model and show it working beyond its trained context, and what
    Q-ROAR adds: perplexity in llama.cpp on a Jane Austen novel at 8k and 16k tokens, unscaled, yarn and
    the committed band search's plan against yarn on the same tokens (about 10 minutes on two cores;
    --no-perplexity stops after converting)."""
    from qroar_gguf.demo import run_demo
    from qroar_gguf.file_types import canonical_qtype

    run_demo(method, target_ctx, canonical_qtype(qtype), text_title, threads, _show_progress(quiet), measure=measure,
             full=full)


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
def tools(ctx: click.Context, as_json: bool) -> None:
    """llama.cpp's own programs (llama-cli, llama-server, llama-perplexity, llama-quantize, llama-imatrix)
    that the set-up built from the pinned source: their paths and versions, and the libllama the Python
    bindings load. `qroar-gguf tools build` builds them (once; the set-up runs it)."""
    if ctx.invoked_subcommand is not None:
        return
    from qroar_gguf.llama_tools import BIN_OVERRIDE_ENV, describe_tools

    described = describe_tools()
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    build = described["build"]
    if described["override"]:
        click.echo(f"tools from ${BIN_OVERRIDE_ENV}: {described['override']}")
    elif build is None:
        click.echo("llama.cpp's tools are not built on this machine: run `qroar-gguf tools build`")
    else:
        options = " ".join(build["cmake_args"]) or "default (CPU, portable)"
        commit = build.get("llama_cpp_commit")
        click.echo(f"llama.cpp {build['llama_cpp_version']}{f', the sdist commit {commit[:12]},' if commit else ''} from "
                   f"llama-cpp-python {build['llama_cpp_python']}, "
                   f"patches: {', '.join(build['patches']) or 'none'}; options: {options}")
    for name, tool in described["tools"].items():
        click.echo(f"  {name:<17} {tool['path'] or 'missing'}")
    bindings = described["bindings"]
    same = {True: "the build's own", False: "NOT the build's (run bash tools/setup.sh)", None: "unchecked"}
    click.echo(f"Python bindings load {bindings['lib'] or 'no libllama'} ({same[bindings['same_as_build']]})")


@tools.command(name="build")
@click.option("--cmake-arg", "cmake_args", multiple=True, metavar="-DNAME=VALUE",
              help="Passed to llama.cpp's CMake, e.g. -DGGML_CUDA=ON or -DGGML_METAL=ON (repeatable); "
                   "each set of options is a build of its own.")
@click.option("--jobs", type=click.IntRange(min=1), default=None, help="Parallel compile jobs. Default: all CPUs.")
@click.option("--rebuild", is_flag=True, help="Build again even if this build is cached.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
def tools_build(cmake_args: tuple[str, ...], jobs: int | None, rebuild: bool, quiet: bool) -> None:
    """Build llama.cpp's tools from the llama.cpp vendored in the pinned llama-cpp-python sdist, with
    patches/ applied (CMakeLists.txt), once; later runs find the cached build. The Python bindings keep
    the libllama the set-up gave them (bash tools/setup.sh links the default build's)."""
    from qroar_gguf.llama_tools import build_tools

    build = build_tools(cmake_args, jobs=jobs, rebuild=rebuild, progress=not quiet)
    click.echo(str(build.bin))


if __name__ == "__main__":
    main()
