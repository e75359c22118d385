"""HF checkpoint -> unquantized GGUF with rope_freqs -> llama.cpp quantizer -> final file.

Two routes, one command: a family with a converter of its own (``arch/families.py``) streams the
checkpoint into the GGUF here; any other architecture llama.cpp's converter takes goes through it and then
through `patch`'s plan step (``llama_converter.py``). ``route_for`` decides.

Each step fails with one QroarError line before or while writing; the final file appears only when
complete (written under a hidden temporary name, then renamed), and temporaries are removed.
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
from qroar_gguf.arch import llama
from qroar_gguf.arch.base import ROPE_FREQS, ModelFamily, config_architectures
from qroar_gguf.arch.families import family_for, supported_architectures
from qroar_gguf.arch.vocab import write_vocab
from qroar_gguf.choices import UNQUANTIZED
from qroar_gguf.errors import QroarError
from qroar_gguf.gguf_io import provenance
from qroar_gguf.gguf_io.imatrix import ImatrixRequest
from qroar_gguf.gguf_io.layout import read_layout
from qroar_gguf.gguf_io.quantize import (
    TypeOverrides,
    check_quantization,
    check_type_fits_model,
    check_types_fit,
    quantize_planned,
)
from qroar_gguf.gguf_io.writer import PlannedTensor, write_streaming
from qroar_gguf.llama_converter import Delegated, convert_delegated, delegated_source
from qroar_gguf.llama_tools import find_tool
from qroar_gguf.outputs import (
    check_destination,
    check_free_space,
    describe_os_error,
    exclusive,
    temporary_beside,
)
from qroar_gguf.patch import _write_modelfile as write_modelfile  # patch's Modelfile writer, for both routes
from qroar_gguf.rope.bands import BandFold
from qroar_gguf.rope.measure import measure_sensitivity
from qroar_gguf.rope.plans import RopeFacts, RopePlan, combine_with_source, source_factors
from qroar_gguf.rope.spec import PlanSpec, rope_facts_for
from qroar_gguf.source.checkpoint import Checkpoint, open_checkpoint
from qroar_gguf.source.safetensors_lazy import FLOAT_DTYPES

Q = gguf.GGMLQuantizationType
_FILE_TYPES = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
               "BF16": gguf.LlamaFileType.MOSTLY_BF16}


@dataclass
class ConvertOptions:
    plan: PlanSpec = field(default_factory=PlanSpec)  # method, options, aggregation and band values
    target_ctx: int | None = None  # None: `scale` x trained context (DEFAULT_SCALE when both are None)
    scale: float | None = None
    qtype: str = "Q4_K_M"
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    quantizer: str = "libllama"  # or "llama-quantize" (choices.QUANTIZERS)
    overrides: TypeOverrides = field(default_factory=TypeOverrides)  # --imatrix FILE, per-tensor types
    imatrix_from: ImatrixRequest | None = None  # compute the matrix on the unquantized file (plan applied)
    keep_f16: Path | None = None
    force: bool = False
    progress: bool = True
    band_search: dict | None = None  # provenance of the search that chose the band values (search.py)
    name: str | None = None  # general.name (None: from the checkpoint, as llama.cpp's converter finds it)
    metadata: Path | None = None  # a JSON file of general.* overrides (llama.cpp's --metadata format)
    allow_patched_runtime: bool = False  # write families whose rope_freqs only a patched llama.cpp loads
    converter: str = "auto"  # choices.CONVERTERS: qroar-gguf's own where a family has one, or llama.cpp's
    modelfile: Path | None = None  # also write an Ollama Modelfile here


@dataclass
class ConvertResult:
    output: Path
    plan: RopePlan
    factors: np.ndarray  # what rope_freqs.weight holds (plan x source factors)
    trained_ctx: int
    target_ctx: int
    qtype: str
    intermediate: Path | None
    seconds: float
    route: str = "native"  # or "llama.cpp": its converter, then patch's plan step
    gguf_arch: str | None = None
    scaling_keys: str | None = None  # keys-only arches: the rope keys written instead of rope_freqs
    attn_folded: float | None = None  # llama.cpp's route: the temperature multiplied into q/k rows
    modelfile: Path | None = None


def convert(source: str | Path, output: str | Path, options: ConvertOptions) -> ConvertResult:
    start = time.monotonic()
    output = Path(output)
    keep_f16 = None if options.keep_f16 is None else Path(options.keep_f16)
    check_quantization(options.qtype, options.overrides, imatrix_coming=options.imatrix_from is not None)
    if options.overrides.imatrix is not None and options.imatrix_from is not None:
        raise QroarError("give --imatrix FILE or --imatrix-text FILE, not both")
    if options.qtype not in UNQUANTIZED:  # before minutes of writing: one line if the tools are not built
        if options.quantizer == "llama-quantize" or options.overrides or options.imatrix_from is not None:
            find_tool("llama-quantize")
        if options.imatrix_from is not None:
            find_tool("llama-imatrix")
    if options.modelfile is not None:
        check_destination(Path(options.modelfile), force=options.force, what="--modelfile")
    delegated = route_for(source, options)
    if delegated is not None:
        return _convert_delegated(delegated, output, options, start)
    src = read_source(source, options)
    ckpt, hp, facts, existing = src.ckpt, src.hp, src.facts, src.existing
    check_destination(output, force=options.force, what="output", inputs=ckpt.source_files)
    if keep_f16 is not None:
        check_destination(keep_f16, force=options.force, what="--keep-f16", inputs=ckpt.source_files)
        if keep_f16.resolve() == output.resolve():
            raise QroarError("--keep-f16 must name a different file than the output")
    vocab = src.family.read_vocab(ckpt.directory)
    meta = model_metadata(ckpt, src.family, options.name, options.metadata)  # before the plan's measuring
    plan = make_conversion_plan(options, src)
    fold = options.plan.bands.fold(facts, n_head=hp.n_head, n_kv_head=hp.n_kv_head, head_dim=hp.head_dim)
    scaled = fold is not None and any(v != 1 for v in fold.provenance()["band_scales"])
    if scaled and not src.family.folds_band_scales:
        raise QroarError(f"band scales cannot be folded into a {src.family.gguf_arch_name} file (its Q/K rows are "
                         "normalised or not in llama's pair order): use band factors only")
    factors = plan.factors.astype(np.float32) if fold is None else fold.apply_factors(facts, plan.factors)
    if existing is not None:
        factors = combine_with_source(factors, existing)

    unquantized = options.qtype in UNQUANTIZED
    store = options.qtype if unquantized else ("BF16" if ckpt.source_dtype == "BF16" else "F16")
    writer = gguf.GGUFWriter(path=None, arch=src.family.gguf_arch_name)
    _add_metadata(writer, ckpt, src.family, facts, plan, factors, existing, store,
                  meta)
    if fold is not None or options.band_search is not None:
        provenance.add_band_provenance(writer, fold.provenance() if fold else None, options.band_search)
    write_vocab(writer, vocab)
    tensors = _plan_tensors(ckpt, src.family, plan.attn_scale, factors, Q[store], fold)
    if not unquantized:
        check_types_fit({t.name: t.shape[-1] for t in tensors if len(t.shape) >= 2}, options.overrides)
        layer_matrix = next(t for t in tensors if t.name.startswith("blk.") and len(t.shape) >= 2)
        check_type_fits_model(options.qtype, [t.name for t in tensors], layer_matrix.produce)

    destinations = [(output, "output")] + ([] if keep_f16 is None else [(keep_f16, "--keep-f16")])
    with ExitStack() as held:
        for path, what in destinations:  # again under the lock: another run may have finished meanwhile
            held.enter_context(exclusive(path))
            check_destination(path, force=options.force, what=what, inputs=ckpt.source_files)
        try:
            final_tmp = held.enter_context(temporary_beside(output, "partial"))
            if unquantized:
                first = final_tmp
            else:
                first = held.enter_context(temporary_beside(keep_f16 or output, f"{store.lower()}.tmp"))
            check_free_space(first, sum(t.nbytes for t in tensors), "the unquantized file")
            write_streaming(first, writer, tensors, progress=options.progress)
            if not unquantized:
                quantize_planned(first, final_tmp, options.qtype, options.threads, target_ctx=facts.target_ctx,
                                 imatrix_from=options.imatrix_from, overrides=options.overrides,
                                 quantizer=options.quantizer, progress=options.progress)
            os.replace(final_tmp, output)
            if keep_f16 is not None and not unquantized:
                os.replace(first, keep_f16)
        except OSError as exc:
            raise QroarError(describe_os_error(exc, "write", output)) from None
    return ConvertResult(output=output, plan=plan, factors=factors, trained_ctx=facts.trained_ctx,
                         target_ctx=facts.target_ctx, qtype=options.qtype, intermediate=keep_f16,
                         seconds=time.monotonic() - start, gguf_arch=src.family.gguf_arch_name,
                         modelfile=_modelfile(options, output, facts.target_ctx))


def route_for(source: str | Path, options: ConvertOptions) -> Delegated | None:
    """None where qroar-gguf's own converter takes the checkpoint (a family of its own, and for a family
    whose rope_freqs only a patched llama.cpp loads, --allow-patched-runtime); else the checkpoint for
    llama.cpp's converter. ``options.converter`` forces either."""
    if options.converter == "llama.cpp":
        return delegated_source(source)
    config = open_checkpoint(source).config
    archs = config_architectures(config)
    native = [a for a in archs if a in supported_architectures()]
    if options.converter == "native" or native or not archs:  # none named: the family's line says what to add
        family = family_for(config)  # its own line where the config does not fit the family
        if options.converter == "auto" and family.needs_patch and not options.allow_patched_runtime:
            return delegated_source(source)  # stock runtimes: llama.cpp's keys route
        return None
    return delegated_source(source)


