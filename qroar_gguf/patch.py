"""An existing GGUF (quantized or not) extended without re-quantizing it: `qroar-gguf patch`.

The stages mirror conversion's: read the source and its facts (`read_gguf_source`), make the plan
(`make_patch_plan`; qroar measures the file's own W_Q/W_K, dequantized), write (every key kept but the
context length, every tensor copied byte for byte but the few that carry the attention scale, the plan's
factors added or multiplied into the file's own; on btrfs or XFS the copied tensors share the input's blocks, as
`cp`'s copies do, see `gguf_io.rewrite`), publish under the output's lock by rename. The family of
the file's arch (arch/) says where the factors go: `rope_freqs.weight`, phi3's `rope_factors_long/short`,
or llama.cpp's rope keys (`_patch_keys`); in which row order its pairs lie; which tensors carry the
temperature; what the file is rewritten as (qwen2 -> llama).

An attention scale (YaRN's temperature) goes where `convert` puts it, into the weights, so that a
context shift (llama-server `--context-shift`, Ollama's default), which re-ropes every cached key with
llama.cpp's runtime attention factor, cannot apply it again: the f16 block scales of the rotary rows of
W_Q/W_K (and their biases) are multiplied, which scales those rows exactly up to f16 rounding with no
re-quantization (`gguf_io.blockscale`; `arch.temperature` says which rows). `--attn-factor-key` writes
it as `<arch>.rope.scaling.attn_factor` instead, the form llama.cpp's runtime reads and re-applies at
every shift.

`fix_shift` repairs a file made elsewhere the same way: whatever a shift would re-apply (an attn_factor
key, YaRN's own factor in the kernel) moves into the weights, and the key left cancels the kernel's.
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
from qroar_gguf.arch.base import PAIR_ROUTES, ROPE_FREQS, GgufFamily
from qroar_gguf.arch.families import gguf_family, refusal
from qroar_gguf.arch.temperature import ShiftState, shift_state, temperature_targets
from qroar_gguf.errors import QroarError
from qroar_gguf.gguf_io import provenance
from qroar_gguf.gguf_io.blockscale import scale_rows, why_not_scalable
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
from qroar_gguf.rope.scaling_keys import FileRope, has_key_form, keys_plan, refuse_per_pair
from qroar_gguf.rope.spec import PlanSpec, rope_facts_for

VT = gguf.GGUFValueType


@dataclass
class PatchOptions:
    plan: PlanSpec = field(default_factory=PlanSpec)
    target_ctx: int | None = None  # None: `scale` x the file's context (DEFAULT_SCALE when both are None)
    scale: float | None = None
    force: bool = False  # overwrite the output; patch a file qroar-gguf already made or patched
    progress: bool = True
    modelfile: Path | None = None  # also write an Ollama Modelfile here
    attn_factor_key: bool = False  # the attention scale as <arch>.rope.scaling.attn_factor, not in W_Q/W_K
    allow_patched_runtime: bool = False  # rope_freqs on an arch only a patches/ build loads it for (qwen3)


@dataclass
class PatchResult:
    output: Path
    plan: RopePlan
    factors: np.ndarray  # what the per-pair tensors hold (plan x the file's own factors)
    trained_ctx: int
    target_ctx: int
    attn_factor: float | None  # <arch>.rope.scaling.attn_factor as written; None: not written
    attn_folded: float  # the attention scale multiplied into W_Q/W_K rows (1: none)
    scaled_tensors: list[str]  # the tensors whose rows carry it (every other one is copied byte for byte)
    modelfile: Path | None
    seconds: float
    scaling_keys: str | None = None  # keys-only arches: the rope keys written instead of rope_freqs
    pair_tensors: tuple[str, ...] = ()  # the tensors the factors were written to (none for the keys)


@dataclass
class GgufSource:
    """A GGUF file checked for patching, with its RoPE facts for the target context."""

    path: Path
    layout: GgufLayout  # keys as stored, tensor infos
    hp: GgufHparams
    facts: RopeFacts
    existing: np.ndarray | None  # the file's own per-pair factors (Llama 3.x files carry rope_freqs)
    attn_factor: float | None  # the file's own <arch>.rope.scaling.attn_factor
    family: type[GgufFamily] = GgufFamily  # the file's arch's
    route: str = "keys"  # where the factors go: a key of arch.base.PAIR_ROUTES

    @property
    def target_arch(self) -> str:
        """The arch the output declares: the file's own, or the one it is rewritten as (qwen2 -> llama)."""
        return self.family.rewrite_as or self.hp.architecture

    @property
    def keys_only(self) -> bool:
        """Extended through llama.cpp's rope keys: its loader (as allowed) reads no per-pair factors."""
        return self.route == "keys"

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
    family = gguf_family(arch)
    if isinstance(arch, str) and (family is None or family.pair_route is None):
        raise QroarError(f"{path}: {refusal(arch)}")
    route = (family.route(options.allow_patched_runtime, per_pair=not has_key_form(options.plan))
             if family is not None else "keys")
    _check_scaling(layout, path, arch, route)
    hp = read_hparams(layout, path)
    made = provenance.read_provenance(layout)
    if _rescaled(made) and not options.force:
        raise QroarError(f"{path} was already made or patched by qroar-gguf (method {made.get('method')}, context "
                         f"{made.get('target_context')}): patching it again multiplies new factors into its own; "
                         "--force does that (better: patch the original file)")
    if family.qk_tensors == "split":  # a fused attn_qkv (phi3): temperature_targets checks the rows it scales
        check_attention_shapes(hp, layout.tensors, path)  # before any size the keys claim is used
    names = {t.name: t for t in layout.tensors}
    if family.rewrite_as and hp.n_rot != hp.head_size:
        raise QroarError(f"{path}: {hp.n_rot} of {hp.head_size} dimensions per head rotate; rewriting {arch} as "
                         f"{family.rewrite_as} reorders whole heads, which only fully rotary heads allow")
    if family.whole_heads and hp.n_rot != hp.head_size:  # llama-model.cpp: "invalid n_rot"
        raise QroarError(f"{path}: {hp.n_rot} of {hp.head_size} dimensions per head rotate, and llama.cpp's "
                         f"{arch} loader refuses anything but fully rotary heads (\"invalid n_rot\")")
    if family.rewrite_as and len(set(hp.n_head_layers)) + len(set(hp.n_kv_head_layers)) > 2:
        raise QroarError(f"{path}: its head counts differ between layers; rewriting {arch} as "
                         f"{family.rewrite_as} reorders every layer's rows by one head count")
    existing = _existing_factors([names.get(n) for n in PAIR_ROUTES[route]], hp, path)
    attn_factor = scalar_value(layout, gguf.Keys.Rope.SCALING_ATTN_FACTOR.format(arch=arch))
    if attn_factor is not None and not (isinstance(attn_factor, float) and np.isfinite(attn_factor)
                                        and attn_factor > 0):
        raise QroarError(f"{path}: {arch}.rope.scaling.attn_factor is {attn_factor!r}, not a positive number")
    facts = rope_facts_for(hp.n_rot, hp.rope_theta, hp.context_length, options.plan.method, options.target_ctx,
                           options.scale)
    _check_context_fits(layout, arch, facts.target_ctx, path)
    return GgufSource(path, layout, hp, facts, existing, attn_factor, family, route)


