#!/usr/bin/env bash
# One comparison table of a teacher and its students: size, perplexity, KL divergence from
# the teacher, general (PIQA, ARC-Easy) and medical (MedQA, PubMedQA, MMLU medical) accuracy,
# speed and energy, every figure from `compress eval --json`.
#   scripts/bench/compare.sh STUDENT...      (HF folders or .gguf files)
#   TEACHER (default the SmolLM2 Q4_1 GGUF), CHUNKS (default 32), LIMIT documents per task
#   (default 200; empty for all), OUT (default /tmp/compare-bench).
# Speed and energy come from a separate `--speed` run (512-token prompt, 128 generated), so the
# teacher pass of the KLD run does not count towards a student's energy.
set -euo pipefail
LIMIT="${LIMIT-200}"
OUT="${OUT:-/tmp/compare-bench}"
source "$(dirname "$0")/lib.sh"
TEACHER="${TEACHER:-$MODEL}"
LIMIT_ARGS=()
[ -n "$LIMIT" ] && LIMIT_ARGS=(--limit "$LIMIT")
echo "Teacher $TEACHER; wikitext-2 test ctx 512, $CHUNKS chunks; tasks: ${LIMIT:-all} documents each; $(nproc) threads, $(date -u +%F)"
echo
echo "| model | bytes | bpw | perplexity | KLD mean | same top % | PIQA acc_norm | ARC-E acc | MedQA acc | PubMedQA acc | MMLU-med acc | pp tok/s | tg tok/s | J / 1k tokens |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
i=0
for M in "$TEACHER" "$@"; do
    i=$((i + 1))
    "$BIN" eval "$M" --teacher "$TEACHER" --ppl "$TEXT" --ctx 512 --chunks "$CHUNKS" \
        --tasks piqa,arc_easy,medqa,pubmedqa,mmlu_medical --data-dir "$COMPRESS_DATA" "${LIMIT_ARGS[@]}" \
        --force --json "$OUT/q$i.json" >/dev/null
    "$BIN" eval "$M" --speed --force --json "$OUT/s$i.json" >/dev/null
    python3 - "$M" "$OUT/q$i.json" "$OUT/s$i.json" <<'PY'
import json, sys
m, q, s = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
t, k, z, sp, e = q["tasks"], q["kld"], q["size"], s["speed"], s["energy"]
acc = lambda n, f="acc": f"{100*t[n][f]:.1f} ± {100*t[n][f + '_stderr']:.1f}"
print(f"| {m} | {z['bytes']} | {z['bits_per_weight']:.2f} | {q['perplexity']['value']:.3f} | {k['mean']:.4f} | "
      f"{k['top1_agreement']:.1f} | {acc('piqa', 'acc_norm')} | {acc('arc_easy')} | {acc('medqa')} | {acc('pubmedqa')} | "
      f"{acc('mmlu_medical')} | {sp['pp_tokens_per_second']:.0f} | {sp['tg_tokens_per_second']:.1f} | "
      f"{e['joules_per_1k_tokens']:.0f} ({e['source']}) |")
PY
done