def _convert_delegated(src: Delegated, output: Path, options: ConvertOptions, start: float) -> ConvertResult:
    done, _outtype = convert_delegated(src, output, options)
    return ConvertResult(output=output, plan=done.plan, factors=done.factors, trained_ctx=done.trained_ctx,
                         target_ctx=done.target_ctx, qtype=options.qtype,
                         intermediate=None if options.qtype in UNQUANTIZED else options.keep_f16,
                         seconds=time.monotonic() - start, route="llama.cpp", gguf_arch=src.gguf_arch,
                         scaling_keys=done.scaling_keys, attn_folded=done.attn_folded,
                         modelfile=_modelfile(options, output, done.target_ctx))


def _modelfile(options: ConvertOptions, output: Path, context: int) -> Path | None:
    """The Ollama Modelfile for the published file, where asked for (patch's own writer)."""
    if options.modelfile is None:
        return None
    return write_modelfile(options, read_layout(output), output, context)


@dataclass
class Source:
    """A checkpoint whose config and tensors were checked, with its RoPE facts for the target context."""

    ckpt: Checkpoint
    family: ModelFamily  # the hooks that differ between model families (arch/)
    facts: RopeFacts
    existing: np.ndarray | None  # factors the checkpoint's own rope scaling implies

    @property
    def hp(self):
        return self.family.hparams