def _check_scaling(layout: GgufLayout, path: Path, arch, route: str) -> None:
    """What a byte-for-byte copy with rope_freqs added cannot serve: refused with what to do instead."""
    split = scalar_value(layout, gguf.Keys.Split.LLM_KV_SPLIT_COUNT)
    if isinstance(split, int) and split > 1:
        raise QroarError(f"{path} is one of {split} parts of a split GGUF: merge them first "
                         "(llama-gguf-split --merge FIRST.gguf MERGED.gguf) and patch the merged file")
    scaling = scalar_value(layout, gguf.Keys.Rope.SCALING_TYPE.format(arch=arch))
    factors = [t.name for t in layout.tensors if t.name.startswith("rope_factors_")]
    if route == "rope_factors" and len(factors) == 2 and _same_factors(layout):
        factors = []  # one set for every context (a file this route wrote): the plan multiplies into it
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
    if made is None or "method" not in made:  # none, or only a --fix-shift record: RoPE as trained
        return False
    factors = made.get("factors")
    unscaled = (isinstance(factors, list) and all(f == 1.0 for f in factors)
                and made.get("attention_scale_folded", 1.0) == 1.0 and made.get("attention_factor", 1.0) == 1.0)
    return not unscaled


def _same_factors(layout: GgufLayout) -> bool:
    """Whether a file's rope_factors_long and rope_factors_short hold the same bytes."""
    tensors = [t for t in layout.tensors if t.name.startswith("rope_factors_")]
    if len({(t.tensor_type, t.n_bytes) for t in tensors}) != 1 or tensors[0].n_bytes > 1 << 20:
        return False
    with open(layout.path, "rb") as f:
        data = []
        for t in tensors:
            f.seek(t.data_offset)
            data.append(f.read(t.n_bytes))
    return data[0] == data[1]


