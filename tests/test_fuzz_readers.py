"""Property-based fuzzing of what reads untrusted files: the safetensors header reader, config.json, and
GGUF files as `inspect` and `patch` read a download.

Mutated files never crash the tool with anything but a one-line QroarError, never hang, and a failed
conversion never leaves a file behind. CI runs 2,000 examples of each; QROAR_FUZZ_EXAMPLES=N runs N.
The GGUF fuzzer changes a small valid model where the format and the model keep their numbers, and
inspects and patches each file in a forked child under an address-space limit (memory bounded by the
file, never by a claim); CI runs 300 examples, QROAR_FUZZ_GGUF_EXAMPLES=N runs N, and
tools/fuzz_gguf.py records one long run.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from checkpoints import make_tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qroar_gguf.convert import ConvertOptions, convert, read_source
from qroar_gguf.errors import QroarError
from qroar_gguf.rope.spec import PlanSpec
from qroar_gguf.source.safetensors_lazy import SafetensorsFile

EXAMPLES = int(os.environ.get("QROAR_FUZZ_EXAMPLES", "2000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=10), derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


# -- safetensors headers ------------------------------------------------------------------------------

def _valid_file() -> tuple[dict, bytes]:
    tensors = {"a": np.arange(12, dtype="<f2").reshape(3, 4), "b": np.ones(5, dtype="<f4"),
               "c": np.zeros((2, 2), dtype="<u2")}
    dtypes = {"a": "F16", "b": "F32", "c": "BF16"}
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, values in tensors.items():
        header[name] = {"dtype": dtypes[name], "shape": list(values.shape),
                        "data_offsets": [len(data), len(data) + values.nbytes]}
        data += values.tobytes()
    return header, data


def _pack(header_bytes: bytes, data: bytes, declared: int | None = None) -> bytes:
    return struct.pack("<Q", len(header_bytes) if declared is None else declared) + header_bytes + data


@st.composite
def mutated_header_files(draw) -> bytes:
    header, data = _valid_file()
    kind = draw(st.sampled_from(["entry", "key", "bytes", "length", "truncate"]))
    if kind == "entry":  # a field of one entry replaced by any JSON value
        name = draw(st.sampled_from(["a", "b", "c", "__metadata__"]))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
        if name == "__metadata__":
            header[name] = draw(json_values)
        else:
            header[name][field] = draw(json_values)
    elif kind == "key":  # a whole entry replaced, added or removed
        name = draw(st.sampled_from(["a", "b", "c", "d"]))
        if draw(st.booleans()):
            header.pop(name, None)
        else:
            header[name] = draw(json_values)
    raw = json.dumps(header).encode()
    blob = _pack(raw, data)
    if kind == "bytes":  # random bytes anywhere
        blob = bytearray(blob)
        for _ in range(draw(st.integers(1, 8))):
            blob[draw(st.integers(0, len(blob) - 1))] = draw(st.integers(0, 255))
        blob = bytes(blob)
    elif kind == "length":  # the declared header length
        blob = _pack(raw, data, draw(st.integers(0, 2**64 - 1)))
    elif kind == "truncate":
        blob = blob[: draw(st.integers(0, len(blob) - 1))]
    return blob


@FUZZ
@given(blob=mutated_header_files())
def test_safetensors_reader_fails_only_cleanly(blob: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(blob)
        try:
            reader = SafetensorsFile(path)
            for name in reader.tensors:
                values = reader.load(name)
                assert values.shape == reader.tensors[name].shape
        except QroarError as exc:
            assert "\n" not in str(exc) and str(exc)


# -- config.json ---------------------------------------------------------------------------------------

CONFIG_KEYS = ["architectures", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "num_hidden_layers", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
               "vocab_size", "tie_word_embeddings", "partial_rotary_factor", "rope_scaling", "rope_parameters",
               "text_config", "_name_or_path", "model_type"]


@pytest.fixture(scope="module")
def fuzz_checkpoint(smollm2_dir: Path, tmp_path_factory) -> Path:
    directory, _ = make_tiny_llama(tmp_path_factory.mktemp("fuzz") / "ckpt", smollm2_dir, hidden_size=16,
                                   intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                                   num_hidden_layers=1)
    return directory


@st.composite
def mutated_configs(draw, base: dict):
    config = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(CONFIG_KEYS) | st.text(max_size=8))
        action = draw(st.sampled_from(["set", "delete", "plausible"]))
        if action == "delete":
            config.pop(key, None)
        elif action == "plausible" and isinstance(base.get(key), int) and not isinstance(base.get(key), bool):
            config[key] = draw(st.sampled_from([0, -1, 1, 2, base[key] * 2, base[key] // 2, 2**40, float(base[key])]))
        elif key == "rope_scaling":
            config[key] = draw(st.fixed_dictionaries(
                {"rope_type": st.sampled_from(["linear", "llama3", "yarn", "default", 5])},
                optional={"factor": json_values, "low_freq_factor": json_values, "high_freq_factor": json_values,
                          "original_max_position_embeddings": json_values}))
        else:
            config[key] = draw(json_values)
    if draw(st.integers(0, 20)) == 0:
        return draw(json_values)  # not an object at all
    return config


def test_config_reader_fails_only_cleanly(fuzz_checkpoint: Path, tmp_path_factory):
    base = json.loads((fuzz_checkpoint / "config.json").read_text())
    work = tmp_path_factory.mktemp("fuzz-config")
    directory, out_dir = work / "ckpt", work / "out"
    shutil.copytree(fuzz_checkpoint, directory)
    out_dir.mkdir()
    outcomes = {"refused": 0, "accepted": 0}

    @FUZZ
    @given(config=mutated_configs(base), method=st.sampled_from(["yarn", "linear", "none"]))
    def check(config, method: str):
        (directory / "config.json").write_text(json.dumps(config))  # NaN/Infinity as Python writes them
        options = ConvertOptions(plan=PlanSpec(method), qtype="F16", progress=False, force=True)
        try:
            read_source(directory, options)
        except QroarError as exc:
            assert "\n" not in str(exc) and str(exc)
            outcomes["refused"] += 1
            # the whole conversion refuses the same file, and writes nothing
            with pytest.raises(QroarError):
                convert(directory, out_dir / "model.gguf", options)
            assert list(out_dir.iterdir()) == []
        else:
            outcomes["accepted"] += 1

    check()
    assert outcomes["refused"] > EXAMPLES // 4 and outcomes["accepted"] > 0, outcomes


# -- GGUF files: what `inspect` and `patch` read from a download ---------------------------------------

GGUF_EXAMPLES = int(os.environ.get("QROAR_FUZZ_GGUF_EXAMPLES", "300"))
GGUF_FUZZ = settings(max_examples=GGUF_EXAMPLES, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
#: Address space a reader may add to what its process had when it started: the files are a few KiB, so
#: this is a bound no claim can talk the reader past (a claim believed asks for gigabytes).
HEADROOM = 512 << 20
#: Seconds one file may take to be inspected and patched before the reader counts as hung.
HUNG = 60

ARCH = "llama"
HPARAMS = [f"{ARCH}.{k}" for k in ("context_length", "embedding_length", "block_count", "attention.head_count",
                                   "attention.head_count_kv", "attention.key_length", "rope.dimension_count",
                                   "rope.freq_base", "rope.scaling.type", "rope.scaling.attn_factor")] + [
    "general.architecture", "general.file_type", "general.name", "split.count"]
QROAR_KEYS = ["qroar.method", "qroar.params", "qroar.factors", "qroar.trained_context", "qroar.target_context",
              "qroar.attention_scale_folded", "qroar.bands", "qroar.band_factors", "qroar.search"]
big_ints = st.sampled_from([0, 1, 2, 3, 16, 31, 32, 33, 64, 128, 512, 513, 2**24, 2**31 - 1, 2**31, 2**32 - 1,
                            2**32, 2**40, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1)


@st.composite
def gguf_values(draw):
    """A typed value as a file may hold it where a hyperparameter or a qroar.* key belongs."""
    from gguf_craft import VT, Value

    kind = draw(st.sampled_from(["u32", "i32", "u64", "f32", "f64", "bool", "string", "json", "array"]))
    if kind in ("u32", "i32", "u64"):
        bits, signed = {"u32": (32, False), "i32": (32, True), "u64": (64, False)}[kind]
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        n = draw(big_ints | st.integers(low, high))
        n = min(max(n, low), high)
        return Value({"u32": VT.UINT32, "i32": VT.INT32, "u64": VT.UINT64}[kind], n)
    if kind in ("f32", "f64"):
        x = draw(st.floats(width=32 if kind == "f32" else 64, allow_nan=True, allow_infinity=True))
        return Value(VT.FLOAT32 if kind == "f32" else VT.FLOAT64, x)
    if kind == "bool":
        return Value(VT.BOOL, draw(st.booleans()))
    if kind == "string":
        return Value(VT.STRING, draw(st.text(max_size=12)).encode("utf-8", "surrogatepass"))
    if kind == "json":
        return Value(VT.STRING, json.dumps(draw(json_values)).encode())
    item = draw(st.sampled_from([VT.UINT32, VT.INT32, VT.FLOAT32, VT.STRING]))
    items = draw(st.lists(big_ints.map(lambda n: n % 2**31) if item != VT.STRING else st.binary(max_size=4),
                          max_size=4))
    return Value(VT.ARRAY, [float(v) for v in items] if item == VT.FLOAT32 else items, item)


@st.composite
def gguf_files(draw) -> tuple[bytes, list[str]]:
    """The small valid model of gguf_craft, changed where the format and the model keep their numbers:
    counts, lengths, nesting, types, dims, offsets, alignment, the model's own hyperparameters, its
    qroar.* keys; then, at times, bytes or the end. The list says what was changed."""
    from dataclasses import replace

    from gguf_craft import QT, VT, Value, craft, nested, small_model, with_key, with_tensor

    g, done = small_model(ARCH), []
    tensors = [t.name for t in g.tensors]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["count", "length", "nesting", "type", "dims", "offset", "alignment",
                                     "hparam", "hparam", "qroar", "header"]))
        if kind == "count":  # an array's or the header's count, or a tensor's number of dims
            where = draw(st.sampled_from(["tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "keys", "tensors",
                                          "dims"]))
            n = draw(big_ints)
            if where == "keys":
                g.claimed_keys = n
            elif where == "tensors":
                g.claimed_tensors = n
            elif where == "dims":
                g = with_tensor(g, draw(st.sampled_from(tensors)), claimed_dims=n % 2**32)
            else:
                old = next(k.value for k in g.keys if k.name == where)
                g = with_key(g, where, replace(old, claimed=n))
            done.append(f"{where} count {n}")
        elif kind == "length":  # a string's length: a key's name or a value
            n = draw(big_ints)
            if draw(st.booleans()):
                g = replace(g, keys=[replace(k, claimed_name=n) if k.name == "general.name" else k for k in g.keys])
            else:
                g = with_key(g, "general.name", Value(VT.STRING, b"small", claimed=n))
            done.append(f"string length {n}")
        elif kind == "nesting":
            depth = draw(st.sampled_from([1, 2, 3, 4, 64, 1000, 100_000]))
            g = with_key(g, "x.nested", nested(depth))
            done.append(f"nesting {depth}")
        elif kind == "type":  # a key's or a tensor's type code
            code = draw(st.integers(0, 40) | st.integers(0, 2**32 - 1))
            if draw(st.booleans()):
                name = draw(st.sampled_from(HPARAMS[:7] + ["tokenizer.ggml.tokens"]))
                g = with_key(g, name, Value(code, draw(st.binary(max_size=16))))
            else:
                g = with_tensor(g, draw(st.sampled_from(tensors)), type=code)
            done.append(f"type {code}")
        elif kind == "dims":
            dims = tuple(draw(st.lists(big_ints, min_size=0, max_size=5)))
            g = with_tensor(g, draw(st.sampled_from(tensors)), dims=dims)
            done.append(f"dims {dims}")
        elif kind == "offset":
            offset = draw(big_ints | st.integers(0, 1 << 16))
            g = with_tensor(g, draw(st.sampled_from(tensors)), offset=offset)
            done.append(f"offset {offset}")
        elif kind == "alignment":
            value = draw(gguf_values() | st.sampled_from([Value(VT.UINT32, 1), Value(VT.UINT32, 64),
                                                          Value(VT.UINT32, 0), Value(VT.UINT32, 2**31)]))
            g = with_key(g, "general.alignment", value)
            if value.type == VT.UINT32 and 0 < value.value <= 4096 and not value.value & (value.value - 1):
                g.alignment = value.value  # honoured, so that the file is otherwise valid
            done.append(f"alignment {value}")
        elif kind == "hparam":
            name = draw(st.sampled_from(HPARAMS))
            value = None if draw(st.integers(0, 5)) == 0 else draw(gguf_values())
            g = with_key(g, name, value)
            done.append(f"{name} {value}")
        elif kind == "qroar":
            name = draw(st.sampled_from(QROAR_KEYS))
            g = with_key(g, name, draw(gguf_values()))
            done.append(f"{name} set")
        else:
            g.version = draw(st.sampled_from([1, 2, 3, 4, 2**32 - 1, 0x03000000]))
            done.append(f"version {g.version}")
    blob = bytearray(craft(g))
    if draw(st.integers(0, 4)) == 0:
        for _ in range(draw(st.integers(1, 4))):
            blob[draw(st.integers(0, len(blob) - 1))] = draw(st.integers(0, 255))
        done.append("bytes")
    if draw(st.integers(0, 6)) == 0:
        del blob[draw(st.integers(0, len(blob) - 1)):]
        done.append("truncated")
    return bytes(blob), done


def _read_and_patch(source: Path, out: Path, method: str) -> dict:
    """What the tool does with a downloaded file: inspect it, patch it. Each step's outcome."""
    from qroar_gguf.display import printable
    from qroar_gguf.patch import PatchOptions, patch
    from qroar_gguf.summary import read_summary

    outcomes = {}
    for step in ("inspect", "patch"):
        try:
            if step == "inspect":
                json.dumps(read_summary(source), allow_nan=False)
            else:
                patch(source, out, PatchOptions(plan=PlanSpec(method), target_ctx=1024, progress=False))
            outcomes[step] = "ok"
        except QroarError as exc:
            line = printable(" ".join(str(exc).split()))
            outcomes[step] = "refused" if line and len(line.splitlines()) == 1 else f"bad message {line!r}"
    return outcomes


