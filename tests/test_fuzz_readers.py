"""Property-based fuzzing of what reads untrusted files: the safetensors header reader and config.json.

Mutated files never crash the tool with anything but a one-line QroarError, never hang, and a failed
conversion never leaves a file behind. CI runs 2,000 examples of each; QROAR_FUZZ_EXAMPLES=N runs N.
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
