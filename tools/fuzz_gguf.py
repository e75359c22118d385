#!/usr/bin/env python3
"""One long run of the GGUF fuzzer, recorded in tools/results/fuzz_gguf.json.

The test is tests/test_fuzz_readers.py::test_gguf_readers_fail_only_cleanly_within_bounded_memory.
CI runs the test at a size it can afford; this runs the same test, the same strategies and checks,
with more examples, and records what it did: examples tried, outcomes, wall time, the slowest case
(seconds and what was changed in it). Every file is inspected and patched in a forked child under an
address-space limit, so a claim believed would fail the run, not slow it.

    python tools/fuzz_gguf.py --examples 5000   # writes tools/results/fuzz_gguf.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST = "tests/test_fuzz_readers.py::test_gguf_readers_fail_only_cleanly_within_bounded_memory"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=REPO / "tools" / "results" / "fuzz_gguf.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stats_path = Path(tmp) / "stats.json"
        env = {**os.environ, "QROAR_FUZZ_GGUF_EXAMPLES": str(args.examples), "QROAR_FUZZ_STATS": str(stats_path),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        start = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST], cwd=REPO,
                             env=env)
        seconds = time.monotonic() - start
        if run.returncode != 0:
            sys.exit(f"the fuzz test failed (status {run.returncode}): see its output above; nothing recorded")
        stats = json.loads(stats_path.read_text())
    result = {
        "fuzzer": TEST,
        "asked_examples": args.examples,
        "examples": stats["examples"],
        "seconds": round(seconds, 1),
        "slowest": stats["slowest"],
        "outcomes": dict(sorted(stats["outcomes"].items(), key=lambda kv: -kv[1])),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
