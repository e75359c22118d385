"""Qwen2's tokenizer (Qwen2, Qwen2.5 and Qwen3 share its pre-tokenizer) through the converter.

Qwen2's tokenizer.json is rebuilt from llama.cpp's own test vocabulary (models/ggml-vocab-qwen2.gguf in
the llama-cpp-python sdist the set-up keeps, see qwen2_vocab.py), and shown to be Qwen2's: it gives the ids
Qwen2's tokenizer gave llama.cpp's test strings. A random-weight Qwen2 checkpoint saved with it is
converted; the file must name llama.cpp's "qwen2" pre-tokenizer, and the real libllama must tokenize as
`tokenizers` does: llama.cpp's test strings, and code, non-English text, emoji, numbers, whitespace, prose.
"""

from __future__ import annotations

import shutil
import unicodedata
from pathlib import Path

import gguf
import pytest
from checkpoints import TOKENIZER_FILES
from qwen2_vocab import GgufVocab, extract, read_cases, read_vocab, write_tokenizer
from runs import convert_ok

from qroar_gguf.arch.pretokenizer import detect_pre_tokenizer
from qroar_gguf.errors import QroarError
from qroar_gguf.gguf_io.layout import read_layout
from qroar_gguf.llama_tools import SDIST_NAME, fetch_sdist
from qroar_gguf.paths import cache_dir

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
llama_cpp = pytest.importorskip("llama_cpp")

# Texts of our own, all NFC (see test_llama_cpp_does_not_normalize for why that matters).
TEXTS = {
    "python": 'class Stack:\n    """A LIFO stack."""\n\n    def __init__(self) -> None:\n'
              "        self._items: list[int] = []\n\n    def push(self, x):\n"
              "\tif x is None:  # a tab among spaces\n\t\traise ValueError(\"None isn't allowed\")\n"
              "        self._items.append(x)\n        return len(self._items)-1\n",
    "c++": "#include <vector>\n\ntemplate <typename T>\nT sum(const std::vector<T>& v) {\n\tT s{};\n"
           "\tfor (auto x : v) { s += x; }  // 0x1F, 1e-9f, a->b, i++\n\treturn s;\n}\n",
    "chinese": "我们在北京的实验室里训练了一个新的语言模型，它能够理解中文、英文和代码。我想在apple工作",
    "japanese": "東京は日本の首都です。ひらがな、カタカナ、漢字を混ぜて書きます。ｶﾀｶﾅ（半角）も。",
    "korean": "안녕하세요, 세계! 한국어 문장입니다.",
    "russian": "Съешь же ещё этих мягких французских булок, да выпей чаю. Ёжик!",
    "arabic": "مرحبا بالعالم! هذه جملة باللغة العربية، مع أرقام ١٢٣ و 456.",
    "hindi": "नमस्ते दुनिया, यह हिन्दी है।",  # vowel signs are marks, not letters: \p{L}+ stops at them
    "german": "Größenwahn über Äpfel, Öl und Übermut: „Schöne Grüße“ aus Köln – ß und ẞ.",
    "emoji": "🦙🚀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇩🇪🇯🇵 ❤️ 😶‍🌫️!!",
    "numbers": "π ≈ 3.14159, e ≈ 2.71828; 1234567 + 89 = 1234656; 1,000,000.00 $; 12:30, 2024-05-17; ½ ² Ⅻ",
    "whitespace": "  leading\ttab\t\tand  \n\n\n trailing   \r\n\r\nlone\rreturn \u00a0nbsp\u3000ideographic"
                  "\u2003em  \n \t \n    ",
    "contractions": "DON'T, I'VE, we'Re, it's, they'll, she'd, O'Neill's rock'n'roll 'tis",
    "chat": "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n你好, naïve café?<|im_end|>\n"
            "<|im_start|>assistant\n",
    "mixed": "Mixed: naïve café — Zürich; 東京2024年; Москва-2; x²+y²=z²; ﬁne; <|endoftext|>",
}


def austen_chapter() -> str:
    """The first chapter of Emma: a few thousand words of English prose."""
    from qroar_gguf.assets.austen import austen_text

    try:
        text = austen_text("Emma").read_text(encoding="utf-8")
    except QroarError as e:
        pytest.skip(f"no Austen text: {e}")
    start = text.index("Emma Woodhouse, handsome")
    return text[start:text.index("CHAPTER II", start)]


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory) -> Path:
    if not (cache_dir() / "sdist" / SDIST_NAME).is_file():
        pytest.skip(f"{SDIST_NAME} is not in {cache_dir() / 'sdist'}: run `bash tools/setup.sh`")
    return extract(fetch_sdist(lambda message: None), tmp_path_factory.mktemp("qwen2-vocab"))


@pytest.fixture(scope="module")
def source(vocab_file: Path) -> GgufVocab:
    return read_vocab(vocab_file)


@pytest.fixture(scope="module")
def cases(vocab_file: Path) -> list[tuple[str, list[int]]]:
    return read_cases(vocab_file)


