#!/usr/bin/env bash
# Generation speed of SmolLM2 on compress's decoder (f32 weights, KV cache):
#   single  `compress eval --speed`: a PP-token prompt, then TG greedy tokens, one sequence;
#   batched `compress generate --calib N`: N sequences sampled together from BOS, LEN tokens
#           each (how data-free calibration generates).
# Prints tokens/s, wall and CPU seconds of each, and batched / single throughput.
#   THREADS (default: all cores), PP (512), TG (128), N (32), LEN (128), OUT (default: a temp dir)
#   LLAMA_BENCH (optional): a llama-bench binary built by hand from llama.cpp (this repository
#   builds no peer). With it, single-sequence decoding is paired with llama.cpp's: the model
#   converted to an F32 GGUF (`compress convert --type f32`), then ROUNDS (default 3) rounds
#   of ours (`eval --speed`, TG tokens after a PP-token prompt) and llama-bench (`-d PP -n TG`:
#   TG tokens generated after PP tokens of context,
#   one repetition, same threads) in alternation, so both see the same machine; prints each
#   round and the medians.
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

if [[ -n "${LLAMA_BENCH:-}" ]]; then
    [[ -x "$LLAMA_BENCH" ]] || { echo "error: LLAMA_BENCH=$LLAMA_BENCH is not an executable" >&2; exit 1; }
    F32="$OUT/model-f32.gguf"
    [[ -f "$F32" ]] || "$BIN" convert "$MODEL" "$F32" --type f32 --force >/dev/null
    TH="${THREADS:-$(nproc)}"
    echo
    echo "| round | ours tok/s (f32 reference engine) | llama.cpp F32 tok/s (llama-bench -d $PP -n $TG) |"
    echo "|---|---|---|"
    OURS_ALL=() PEER_ALL=()
    for r in $(seq 1 "${ROUNDS:-3}"); do
        "$BIN" eval "$MODEL" --speed --pp "$PP" --tg "$TG" --threads "$TH" \
            --json "$OUT/pair.json" --force >/dev/null
        O=$(python3 -c "import json;print('%.2f'%json.load(open('$OUT/pair.json'))['speed']['tg_tokens_per_second'])")
        "$LLAMA_BENCH" -m "$F32" -p 0 -d "$PP" -n "$TG" -t "$TH" -r 1 -o json >"$OUT/llama.json" 2>"$OUT/llama.log" ||
            { echo "error: llama-bench failed ($OUT/llama.log)" >&2; tail -3 "$OUT/llama.log" >&2; exit 1; }
        P=$(python3 -c "import json;print('%.2f'%[x for x in json.load(open('$OUT/llama.json')) if x['n_gen'] > 0][0]['avg_ts'])")
        echo "| $r | $O | $P |"
        OURS_ALL+=("$O") PEER_ALL+=("$P")
    done
    python3 - "${OURS_ALL[*]}" "${PEER_ALL[*]}" <<'EOF2'
import statistics, sys
o, p = (list(map(float, a.split())) for a in sys.argv[1:3])
mo, mp = statistics.median(o), statistics.median(p)
print(f"\nmedians: ours {mo:.2f} tok/s, llama.cpp F32 {mp:.2f} tok/s, ours / llama.cpp {mo / mp:.2f}")
EOF2
fi