def _existing_factors(tensors: list[RawTensor | None], hp: GgufHparams, path: Path) -> np.ndarray | None:
    """The file's own per-pair factors on its route (the first of its tensors; _check_scaling made sure
    phi3's two hold the same)."""
    tensor = next((t for t in tensors if t is not None), None)
    if tensor is None:
        return None
    if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or int(tensor.n_elements) != hp.n_rot // 2:
        raise QroarError(f"{path}: {tensor.name} is {tensor.tensor_type.name} with {int(tensor.n_elements)} values; "
                         f"llama.cpp needs F32 with one per rotary pair ({hp.n_rot // 2})")
    values = np.fromfile(path, dtype="<f4", count=tensor.n_elements, offset=tensor.data_offset).astype(np.float32)
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise QroarError(f"{path}: {tensor.name} holds values that are not finite and positive")
    return values


def make_patch_plan(options: PatchOptions, src: GgufSource) -> RopePlan:
    """The second stage: the plan's factors and attention scale (qroar measures attn_q/attn_k first)."""
    spec, sensitivity = options.plan, None
    if spec.bands.scales is not None:
        raise QroarError("--band-scales rescales W_Q/W_K rows, which a patch copies untouched: use convert "
                         "on the checkpoint for band scales (band factors work here)")
    if spec.needs_sensitivity:  # in the row order of the file's arch (its family's)
        sensitivity = measure_gguf_sensitivity(src.path, agg=spec.aggregation, layout=src.layout).sensitivity
    return spec.plan(src.facts, sensitivity)


def patch(source: str | Path, output: str | Path, options: PatchOptions) -> PatchResult:
    start = time.monotonic()
    output = Path(output)
    src = read_gguf_source(source, options)
    check_destination(output, force=options.force, what="output", inputs=[src.path])
    if options.modelfile is not None:
        check_destination(Path(options.modelfile), force=options.force, what="--modelfile", inputs=[src.path])
    if src.keys_only:
        return _patch_keys(src, output, options, start)
    # a route the stock loader lacks (qwen3's rope_freqs) is taken only where allowed: the file says which patch
    needs_patch = src.family.needs_patch if src.family.pair_route != src.route else None
    pair_tensors = PAIR_ROUTES[src.route]
    plan = make_patch_plan(options, src)
    hp, facts = src.hp, src.facts
    fold = options.plan.bands.fold(facts, n_head=hp.n_head, n_kv_head=hp.n_kv_head, head_dim=hp.head_size)
    factors = plan.factors.astype(np.float32) if fold is None else fold.apply_factors(facts, plan.factors)
    if src.existing is not None:
        factors = combine_with_source(factors, src.existing)
    temperature = float((src.attn_factor or 1.0) * plan.attn_scale)  # the file's own scale and the plan's
    attn_factor, folded, scaled = None, 1.0, {}
    if options.attn_factor_key:
        if src.attn_factor is not None or plan.attn_scale != 1.0:
            attn_factor = float(np.float32(temperature))
    elif temperature != 1.0:
        folded, scaled = temperature, _temperature_rows(src.layout, src.hp, temperature, src.family)

    tensors = [_tensor_out(src, t, factors, scaled.get(t.name), pair_tensors) for t in src.layout.tensors]
    if src.existing is None:  # first, where llama.cpp's converter puts them
        tensors[:0] = [TensorOut(name, values=factors) for name in pair_tensors]
    changes = {**_key_changes(src, facts, attn_factor),
               **_provenance_entries(src, plan, factors, fold, folded, plan.attn_scale if options.attn_factor_key
                                     else 1.0, needs_patch)}
    _publish(src.layout, rewritten_header(src.layout, changes, tensors), tensors, output, options.force,
             options.progress)
    modelfile = _write_modelfile(options, src.layout, output, facts.target_ctx)
    return PatchResult(output=output, plan=plan, factors=factors, trained_ctx=facts.trained_ctx,
                       target_ctx=facts.target_ctx, attn_factor=attn_factor, attn_folded=folded,
                       scaled_tensors=list(scaled), modelfile=modelfile, seconds=time.monotonic() - start,
                       pair_tensors=pair_tensors)


