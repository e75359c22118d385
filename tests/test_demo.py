"""`qroar-gguf demo` as a newcomer runs it (without the minutes of perplexity), and the command it prints."""

from __future__ import annotations

import shlex
import subprocess

from click.testing import CliRunner

from qroar_gguf.cli import main
from qroar_gguf.llama_tools import find_tool

#: llama-cli answers one turn and exits (no terminal here)
ONE_TURN = ["-p", "Who is Emma Woodhouse?", "-n", "16", "-st", "--temp", "0", "-t", "2"]


def test_demo_converts_and_prints_a_command_that_runs_the_file(smollm2_dir):
    result = CliRunner().invoke(main, ["demo", "--qtype", "Q4_0", "--no-perplexity", "--quiet"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "3/4 perplexity: skipped (--no-perplexity)" in lines
    run_line = lines[lines.index("    run it with llama-cpp-python (the file needs no rope options):") + 1]
    command = shlex.split(run_line)
    model, n_ctx = command[-3], int(command[-2])
    assert model.endswith(".yarn.16384.Q4_0.gguf") and n_ctx == 16384

    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "the model generated nothing"

    # the last line: llama.cpp's llama-cli, built by the set-up, on this file; run here for one turn
    cli = shlex.split(lines[-1])
    assert cli[0] == str(find_tool("llama-cli")) and cli[1:] == ["-m", model, "-c", str(n_ctx)], lines[-1]
    server = shlex.split(lines[-3])
    assert server == [str(find_tool("llama-server")), "-m", model, "-c", str(n_ctx)], lines[-3]
    proc = subprocess.run([*cli, *ONE_TURN], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip(), "llama-cli answered nothing"
