"""Output files stay byte-identical across refactoring: SmolLM2 converted with every method and a band
plan, against SHA-256 digests of the files the code made (llama-cpp-python 0.3.36 built portable).
Recorded at commit 01eccb3 and kept through the restructuring; re-recorded once, deliberately, when
general.* metadata came to be written as llama.cpp's converter writes it (name, basename, size label,
finetune, license, languages), which changed those keys and nothing else. A change that alters any
byte (a metadata key, a factor's last bit, a tensor order) fails here; a deliberate format change
updates the digests and says why in its commit.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from runs import convert_ok

CASES = {
    "none.Q4_0": (["--method", "none", "--ctx", "8192", "--qtype", "Q4_0"],
                  "48f8ff45a7f73ba95c4107f51ff05597eb40af1a676daa9a38ffc828d95d7e06"),
    "linear.Q4_0": (["--method", "linear", "--ctx", "16384", "--qtype", "Q4_0"],
                    "e3c3a1e829b8cf6f479f0e91055ef2bf74ea517807dbd62cdf01d09dab894930"),
    "ntk.Q4_0": (["--method", "ntk", "--ctx", "16384", "--qtype", "Q4_0"],
                 "548c9f24a665564ceb1c641ed40312b9778afacddf087ed05b281ef19f2ddbff"),
    "yarn.Q4_0": (["--method", "yarn", "--ctx", "16384", "--qtype", "Q4_0"],
                  "d517c1a96c3ae1b8b322fbcd005112c9425b92df8dd68b5140b8a408787eaacc"),
    "llama3.Q4_0": (["--method", "llama3", "--ctx", "16384", "--qtype", "Q4_0"],
                    "4320150a1da04a18dcf68ea0b5469023f5b1629aed4511506d175b396b590c3e"),
    "qroar.Q4_0": (["--method", "qroar", "--ctx", "16384", "--qtype", "Q4_0"],
                   "e894c95d222e97b35dc9e3bc419af06ee2618ff874c683f4fd16a9b0d131d559"),
    "yarn.32k.Q4_K_M": (["--method", "yarn", "--ctx", "32768", "--qtype", "Q4_K_M"],
                        "e8114ab1914d7466e2d8ce0decb7cb62ca1d7ed5d674f17ad0fe577c59e9c4eb"),
    "yarn.F16": (["--method", "yarn", "--ctx", "16384", "--qtype", "F16"],
                 "b165c74101a3465deae98b412a84d793c4044da41dc0fd83d87331bb8053a108"),
    "bands.Q4_0": (["--method", "yarn", "--ctx", "32768", "--qtype", "Q4_0", "--band-factors", "1,1,0.9,0.9",
                    "--band-scales", "1,1.1,0.9,1", "--no-symmetric"],
                   "d3377879385c8b25f25e88b275c1229ffa2355567970955ae5f66384de5d35b3"),
    "qroar.mean.Q8_0": (["--method", "qroar", "--ctx", "16384", "--qtype", "Q8_0", "--agg", "mean", "--beta", "4",
                         "--base", "llama3"],
                        "3799717da821d443f6fc2ac297eaa2ff1e654be5c9dca14e4de110e39d85bcdc"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_output_is_byte_identical(smollm2_dir: Path, tmp_path: Path, case: str):
    args, expected = CASES[case]
    out = tmp_path / f"{case}.gguf"
    convert_ok(smollm2_dir, "-o", out, *args)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected
