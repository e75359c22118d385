"""What the command line offers by name, kept free of imports so `--help` starts fast.

Each list mirrors the table that owns the fact, and tests/test_choices.py holds them equal: quantization
types (llama-quantize's own table, in llama.cpp's quantize.cpp), RoPE plans (rope/plans.py's PLANS) and
key-cache types (gguf-py's GGMLQuantizationType, through evaluate/runtime.py). The aggregations are
owned here: rope/sensitivity.py imports them.
"""

#: --qtype names by family, each with a line on what it is for: every name llama-quantize takes (the
#: pinned tools/quantize/quantize.cpp's QUANT_OPTIONS, less COPY, which is no type) with the number of
#: llama.cpp's file type it stands for (llama.h's llama_ftype). An alias (Q4_K) follows its type's own
#: name (Q4_K_M) and shares its number. tests/test_choices.py parses quantize.cpp and holds them equal.
QTYPE_FAMILIES: dict[str, tuple[str, dict[str, int]]] = {
    "k-quants": ("the usual choice: 256-value super-blocks, more bits kept for the layers that need them "
                 "(_M, _L) or fewer (_S); Q2_K_S only with an importance matrix",
                 {"Q4_K_M": 15, "Q4_K": 15, "Q4_K_S": 14, "Q5_K_M": 17, "Q5_K": 17, "Q5_K_S": 16, "Q6_K": 18,
                  "Q3_K_L": 13, "Q3_K_M": 12, "Q3_K": 12, "Q3_K_S": 11, "Q2_K": 10, "Q2_K_S": 21}),
    "i-quants": ("codebook quants (lattice grids; a non-linear table for IQ4_*) for 4 bits and fewer; below 4 "
                 "bits only with an importance matrix (--imatrix or --imatrix-text)",
                 {"IQ4_XS": 30, "IQ4_NL": 25, "IQ3_M": 27, "IQ3_S": 26, "IQ3_XS": 22, "IQ3_XXS": 23,
                  "IQ2_M": 29, "IQ2_S": 28, "IQ2_XS": 20, "IQ2_XXS": 19, "IQ1_M": 31, "IQ1_S": 24}),
    "legacy": ("one scale (and an offset, _1) per block of 32 values: simple, fast everywhere; Q8_0 is near "
               "lossless; Q2_0 and Q1_0 keep 2 and 1 bits with a scale per 64 and 128 values, for models trained "
               "that coarse",
               {"Q8_0": 7, "Q5_1": 9, "Q5_0": 8, "Q4_1": 3, "Q4_0": 2, "Q2_0": 41, "Q1_0": 40}),
    "ternary": ("weights of -1, 0 and 1 times a scale, for models trained ternary (BitNet b1.58); refused on "
                "other models",
                {"TQ2_0": 37, "TQ1_0": 36}),
    "float": ("unquantized (F32, F16, BF16: written directly, no quantizer), or MXFP4_MOE: 4-bit floats for a "
              "mixture-of-experts' expert tensors, Q8_0 elsewhere (refused on models without experts)",
              {"F16": 1, "BF16": 32, "F32": 0, "MXFP4_MOE": 38}),
}
#: The one table from --qtype names (aliases included) to llama.cpp's file types.
FILE_TYPES: dict[str, int] = {name: ftype for _, types in QTYPE_FAMILIES.values() for name, ftype in types.items()}
QTYPES = tuple(FILE_TYPES)
DEFAULT_QTYPE = "Q4_K_M"
#: Refused without an importance matrix. llama.cpp itself refuses IQ1_*, IQ2_*, IQ3_XXS and Q2_K_S without
#: one, but only after the unquantized file is written; the other IQ3 types it makes, and at about 3 bits
#: they lose too much without one.
NEEDS_IMATRIX = ("IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S",
                 "Q2_K_S")
#: Written as they are, with no quantizer run.
UNQUANTIZED = ("F32", "F16", "BF16")
#: Types for some models only: MXFP4 goes to a mixture-of-experts' expert tensors (a dense model gets
#: Q8_0 under MXFP4's name), the ternary types keep only the sign of each weight and one scale per block.
EXPERTS_ONLY = ("MXFP4_MOE",)
TERNARY = ("TQ1_0", "TQ2_0")
#: --quantizer: libllama through the Python bindings, or llama.cpp's llama-quantize program (the same code).
QUANTIZERS = ("libllama", "llama-quantize")
#: --method names: rope/plans.py's PLANS, in its order.
METHODS = ("none", "linear", "ntk", "yarn", "llama3", "qroar")
#: yarn beats ntk, llama3 and linear in every measurement so far (docs/results.md says by how much).
DEFAULT_METHOD = "yarn"
#: The demo's novel and quantization: a novel the committed band searches never saw (their dev text was
#: Emma), and the type they were run for (on SmolLM2, Q4_K_M is mostly Q5_0). tests/test_demo.py holds
#: them against demo.py's COMMITTED_SEARCHES.
DEMO_TEXT = "Persuasion"
DEMO_QTYPE = "Q4_0"
#: --agg names: how qroar aggregates a pair's sensitivity over layers (rope/sensitivity.py).
AGGREGATIONS = ("max", "mean")
#: qroar's defaults, wherever a default is taken (plans, sensitivity, measure, plot, the command line):
#: protection strength beta, and the aggregation over layers.
DEFAULT_BETA = 8.0
DEFAULT_AGG = "max"
#: --type-k names (llama.cpp's KV cache types a key cache may take).
KEY_CACHE_TYPES = ("f16", "q8_0", "q4_0")
#: bench's --imatrix axis: no importance matrix, one from short windows, one from windows of the file's
#: target context; evaluate/bench.py owns their meaning.
IMATRIX_AXIS = ("none", "short", "target")
#: What measures `bench`'s rows: the Python bindings, or llama.cpp's llama-perplexity program.
BENCH_EVALUATORS = ("bindings", "llama-perplexity")
#: bench --imatrix short's window and convert --imatrix-ctx's default: 512 tokens, as llama.cpp's
#: importance matrices are usually made.
IMATRIX_SHORT_WINDOW = 512
#: bench --imatrix-tokens: calibration tokens of every matrix, the same for short and target so that
#: only the window differs; convert --imatrix-chunks defaults to as many windows as make them.
DEFAULT_IMATRIX_TOKENS = 32768
#: convert --converter: qroar-gguf's own converter where a family has one (auto; native insists on it), or
#: llama.cpp's convert_hf_to_gguf.py for any architecture it takes (llama.cpp forces it).
CONVERTERS = ("auto", "native", "llama.cpp")
#: The Hugging Face architectures qroar-gguf converts itself, by the route their plan takes (arch/families.py's
#: families; tests/test_choices.py holds them equal). Every other architecture llama.cpp's converter takes goes
#: through it: per-pair factors (rope_freqs) where the GGUF arch's loader reads them, llama.cpp's rope keys
#: elsewhere (each GGUF arch's family module under arch/).
NATIVE_ROUTES = {
    "LlamaForCausalLM": "rope_freqs",
    "MistralForCausalLM": "rope_freqs",
    "Qwen2ForCausalLM": "rope_freqs (written as llama)",
    "Qwen3ForCausalLM": "rope_freqs with --allow-patched-runtime; else llama.cpp's converter, keys",
}
