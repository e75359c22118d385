"""Stopping a conversion at any moment, and two conversions at once: real signals, real processes.

A stopped run exits 128 + the signal's number (130 for Ctrl-C), publishes nothing and leaves no
temporary file, no quantizer process and no search folder behind. Two runs to the same output never
both publish: the second fails at once, and the file holds what the run that reported it wrote.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoints import gguf_tensors
from runs import convert_ok, processes_naming, run_cli


def _foreground_signals() -> None:
    """SIGINT as a terminal's foreground job has it: pytest itself may run as a background job of a
    non-interactive shell, which ignores SIGINT, and an ignored signal stays ignored across exec."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(*args: str | Path, env: dict | None = None) -> subprocess.Popen:
    # A session of its own, as a shell gives a foreground job: a terminal's Ctrl-C reaches the group.
    return subprocess.Popen([sys.executable, "-m", "qroar_gguf", *map(str, args), "-q"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env,
                            preexec_fn=_foreground_signals)


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended ({proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{what} never happened")
        time.sleep(0.002)


def _temporaries(folder: Path, suffix: str) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(suffix)]


def _growing(folder: Path, suffix: str):
    return lambda: any(p.stat().st_size > 0 for p in _temporaries(folder, suffix) if p.exists())


def _handles(proc: subprocess.Popen, signum: int):
    """Whether the process has installed its own handler for `signum` (SigCgt in /proc), i.e. our CLI runs."""
    def check() -> bool:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
        return False
    return check


PHASES = {
    # the command line is up, reading the checkpoint and planning: no file exists yet
    "start": lambda out, proc: _handles(proc, signal.SIGHUP),
    # writing the unquantized intermediate
    "write": lambda out, proc: _growing(out, ".f16.tmp"),
    # llama.cpp's quantizer writing the final file
    "quantize": lambda out, proc: _growing(out, ".partial"),
}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
@pytest.mark.parametrize("phase", list(PHASES))
def test_a_signal_stops_the_run_and_leaves_nothing(smollm2_dir: Path, tmp_path: Path, phase: str, signum):
    out = tmp_path / "out"
    out.mkdir()
    proc = _start(smollm2_dir, "-o", out / "model.gguf", "--qtype", "Q4_K_M", "--threads", "1")
    _wait_for(PHASES[phase](out, proc), proc, f"the {phase} phase")
    os.killpg(proc.pid, signum)  # the whole group, as a terminal does
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, stderr
    assert [line for line in stderr.splitlines() if line.strip()] == (
        ["interrupted"] if signum == signal.SIGINT else [f"stopped by {signal.Signals(signum).name}"]), stderr
    assert list(out.iterdir()) == [], "something was left or published"
    time.sleep(0.2)
    assert processes_naming("quantize_child", out) == [], "the quantizer outlived the run"


def test_sigterm_to_the_main_process_alone_kills_the_quantizer(smollm2_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    proc = _start(smollm2_dir, "-o", out / "model.gguf", "--qtype", "Q4_K_M", "--threads", "1")
    _wait_for(_growing(out, ".partial"), proc, "the quantize phase")
    os.kill(proc.pid, signal.SIGTERM)  # as `kill PID` does: the child gets nothing from us
    proc.communicate(timeout=60)
    assert proc.returncode == 143
    time.sleep(0.2)
    assert list(out.iterdir()) == [] and processes_naming("quantize_child", out) == []


def test_sigterm_during_a_search_removes_its_folder(tiny, tmp_path: Path):
    directory, _ = tiny
    out, tmpdir = tmp_path / "out", tmp_path / "tmp"
    out.mkdir()
    tmpdir.mkdir()
    text = tmp_path / "dev.txt"
    text.write_text("It is a truth universally acknowledged that a single man in possession of a good fortune "
                    "must be in want of a wife. " * 40)
    env = {**os.environ, "TMPDIR": str(tmpdir), "QROAR_CACHE": str(tmp_path / "cache")}
    proc = _start(directory, "-o", out / "model.gguf", "--qtype", "Q8_0", "--search", "--dev-text", text,
                  "--dev-ctx", "64", "--search-budget", "50", env=env)
    _wait_for(lambda: any(p.name.startswith("qroar-search-") for p in tmpdir.iterdir()), proc, "a search folder")
    os.killpg(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert list(tmpdir.iterdir()) == [] and list(out.iterdir()) == []


def test_two_runs_to_one_output_never_both_publish(smollm2_dir: Path, tmp_path: Path):
    out = tmp_path / "model.gguf"
    runs = {method: subprocess.Popen([sys.executable, "-m", "qroar_gguf", str(smollm2_dir), "-o", str(out),
                                      "--method", method, "--qtype", "Q4_K_M", "--force", "--threads", "1"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for method in ("yarn", "linear")}
    results = {method: (*proc.communicate(timeout=300), proc.returncode) for method, proc in runs.items()}
    results = {method: (status, stdout, stderr) for method, (stdout, stderr, status) in results.items()}
    winners = [m for m, (status, _, _) in results.items() if status == 0]
    assert len(winners) == 1, results
    (loser,) = set(results) - set(winners)
    status, _, stderr = results[loser]
    assert status == 1 and "another qroar-gguf run is writing" in stderr, stderr
    _, stdout, _ = results[winners[0]]
    assert f"method {winners[0]}" in stdout
    summary = json.loads(run_cli("inspect", out, "--json").stdout)
    assert summary["qroar"]["method"] == winners[0], "the file is not what its run reported"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_files_named_like_old_temporaries_are_left_alone(tiny, tmp_path: Path):
    directory, _ = tiny
    out = tmp_path / "model.gguf"
    mine = {".model.gguf.partial": b"a user's file", ".model.gguf.f16.tmp": b"another one"}
    for name, content in mine.items():
        (tmp_path / name).write_bytes(content)
    convert_ok(directory, "-o", out, "--qtype", "Q8_0")
    for name, content in mine.items():
        assert (tmp_path / name).read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*mine, "model.gguf"])
    assert gguf_tensors(out)["blk.0.attn_q.weight"].tensor_type.name == "Q8_0"
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask()), "the file is not readable as usual"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_a_killed_runs_leftovers_are_removed_by_the_next_run(smollm2_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    lookalike = out / ".model.gguf.partial"  # a user's file with an old-style name stays
    lookalike.write_bytes(b"mine")
    proc = _start(smollm2_dir, "-o", out / "model.gguf", "--qtype", "Q4_K_M", "--threads", "1")
    ours = lambda: any(p.stat().st_size > 0 for p in out.glob(".model.gguf.qroar*.partial"))  # noqa: E731
    _wait_for(ours, proc, "the quantize phase")
    os.killpg(proc.pid, signal.SIGKILL)  # nothing can clean up after this
    proc.wait(timeout=60)
    time.sleep(0.2)
    left = sorted(p.name for p in out.iterdir() if p != lookalike)
    assert left and all(".qroar" in name for name in left), left
    convert_ok(smollm2_dir, "-o", out / "model.gguf", "--qtype", "Q8_0")
    assert sorted(p.name for p in out.iterdir()) == [".model.gguf.partial", "model.gguf"]
    assert lookalike.read_bytes() == b"mine"