def _patch_keys(src: GgufSource, output: Path, options: PatchOptions, start: float) -> PatchResult:
    """``patch`` for an arch whose loader reads no rope_freqs: llama.cpp's rope keys, YaRN's temperature in
    the q/k rows (``rope.scaling_keys``), every other tensor copied byte for byte."""
    arch, family = src.hp.architecture, src.family
    refuse_per_pair(arch, family, options.plan)
    if options.attn_factor_key and family.temperature_in == "kq_scale":
        raise QroarError(f"--attn-factor-key: llama.cpp's {arch} graph builds YaRN's temperature from the rope keys "
                         "themselves (its kq_scale), so patch writes no attn_factor for it")
    if options.attn_factor_key:
        raise QroarError(f"--attn-factor-key: a {arch} file carries YaRN's temperature in its q/k rows, and its attn_factor "
                         "key only cancels the kernel's own factor (the form a context shift keeps exact)")
    plan = options.plan.plan(src.facts, None)
    state = shift_state(src.layout, arch, src.hp.context_length)  # the file's own scaling keys, checked
    declared = src.layout.fields
    file = FileRope(arch, state.scaling_type, state.scaling_factor, state.attn_factor,
                    gguf.Keys.Attention.SLIDING_WINDOW.format(arch=arch) in declared,
                    gguf.Keys.Rope.DIMENSION_SECTIONS.format(arch=arch) in declared)
    keys = keys_plan(family, file, options.plan, plan, src.facts)
    scaled = {} if keys.fold == 1.0 else _temperature_rows(src.layout, src.hp, keys.fold, family)
    tensors = [TensorOut(t.name, source=t, rewrite_rows=None if t.name not in scaled else
                         (lambda rows, t=t: scale_rows(rows, t.tensor_type, scaled[t.name])))
               for t in src.layout.tensors]
    changes = {**_key_changes(src, src.facts, keys.attn_factor),
               **{name: pack_key(name, kind, value) for name, (kind, value) in keys.keys.items()},
               **_provenance_entries(src, plan, plan.factors, None, keys.fold, 1.0)}
    _publish(src.layout, rewritten_header(src.layout, changes, tensors), tensors, output, options.force,
             options.progress)
    modelfile = _write_modelfile(options, src.layout, output, src.facts.target_ctx)
    return PatchResult(output=output, plan=plan, factors=plan.factors, trained_ctx=src.facts.trained_ctx,
                       target_ctx=src.facts.target_ctx, attn_factor=keys.attn_factor, attn_folded=keys.fold,
                       scaled_tensors=list(scaled), modelfile=modelfile, seconds=time.monotonic() - start,
                       scaling_keys=keys.describe())


def _temperature_rows(layout: GgufLayout, hp: GgufHparams, scale: float,
                      family: type[GgufFamily] | None) -> dict[str, np.ndarray]:
    """Tensor name -> per-row factors that put the attention scale into the weights (where the family
    says); one line where a tensor's type cannot take it exactly."""
    targets = temperature_targets(layout, hp, scale, family)
    for target in targets:
        reason = why_not_scalable(target.tensor.tensor_type)
        if reason is not None:
            raise QroarError(f"{layout.path}: {target.tensor.name} cannot carry the attention scale {scale:.6g}: "
                             f"{reason}; --attn-factor-key writes it as rope.scaling.attn_factor instead (which a "
                             "context shift applies again)")
    return {target.tensor.name: target.row_factors for target in targets}


