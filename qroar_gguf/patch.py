"""An existing GGUF (quantized or not) extended without re-quantizing it: `qroar-gguf patch`.

The stages mirror conversion's: read the source and its facts (`read_gguf_source`), make the plan
(`make_patch_plan`; qroar measures the file's own attn_q/attn_k, dequantized), write (every key kept
but the context length, every tensor copied byte for byte, `rope_freqs.weight` added or multiplied
into the file's own), publish under the output's lock by rename.

The one thing a patch cannot do as `convert` does is fold an attention scale into W_Q/W_K: they are
quantized. It writes the scale as `<arch>.rope.scaling.attn_factor` instead, which llama.cpp multiplies
into the rotation of every query and key (`cparams.yarn_attn_factor *= hparams.rope_attn_factor` in
llama-context.cpp; without a YaRN scaling type nothing else changes it); for fully rotary heads that is
the fold exactly.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from qroar_gguf import __version__
from qroar_gguf.arch.gguf_arches import PATCHABLE, REWRITTEN_AS, refusal
from qroar_gguf.arch.llama import permute_for_gguf
from qroar_gguf.errors import QroarError
from qroar_gguf.gguf_io import provenance
from qroar_gguf.gguf_io.layout import GgufLayout, RawTensor, pack_key, read_layout
from qroar_gguf.gguf_io.reader import (
    ARCHITECTURE,
    GgufHparams,
    check_attention_shapes,
    read_hparams,
    scalar_value,
)
from qroar_gguf.gguf_io.rewrite import TensorOut, rewritten_header, write_rewritten
from qroar_gguf.modelfile import modelfile_text
from qroar_gguf.outputs import (
    check_destination,
    check_free_space,
    describe_os_error,
    exclusive,
    publish_text,
    temporary_beside,
)
from qroar_gguf.rope.measure import measure_gguf_sensitivity
from qroar_gguf.rope.plans import RopeFacts, RopePlan, combine_with_source
from qroar_gguf.rope.spec import PlanSpec, rope_facts_for

ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
VT = gguf.GGUFValueType


@dataclass
class PatchOptions:
    plan: PlanSpec = field(default_factory=PlanSpec)
    target_ctx: int | None = None  # None: `scale` x the file's context (DEFAULT_SCALE when both are None)
    scale: float | None = None
    force: bool = False  # overwrite the output; patch a file qroar-gguf already made or patched
    progress: bool = True
    modelfile: Path | None = None  # also write an Ollama Modelfile here


@dataclass
class PatchResult:
    output: Path
    plan: RopePlan
    factors: np.ndarray  # what rope_freqs.weight holds (plan x the file's own factors)
    trained_ctx: int
    target_ctx: int
    attn_factor: float | None  # <arch>.rope.scaling.attn_factor as written; None: not written
    modelfile: Path | None
    seconds: float


@dataclass
class GgufSource:
    """A GGUF file checked for patching, with its RoPE facts for the target context."""

    path: Path
    layout: GgufLayout  # keys as stored, tensor infos
    hp: GgufHparams
    facts: RopeFacts
    existing: np.ndarray | None  # the file's own rope_freqs.weight (Llama 3.x files carry one)
    attn_factor: float | None  # the file's own <arch>.rope.scaling.attn_factor

    @property
    def target_arch(self) -> str:
        """The arch the output declares: the file's own, or the one it is rewritten as (qwen2 -> llama)."""
        return REWRITTEN_AS.get(self.hp.architecture, self.hp.architecture)

    @property
    def rewritten(self) -> bool:
        return self.target_arch != self.hp.architecture

    def renamed(self, key: str) -> str:
        """A key of the input under the output's arch."""
        prefix = self.hp.architecture + "."
        return self.target_arch + "." + key[len(prefix):] if key.startswith(prefix) else key