def read_source(source: str | Path, options: ConvertOptions) -> Source:
    """The first stage: open the checkpoint, validate config.json and every tensor against it, and fix
    the trained and target contexts. Reads headers only; every problem is one QroarError line."""
    ckpt = open_checkpoint(source)
    family = family_for(ckpt.config)
    if family.needs_patch and not options.allow_patched_runtime:
        raise QroarError(f"a {family.gguf_arch_name} file with rope_freqs runs only in a llama.cpp with "
                         f"patches/{family.needs_patch} (the tools `bash tools/setup.sh` builds); stock llama.cpp and "
                         "Ollama refuse it: pass --allow-patched-runtime to write one anyway")
    check_tensors(ckpt, family)
    facts, existing = _rope_facts(ckpt.config, family.hparams, options)
    return Source(ckpt, family, facts, existing)


def check_tensors(ckpt: Checkpoint, family: ModelFamily) -> None:
    """Every tensor llama.cpp will need, with the shape config.json implies and a float type, and no
    tensor it would not load: checked before anything is written, naming the first mismatch."""
    hp, expected = family.hparams, family.expected_tensors()
    for name in ckpt.names:
        if name.endswith(".rotary_emb.inv_freq"):
            continue
        info, spec = ckpt.info(name), expected.get(name)
        if spec is None:
            raise QroarError(f"tensor {name!r} has no place in a {hp.architecture} with {hp.n_layer} layers "
                             "(config.json num_hidden_layers): is this the checkpoint config.json describes?")
        if info.dtype not in FLOAT_DTYPES:
            raise QroarError(f"tensor {name!r} is stored as {info.dtype}; weights must be floating point "
                             f"({', '.join(FLOAT_DTYPES)}): re-save the checkpoint in float16 or bfloat16")
        if tuple(info.shape) != spec.shape:
            raise QroarError(f"tensor {name!r} has shape {list(info.shape)} but config.json implies "
                             f"{list(spec.shape)}: the weights and config.json do not belong together")
    for name, spec in expected.items():
        if spec.required and name not in ckpt.index:
            raise QroarError(f"tensor {name!r} is missing from {ckpt.directory}: the checkpoint is incomplete "
                             "(for a sharded one, give its directory or model.safetensors.index.json, not one "
                             "shard)")


