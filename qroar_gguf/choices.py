"""What the command line offers by name, kept free of imports so `--help` starts fast.

Each list mirrors the table that owns the fact, and tests/test_choices.py holds them equal: quantization
types (gguf-py's LlamaFileType, through gguf_io/quantize.py), RoPE plans (rope/plans.py's PLANS) and
key-cache types (gguf-py's GGMLQuantizationType, through evaluate/runtime.py). The aggregations are
owned here: rope/sensitivity.py imports them.
"""

#: --qtype names, in the order --help lists them; gguf_io/quantize.py maps each to llama.cpp's file type.
QTYPES = ("Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1", "Q5_K_M", "Q5_K_S", "Q5_0", "Q6_K", "Q8_0",
          "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "IQ4_XS", "IQ3_M", "IQ3_S", "IQ3_XXS", "F16", "BF16", "F32")
#: Refused without an importance matrix: at about 3 bits the i-quants lose too much without one
#: (llama.cpp itself insists only below 3 bits).
NEEDS_IMATRIX = ("IQ3_M", "IQ3_S", "IQ3_XXS")
#: Written as they are, with no quantizer run.
UNQUANTIZED = ("F32", "F16", "BF16")
#: --quantizer: libllama through the Python bindings, or llama.cpp's llama-quantize program (the same code).
QUANTIZERS = ("libllama", "llama-quantize")
#: --method names: rope/plans.py's PLANS, in its order.
METHODS = ("none", "linear", "ntk", "yarn", "llama3", "qroar")
#: yarn beats ntk, llama3 and linear in every measurement so far (README's tables say by how much).
DEFAULT_METHOD = "yarn"
#: --agg names: how qroar aggregates a pair's sensitivity over layers (rope/sensitivity.py); the first
#: is the default.
AGGREGATIONS = ("max", "mean")
#: --type-k names (llama.cpp's KV cache types a key cache may take).
KEY_CACHE_TYPES = ("f16", "q8_0", "q4_0")
#: bench's --imatrix axis: no importance matrix, one from short windows, one from windows of the file's
#: target context; evaluate/bench.py owns their meaning.
IMATRIX_AXIS = ("none", "short", "target")
#: bench --imatrix short's window and convert --imatrix-ctx's default: 512 tokens, as llama.cpp's
#: importance matrices are usually made.
IMATRIX_SHORT_WINDOW = 512
#: bench --imatrix-tokens: calibration tokens of every matrix, the same for short and target so that
#: only the window differs; convert --imatrix-chunks defaults to as many windows as make them.
DEFAULT_IMATRIX_TOKENS = 32768