@pytest.fixture(scope="module")
def tokenizer_dir(source: GgufVocab, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("qwen2-tokenizer")
    write_tokenizer(source, directory)
    return directory


@pytest.fixture(scope="module")
def hf_ids(tokenizer_dir: Path):
    """`tokenizers` on the rebuilt tokenizer.json. It always matches added tokens in the text, as
    libllama does with parse_special."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def converted(tokenizer_dir: Path, source: GgufVocab, tmp_path_factory) -> Path:
    """A random Qwen2 (GQA, tied embeddings, Qwen2's vocab_size and special ids) with the rebuilt
    tokenizer, saved by transformers and converted to F16."""
    directory = tmp_path_factory.mktemp("qwen2-ckpt")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=len(source.tokens), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True, max_position_embeddings=source.context_length,
                                      rope_theta=1000000.0, bos_token_id=source.bos, eos_token_id=source.eos)
    transformers.Qwen2ForCausalLM(config).to(torch.float16).save_pretrained(directory / "ckpt")
    for name in TOKENIZER_FILES:  # the files test_rebuilt_tokenizer_gives_qwen2s_ids checks
        shutil.copy(tokenizer_dir / name, directory / "ckpt" / name)
    out = directory / "qwen2.F16.gguf"
    convert_ok(directory / "ckpt", "-o", out, "--qtype", "F16", "--method", "none")
    return out


@pytest.fixture(scope="module")
def converted_model(converted: Path):
    from qroar_gguf.evaluate.runtime import GgufModel

    with GgufModel(converted, n_gpu_layers=0) as model:
        yield model


@pytest.fixture(scope="module")
def libllama(converted_model, vocab_file: Path):
    """libllama's tokenization of the converted file and of llama.cpp's vocabulary file (which has no
    weights, so only the bindings' vocab_only load opens it). No BOS; added tokens parsed as
    `tokenizers` does (llama.cpp's test strings hold none)."""
    vocab_only = llama_cpp.Llama(model_path=str(vocab_file), vocab_only=True, verbose=False)
    yield {
        "converted": lambda text: converted_model.tokenize(text, add_special=False, parse_special=True).tolist(),
        "vocab-file": lambda text: vocab_only.tokenize(text.encode("utf-8"), add_bos=False, special=True),
    }
    vocab_only.close()


def test_llama_cpp_test_strings_are_read(cases) -> None:
    assert len(cases) > 30 and len({text for text, _ in cases}) == len(cases)
    assert any(not text.isascii() for text, _ in cases) and ("", []) in cases


def test_rebuilt_tokenizer_gives_qwen2s_ids(cases, hf_ids, tokenizer_dir: Path) -> None:
    """Both `tokenizers` and transformers' AutoTokenizer (what wrote the .out file) on the rebuilt files."""
    auto = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    for name, encode in (("tokenizers", hf_ids), ("AutoTokenizer", lambda t: auto.encode(t, add_special_tokens=False))):
        wrong = [(text, ids, encode(text)) for text, ids in cases if encode(text) != ids]
        assert not wrong, f"{name}: {len(wrong)} of {len(cases)} strings differ from Qwen2's ids: {wrong[:3]}"


def test_converted_vocabulary_is_llama_cpps(converted: Path, source: GgufVocab, tokenizer_dir: Path) -> None:
    """Our detection names the pre-tokenizer "qwen2", and the vocabulary is what llama.cpp's converter
    wrote, but for its placeholder ids, typed unused as today's llama.cpp converter types them."""
    assert detect_pre_tokenizer(tokenizer_dir / "tokenizer.json") == "qwen2"
    fields = read_layout(converted).fields
    value = lambda key: fields[key].contents()  # noqa: E731
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "qwen2"
    assert value("tokenizer.ggml.tokens") == source.tokens
    assert value("tokenizer.ggml.merges") == source.merges
    n = source.n_tokens
    types = value("tokenizer.ggml.token_type")
    assert types[:n] == source.types[:n]
    assert n < len(types) and set(types[n:]) == {gguf.TokenType.UNUSED}
    assert (value("tokenizer.ggml.bos_token_id"), value("tokenizer.ggml.eos_token_id"),
            value("tokenizer.ggml.padding_token_id")) == (source.bos, source.eos, source.pad)
    assert "tokenizer.ggml.add_bos_token" not in fields


@pytest.mark.parametrize("file", ["converted", "vocab-file"])
def test_libllama_gives_qwen2s_ids_on_llama_cpp_test_strings(file: str, libllama, cases, hf_ids) -> None:
    tokenize = libllama[file]
    wrong = [(text, ids, tokenize(text)) for text, ids in cases if tokenize(text) != ids]
    assert not wrong, f"{len(wrong)} of {len(cases)} strings differ from Qwen2's ids: {wrong[:3]}"


@pytest.mark.parametrize("file", ["converted", "vocab-file"])
@pytest.mark.parametrize("text", [*TEXTS, "austen"])
def test_libllama_matches_tokenizers(file: str, text: str, libllama, hf_ids) -> None:
    text = austen_chapter() if text == "austen" else TEXTS[text]
    assert unicodedata.is_normalized("NFC", text)
    ours = hf_ids(text)
    assert len(ours) > 5
    assert libllama[file](text) == ours


def test_no_bos_is_added(converted_model, hf_ids) -> None:
    """Qwen2 adds no BOS; neither does libllama on the converted file, even when asked for special tokens."""
    assert not converted_model.add_bos
    assert converted_model.tokenize("Hello world", add_special=True).tolist() == hf_ids("Hello world")


def test_llama_cpp_does_not_normalize(libllama, hf_ids) -> None:
    """Qwen2's tokenizer applies NFC first; llama.cpp's BPE does not normalise, so decomposed text
    tokenizes differently there, whatever the converter writes. Composed, the ids agree. (If this fails,
    llama.cpp has started to normalise, and TEXTS need not be NFC any more.)"""
    decomposed = "cafe\u0301 Cre\u0300me bru\u0302le\u0301e"
    composed = unicodedata.normalize("NFC", decomposed)
    assert hf_ids(decomposed) == hf_ids(composed) == libllama["converted"](composed)
    assert libllama["converted"](decomposed) != hf_ids(decomposed)