def _rope_facts(config: dict, hp: llama.LlamaHparams, options: ConvertOptions) -> tuple[RopeFacts, np.ndarray | None]:
    existing, _original_ctx = source_factors(config, hp.n_rot)
    # The trained context is what the checkpoint supports as shipped: for a Llama 3.1 config with
    # llama3 factors that is max_position_embeddings (131072), not the pre-extension 8192; our factors
    # then multiply into the existing ones.
    facts = rope_facts_for(hp.n_rot, hp.rope_theta, hp.context_length, options.plan.method, options.target_ctx,
                           options.scale)
    return facts, existing


def make_conversion_plan(options: ConvertOptions, src: Source) -> RopePlan:
    """The second stage: the plan's factors and attention scale (qroar measures W_Q/W_K first)."""
    spec, sensitivity = options.plan, None
    if spec.needs_sensitivity:
        measured = measure_sensitivity(src.ckpt, src.family, agg=spec.aggregation, progress=options.progress)
        sensitivity = measured.sensitivity
    return spec.plan(src.facts, sensitivity)


_TEXT_METADATA = ("name", "author", "version", "organization", "finetune", "basename", "description",
                  "quantized_by", "size_label", "license", "license_name", "license_link", "url", "doi", "uuid",
                  "repo_url", "source_url", "source_doi", "source_uuid", "source_repo_url")


def model_metadata(ckpt: Checkpoint, family: ModelFamily | None, name: str | None = None,
                   overrides: Path | None = None) -> gguf.Metadata:
    """general.* as llama.cpp's converter finds them: gguf-py's Metadata from the checkpoint's folder
    name, config.json and model card (README.md front matter), then ``overrides`` (a JSON file) and
    ``name``; the size label from the parameter count when nothing gives one (every tensor's where no
    family of ours names them)."""
    total = sum(int(np.prod(ckpt.info(n).shape, dtype=np.int64)) for n in ckpt.names
                if family is None or family.gguf_name(n))
    # gguf-py parses the model card with PyYAML and the override file with json: whatever they raise on a
    # malformed file (YAML errors, a list where an object belongs, ...) becomes one line naming the file.
    try:
        meta = gguf.Metadata.load(None, ckpt.directory, name, total)
    except Exception as exc:
        raise QroarError(f"{ckpt.directory}: its model card (README.md front matter) or config.json cannot be "
                         f"read for metadata ({type(exc).__name__}: {exc}): fix or remove it") from None
    if overrides is not None:
        try:
            meta = gguf.Metadata.load(overrides, ckpt.directory, name, total)
            given = gguf.Metadata.load_metadata_override(overrides)
            meta.license = given.get(gguf.Keys.General.LICENSE, meta.license)  # the one key load() skips
        except Exception as exc:
            raise QroarError(f"--metadata {overrides}: not a JSON object of general.* values "
                             f"({type(exc).__name__}: {exc})") from None
    for key, value in vars(meta).items():  # a card's `version: 1.0` is a number; GGUF stores text there
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key in _TEXT_METADATA:
            setattr(meta, key, str(value))
    if meta.name is None:
        meta.name = ckpt.directory.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, 0, 0, 0)
    return meta


