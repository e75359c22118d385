"""Output files stay byte-identical across refactoring: SmolLM2 converted with every method and a band
plan, against SHA-256 digests recorded from the files the code made before the restructuring
(commit 01eccb3, llama-cpp-python 0.3.36 built portable). A change that alters any byte (a metadata
key, a factor's last bit, a tensor order) fails here; a deliberate format change updates the digests
and says why in its commit.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from runs import convert_ok

CASES = {
    "none.Q4_0": (["--method", "none", "--ctx", "8192", "--qtype", "Q4_0"],
                  "2a7c7368b06c6244848c7328ee59a28be8d45589dca1f577de9d33df2b44b3c3"),
    "linear.Q4_0": (["--method", "linear", "--ctx", "16384", "--qtype", "Q4_0"],
                    "c5063130e81e2d638997eb39951787d9f5b996c00d20068adba48d824840068e"),
    "ntk.Q4_0": (["--method", "ntk", "--ctx", "16384", "--qtype", "Q4_0"],
                 "39fc95df79ef87ea538020543345e32dbd9cb42c39c744ebf62bf0862a931968"),
    "yarn.Q4_0": (["--method", "yarn", "--ctx", "16384", "--qtype", "Q4_0"],
                  "d443dfb2c4944fcc3a0d8feb9c27e403786037b63c8443f44d7c8bd50280ec48"),
    "llama3.Q4_0": (["--method", "llama3", "--ctx", "16384", "--qtype", "Q4_0"],
                    "024466c99681779698f768e9d55908ac757ba3bf1c25abafa492fcac60a9f770"),
    "qroar.Q4_0": (["--method", "qroar", "--ctx", "16384", "--qtype", "Q4_0"],
                   "66044a3238e889438e202267681fa3175f730d8e761f308e0bbb37c9a0438d93"),
    "yarn.32k.Q4_K_M": (["--method", "yarn", "--ctx", "32768", "--qtype", "Q4_K_M"],
                        "e5aaa7e9375e91561c3e526ac96472e5f874f362d24b5c2626b84486ffb522f1"),
    "yarn.F16": (["--method", "yarn", "--ctx", "16384", "--qtype", "F16"],
                 "f5ec2110e0bdac00ecf736dd712bd544659f09f011c25cd721f7d2afcd2bbee0"),
    "bands.Q4_0": (["--method", "yarn", "--ctx", "32768", "--qtype", "Q4_0", "--band-factors", "1,1,0.9,0.9",
                    "--band-scales", "1,1.1,0.9,1", "--no-symmetric"],
                   "0fb27563d2fed9dfe70e2f5eef8eaf2d65d550f42d99dfb17ae45ed691ecfd78"),
    "qroar.mean.Q8_0": (["--method", "qroar", "--ctx", "16384", "--qtype", "Q8_0", "--agg", "mean", "--beta", "4",
                         "--base", "llama3"],
                        "de0c4cacaaa6689352258a785ef1eb23c89c4189397aa1a8a4b95e28702873b8"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_output_is_byte_identical(smollm2_dir: Path, tmp_path: Path, case: str):
    args, expected = CASES[case]
    out = tmp_path / f"{case}.gguf"
    convert_ok(smollm2_dir, "-o", out, *args)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected
