"""Every third-party module the package imports is a declared core dependency (what the plain set-up installs).

The test extras (torch, transformers, pytest, ...) are installed where these tests run, so an import
the package makes of them would pass every other test and crash on a newcomer's machine. This reads
every import statement under qroar_gguf/, function-local ones included, without running any of them.
tools/check_fresh_setup.sh checks the same from the other side: a fresh set-up actually running the demo.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "qroar_gguf"


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _normalize(re.match(r"[A-Za-z0-9._-]+", requirement).group(0))


def _core_dependencies() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return {_requirement_name(r) for r in project["dependencies"]}


def third_party_imports(root: Path) -> dict[str, list[str]]:
    """Top-level module name -> the places (file:line) under `root` that import it."""
    found: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("__future__", "qroar_gguf"):
                    continue
                found.setdefault(top, []).append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_the_reader_sees_function_local_imports():
    # evaluate/plots.py imports matplotlib inside a function (the kind of import that once hid a missing
    # dependency: safetensors, imported only when the default model is first built).
    imports = third_party_imports(PACKAGE)
    assert any(place.startswith("qroar_gguf/evaluate/plots.py") for place in imports["matplotlib"])
    assert "json" not in imports and "numpy" in imports


def test_every_imported_module_is_a_core_dependency():
    declared = _core_dependencies()
    providers = packages_distributions()
    problems = []
    for module, places in sorted(third_party_imports(PACKAGE).items()):
        dists = {_normalize(d) for d in providers.get(module, [])}
        if not dists:
            problems.append(f"{module} (imported at {places[0]}) is not installed at all")
        elif not dists & declared:
            problems.append(f"{module} (imported at {places[0]}) comes from {'/'.join(sorted(dists))}, "
                            "which is not in [project] dependencies of pyproject.toml")
    assert not problems, "; ".join(problems)



def test_versions_are_written_once():
    """The package's version lives in qroar_gguf/__init__.py (pyproject.toml reads it); the pinned
    llama-cpp-python in llama_tools.py, which pyproject.toml's pin and tools/ follow."""
    from qroar_gguf import __version__
    from qroar_gguf.llama_tools import LLAMA_CPP_PYTHON_VERSION

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "qroar_gguf.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)
    pins = [r for r in pyproject["project"]["dependencies"] if _requirement_name(r) == "llama-cpp-python"]
    assert pins == [f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"]
    for script in sorted((REPO / "tools").glob("*.sh")):  # they read it from llama_tools.py, as setup.sh does
        assert LLAMA_CPP_PYTHON_VERSION not in script.read_text(encoding="utf-8"), script.name