def _publish(layout: GgufLayout, header: bytes, tensors: list[TensorOut], output: Path, force: bool,
             progress: bool) -> None:
    """The rewritten file written beside ``output`` under its lock, then renamed into place."""
    with ExitStack() as held:
        held.enter_context(exclusive(output))
        check_destination(output, force=force, what="output", inputs=[layout.path])  # again, under the lock
        try:
            partial = held.enter_context(temporary_beside(output, "partial"))
            check_free_space(partial, len(header) + sum(t.nbytes for t in tensors), "the patched file")
            write_rewritten(partial, layout, header, tensors, progress=progress)
            os.replace(partial, output)
        except OSError as exc:
            raise QroarError(describe_os_error(exc, "write", output)) from None


def _write_modelfile(options, layout: GgufLayout, output: Path, context: int) -> Path | None:
    if options.modelfile is None:
        return None
    modelfile = Path(options.modelfile)
    template = scalar_value(layout, gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    publish_text(modelfile, modelfile_text(_from_path(output, modelfile), context,
                                           template if isinstance(template, str) else None))
    return modelfile


def _tensor_out(src: GgufSource, t: RawTensor, factors: np.ndarray, row_factors: np.ndarray | None,
                pair_tensors: tuple[str, ...]) -> TensorOut:
    """A tensor of the output: the per-pair tensors from the factors; Q/K rows scaled by ``row_factors``
    (their block scales) and into the rewritten arch's row order (whole rows move, so quantized blocks are
    copied as they are); every other one copied."""
    if t.name in pair_tensors:
        return TensorOut(t.name, values=factors)
    steps = []
    if row_factors is not None:
        steps.append(lambda rows: scale_rows(rows, t.tensor_type, row_factors))
    kind = src.family.projection_kind(t.name)
    if src.rewritten and kind in ("q", "k"):
        n_head = src.hp.n_head if kind == "q" else src.hp.n_kv_head
        # after scaling: the factors are by input row
        steps.append(lambda rows: src.family.to_output_rows(rows, n_head, src.hp.head_size))
    return TensorOut(t.name, source=t, rewrite_rows=_chained(steps) if steps else None)


def _chained(steps):
    def run(rows: np.ndarray) -> np.ndarray:
        for step in steps:
            rows = step(rows)
        return rows
    return run


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
    key = gguf.Keys.Rope.SCALING_ATTN_FACTOR.format(arch=arch)
    if attn_factor is not None:
        changes[key] = pack_key(src.renamed(key), VT.FLOAT32, attn_factor)
    elif key in fields:  # the file's own scale went into the weights with the plan's
        changes[key] = None
    changes.update({name: None for name in fields if name.startswith(provenance.PREFIX)})
    return changes


def _provenance_entries(src: GgufSource, plan: RopePlan, factors: np.ndarray, fold, folded: float,
                        key_scale: float, needs_patch: str | None = None) -> dict[str, bytes]:
    """The qroar.* keys, written by provenance's own functions and stored as entries: ``folded`` went into
    the weights, ``key_scale`` (the plan's share) into rope.scaling.attn_factor."""
    writer = gguf.GGUFWriter(path=None, arch=src.hp.architecture)
    provenance.add_provenance(
        writer, version=__version__, method=plan.method, params=plan.params, trained_ctx=src.facts.trained_ctx,
        target_ctx=src.facts.target_ctx, factors=factors, source_factors=src.existing, attn_scale=folded,
        source=src.path.name, needs_patch=needs_patch,
    )
    writer.add_float32(provenance.ATTN_FACTOR, float(key_scale))
    if src.rewritten:
        writer.add_string(provenance.SOURCE_ARCH, src.hp.architecture)
    if fold is not None:
        provenance.add_band_provenance(writer, fold.provenance(), None)
    return _stored_entries(writer)


def _stored_entries(writer: gguf.GGUFWriter) -> dict[str, bytes]:
    """The qroar.* keys a throwaway writer holds, as stored entries."""
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


@dataclass
class FixShiftResult:
    output: Path | None  # None: the file was already exact under shifts, nothing written
    before: ShiftState
    moved: float  # the factor moved into the weights
    attn_factor: float | None  # <arch>.rope.scaling.attn_factor as written (None: dropped or absent)
    scaled_tensors: list[str]
    modelfile: Path | None
    seconds: float


#: Arches whose sliding-window layers run with freq_scale 1 yet receive the context's attention factor:
#: a key that cancels YaRN's kernel factor on the global layers would scale the sliding ones.
_SLIDING_WINDOW = gguf.Keys.Attention.SLIDING_WINDOW


def fix_shift(source: str | Path, output: str | Path, options: PatchOptions) -> FixShiftResult:
    """Rewrite a file whose attention temperature a context shift re-applies (a YaRN scaling type, an
    attn_factor key) into the exact form: the factor in the rotary rows of the q/k weights (or q/k norms),
    and an attn_factor key that cancels what the kernel still multiplies in. The same logits without a
    shift (up to f16 rounding of the block scales), and a shift that only rotates."""
    start = time.monotonic()
    path, output = Path(source), Path(output)
    layout = read_layout(path)
    hp = read_hparams(layout, path)
    arch = hp.architecture
    family = gguf_family(arch)
    state = shift_state(layout, arch, hp.context_length, family is None or family.context_shift)
    if not state.shifted:
        raise QroarError(f"{path}: {arch} builds its attention scale from the attn factor itself, and Ollama runs "
                         "it without --context-shift: --fix-shift leaves such files as they are")
    if state.exact:
        return FixShiftResult(None, state, 1.0, None, [], None, time.monotonic() - start)
    check_destination(output, force=options.force, what="output", inputs=[path])
    if options.modelfile is not None:
        check_destination(Path(options.modelfile), force=options.force, what="--modelfile", inputs=[path])
    runtime = state.context_scale * state.kernel_scale  # what the runtime multiplies in besides the key
    if abs(runtime - 1.0) > 1e-6 and layout.get_field(_SLIDING_WINDOW.format(arch=arch)) is not None:
        raise QroarError(f"{path}: {arch} runs sliding-window layers without YaRN's factor but with the attention "
                         "factor key, so no key can cancel YaRN's factor on every layer: --fix-shift cannot make this "
                         "file exact")
    scaled = _temperature_rows(layout, hp, state.shift_factor, family)
    new_key = None if abs(runtime - 1.0) <= 1e-6 else float(np.float32(1.0 / runtime))
    key = gguf.Keys.Rope.SCALING_ATTN_FACTOR.format(arch=arch)
    changes: dict[str, bytes | None] = {key: None if new_key is None else pack_key(key, VT.FLOAT32, new_key)}
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_float32(provenance.SHIFT_FOLDED, float(state.shift_factor))
    made = provenance.read_provenance(layout) or {}
    if provenance.ATTN_FACTOR in layout.fields:  # our own key-form patch: its scale is in the weights now
        folded_before = made.get("attention_scale_folded")
        folded_before = folded_before if isinstance(folded_before, float) else 1.0
        writer.add_float32(provenance.ATTN_FACTOR, 1.0)
        writer.add_float32(provenance.ATTN_SCALE, float(folded_before * state.shift_factor))
    changes.update(_stored_entries(writer))
    tensors = [TensorOut(t.name, source=t, rewrite_rows=None if t.name not in scaled else
                         (lambda rows, t=t: scale_rows(rows, t.tensor_type, scaled[t.name])))
               for t in layout.tensors]
    _publish(layout, rewritten_header(layout, changes, tensors), tensors, output, options.force, options.progress)
    modelfile = _write_modelfile(options, layout, output, hp.context_length)
    return FixShiftResult(output, state, state.shift_factor, new_key, list(scaled), modelfile,
                          time.monotonic() - start)
