"""`qroar-gguf demo` as a newcomer runs it (without the minutes of perplexity), and the command it prints."""

from __future__ import annotations

import shlex
import subprocess

from click.testing import CliRunner

from qroar_gguf.cli import main


def test_demo_converts_and_prints_a_command_that_runs_the_file(smollm2_dir):
    result = CliRunner().invoke(main, ["demo", "--qtype", "Q4_0", "--no-perplexity", "--quiet"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "3/4 perplexity: skipped (--no-perplexity)" in lines
    run_line = lines[lines.index("    run it here with llama-cpp-python (the set-up installed it; the file needs "
                                 "no rope options):") + 1]
    command = shlex.split(run_line)
    model, n_ctx = command[-3], int(command[-2])
    assert model.endswith(".yarn.16384.Q4_0.gguf") and n_ctx == 16384

    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "the model generated nothing"
    assert lines[-1].endswith(f"llama-cli -m {model} -c {n_ctx}")
