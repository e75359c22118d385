"""llama-server, the program Ollama runs, started for a test on a free loopback port and stopped after."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qroar_gguf.llama_tools import find_tool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def post_json(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@contextmanager
def llama_server(model: Path, args: list[str], log_path: Path, env: dict | None = None,
                 ready_within: float = 180) -> Iterator[str]:
    """llama-server on ``model`` with ``args``, its output in ``log_path``; yields its base URL once
    /health answers ok, and stops it on the way out."""
    port = free_port()
    with open(log_path, "w") as log:
        server = subprocess.Popen([str(find_tool("llama-server")), "-m", str(model), "--host", "127.0.0.1",
                                   "--port", str(port), *args],
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_within
        while True:
            assert server.poll() is None, log_path.read_text()[-3000:]
            try:
                if get_json(f"{base}/health", timeout=2).get("status") == "ok":
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
