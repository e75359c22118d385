"""The scripts in tools/ share tools/benchlib.py instead of keeping their own copies: the checkout on
sys.path, the runner and peak-memory measurement, llama-perplexity's log (read in the package, by
evaluate/perplexity_tool.py)."""

from __future__ import annotations

from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"
SCRIPTS = sorted(p for p in TOOLS.glob("*.py") if p.name != "benchlib.py")


def test_scripts_share_benchlib_instead_of_copies():
    copies = {"sys.path.insert": "benchlib puts the checkout on sys.path",
              "Final estimate": "benchlib.llama_perplexity / perplexity_tool.final_estimate",
              "/usr/bin/time": "benchlib.measure", "os.wait4": "benchlib.measure",
              '[sys.executable, "-m", "qroar_gguf"]': "benchlib.QROAR / benchlib.qroar"}
    found = [f"{script.name}: {needle} (use {instead})" for script in SCRIPTS
             for needle, instead in copies.items() if needle in script.read_text(encoding="utf-8")]
    assert not found, found


def test_scripts_that_import_the_package_import_benchlib_first():
    """(A module the scripts import, tail_inflation.py, runs in their process: it needs no import of its own.)"""
    for script in SCRIPTS:
        if '__name__ == "__main__"' not in script.read_text(encoding="utf-8"):
            continue
        lines = script.read_text(encoding="utf-8").splitlines()
        package = next((i for i, line in enumerate(lines) if line.startswith(("from qroar_gguf", "import qroar_gguf"))),
                       None)
        if package is not None:
            first = next((i for i, line in enumerate(lines) if "benchlib" in line and "import" in line), None)
            assert first is not None and first < package, f"{script.name} imports qroar_gguf before benchlib"
