"""Carry a checkpoint's tokenizer into GGUF metadata the way llama.cpp's converter does.

Two kinds: SentencePiece (`tokenizer.model`: Llama 2, TinyLlama, Mistral v0.1-0.3) and gpt2-style
byte-level BPE (`tokenizer.json`: Llama 3, SmolLM). For BPE, llama.cpp needs the *pre-tokenizer*
name, which its converter identifies by hashing how the tokenizer splits a probe text; we use the
same probe and table (qroar_gguf/arch/pre_tokenizers.json), with the `tokenizers` library instead of
transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
from sentencepiece import SentencePieceProcessor
from tokenizers import Tokenizer

from qroar_gguf.arch.pretokenizer import detect_pre_tokenizer
from qroar_gguf.errors import QroarError


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    add_space_prefix: bool | None
    pre: str
    tokens: list[bytes | str]
    types: list[int]
    scores: list[float] | None
    special: gguf.SpecialVocab


def read_vocab(directory: Path, vocab_size: int) -> Vocab:
    config = _tokenizer_config(directory)  # first: gguf-py's SpecialVocab reads it too, less carefully
    try:
        if (directory / "tokenizer.model").is_file():
            vocab = _sentencepiece_vocab(directory, vocab_size, config)
        elif (directory / "tokenizer.json").is_file():
            vocab = _bpe_vocab(directory, vocab_size)
        else:
            raise QroarError(f"{directory} has no tokenizer.json or tokenizer.model")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # odd values in the tokenizer's JSON files
        raise QroarError(f"{directory}: the tokenizer files could not be read ({type(exc).__name__}: {exc}); "
                         "restore the model's own tokenizer files") from None
    template = vocab.special.chat_template
    if template is not None and not (isinstance(template, str) or (isinstance(template, list) and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
            for t in template))):
        raise QroarError(f"{directory / 'tokenizer_config.json'}: chat_template must be a string or a list of "
                         "{name, template} objects; restore the model's own file")
    add_space_prefix = config.get("add_prefix_space")
    vocab.add_space_prefix = add_space_prefix if isinstance(add_space_prefix, bool) else None
    return vocab


def _tokenizer_config(directory: Path) -> dict:
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise QroarError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise QroarError(f"{path} is not a JSON object: restore the model's own tokenizer_config.json")
    return config


def write_vocab(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    vocab.special.add_to_gguf(writer, quiet=True)


def _looks_special(text: str) -> bool:
    # As llama.cpp's converter: some models forget to flag control tokens as special.
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _bpe_vocab(directory: Path, vocab_size: int) -> Vocab:

    path = directory / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(path))
        spec = json.loads(path.read_text(encoding="utf-8"))
    except Exception as exc:  # tokenizers raises plain Exception subclasses for malformed files
        raise QroarError(f"{path} could not be read as a tokenizer ({exc})") from None
    if (spec.get("model") or {}).get("type") != "BPE":
        raise QroarError(f"{path}: only byte-level BPE tokenizer.json files are supported "
                         f"(found {(spec.get('model') or {}).get('type')!r})")

    pre = detect_pre_tokenizer(path)
    if pre is None:
        raise QroarError(f"{path}: llama.cpp does not know this BPE pre-tokenizer (its hash is not in "
                         "llama.cpp's table), so the GGUF would tokenize wrongly")

    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise QroarError(f"{path} has token ids up to {max(vocab.values())} but config.json says vocab_size "
                         f"{vocab_size}")
    added = {entry["content"]: entry for entry in spec.get("added_tokens", [])}
    by_id = {i: t for t, i in vocab.items()}

    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if token in added:
            entry = added[token]
            if not entry.get("normalized", False):
                # llama.cpp expects added tokens pre-normalised; round-trip through the tokenizer.
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False).ids,
                                         skip_special_tokens=False)
            if entry.get("special") or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)

    special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size)
    return Vocab(model="gpt2", add_space_prefix=None, pre=pre, tokens=tokens, types=types, scores=None, special=special)


def _sentencepiece_vocab(directory: Path, vocab_size: int, config: dict) -> Vocab:
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(directory / "tokenizer.model"))
    except (OSError, RuntimeError) as exc:
        raise QroarError(f"{directory / 'tokenizer.model'} could not be read by SentencePiece ({exc})") from None

    tokens: list[bytes] = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = (gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else gguf.TokenType.CONTROL if sp.IsControl(i)
                    else gguf.TokenType.UNUSED if sp.IsUnused(i) else gguf.TokenType.BYTE if sp.IsByte(i)
                    else gguf.TokenType.NORMAL)

    added_path = directory / "added_tokens.json"
    if added_path.is_file():
        for text, i in json.loads(added_path.read_text(encoding="utf-8")).items():
            if i < vocab_size:
                tokens[i], scores[i], types[i] = text.encode("utf-8"), -1000.0, gguf.TokenType.USER_DEFINED

    for key, entry in config.get("added_tokens_decoder", {}).items():
        i, text = int(key), entry["content"]
        if i >= vocab_size:
            continue
        if entry.get("special") or _looks_special(text):
            types[i] = gguf.TokenType.CONTROL
        else:
            text = text.replace("\u2581", " ")
            types[i] = gguf.TokenType.USER_DEFINED
        tokens[i], scores[i] = text.encode("utf-8"), -1000.0

    special = gguf.SpecialVocab(directory, n_vocab=vocab_size)
    return Vocab(model="llama", add_space_prefix=None, pre="default", tokens=tokens, types=types, scores=scores, special=special)
