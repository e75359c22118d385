#!/usr/bin/env bash
# The benchmark runs behind README's quality section: SmolLM2-135M (trained context 8192) on Jane
# Austen, every plan side by side. Results land in bench/<run>/results.{json,md} and ppl_vs_ctx.png;
# built files and finished evaluations are cached there too, so a rerun only fills in what is missing.
#
#   bash tools/bench_smollm2.sh [STAGE ...]     (default: all stages, in this order)
#
# Stages: emma16k (8192 + 16384, Q4_0, all plans), emma16kq4km (16384, Q4_K_M), emma32k (32768, Q4_0, the contenders),
# pride16k (a second novel), keyq4 (16384 with a q4_0 key cache), passkey (retrieval at 8192/16384).
# A 16k window takes minutes on two cores: THREADS (default: all cores) and a bigger machine help.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-$(nproc)}
OUT=${BENCH_OUT:-bench}
QG=("$PY" -m qroar_gguf)
MODEL=$("$PY" -c 'from qroar_gguf.assets.smollm2 import default_model_dir; print(default_model_dir(progress=False))')
text() { "$PY" -c "from qroar_gguf.assets.austen import austen_text; print(austen_text('$1'))"; }
PLANS=(none linear ntk yarn yarn:attn_scale=false llama3 qroar)
CONTENDERS=(linear ntk yarn llama3 qroar)
bench() { "${QG[@]}" bench "$MODEL" --threads "$THREADS" -q "$@"; }

stage_emma16k() { bench --ctx 8192 16384 --qtype Q4_0 --plans "${PLANS[@]}" --text "$(text Emma)" --chunks 1 --out "$OUT/smollm2-emma-16k"; }
stage_emma16kq4km() { bench --ctx 16384 --qtype Q4_K_M --plans linear ntk yarn qroar --text "$(text Emma)" --chunks 1 --out "$OUT/smollm2-emma-16k-q4km"; }
stage_emma32k() { bench --ctx 32768 --qtype Q4_0 --plans linear ntk yarn qroar --text "$(text Emma)" --chunks 1 --out "$OUT/smollm2-emma-32k"; }
stage_pride16k() { bench --ctx 16384 --qtype Q4_0 --plans "${CONTENDERS[@]}" --text "$(text 'Pride & Prejudice')" --chunks 1 --out "$OUT/smollm2-pride-16k"; }
stage_keyq4() { bench --ctx 16384 --qtype Q4_0 --plans "${CONTENDERS[@]}" --type-k q4_0 --text "$(text Emma)" --chunks 1 --out "$OUT/smollm2-emma-16k-keyq4"; }
stage_passkey() { bench --ctx 8192 16384 --qtype Q4_0 --plans none linear yarn qroar --passkey-trials 2 --text "$(text Emma)" --chunks 1 --out "$OUT/smollm2-passkey"; }

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(emma16k emma16kq4km pride16k keyq4 emma32k passkey)
for s in "${stages[@]}"; do
    echo "== stage $s ($(date +%T))" >&2
    "stage_$s"
done