def default_output(source: str | Path, options: ConvertOptions) -> Path:
    """`{name}-{size}-{ctx}-{qtype}.gguf` in the current folder, as llama.cpp's converter names files
    (e.g. SmolLM2-135M-Instruct-32k-Q4_K_M.gguf)."""
    delegated = route_for(source, options)
    if delegated is None:
        src = read_source(source, options)
        meta = model_metadata(src.ckpt, src.family, options.name, options.metadata)
        ctx = src.facts.target_ctx
    else:
        meta = model_metadata(delegated.ckpt, None, options.name, options.metadata)
        ctx = rope_facts_for(2, 10000.0, _trained_context(delegated.ckpt), options.plan.method, options.target_ctx,
                             options.scale).target_ctx
    stem = gguf.naming_convention(meta.name, meta.basename, meta.finetune, meta.version, meta.size_label, None)
    stem = stem.replace("/", "-").replace("\\", "-")  # a name from a card is no path
    return Path(f"{stem}-{f'{ctx // 1024}k' if ctx % 1024 == 0 else ctx}-{options.qtype}.gguf")


def _trained_context(ckpt: Checkpoint) -> int:
    """The context llama.cpp's converter writes as context_length (its own order of config keys)."""
    config = ckpt.config.get("text_config") if isinstance(ckpt.config.get("text_config"), dict) else ckpt.config
    for key in ("max_position_embeddings", "n_ctx", "n_positions", "max_length"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    raise QroarError(f"{ckpt.directory}/config.json gives no context length: name the output with -o")


def _add_metadata(writer: gguf.GGUFWriter, ckpt: Checkpoint, family: ModelFamily, facts: RopeFacts,
                  plan: RopePlan, factors: np.ndarray, existing: np.ndarray | None, store: str,
                  meta: gguf.Metadata) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(writer)
    writer.add_file_type(_FILE_TYPES[store])
    family.set_gguf_parameters(writer, facts.target_ctx)
    provenance.add_provenance(
        writer, version=__version__, method=plan.method, params=plan.params, trained_ctx=facts.trained_ctx,
        target_ctx=facts.target_ctx, factors=factors, source_factors=existing, attn_scale=plan.attn_scale,
        source=str(ckpt.config.get("_name_or_path") or ckpt.directory.name), needs_patch=family.needs_patch)


def _plan_tensors(ckpt: Checkpoint, family: ModelFamily, attn_scale: float, factors: np.ndarray,
                  store: gguf.GGMLQuantizationType, fold: BandFold | None = None) -> list[PlannedTensor]:
    planned = [PlannedTensor(ROPE_FREQS, factors.shape, Q.F32, lambda: factors)]
    for hf_name in ckpt.names:
        gguf_name = family.gguf_name(hf_name)
        if gguf_name is None:
            if hf_name.endswith(".rotary_emb.inv_freq"):
                continue
            raise QroarError(f"tensor {hf_name!r} has no llama.cpp counterpart; is this really a "
                             f"{family.hparams.architecture} checkpoint?")
        shape = ckpt.info(hf_name).shape
        qtype = store if len(shape) >= 2 else Q.F32  # norms and biases stay F32, as llama.cpp expects
        kind = family.scale_kind(hf_name)
        rows = None  # band scales (per row) for W_Q / W_K and their biases
        if fold is not None:
            rows = fold.q_rows if kind == "q" else fold.k_rows if kind == "k" else None
        planned.append(PlannedTensor(gguf_name, shape, qtype, _producer(ckpt, hf_name, family, attn_scale, rows)))
    return planned


def _producer(ckpt: Checkpoint, hf_name: str, family: ModelFamily, attn_scale: float,
              row_scale: np.ndarray | None = None):
    scaled = family.scale_kind(hf_name) is not None

    def produce() -> np.ndarray:
        values = ckpt.load(hf_name)
        if not scaled:
            return family.modify_tensor(hf_name, values)
        if not np.isfinite(values).all():
            raise QroarError(f"{hf_name} contains NaN or Inf values: the checkpoint is damaged")
        values = family.modify_tensor(hf_name, values)
        if attn_scale != 1.0:
            # Folding the attention scale into both W_Q and W_K multiplies q.k by its square, which is
            # how transformers and llama.cpp apply YaRN's mscale (to cos and sin of both q and k).
            values = values.astype(np.float32) * np.float32(attn_scale)
        if row_scale is not None:  # band scales, per row in llama.cpp's layout (both rows of each pair)
            values = values.astype(np.float32) * row_scale.reshape(-1, *(1,) * (values.ndim - 1))
        return values

    return produce
