"""The package's imports run one way: each module imports only from its own layer or the layers below.

The layers are docs/architecture.md's table, bottom first. Every import statement counts, the ones
inside functions too, so a cycle cannot hide in a function body. A new module must be placed in a
layer here (and in docs/architecture.md) before it can import anything.
"""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qroar_gguf"

LAYERS = [
    # 0. facts every layer may use
    ["qroar_gguf", "errors", "display", "paths", "digests", "choices", "search_settings", "population", "gguf_io.quantize_child",
     "modelfile"],
    # 1. reading what the user gives, writing files safely, the packaged assets
    ["source.checkpoint", "source.safetensors_lazy", "source.text", "gguf_io.reader", "gguf_io.layout", "gguf_io.rewrite", "gguf_io.blockscale",
     "file_types", "outputs",
     "assets.austen", "assets.smollm2", "llama_tools"],
    # 2. model families: hyperparameters, tensor names and shapes, vocabularies
    ["arch.base", "arch.llama", "arch.qwen2", "arch.qwen3", "arch.gemma", "arch.glm4", "arch.olmo2", "arch.phi3",
     "arch.deepseek2", "arch.llama_like", "arch.refused", "arch.families", "arch.pretokenizer", "arch.vocab",
     "arch.temperature"],
    # 3. RoPE math: plans, sensitivity, bands, diagnostics, measuring weights
    ["rope.plans", "rope.layout", "rope.sensitivity", "rope.bands", "rope.diagnostics", "rope.measure",
     "rope.spec", "rope.scaling_keys"],
    # 4. GGUF writing and quantizing; llama.cpp's runtime; statistics
    ["gguf_io.provenance", "gguf_io.writer", "gguf_io.quantize", "gguf_io.imatrix", "evaluate.runtime",
     "evaluate.paired", "evaluate.perplexity_tool"],
    # 5. evaluators on the runtime
    ["evaluate.perplexity", "evaluate.kld", "evaluate.passkey", "evaluate.kshift"],
    # 6. conversion's stages, and a GGUF's patch
    ["convert", "patch", "llama_converter"],
    # 7. what is built on conversion and evaluation
    ["search", "summary", "inspect_text", "evaluate.report", "evaluate.plots", "evaluate.bench"],
    # 8. the demo, 9. the command line
    ["demo"],
    ["cli", "__main__"],
]
PACKAGES = ["arch", "assets", "evaluate", "gguf_io", "rope", "source"]  # their __init__ files import nothing


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    return "qroar_gguf" if name == "__init__" else name.removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from qroar_gguf.arch import llama` imports the module arch.llama; `from qroar_gguf import
            # __version__` the package itself (_graph resolves which is which)
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name == "qroar_gguf" or name.startswith("qroar_gguf."):
                found.add(name.removeprefix("qroar_gguf."))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = _imports(path)
        # a dotted name that is a module counts as that module; its parent package alone counts only
        # when nothing below it was meant (`from qroar_gguf.gguf_io.reader import x` imports gguf_io.reader)
        deps = {d for d in imported if d in modules}
        deps = {d for d in deps if not any(o.startswith(d + ".") for o in deps)}
        graph[name] = deps - {name}
    return graph


def test_every_module_has_a_layer():
    placed = [m for layer in LAYERS for m in layer]
    assert len(placed) == len(set(placed)), "a module is placed twice"
    assert set(_graph()) == set(placed) | set(PACKAGES)


def test_imports_only_go_down_or_sideways():
    layer_of = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    upward = [f"{m} (layer {layer_of[m]}) imports {d} (layer {layer_of[d]})"
              for m, deps in _graph().items() if m in layer_of for d in deps if layer_of[d] > layer_of[m]]
    assert not upward, "; ".join(upward)


def test_no_import_cycles():
    try:
        tuple(TopologicalSorter(_graph()).static_order())
    except CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None


def test_package_inits_are_empty_of_imports():
    for name in PACKAGES:
        assert _imports(PACKAGE / name / "__init__.py") == set(), name
