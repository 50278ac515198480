#!/usr/bin/env bash
# Post-training quantization table: RTN, AWQ and GPTQ at W8 per-channel, W4 g128 asym,
# W4 g128 sym and W3 g128 asym on SmolLM2-135M-Instruct; each student's perplexity on
# wikitext-2 test (ctx 512, CHUNKS chunks) and its size, bits per weight and wall time.
# Prints a markdown table (paste into BENCHMARKS.md).
#   CALIB_SAMPLES (default 128) x CALIB_LEN (512) calibration tokens from wiki.valid.tokens.
#   METHODS (default "rtn awq gptq"), CHUNKS (default 32), OUT (default /tmp/ptq-bench).
set -euo pipefail
CALIB_SAMPLES="${CALIB_SAMPLES:-128}"
CALIB_LEN="${CALIB_LEN:-512}"
METHODS="${METHODS:-rtn awq gptq}"
OUT="${OUT:-/tmp/ptq-bench}"
source "$(dirname "$0")/lib.sh"

read -r T_PPL T_SE _ _ < <(ppl "$MODEL")
echo "Teacher $MODEL: perplexity $T_PPL ± $T_SE (wikitext-2 test, ctx 512, $CHUNKS chunks); calibration $CALIB_SAMPLES x $CALIB_LEN tokens of wiki.valid.tokens, seed 0; $(nproc) threads, $(date -u +%F)"
echo
echo "| method | bits | group | sym | linear bpw | bytes (dense bf16) | perplexity | ratio to teacher | quant wall s | quant peak RSS MiB |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for spec in "8 per-channel asym" "4 128 asym" "4 128 sym" "3 128 asym"; do
    read -r BITS GROUP SYM <<<"$spec"
    for M in $METHODS; do
        ARGS=(--method "$M" --bits "$BITS")
        if [ "$GROUP" = per-channel ]; then ARGS+=(--per-channel); else ARGS+=(--group "$GROUP"); fi
        if [ "$SYM" = sym ]; then ARGS+=(--sym); fi
        if [ "$M" != rtn ]; then ARGS+=(--calib "$CALIB" --calib-samples "$CALIB_SAMPLES" --calib-len "$CALIB_LEN"); fi
        DIR="$OUT/$M-w$BITS-$GROUP-$SYM"
        START=$(date +%s.%N)
        /usr/bin/time -f "%M" -o "$OUT/rss" "$BIN" quant "$MODEL" "${ARGS[@]}" --format dense --out "$DIR" --force >/dev/null
        END=$(date +%s.%N)
        read -r P SE _ _ < <(ppl "$DIR")
        python3 - "$DIR" "$M" "$BITS" "$GROUP" "$SYM" "$P" "$SE" "$T_PPL" "$START" "$END" "$(tail -1 "$OUT/rss")" <<'PY'
import json, sys
d, m, bits, group, sym, p, se, t, s, e, rss = sys.argv[1:]
r = json.load(open(d + "/quant_report.json"))
print(f"| {m} | {bits} | {group} | {sym} | {r['report']['linear_bits_per_weight']:.3f} | {r['dense_bytes']} | {float(p):.4f} ± {float(se):.4f} | {float(p)/float(t):.4f} | {float(e)-float(s):.1f} | {int(rss)/1024:.0f} |")
PY
    done
done
