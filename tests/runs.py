"""Running the real command line in a subprocess, and checking that a failure is clean."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path


def run_cli(*args: str | Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qroar_gguf", *map(str, args)], capture_output=True, text=True,
                          **kwargs)


def convert_ok(*args: str | Path) -> None:
    result = run_cli(*args, "-q")
    assert result.returncode == 0, result.stderr


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def assert_clean_failure(result: subprocess.CompletedProcess, out_dir: Path, before: set[str], needle: str,
                         status: int = 1) -> None:
    """Exit `status`, one line on stderr containing `needle`, no traceback, nothing new in `out_dir`."""
    assert result.returncode == status, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert needle.lower() in lines[0].lower(), lines[0]
    assert {p.name for p in out_dir.iterdir()} == before, "a file was left behind"


def fail_cleanly(args: list, out_dir: Path, needle: str, protect: Path | None = None, status: int = 1) -> str:
    """Run the command line, expect a clean failure, and that `protect` (the input) is unchanged; the line."""
    before = {p.name for p in out_dir.iterdir()}
    before_input = digest(protect) if protect else None
    result = run_cli(*args)
    assert_clean_failure(result, out_dir, before, needle, status)
    if protect:
        assert digest(protect) == before_input, "the input was modified"
    return result.stderr.strip()


def processes_naming(program: str, folder: Path) -> list[int]:
    """Processes whose command line holds ``program`` and a path in ``folder`` (a child a stop must kill)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if program in cmdline and str(folder) in cmdline:
                found.append(int(entry.name))
    return found
