"""Qwen2's Hugging Face tokenizer, rebuilt from the vocabulary file llama.cpp tests its tokenizer with.

The Hugging Face Hub is out of reach, but the llama-cpp-python sdist the set-up keeps carries llama.cpp's
models/ggml-vocab-qwen2.gguf (the converter's output for Qwen2's tokenizer: tokens, merges, types) and,
beside it, test strings (.inp) with the ids Qwen2's own tokenizer gave them (.out), written by llama.cpp's
convert_hf_to_gguf_update.py as `tokenizer.encode(text, add_special_tokens=False)`. Rebuilding
tokenizer.json from the GGUF and reproducing every .out line shows the rebuild is Qwen2's tokenizer.
"""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

VOCAB_NAME = "ggml-vocab-qwen2.gguf"
_MEMBER_SUFFIX = f"/vendor/llama.cpp/models/{VOCAB_NAME}"
# How llama.cpp's update script separates the test strings (after each one, the last included).
TEST_SEPARATOR = "\n__ggml_vocab_test__\n"

# The Split regex of Qwen2's tokenizer.json (Qwen2, Qwen2.5 and Qwen3 share it): llama.cpp's "qwen2"
# pre-tokenizer is this regex with the (?i:...) group spelt out.
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.token_type values (gguf.TokenType) that are added tokens in Hugging Face's terms.
_CONTROL, _USER_DEFINED = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)
# llama.cpp's converter fills the ids a tokenizer lacks below config.json's vocab_size with "[PAD<id>]"
# (this file: 151646..151935, typed user-defined by the converter of its day). They are not tokens of
# Qwen2's tokenizer, which has 151646, so they are left out of the rebuild.
_PLACEHOLDER = re.compile(r"\[PAD(\d+)\]")


def extract(sdist: Path, directory: Path) -> Path:
    """Copy ggml-vocab-qwen2.gguf and its .inp/.out out of the sdist into `directory`; the GGUF's path."""
    suffixes = ("", ".inp", ".out")
    with tarfile.open(sdist) as tar:
        members = {s: m for m in tar.getmembers() for s in suffixes
                   if m.isfile() and m.name.endswith(_MEMBER_SUFFIX + s)}
        missing = [VOCAB_NAME + s for s in suffixes if s not in members]
        if missing:
            raise FileNotFoundError(f"{sdist} has no {', '.join(missing)}")
        for s, member in members.items():
            (directory / (VOCAB_NAME + s)).write_bytes(tar.extractfile(member).read())
    return directory / VOCAB_NAME


def read_cases(vocab_path: Path) -> list[tuple[str, list[int]]]:
    """The (text, ids) pairs of the .inp/.out files, read as llama.cpp's test-tokenizer-0 reads them."""
    # Bytes, not read_text: universal newlines would turn a "\r" in a test string into "\n".
    raw = vocab_path.with_name(vocab_path.name + ".inp").read_bytes().decode("utf-8")
    lines = vocab_path.with_name(vocab_path.name + ".out").read_bytes().decode("utf-8").split("\n")
    texts = raw.split(TEST_SEPARATOR)
    if texts[-1] != "" or lines[-1] != "":
        raise ValueError(f"{vocab_path}.inp/.out do not end as llama.cpp's update script writes them")
    texts, lines = texts[:-1], lines[:-1]
    if len(texts) != len(lines):
        raise ValueError(f"{vocab_path}: {len(texts)} test strings but {len(lines)} lines of ids")
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines)]


@dataclass(frozen=True)
class GgufVocab:
    """What a GGUF says about its byte-level BPE vocabulary."""

    model: str  # tokenizer.ggml.model
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos: int
    eos: int
    pad: int
    chat_template: str | None
    context_length: int

    @property
    def n_tokens(self) -> int:
        """The ids of the tokenizer itself: those below the converter's trailing "[PAD<id>]" placeholders."""
        n = len(self.tokens)
        while n and (m := _PLACEHOLDER.fullmatch(self.tokens[n - 1])) and int(m.group(1)) == n - 1:
            n -= 1
        return n


def read_vocab(vocab_path: Path) -> GgufVocab:
    """The vocabulary of a GGUF, read with gguf-py (the reader of llama.cpp's own converter)."""
    reader = gguf.GGUFReader(vocab_path)

    def field(key: str):
        return reader.fields[key].contents() if key in reader.fields else None

    arch = field("general.architecture")
    return GgufVocab(model=field("tokenizer.ggml.model"), pre=field("tokenizer.ggml.pre"),
                     tokens=field("tokenizer.ggml.tokens"), types=field("tokenizer.ggml.token_type"),
                     merges=field("tokenizer.ggml.merges"), bos=int(field("tokenizer.ggml.bos_token_id")),
                     eos=int(field("tokenizer.ggml.eos_token_id")), pad=int(field("tokenizer.ggml.padding_token_id")),
                     chat_template=field("tokenizer.chat_template"),
                     context_length=int(field(f"{arch}.context_length")))


def write_tokenizer(vocab: GgufVocab, directory: Path) -> Tokenizer:
    """Write Qwen2's tokenizer.json, tokenizer_config.json and special_tokens_map.json into `directory`,
    as Qwen2's base model ships them; the tokenizer."""
    if vocab.model != "gpt2" or vocab.pre != "qwen2":
        raise ValueError(f"not a byte-level BPE vocabulary with llama.cpp's qwen2 pre-tokenizer "
                         f"({vocab.model!r}, {vocab.pre!r})")
    tokens, types, n_tokens = vocab.tokens, vocab.types, vocab.n_tokens
    added = [i for i in range(n_tokens) if types[i] in (_CONTROL, _USER_DEFINED)]
    added_set = set(added)
    bpe_vocab = {tokens[i]: i for i in range(n_tokens) if i not in added_set}
    merges = [tuple(m.split(" ")) for m in vocab.merges]  # byte-level symbols: no spaces in them

    tok = Tokenizer(models.BPE(vocab=bpe_vocab, merges=merges, unk_token=None, byte_fallback=False,
                               ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # In id order, so that each added token gets its own id (the BPE vocabulary stops just below them).
    for i in added:
        tok.add_tokens([AddedToken(tokens[i], special=types[i] == _CONTROL, normalized=False)])
        if tok.token_to_id(tokens[i]) != i:
            raise ValueError(f"added token {tokens[i]!r} did not get its id {i}")
    tok.save(str(directory / "tokenizer.json"))

    eos, pad = tokens[vocab.eos], tokens[vocab.pad]
    specials = [tokens[i] for i in added if types[i] == _CONTROL and tokens[i] not in (eos, pad)]
    decoder = {str(i): {"content": tokens[i], "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": types[i] == _CONTROL} for i in added}
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": specials,
        "bos_token": None,  # Qwen2 adds no BOS (config.json's bos_token_id names <|endoftext|> all the same)
        "chat_template": vocab.chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "errors": "replace",
        "model_max_length": vocab.context_length,
        "pad_token": pad,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    _write_json(directory / "tokenizer_config.json", config)
    _write_json(directory / "special_tokens_map.json",
                {"additional_special_tokens": specials, "eos_token": eos, "pad_token": pad})
    return tok


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
