"""Checkpoints of the architectures qroar-gguf has no converter of its own for: llama.cpp's converter.

The pinned sdist's ``convert_hf_to_gguf.py`` (with its ``conversion/`` package and its own gguf-py, run in a
child process that any stop kills) writes an unquantized GGUF (F32, F16 or BF16 as the source stores its
weights) beside the output; then the plan step is `patch`'s own, on that file (per-pair factors as
``rope_freqs`` where the GGUF arch's loader reads them, llama.cpp's rope keys elsewhere, YaRN's temperature
folded into the q/k rows so a context shift only rotates); then llama.cpp's quantizer, and the output is
published by rename under its lock. Temporaries go as soon as the next step has read them.

Which GGUF arch the converter writes is read from its source without running it (``TEXT_MODEL_MAP`` and
the registered class's ``model_arch``), so a plan the arch cannot take is refused before minutes of
conversion; the patch step checks the written file again.
"""

from __future__ import annotations

import ast
import collections
import importlib.util
import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from qroar_gguf.arch.base import config_architectures
from qroar_gguf.arch.families import gguf_family, refusal
from qroar_gguf.choices import UNQUANTIZED
from qroar_gguf.errors import QroarError
from qroar_gguf.gguf_io.quantize import quantize_planned
from qroar_gguf.llama_tools import reference_converter, run_program
from qroar_gguf.outputs import (
    check_destination,
    check_free_space,
    describe_os_error,
    exclusive,
    temporary_beside,
)
from qroar_gguf.patch import PatchOptions, PatchResult, patch
from qroar_gguf.rope.scaling_keys import has_key_form, refuse_per_pair
from qroar_gguf.source.checkpoint import Checkpoint, open_checkpoint

#: ``options`` below is convert.ConvertOptions (not imported: convert imports this module).

#: What the converter needs beyond qroar-gguf's own dependencies (it reads tensors through torch and
#: tokenizers through transformers); the set-up's `test` extra installs both.
NEEDS = ("torch", "transformers")
INSTALL_HINT = "pip install 'qroar-gguf[test]' (or: pip install torch transformers)"
_BYTES = {"f32": 4, "f16": 2, "bf16": 2}


@dataclass
class Delegated:
    """A checkpoint for llama.cpp's converter: its Hugging Face architecture and the GGUF arch it becomes."""

    ckpt: Checkpoint
    hf_architecture: str
    gguf_arch: str | None  # None: not read from the converter's source (the patch step checks the file)

    @property
    def route(self) -> str:
        """How the plan reaches the file: per-pair factors, or llama.cpp's own rope keys."""
        family = gguf_family(self.gguf_arch)
        if family is not None and family.rewrite_as:
            family = gguf_family(family.rewrite_as)
        return "?" if family is None or family.pair_route is None else family.route()


@cache
def converter_architectures() -> dict[str, str]:
    """Hugging Face architecture -> the ``conversion`` module that converts it (the converter's own
    ``TEXT_MODEL_MAP``, read from its source: no torch needed)."""
    source = (reference_converter().parent / "conversion" / "__init__.py").read_text(encoding="utf-8")
    for node in ast.parse(source).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP" and node.value is not None:
            return {k: v for k, v in ast.literal_eval(node.value).items()}
    raise QroarError("llama.cpp's converter in the cache has no TEXT_MODEL_MAP: remove "
                     f"{reference_converter().parent} so that it is extracted again")


@cache
def converter_gguf_arch(hf_architecture: str) -> str | None:
    """The GGUF arch llama.cpp's converter writes for ``hf_architecture``: the ``model_arch`` of the class
    registered for it (or of its base class in the same module); None where the source does not say."""
    module = converter_architectures().get(hf_architecture)
    if module is None:
        return None
    path = reference_converter().parent / "conversion" / f"{module}.py"
    classes = {n.name: n for n in ast.parse(path.read_text(encoding="utf-8")).body if isinstance(n, ast.ClassDef)}

    def registered(cls: ast.ClassDef) -> bool:
        return any(isinstance(d, ast.Call) and getattr(d.func, "attr", None) == "register"
                   and any(isinstance(a, ast.Constant) and a.value == hf_architecture for a in d.args)
                   for d in cls.decorator_list)

    def arch_of(cls: ast.ClassDef | None, depth: int = 0) -> str | None:
        if cls is None or depth > 8:
            return None
        for stmt in cls.body:
            if (isinstance(stmt, ast.Assign) and any(getattr(t, "id", None) == "model_arch" for t in stmt.targets)
                    and isinstance(stmt.value, ast.Attribute)):
                member = getattr(gguf.MODEL_ARCH, stmt.value.attr, None)
                return None if member is None else gguf.MODEL_ARCH_NAMES.get(member)
        bases = [b.id for b in cls.bases if isinstance(b, ast.Name)]
        return next((a for a in (arch_of(classes.get(b), depth + 1) for b in bases) if a), None)

    return next((arch_of(c) for c in classes.values() if registered(c)), None)


def delegated_source(source: str | Path) -> Delegated:
    """The checkpoint, with the architecture llama.cpp's converter takes it as; one line where it takes none."""
    ckpt = open_checkpoint(source)
    archs = config_architectures(ckpt.config)
    known = converter_architectures()
    hf = next((a for a in archs if a in known), None)
    if hf is None:
        named = ", ".join(map(str, archs)) or f"none (model_type {ckpt.config.get('model_type')!r})"
        raise QroarError(f"architecture {named}: neither qroar-gguf nor llama.cpp's converter (convert_hf_to_gguf.py "
                         "of the pinned llama.cpp) converts it")
    _check_source_scaling(ckpt)
    return Delegated(ckpt, hf, converter_gguf_arch(hf))


#: rope types in config.json that llama.cpp's converter writes as a file `patch` extends: none, linear
#: (a factor the plan multiplies into), llama3 (rope_freqs the plan multiplies into).
_EXTENDABLE = (None, "default", "linear", "llama3")


def _check_source_scaling(ckpt: Checkpoint) -> None:
    """A checkpoint that already scales RoPE its own way (yarn, longrope, dynamic...) is refused before minutes
    of conversion, as `patch` would refuse the file llama.cpp's converter writes for it."""
    configs = [ckpt.config] + [c for c in (ckpt.config.get("text_config"),) if isinstance(c, dict)]
    for config in configs:
        for key in ("rope_scaling", "rope_parameters"):
            value = config.get(key)
            kind = (value.get("rope_type") or value.get("type")) if isinstance(value, dict) else None
            if kind not in _EXTENDABLE:
                raise QroarError(f"{ckpt.directory}/config.json already scales RoPE its own way ({key} {kind!r}), "
                                 "which llama.cpp applies instead of or on top of another plan: convert the "
                                 "model's unscaled config, or run it as it is")


def check_delegated_plan(src: Delegated, options) -> None:
    """What the GGUF arch cannot take, refused before the conversion (patch's own rules and lines)."""
    plan = options.plan
    if plan.bands.scales is not None:
        raise QroarError(f"--band-scales rescales W_Q/W_K rows as qroar-gguf's own converter writes them, and "
                         f"{src.hf_architecture} goes through llama.cpp's converter: band factors work here")
    arch = src.gguf_arch
    if arch is None:
        return
    family = gguf_family(arch)
    if family is None or family.pair_route is None:
        raise QroarError(f"{src.hf_architecture} becomes GGUF arch {arch}: {refusal(arch)}")
    if family.route(options.allow_patched_runtime, per_pair=not has_key_form(plan)) == "keys":
        refuse_per_pair(arch, family, plan)  # patch's own line


def check_converter_runs() -> None:
    """One line, before anything is written, where the converter's own dependencies are missing."""
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise QroarError(f"llama.cpp's converter needs {' and '.join(missing)}, which this Python lacks: "
                         f"{INSTALL_HINT}")


def outtype_for(src: Delegated, options) -> str:
    """The unquantized type llama.cpp's converter writes: the output's own where it is unquantized, else the
    source's. BF16 rows cannot carry YaRN's temperature exactly (8 bits of mantissa), so a BF16 source
    whose plan folds one is converted to F32 (exact; the quantizer reads either the same way)."""
    if options.qtype in UNQUANTIZED:
        return options.qtype.lower()
    dtype = src.ckpt.source_dtype
    if dtype == "BF16" and options.plan.method in ("yarn", "qroar") and options.plan.options.get("attn_scale", True):
        return "f32"
    return dtype.lower()


def run_converter(src: Delegated, out: Path, outtype: str, options) -> None:
    """llama.cpp's convert_hf_to_gguf.py writes ``out`` in a child process (killed on any stop), with a
    progress bar of the bytes written; its own reason in one line where it fails."""
    script = reference_converter()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(script.parent / "gguf-py"), env.get("PYTHONPATH")) if p)
    command = [sys.executable, str(script), str(src.ckpt.directory), "--outtype", outtype, "--outfile", str(out)]
    if options.name is not None:
        command += ["--model-name", options.name]
    if options.metadata is not None:
        command += ["--metadata", str(options.metadata)]
    total = sum(int(np.prod(src.ckpt.info(n).shape, dtype=np.int64)) for n in src.ckpt.names) * _BYTES[outtype]
    log: collections.deque[str] = collections.deque(maxlen=200)
    with tqdm(total=total, desc=f"convert ({src.gguf_arch or src.hf_architecture}, llama.cpp)", unit="B",
              unit_scale=True, disable=not options.progress, leave=False) as bar:

        def show_progress() -> None:
            try:
                bar.n = min(out.stat().st_size, total)
                bar.refresh()
            except OSError:  # not written yet
                pass

        status = run_program(command, log, env=env, while_running=show_progress)
    if status != 0:
        raise QroarError(_converter_failure(src, status, list(log)))


def _converter_failure(src: Delegated, status: int, log: list[str]) -> str:
    """The converter's reason in one line."""
    text = "\n".join(log)
    for name in NEEDS:
        if f"No module named '{name}'" in text:
            return f"llama.cpp's converter needs {name}, which this Python lacks: {INSTALL_HINT}"
    lines = [line for line in log if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:") or "Error" in line.split(":", 1)[0]]
    reason = (errors or lines or [f"it stopped with status {status} and printed nothing"])[-1]
    return f"llama.cpp's converter could not convert {src.ckpt.directory} ({src.hf_architecture}): {reason.strip()}"


def convert_delegated(src: Delegated, output: Path, options):
    """Convert (llama.cpp's converter), plan (patch's step), quantize, publish. Returns what `patch` said of
    the plan step, and the unquantized type the converter wrote."""
    check_delegated_plan(src, options)
    check_converter_runs()
    keep_f16 = None if options.keep_f16 is None else Path(options.keep_f16)
    inputs = src.ckpt.source_files
    check_destination(output, force=options.force, what="output", inputs=inputs)
    if keep_f16 is not None:
        check_destination(keep_f16, force=options.force, what="--keep-f16", inputs=inputs)
        if keep_f16.resolve() == output.resolve():
            raise QroarError("--keep-f16 must name a different file than the output")
    outtype = outtype_for(src, options)
    unquantized = options.qtype in UNQUANTIZED
    size = sum(int(np.prod(src.ckpt.info(n).shape, dtype=np.int64)) for n in src.ckpt.names) * _BYTES[outtype]
    destinations = [(output, "output")] + ([] if keep_f16 is None else [(keep_f16, "--keep-f16")])
    with ExitStack() as held:
        for path, what in destinations:  # again under the lock: another run may have finished meanwhile
            held.enter_context(exclusive(path))
            check_destination(path, force=options.force, what=what, inputs=inputs)
        try:
            final_tmp = held.enter_context(temporary_beside(output, "partial"))
            converted = held.enter_context(temporary_beside(output, f"{outtype}.converted.tmp"))
            planned = final_tmp if unquantized else held.enter_context(
                temporary_beside(keep_f16 or output, f"{outtype}.tmp"))
            check_free_space(converted, 2 * size, "llama.cpp's unquantized file and its extended copy")
            run_converter(src, converted, outtype, options)
            result = _plan_step(src, converted, planned, options)
            converted.unlink()
            if not unquantized:
                quantize_planned(planned, final_tmp, options.qtype, options.threads, target_ctx=result.target_ctx,
                                 imatrix_from=options.imatrix_from, overrides=options.overrides,
                                 quantizer=options.quantizer, progress=options.progress)
            os.replace(final_tmp, output)
            if keep_f16 is not None and not unquantized:
                os.replace(planned, keep_f16)
        except OSError as exc:
            raise QroarError(describe_os_error(exc, "write", output)) from None
    return result, outtype


def _plan_step(src: Delegated, converted: Path, planned: Path, options) -> PatchResult:
    """`patch` on the converted file, its lines naming the checkpoint instead of the temporary."""
    try:
        return patch(converted, planned, PatchOptions(
            plan=options.plan, target_ctx=options.target_ctx, scale=options.scale, force=True,
            progress=options.progress, allow_patched_runtime=options.allow_patched_runtime))
    except QroarError as exc:
        message = str(exc).replace(str(converted), f"llama.cpp's conversion of {src.ckpt.directory}")
        raise QroarError(message.replace(converted.name, "the converted file")) from None
