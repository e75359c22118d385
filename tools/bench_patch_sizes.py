#!/usr/bin/env python3
"""Benchmark `qroar-gguf patch` against `cp` on synthetic qwen3 GGUF files of several sizes.

A keys-only arch (qwen3: llama.cpp's rope keys, YaRN's temperature folded into the F32 q/k norms), as
`Qwen3-*-Q8_0.gguf` files look: Qwen3's vocabulary size (151936 tokens and 151387 merges, synthetic
strings), Qwen3-0.6B's shapes for the smallest size and Qwen3-8B's above it, with the layer count chosen to
reach the size; every matrix Q8_0 (valid blocks, one random pattern repeated), norms F32. Each size's file
is written once; then `cp` and `patch --method yarn --scale 4` (and, with ``--baseline``, another
checkout's patch) alternate, each writing a fresh output (removed and `sync`ed between runs, outside the
timing), so the machine's load and page cache treat them alike. Wall time and peak RSS per process
(benchlib.measure: GNU time), the space the file system's use grew by (after a sync: shared blocks take
none), the load average around each size, and `qroar-gguf --version` (the interpreter's and the command
line's own start-up).

    python tools/bench_patch_sizes.py --sizes 0.5,4,16 --repeats 3 --work /work/bigtmp --baseline ../before
    python tools/bench_patch_sizes.py --sizes 4 --work /mnt/xfs --out tools/results/patch_sizes_xfs.json

Writes JSON (default tools/results/patch_sizes.json); docs/results.md's `patch` section shows it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import time
from pathlib import Path

from benchlib import QROAR, REPO, RESULTS, machine, measure

import gguf
import numpy as np

from qroar_gguf.gguf_io.layout import pack_key, pack_tensor_info

VT, QT = gguf.GGUFValueType, gguf.GGMLQuantizationType
N_VOCAB, N_MERGES = 151936, 151387
#: Qwen3 shapes (config.json of Qwen3-0.6B and Qwen3-8B): n_embd, n_head, n_kv_head, head_dim, n_ff
SHAPES = {"Qwen3-0.6B": (1024, 16, 8, 128, 3072), "Qwen3-8B": (4096, 32, 8, 128, 12288)}
_BLOCK = 34  # Q8_0: f16 scale + 32 int8
_PATTERN_BLOCKS = (1 << 24) // _BLOCK


def _q8_bytes(n_elements: int) -> int:
    return n_elements // 32 * _BLOCK


def _layer_tensors(i: int, n_embd: int, n_head: int, n_kv: int, head: int, n_ff: int) -> list:
    q, kv = n_head * head, n_kv * head
    return [(f"blk.{i}.attn_norm.weight", (n_embd,), QT.F32), (f"blk.{i}.attn_q.weight", (n_embd, q), QT.Q8_0),
            (f"blk.{i}.attn_k.weight", (n_embd, kv), QT.Q8_0), (f"blk.{i}.attn_v.weight", (n_embd, kv), QT.Q8_0),
            (f"blk.{i}.attn_output.weight", (q, n_embd), QT.Q8_0), (f"blk.{i}.attn_q_norm.weight", (head,), QT.F32),
            (f"blk.{i}.attn_k_norm.weight", (head,), QT.F32), (f"blk.{i}.ffn_norm.weight", (n_embd,), QT.F32),
            (f"blk.{i}.ffn_gate.weight", (n_embd, n_ff), QT.Q8_0), (f"blk.{i}.ffn_up.weight", (n_embd, n_ff), QT.Q8_0),
            (f"blk.{i}.ffn_down.weight", (n_ff, n_embd), QT.Q8_0)]


def _nbytes(dims: tuple[int, ...], kind) -> int:
    n = int(np.prod(dims))
    return n * 4 if kind == QT.F32 else _q8_bytes(n)


def synthetic_qwen3(path: Path, gib: float) -> dict:
    """A qwen3 GGUF of about ``gib`` GiB at ``path``; its shape as a dict."""
    name = "Qwen3-0.6B" if gib < 2 else "Qwen3-8B"
    n_embd, n_head, n_kv, head, n_ff = SHAPES[name]
    fixed = [("token_embd.weight", (n_embd, N_VOCAB), QT.Q8_0), ("output_norm.weight", (n_embd,), QT.F32),
             ("output.weight", (n_embd, N_VOCAB), QT.Q8_0)]
    per_layer = sum(_nbytes(d, k) for _, d, k in _layer_tensors(0, *SHAPES[name]))
    n_layer = max(1, round((gib * 2**30 - sum(_nbytes(d, k) for _, d, k in fixed)) / per_layer))
    tensors = fixed[:1] + [t for i in range(n_layer) for t in _layer_tensors(i, *SHAPES[name])] + fixed[1:]
    arch = "qwen3"
    keys = [pack_key("general.architecture", VT.STRING, arch), pack_key("general.name", VT.STRING, f"synthetic {name}"),
            pack_key("general.file_type", VT.UINT32, 7),
            pack_key(f"{arch}.block_count", VT.UINT32, n_layer), pack_key(f"{arch}.context_length", VT.UINT32, 40960),
            pack_key(f"{arch}.embedding_length", VT.UINT32, n_embd),
            pack_key(f"{arch}.feed_forward_length", VT.UINT32, n_ff),
            pack_key(f"{arch}.attention.head_count", VT.UINT32, n_head),
            pack_key(f"{arch}.attention.head_count_kv", VT.UINT32, n_kv),
            pack_key(f"{arch}.rope.freq_base", VT.FLOAT32, 1000000.0),
            pack_key(f"{arch}.attention.layer_norm_rms_epsilon", VT.FLOAT32, 1e-6),
            pack_key(f"{arch}.attention.key_length", VT.UINT32, head),
            pack_key(f"{arch}.attention.value_length", VT.UINT32, head),
            pack_key("tokenizer.ggml.model", VT.STRING, "gpt2"), pack_key("tokenizer.ggml.pre", VT.STRING, "qwen2"),
            pack_key("tokenizer.ggml.tokens", VT.ARRAY, [f"tok{i}" for i in range(N_VOCAB)], VT.STRING),
            pack_key("tokenizer.ggml.token_type", VT.ARRAY, [1] * N_VOCAB, VT.INT32),
            pack_key("tokenizer.ggml.merges", VT.ARRAY, [f"a{i} b{i}" for i in range(N_MERGES)], VT.STRING),
            pack_key("tokenizer.ggml.eos_token_id", VT.UINT32, 151645)]
    infos, offset = [], 0
    for tname, dims, kind in tensors:
        infos.append(pack_tensor_info(tname, dims, kind, offset))
        offset += -(-_nbytes(dims, kind) // 32) * 32
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(keys)) + b"".join(keys) + b"".join(infos)
    rng = np.random.default_rng(0)
    blocks = np.zeros(_PATTERN_BLOCKS, dtype=[("d", "<f2"), ("q", "i1", 32)])
    blocks["d"] = rng.uniform(0.001, 0.02, _PATTERN_BLOCKS).astype("<f2")
    blocks["q"] = rng.integers(-127, 128, (_PATTERN_BLOCKS, 32))
    pattern = blocks.tobytes()
    with open(path, "wb") as f:
        f.write(header + b"\0" * (-len(header) % 32))
        for _, dims, kind in tensors:
            n = _nbytes(dims, kind)
            if kind == QT.F32:
                f.write(np.ones(n // 4, dtype="<f4").tobytes())
            else:
                while n:
                    f.write(pattern[:min(n, len(pattern))])
                    n -= min(n, len(pattern))
            f.write(b"\0" * (-f.tell() % 32))
    return {"shapes_of": name, "n_layer": n_layer, "n_tensors": len(tensors), "header_bytes": len(header),
            "bytes": path.stat().st_size}


def _sync() -> None:
    subprocess.run(["sync"], check=True)


def _used_mib(folder: Path) -> float:
    """The file system's used space, for blocks shared or not: after a sync, once two readings a second
    apart agree (XFS frees a removed file's blocks in the background)."""
    def used() -> float:
        _sync()
        st = os.statvfs(folder)
        return (st.f_blocks - st.f_bfree) * st.f_frsize / 2**20

    last = used()
    for _ in range(30):
        time.sleep(1)
        now = used()
        if abs(now - last) < 1:
            return now
        last = now
    return last


def bench_size(gib: float, work: Path, repeats: int, baseline: Path | None) -> dict:
    source = work / f"qwen3-{gib:g}g.gguf"
    shape = synthetic_qwen3(source, gib)
    tools = ("cp", "patch") + (("patch_baseline",) if baseline else ())
    runs: dict[str, list[dict]] = {tool: [] for tool in tools}
    load_before = os.getloadavg()
    out = work / "out.gguf"
    patch = ["patch", source, "-o", out, "--method", "yarn", "--scale", "4", "-q"]
    for _ in range(repeats):
        for tool in tools:
            out.unlink(missing_ok=True)
            used = _used_mib(work)
            cmd = ["cp", source, out] if tool == "cp" else [*QROAR, *patch]
            run = measure(cmd, cwd=baseline if tool == "patch_baseline" else REPO)
            runs[tool].append({**run, "load1": os.getloadavg()[0], "grew_mib": _used_mib(work) - used})
    out.unlink(missing_ok=True)
    source.unlink()
    median = {tool: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_rss_mib", "grew_mib")}
              for tool, rs in runs.items()}
    return {"gib": gib, "file_mib": shape["bytes"] / 2**20, **shape, "runs": runs, "median": median,
            "load_before": load_before, "load_after": os.getloadavg(),
            "ratio_patch_over_cp": median["patch"]["seconds"] / median["cp"]["seconds"],
            "patch_minus_cp_seconds": median["patch"]["seconds"] - median["cp"]["seconds"],
            **({"ratio_baseline_over_cp": median["patch_baseline"]["seconds"] / median["cp"]["seconds"]}
               if baseline else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.5,4,16", help="GiB, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, required=True, help="a folder on the file system to measure")
    parser.add_argument("--out", type=Path, default=RESULTS / "patch_sizes.json")
    parser.add_argument("--baseline", type=Path, help="another checkout (e.g. a git worktree of the commit "
                        "before a change) whose patch runs too, alternating with this one's and cp")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    fs = subprocess.run(["findmnt", "-no", "FSTYPE", "--target", args.work], capture_output=True,
                        text=True).stdout.strip()
    startup = [measure([*QROAR, "--version"], cwd=REPO)["seconds"] for _ in range(args.repeats)]
    baseline_commit = None
    if args.baseline:
        baseline_commit = subprocess.run(["git", "-C", args.baseline, "rev-parse", "--short", "HEAD"],
                                         capture_output=True, text=True).stdout.strip()
    sizes = []
    for gib in (float(s) for s in args.sizes.split(",")):
        sizes.append(bench_size(gib, args.work, args.repeats, args.baseline))
        print(json.dumps({k: sizes[-1][k] for k in ("gib", "median", "ratio_patch_over_cp")}), flush=True)
    result = {"benchmark": "qroar-gguf patch --method yarn --scale 4 against cp, synthetic qwen3 Q8_0 files, "
                           "fresh output each run, alternating",
              "machine": {**machine(), "file_system": fs, "ram_gib": os.sysconf("SC_PHYS_PAGES")
                          * os.sysconf("SC_PAGE_SIZE") / 2**30},
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "repeats": args.repeats,
              "commit": subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(),
              "baseline_commit": baseline_commit, "startup_seconds": statistics.median(startup), "sizes": sizes}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