def _in_child(source: Path, out: Path, method: str) -> tuple[dict, float]:
    """`_read_and_patch` in a forked child whose address space is limited to what it had plus HEADROOM;
    anything but a clean outcome (an exception, MemoryError included, a signal, a hang) fails."""
    import resource
    import time
    import traceback

    read_end, write_end = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: report one JSON line, never return into pytest
        os.close(read_end)
        try:
            vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
            resource.setrlimit(resource.RLIMIT_AS, (vm + HEADROOM, vm + HEADROOM))
            report = _read_and_patch(source, out, method)
        except BaseException:  # noqa: BLE001 - reported to the parent, which fails the example
            report = {"crash": traceback.format_exc()}
        os.write(write_end, json.dumps(report).encode())
        os._exit(0)
    os.close(write_end)
    chunks = []
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - start > HUNG:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError(f"inspect/patch took more than {HUNG} s")
        time.sleep(0.002)
    seconds = time.monotonic() - start
    while chunk := os.read(read_end, 1 << 16):
        chunks.append(chunk)
    os.close(read_end)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"the reader died: status {status}"
    return json.loads(b"".join(chunks)), seconds


def test_gguf_readers_fail_only_cleanly_within_bounded_memory():
    from gguf_craft import craft, small_model

    from qroar_gguf.gguf_io.layout import read_layout

    stats = {"examples": 0, "outcomes": {}, "slowest": {"seconds": 0.0, "changes": []}}
    seed = craft(small_model(ARCH))

    @GGUF_FUZZ
    @given(case=gguf_files(), method=st.sampled_from(["qroar", "yarn"]))
    def check(case, method: str):
        blob, changes = case
        with tempfile.TemporaryDirectory() as tmp:
            source, out = Path(tmp) / "in.gguf", Path(tmp) / "out.gguf"
            source.write_bytes(blob)
            report, seconds = _in_child(source, out, method)
            assert "crash" not in report, f"{changes}: {report.get('crash')}"
            assert set(report.values()) <= {"ok", "refused"}, (changes, report)
            # one reader: what inspect calls damaged, patch refuses too (patch refuses more: the model's keys)
            assert report["inspect"] == "ok" or report["patch"] == "refused", (changes, report)
            left = sorted(p.name for p in Path(tmp).iterdir())
            if report["patch"] == "ok":  # an accepted file is still copied exactly, but for the rows carrying
                # yarn's attention scale (qroar's base) and rope_freqs
                assert left == ["in.gguf", "out.gguf"], left
                before = {t.name: blob[t.data_offset:t.data_offset + t.n_bytes] for t in read_layout(source).tensors}
                written = read_layout(out)
                after = {t.name: out.read_bytes()[t.data_offset:t.data_offset + t.n_bytes] for t in written.tensors}
                changed = {"rope_freqs.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight"}
                assert after.pop("rope_freqs.weight") and {k: v for k, v in after.items() if k not in changed} == \
                    {k: v for k, v in before.items() if k not in changed}
            else:
                assert left == ["in.gguf"], (changes, left)
            assert source.read_bytes() == blob
        key = f"inspect {report['inspect']}, patch {report['patch']}"
        stats["examples"] += 1
        stats["outcomes"][key] = stats["outcomes"].get(key, 0) + 1
        if seconds > stats["slowest"]["seconds"]:
            stats["slowest"] = {"seconds": round(seconds, 3), "changes": changes, "method": method}

    check()
    assert _in_child_seed_ok(seed)
    refused = sum(n for k, n in stats["outcomes"].items() if "refused" in k)
    assert refused > stats["examples"] // 4 and refused < stats["examples"], stats
    if os.environ.get("QROAR_FUZZ_STATS"):  # tools/fuzz_gguf.py's long run
        Path(os.environ["QROAR_FUZZ_STATS"]).write_text(json.dumps(stats, indent=2) + "\n")


def _in_child_seed_ok(seed: bytes) -> bool:
    """The unchanged seed inspects and patches: what the fuzzer finds are its changes."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "in.gguf"
        source.write_bytes(seed)
        report, _ = _in_child(source, Path(tmp) / "out.gguf", "qroar")
        return report == {"inspect": "ok", "patch": "ok"}
