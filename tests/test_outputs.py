"""Writing safely (qroar_gguf/outputs.py): temporary folders published whole, and the one lock helper."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qroar_gguf.errors import QroarError
from qroar_gguf.outputs import exclusive, publish_folder, remove_stale_temporaries, temporary_folder_beside


def test_a_temporary_folder_is_published_whole_or_removed(tmp_path: Path):
    target = tmp_path / "model"
    for content in ("first", "second"):  # the second replaces the first
        with temporary_folder_beside(target, "build") as work:
            assert work.parent == tmp_path and work.name.startswith(".model.qroar") and work.is_dir()
            (work / "a.txt").write_text(content)
            publish_folder(work, target)
        assert (target / "a.txt").read_text() == content
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with pytest.raises(RuntimeError), temporary_folder_beside(target, "build") as work:
        (work / "a.txt").write_text("half")
        raise RuntimeError("stopped")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and (target / "a.txt").read_text() == "second"


def test_a_dead_runs_temporary_folder_is_removed_and_a_users_is_not(tmp_path: Path):
    target = tmp_path / "model"
    dead = tmp_path / ".model.qroar999999999.abcdefgh.build"
    (dead / "sub").mkdir(parents=True)
    mine = tmp_path / ".model.old"
    mine.mkdir()
    assert remove_stale_temporaries(target) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.old"]


def test_a_named_lock_fails_at_once_or_waits(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("QROAR_CACHE", str(tmp_path / "cache"))
    holder = subprocess.Popen([sys.executable, "-c", "import time\nfrom qroar_gguf.outputs import exclusive\n"
                               "with exclusive('demo-lock'):\n    print('held', flush=True)\n    time.sleep(1.5)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(QroarError, match="another qroar-gguf run is holding demo-lock"), exclusive("demo-lock"):
        pass
    started = time.monotonic()
    with exclusive("demo-lock", wait="waiting for the other run"):
        assert holder.poll() is not None or time.monotonic() - started > 0.1
    holder.wait(timeout=30)
