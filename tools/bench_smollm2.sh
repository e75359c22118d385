#!/usr/bin/env bash
# The benchmark runs behind docs/results.md's quality section: SmolLM2-135M (trained context 8192) on Jane
# Austen, every plan side by side. Results land in bench/<run>/results.{json,md} and ppl_vs_ctx.png;
# built files and finished evaluations are cached there too, so a rerun only fills in what is missing.
#
#   bash tools/bench_smollm2.sh [STAGE ...]     (default: all stages, in this order)
#
# Stages: emma16k (8192 + 16384, Q4_0, all plans), emma16kq4km (16384, Q4_K_M), search (band search on
# Emma, the dev text; writes tools/results/search_emma16k_q4_0.json), pride16k (a held-out novel, with the
# searched variant), pride32k (32768, Q4_0, the contenders), keycache (Pride at 16384 with f16 and q4_0 key
# caches), pride16kq4km (Q4_K_M on Pride), passkey (retrieval at 8192/16384), persuasion16k,
# persuasion16kq4km and persuasion32k (a second held-out novel), symmetric (symmetric band scales on Pride
# with f16 and q4_0 key caches), search32k (band factors searched on yarn at 32768, on Emma; writes
# tools/results/search_emma32k_q4_0.json), searched32k (that result on Pride and Persuasion at 32768),
# emma32k (32768 on Emma), population (stage search's space, base and budget, searched by CMA-ES; writes
# tools/results/population_emma16k_q4_0.json).
# A 16k window takes minutes on two cores (about 3 with its F16 reference, 8-10 with a q4_0 key cache; 32k:
# about 13): THREADS (default: all cores) and a bigger machine help.
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
# What stage `search` found (tools/results/search_emma16k_q4_0.json): band multipliers and non-symmetric band
# scales on top of the default qroar plan, searched for Q4_0 at 16384 on Emma's first window only.
SEARCHED="qroar:band_factors=1/1/1.1/1,band_scales=1/1/1/1,symmetric=false"
bench() { "${QG[@]}" bench "$MODEL" --threads "$THREADS" -q "$@"; }

stage_emma16k() { bench --ctx 8192 16384 --qtype Q4_0 --plans "${PLANS[@]}" --text "$(text Emma)" --chunks 1 --out "$OUT/smollm2-emma-16k"; }
stage_emma16kq4km() { bench --ctx 16384 --qtype Q4_K_M --plans linear ntk yarn qroar --text "$(text Emma)" --chunks 1 --out "$OUT/smollm2-emma-16k-q4km"; }
stage_search() {
    "${QG[@]}" convert "$MODEL" -o "$OUT/search-emma16k.Q4_0.gguf" --force --method qroar --ctx 16384 --qtype Q4_0 \
        --no-symmetric --search --search-space both --dev-text "$(text Emma)" --dev-chunks 1 --search-budget 14 \
        --threads "$THREADS" \
        --search-report tools/results/search_emma16k_q4_0.json
}
# The same space, base and budget as stage search, chosen by CMA-ES (generations of 6) instead of the descent
stage_population() {
    "${QG[@]}" convert "$MODEL" -o "$OUT/population-emma16k.Q4_0.gguf" --force --method qroar --ctx 16384 --qtype Q4_0 \
        --no-symmetric --search --search-strategy cmaes --search-population 6 --search-space both \
        --dev-text "$(text Emma)" --dev-chunks 1 --search-budget 14 --threads "$THREADS" \
        --search-report tools/results/population_emma16k_q4_0.json
}
stage_pride16k() { bench --ctx 16384 --qtype Q4_0 --plans "${CONTENDERS[@]}" "$SEARCHED" --text "$(text 'Pride & Prejudice')" --chunks 1 --out "$OUT/smollm2-pride-16k"; }
stage_pride32k() { bench --ctx 32768 --qtype Q4_0 --plans linear yarn qroar "$SEARCHED" --text "$(text 'Pride & Prejudice')" --chunks 1 --out "$OUT/smollm2-pride-32k"; }
stage_keycache() { bench --ctx 16384 --qtype Q4_0 --type-k f16 q4_0 --plans linear yarn "$SEARCHED" --text "$(text 'Pride & Prejudice')" --chunks 1 --out "$OUT/smollm2-pride-16k-keycache"; }
stage_pride16kq4km() { bench --ctx 16384 --qtype Q4_K_M --plans yarn "$SEARCHED" --text "$(text 'Pride & Prejudice')" --chunks 1 --out "$OUT/smollm2-pride-16k-q4km"; }
stage_passkey() { bench --ctx 8192 16384 --qtype Q4_0 --plans none yarn --passkey-trials 1 --passkey-depths 0.1 0.3 0.5 0.7 0.9 --text "$(text Emma)" --chunks 1 --out "$OUT/smollm2-passkey"; }
stage_persuasion16k() { bench --ctx 16384 --qtype Q4_0 --plans "${CONTENDERS[@]}" "$SEARCHED" --text "$(text Persuasion)" --chunks 1 --out "$OUT/smollm2-persuasion-16k"; }
stage_persuasion16kq4km() { bench --ctx 16384 --qtype Q4_K_M --plans yarn "$SEARCHED" --text "$(text Persuasion)" --chunks 1 --out "$OUT/smollm2-persuasion-16k-q4km"; }
stage_persuasion32k() { bench --ctx 32768 --qtype Q4_0 --plans yarn "$SEARCHED" --text "$(text Persuasion)" --chunks 1 --out "$OUT/smollm2-persuasion-32k"; }
# Symmetric scales leave full-precision logits unchanged, so all they can move is quantization error: band 3
# (the 12 lowest-frequency pairs) shares its q4_0 key-cache blocks with band 2, so its keys scaled by 1/a
# change those blocks' absmax. Both directions, against yarn, with each key cache.
stage_symmetric() { bench --ctx 16384 --qtype Q4_0 --type-k f16 q4_0 --plans yarn "yarn:band_scales=1/1/1/1.25" "yarn:band_scales=1/1/1/0.8" --text "$(text 'Pride & Prejudice')" --chunks 1 --out "$OUT/smollm2-pride-16k-symmetric"; }
# At 4x the 16k search result loses to yarn, so search again at the target context, from yarn (the best
# formula plan there), band factors only (band scales never helped at 16k), five candidates.
stage_search32k() {
    "${QG[@]}" convert "$MODEL" -o "$OUT/search-emma32k.Q4_0.gguf" --force --method yarn --ctx 32768 --qtype Q4_0 \
        --search --search-space factors --dev-text "$(text Emma)" --dev-chunks 1 --search-budget 5 --threads "$THREADS" \
        --search-report tools/results/search_emma32k_q4_0.json
}
stage_searched32k() {
    local plan
    plan=$("$PY" -c 'import json; r = json.load(open("tools/results/search_emma32k_q4_0.json"))
print("yarn:band_factors=" + "/".join(f"{v:g}" for v in r["best_factors"]))')
    for title in 'Pride & Prejudice' Persuasion; do
        local run=${title%% *}; run=${run,,}
        bench --ctx 32768 --qtype Q4_0 --plans yarn "$plan" --text "$(text "$title")" --chunks 1 --out "$OUT/smollm2-$run-32k-search32k"
    done
}
stage_emma32k() { bench --ctx 32768 --qtype Q4_0 --plans linear yarn qroar "$SEARCHED" --text "$(text Emma)" --chunks 1 --out "$OUT/smollm2-emma-32k"; }

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(emma16k emma16kq4km search pride16k pride32k keycache pride16kq4km passkey persuasion16k symmetric
    persuasion16kq4km persuasion32k search32k searched32k emma32k population)
for s in "${stages[@]}"; do
    echo "== stage $s ($(date +%T))" >&2
    "stage_$s"
done
