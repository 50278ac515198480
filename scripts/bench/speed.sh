#!/usr/bin/env bash
# Generation speed of SmolLM2 on compress's decoder (f32 weights, KV cache):
#   single  `compress eval --speed`: a PP-token prompt, then TG greedy tokens, one sequence;
#   batched `compress generate --calib N`: N sequences sampled together from BOS, LEN tokens
#           each (how data-free calibration generates).
# Prints tokens/s, wall and CPU seconds of each, and batched / single throughput.
#   THREADS (default: all cores), PP (512), TG (128), N (32), LEN (128), OUT (default: a temp dir)
# No peer runs here: llama.cpp's F32 decode has to be built by hand to compare (BENCHMARKS.md).
set -euo pipefail
OUT="${OUT:-$(mktemp -d /tmp/bench-speed.XXXXXX)}"
source "$(dirname "$0")/lib.sh"
PP="${PP:-512}" TG="${TG:-128}" N="${N:-32}" LEN="${LEN:-128}"
T=()
[[ -n "${THREADS:-}" ]] && T=(--threads "$THREADS")
# cost FILE: "wall cpu" from a /usr/bin/time -f "%e %U %S" file.
cost() { awk 'END{printf "%.1f %.1f\n", $1, $2 + $3}' "$1"; }

/usr/bin/time -f "%e %U %S" -o "$OUT/single.time" "$BIN" eval "$MODEL" --speed --pp "$PP" --tg "$TG" \
    "${T[@]}" --json "$OUT/single.json" --force >/dev/null
SINGLE=$(python3 -c "import json;print('%.2f'%json.load(open('$OUT/single.json'))['speed']['tg_tokens_per_second'])")
rm -f "$OUT/calib.json" "$OUT/calib.txt"
/usr/bin/time -f "%e %U %S" -o "$OUT/batched.time" "$BIN" generate "$MODEL" --calib "$N" --calib-len "$LEN" \
    --seed 0 "${T[@]}" --out "$OUT/calib.json" >"$OUT/batched.log" 2>&1
BATCHED=$(grep -o '([0-9.]* tok/s)' "$OUT/batched.log" | tr -d '(' | cut -d' ' -f1)
read -r SW SC < <(cost "$OUT/single.time")
read -r BW BC < <(cost "$OUT/batched.time")
echo "| run | tokens | tok/s | wall s | CPU s |"
echo "|---|---|---|---|---|"
echo "| single sequence, greedy ($PP-token prompt) | $TG | $SINGLE | $SW | $SC |"
echo "| $N sequences together, sampled from BOS | $((N * LEN)) | $BATCHED | $BW | $BC |"
python3 -c "print('batched / single throughput: %.2fx' % ($BATCHED / $SINGLE))"