def read_gguf_source(path: str | Path, options: PatchOptions) -> GgufSource:
    """The first stage: open the file, check it can be patched, fix the trained and target contexts.
    Reads the header (and rope_freqs) only; every problem is one QroarError line."""
    path = Path(path)
    layout = read_layout(path)
    arch = scalar_value(layout, ARCHITECTURE)
    if isinstance(arch, str) and arch not in PATCHABLE and arch not in REWRITTEN_AS:
        raise QroarError(f"{path}: {refusal(arch)}")
    _check_scaling(layout, path, arch)
    hp = read_hparams(layout, path)
    made = provenance.read_provenance(layout)
    if _rescaled(made) and not options.force:
        raise QroarError(f"{path} was already made or patched by qroar-gguf (method {made.get('method')}, context "
                         f"{made.get('target_context')}): patching it again multiplies new factors into its own; "
                         "--force does that (better: patch the original file)")
    check_attention_shapes(hp, layout.tensors, path)  # before any size the keys claim is used
    names = {t.name: t for t in layout.tensors}
    if arch in REWRITTEN_AS and hp.n_rot != hp.head_size:
        raise QroarError(f"{path}: {hp.n_rot} of {hp.head_size} dimensions per head rotate; rewriting {arch} as "
                         f"{REWRITTEN_AS[arch]} reorders whole heads, which only fully rotary heads allow")
    if arch == "llama" and hp.n_rot != hp.head_size:  # llama-model.cpp: "invalid n_rot"
        raise QroarError(f"{path}: {hp.n_rot} of {hp.head_size} dimensions per head rotate, and llama.cpp's "
                         "llama loader refuses anything but fully rotary heads (\"invalid n_rot\")")
    if arch in REWRITTEN_AS and len(set(hp.n_head_layers)) + len(set(hp.n_kv_head_layers)) > 2:
        raise QroarError(f"{path}: its head counts differ between layers; rewriting {arch} as "
                         f"{REWRITTEN_AS[arch]} reorders every layer's rows by one head count")
    existing = _existing_factors(names.get(ROPE_FREQS), hp, path)
    attn_factor = scalar_value(layout, gguf.Keys.Rope.SCALING_ATTN_FACTOR.format(arch=arch))
    if attn_factor is not None and not (isinstance(attn_factor, float) and np.isfinite(attn_factor)
                                        and attn_factor > 0):
        raise QroarError(f"{path}: {arch}.rope.scaling.attn_factor is {attn_factor!r}, not a positive number")
    facts = rope_facts_for(hp.n_rot, hp.rope_theta, hp.context_length, options.plan.method, options.target_ctx,
                           options.scale)
    _check_context_fits(layout, arch, facts.target_ctx, path)
    return GgufSource(path, layout, hp, facts, existing, attn_factor)


def _check_scaling(layout: GgufLayout, path: Path, arch) -> None:
    """What a byte-for-byte copy with rope_freqs added cannot serve: refused with what to do instead."""
    split = scalar_value(layout, gguf.Keys.Split.LLM_KV_SPLIT_COUNT)
    if isinstance(split, int) and split > 1:
        raise QroarError(f"{path} is one of {split} parts of a split GGUF: merge them first "
                         "(llama-gguf-split --merge FIRST.gguf MERGED.gguf) and patch the merged file")
    scaling = scalar_value(layout, gguf.Keys.Rope.SCALING_TYPE.format(arch=arch))
    factors = [t.name for t in layout.tensors if t.name.startswith("rope_factors_")]
    if scaling not in (None, "none", "linear") or factors:
        raise QroarError(f"{path} already scales RoPE its own way (rope.scaling.type {scaling!r}"
                         f"{', ' + factors[0] if factors else ''}), which llama.cpp applies instead of or on top "
                         "of rope_freqs: patch extends files with no scaling, linear scaling or rope_freqs only")


def _check_context_fits(layout: GgufLayout, arch: str, target: int, path: Path) -> None:
    """The new context length is written in the type the file stores it in: it must fit there."""
    key = gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=arch)
    kind = layout.fields[key].type
    most = {VT.INT32: 2**31 - 1, VT.INT64: 2**63 - 1, VT.UINT64: 2**64 - 1}.get(kind, 2**32 - 1)
    if target > most:
        raise QroarError(f"{path} stores {key} as {kind.name}, which holds at most {most}: the target context "
                         f"{target} does not fit")


