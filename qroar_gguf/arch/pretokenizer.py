"""Name a BPE tokenizer's pre-tokenizer the way llama.cpp's converter does.

llama.cpp cannot read a tokenizer.json's pre-tokenizer regexes; instead its converter encodes a fixed
probe text (`chktxt`), hashes the token ids and looks the hash up in a table of known tokenizers. The
name it finds becomes `tokenizer.ggml.pre`, which selects llama.cpp's built-in pre-tokenizer. The probe
text and table are copied into `pre_tokenizers.json` (see `extract_from_converter` to refresh them).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

TABLE_PATH = Path(__file__).with_name("pre_tokenizers.json")


@functools.cache
def load_table() -> dict[str, Any]:
    """{"chktxt": str, "hashes": {sha256 hex: pre-tokenizer name}} as shipped with the package."""
    return json.loads(TABLE_PATH.read_text(encoding="utf-8"))


def token_hash(ids: list[int]) -> str:
    """The converter's chkhsh: sha256 of Python's str() of the id list."""
    return hashlib.sha256(str(list(ids)).encode()).hexdigest()


def detect_pre_tokenizer(tokenizer_json_path: str | Path) -> str | None:
    """The llama.cpp pre-tokenizer name for a HF tokenizer.json, or None if llama.cpp does not know it."""
    table = load_table()
    # encode() adds special tokens per the post-processor, as the converter's AutoTokenizer.encode does.
    ids = Tokenizer.from_file(str(tokenizer_json_path)).encode(table["chktxt"]).ids
    return table["hashes"].get(token_hash(ids))


def extract_from_converter(source: str) -> dict[str, Any]:
    """Parse `get_vocab_base_pre` out of llama.cpp's converter source (conversion/base.py in recent
    llama.cpp, convert_hf_to_gguf.py in older ones) into the table format of pre_tokenizers.json.

    The function is a flat list of `if chkhsh == "...": res = "..."`; later ifs win, as in the original.
    """
    tree = ast.parse(source)
    func = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "get_vocab_base_pre")
    chktxt: str | None = None
    hashes: dict[str, str] = {}
    for node in func.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "chktxt":
            chktxt = ast.literal_eval(node.value)
        elif isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            left, right = node.test.left, node.test.comparators[0]
            if getattr(left, "id", None) == "chkhsh" and isinstance(right, ast.Constant):
                for stmt in node.body:
                    if isinstance(stmt, ast.Assign) and getattr(stmt.targets[0], "id", None) == "res":
                        hashes[right.value] = ast.literal_eval(stmt.value)
    if chktxt is None or not hashes:
        raise ValueError("get_vocab_base_pre has no chktxt or no hash table")
    return {"chktxt": chktxt, "hashes": hashes}