def _rescaled(made: dict | None) -> bool:
    """Whether qroar-gguf already changed the file's RoPE (a `--method none` file it made is as trained)."""
    if made is None:
        return False
    factors = made.get("factors")
    unscaled = (isinstance(factors, list) and all(f == 1.0 for f in factors)
                and made.get("attention_scale_folded", 1.0) == 1.0 and made.get("attention_factor", 1.0) == 1.0)
    return not unscaled


def _existing_factors(tensor: RawTensor | None, hp: GgufHparams, path: Path) -> np.ndarray | None:
    if tensor is None:
        return None
    if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or int(tensor.n_elements) != hp.n_rot // 2:
        raise QroarError(f"{path}: {ROPE_FREQS} is {tensor.tensor_type.name} with {int(tensor.n_elements)} values; "
                         f"llama.cpp needs F32 with one per rotary pair ({hp.n_rot // 2})")
    values = np.fromfile(path, dtype="<f4", count=tensor.n_elements, offset=tensor.data_offset).astype(np.float32)
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise QroarError(f"{path}: {ROPE_FREQS} holds values that are not finite and positive")
    return values


def make_patch_plan(options: PatchOptions, src: GgufSource) -> RopePlan:
    """The second stage: the plan's factors and attention scale (qroar measures attn_q/attn_k first)."""
    spec, sensitivity = options.plan, None
    if spec.bands.scales is not None:
        raise QroarError("--band-scales rescales W_Q/W_K rows, which a patch copies untouched: use convert "
                         "on the checkpoint for band scales (band factors work here)")
    if spec.needs_sensitivity:
        pairs = "hf" if src.rewritten else "gguf"  # qwen2 keeps Hugging Face's row order (NEOX pairs)
        sensitivity = measure_gguf_sensitivity(src.path, agg=spec.aggregation, pairs=pairs,
                                               layout=src.layout).sensitivity
    return spec.plan(src.facts, sensitivity)


def patch(source: str | Path, output: str | Path, options: PatchOptions) -> PatchResult:
    start = time.monotonic()
    output = Path(output)
    src = read_gguf_source(source, options)
    check_destination(output, force=options.force, what="output", inputs=[src.path])
    if options.modelfile is not None:
        check_destination(Path(options.modelfile), force=options.force, what="--modelfile", inputs=[src.path])
    plan = make_patch_plan(options, src)
    hp, facts = src.hp, src.facts
    fold = options.plan.bands.fold(facts, n_head=hp.n_head, n_kv_head=hp.n_kv_head, head_dim=hp.n_embd // hp.n_head)
    factors = plan.factors.astype(np.float32) if fold is None else fold.apply_factors(facts, plan.factors)
    if src.existing is not None:
        factors = combine_with_source(factors, src.existing)
    attn_factor = None
    if src.attn_factor is not None or plan.attn_scale != 1.0:
        attn_factor = float(np.float32((src.attn_factor or 1.0) * plan.attn_scale))

    tensors = [_tensor_out(src, t, factors) for t in src.layout.tensors]
    if src.existing is None:  # first, where llama.cpp's converter puts it
        tensors.insert(0, TensorOut(ROPE_FREQS, values=factors))
    changes = {**_key_changes(src, facts, attn_factor), **_provenance_entries(src, plan, factors, fold)}
    header = rewritten_header(src.layout, changes, tensors)

    with ExitStack() as held:
        held.enter_context(exclusive(output))
        check_destination(output, force=options.force, what="output", inputs=[src.path])  # again, under the lock
        try:
            partial = held.enter_context(temporary_beside(output, "partial"))
            check_free_space(partial, len(header) + sum(t.nbytes for t in tensors), "the patched file")
            write_rewritten(partial, src.layout, header, tensors, progress=options.progress)
            os.replace(partial, output)
        except OSError as exc:
            raise QroarError(describe_os_error(exc, "write", output)) from None
    modelfile = None
    if options.modelfile is not None:
        modelfile = Path(options.modelfile)
        template = scalar_value(src.layout, gguf.Keys.Tokenizer.CHAT_TEMPLATE)
        publish_text(modelfile, modelfile_text(_from_path(output, modelfile), facts.target_ctx,
                                               template if isinstance(template, str) else None))
    return PatchResult(output=output, plan=plan, factors=factors, trained_ctx=facts.trained_ctx,
                       target_ctx=facts.target_ctx, attn_factor=attn_factor, modelfile=modelfile,
                       seconds=time.monotonic() - start)


def _tensor_out(src: GgufSource, t: RawTensor, factors: np.ndarray) -> TensorOut:
    """A tensor of the output: rope_freqs from the factors, Q/K rows into llama's pairs when the file is
    rewritten (whole rows move, so quantized blocks are copied as they are), every other one copied."""
    if t.name == ROPE_FREQS:
        return TensorOut(ROPE_FREQS, values=factors)
    parts = t.name.split(".")
    if src.rewritten and len(parts) == 4 and parts[2] in ("attn_q", "attn_k"):
        n_head = src.hp.n_head if parts[2] == "attn_q" else src.hp.n_kv_head
        return TensorOut(t.name, source=t, reorder_rows=lambda rows: permute_for_gguf(rows, n_head))
    return TensorOut(t.name, source=t)


def _key_changes(src: GgufSource, facts: RopeFacts, attn_factor: float | None) -> dict[str, bytes | None]:
    """The keys a patch changes, as stored entries (by the input's key names): the context length (in
    the type the file uses), the attention factor, the arch's keys renamed when the file is rewritten as
    another arch, and any old qroar.* keys dropped (this patch's own follow the copied keys)."""
    fields, arch = src.layout.fields, src.hp.architecture
    changes: dict[str, bytes | None] = {}
    if src.rewritten:
        changes[ARCHITECTURE] = pack_key(ARCHITECTURE, VT.STRING, src.target_arch)
        changes.update({name: key.renamed(src.renamed(name)) for name, key in fields.items()
                        if name.startswith(arch + ".")})
    context = gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=arch)
    old = fields[context].type
    context_type = old if old in (VT.UINT32, VT.UINT64, VT.INT32, VT.INT64) else VT.UINT32
    changes[context] = pack_key(src.renamed(context), context_type, facts.target_ctx)
    if attn_factor is not None:
        key = gguf.Keys.Rope.SCALING_ATTN_FACTOR.format(arch=arch)
        changes[key] = pack_key(src.renamed(key), VT.FLOAT32, attn_factor)
    changes.update({name: None for name in fields if name.startswith(provenance.PREFIX)})
    return changes


def _provenance_entries(src: GgufSource, plan: RopePlan, factors: np.ndarray, fold) -> dict[str, bytes]:
    """The qroar.* keys, written by provenance's own functions and stored as entries."""
    writer = gguf.GGUFWriter(path=None, arch=src.hp.architecture)
    provenance.add_provenance(
        writer, version=__version__, method=plan.method, params=plan.params, trained_ctx=src.facts.trained_ctx,
        target_ctx=src.facts.target_ctx, factors=factors, source_factors=src.existing, attn_scale=1.0,
        source=src.path.name,
    )
    writer.add_float32(provenance.ATTN_FACTOR, float(plan.attn_scale))
    if src.rewritten:
        writer.add_string(provenance.SOURCE_ARCH, src.hp.architecture)
    if fold is not None:
        provenance.add_band_provenance(writer, fold.provenance(), None)
    entries = {}
    for name, v in writer.kv_data[0].items():
        if name.startswith(provenance.PREFIX):
            item = v.sub_type or (gguf.GGUFValueType.get_type(v.value[0]) if v.type == VT.ARRAY else None)
            entries[name] = pack_key(name, v.type, v.value, item)
    return entries


def _from_path(output: Path, modelfile: Path) -> str:
    """The output as the Modelfile's FROM names it: relative to the Modelfile's folder (as Ollama
    resolves it) when it lies there or below, else absolute."""
    try:
        return "./" + output.absolute().relative_to(modelfile.absolute().parent).as_posix()
    except ValueError:
        return str(output.absolute())
